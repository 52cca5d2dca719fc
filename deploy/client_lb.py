"""Client-side gRPC balancing (option B of docs/deploy.md): one channel, a sub-connection
per replica, calls rotated round robin. In the cluster the target is the headless Service,
`dns:///ldm-triton-headless.ldm-serving.svc.cluster.local:8001` (one DNS record per Ready
pod); on loopback it is a static list, `ipv4:127.0.0.1:P1,127.0.0.1:P2`. The balancing policy
is the same, given by the gRPC service config below.
"""
import json

from serving.client.kserve import LdmClient

SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}]}
# tritonclient's own defaults (no message size limit) must be repeated: passing channel_args
# replaces them, and gRPC's default 4 MiB would cut large images.
_MAX = 2**31 - 1
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX),
    ("grpc.max_receive_message_length", _MAX),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]


def loopback_target(addresses: list[str]) -> str:
    return "ipv4:" + ",".join(addresses)


def round_robin_client(target: str, timeout_s: float = 600.0) -> LdmClient:
    """An LdmClient whose gRPC channel balances per call over every address of `target`."""
    return LdmClient(target, protocol="grpc", timeout_s=timeout_s, channel_args=CHANNEL_ARGS)
