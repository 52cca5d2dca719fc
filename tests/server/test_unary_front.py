"""The unary front `pipeline_unary` against a real tritonserver: its own bound on requests in
flight (`max_in_flight`, each holds a forwarding thread) answers UNAVAILABLE at once when it is
full, and frees its places as requests end. (Its cancellation: tests/server/test_streaming.py
test_unary_grpc_cancel_reaches_the_engine; Triton 2.51's HTTP endpoint does not notice a client
that disconnects, see serving/triton/forwarding.py: the gateway cancels on disconnect,
tests/gateway/test_gateway_rest.py.)"""

from concurrent.futures import ThreadPoolExecutor
import shutil
import time

import pytest
from tritonclient.utils import InferenceServerException

from export.triton_config import to_pbtxt, unary_config
from serving.client.kserve import LdmClient
from tests.support.server_metrics import metrics, wait_for

LIMIT = 2


@pytest.fixture(scope="module")
def front_server(tiny_repo, tmp_path_factory, triton_servers):
    repo = tmp_path_factory.mktemp("front") / "repo"
    shutil.copytree(tiny_repo, repo)
    (repo / "pipeline_unary" / "config.pbtxt").write_text(to_pbtxt(unary_config(max_in_flight=LIMIT)))
    with triton_servers.running(repo, "tritonserver-front") as server:
        yield server


def test_a_full_front_answers_unavailable_at_once_and_frees_its_places(front_server):
    def long_request(seed):
        with LdmClient(front_server.http_url, "http", timeout_s=300) as client:
            return client.generate("a red circle", seed=seed, steps=150, height=64, width=64)

    with ThreadPoolExecutor(LIMIT) as pool:
        running = [pool.submit(long_request, seed) for seed in range(LIMIT)]
        # both are in the engine (the front forwarded them): the front is full
        assert wait_for(lambda: metrics(front_server)["ldm_active_requests"] == LIMIT, timeout=120)
        with LdmClient(front_server.http_url, "http") as client:
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as info:
                client.generate("a blue square", steps=2)
            refused_after = time.monotonic() - started
        assert info.value.status() == "UNAVAILABLE" and f"{LIMIT} HTTP/unary requests in flight" in info.value.message()
        # refused by the front, not after the two: they are still running
        assert not any(f.done() for f in running), refused_after
        assert all(f.result().shape == (64, 64, 3) for f in running)
    with LdmClient(front_server.http_url, "http") as client:  # places freed
        assert client.generate("a blue square", steps=2).shape == (32, 32, 3)
