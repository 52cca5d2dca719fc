"""Client-side gRPC balancing (option B of docs/deploy.md): one channel, a sub-connection per
replica, calls rotated round robin. In the cluster the target is the headless Service,
`dns:///ldm-triton-headless.ldm-serving.svc.cluster.local:50051` (one DNS record per Ready
pod, each pod's gateway); on loopback it is a static list, `ipv4:127.0.0.1:P1,127.0.0.1:P2`.
The balancing policy is the same, given by the gRPC service config below.
"""

import json

from serving.client.images import ImagesClient
from serving.client.retry import RetryPolicy

SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}]}
CHANNEL_OPTIONS = [("grpc.service_config", json.dumps(SERVICE_CONFIG))]


def loopback_target(addresses: list[str]) -> str:
    return "ipv4:" + ",".join(addresses)


def round_robin_client(
    target: str, timeout_s: float = 600.0, policy: RetryPolicy = RetryPolicy(), api_key: str | None = None
) -> ImagesClient:
    """An ImagesClient whose channel balances per call over every address of `target`."""
    return ImagesClient(target, api_key=api_key, timeout_s=timeout_s, policy=policy, channel_options=CHANNEL_OPTIONS)
