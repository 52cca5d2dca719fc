"""Fault injection with a real tritonserver (tiny checkpoint): a UNet call that raises, a VAE
call that raises, a client whose stream breaks at the last step (the sink's send raising, and a
real client closing its stream), and the pipeline's python stub process killed mid-load. For
each: which requests fail with which code, that none is answered twice (the engine's counters
match what the clients got) and that none hangs (each ends within its client timeout).

Model faults come from the LDM_FAULTS test hook (serving/core/faults.py), set for the server's
process only. The outcomes are tabled in docs/reliability.md ("Fault injection")."""

from concurrent.futures import ThreadPoolExecutor
import os
import queue
import signal

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.client.kserve import LdmClient, infer_inputs, request_arrays
from serving.core.faults import FAULTS_ENV
from tests.support.server_metrics import metrics, wait_for

TIMEOUT_S = 60.0  # every request must end within this (the tiny model answers in well under a second)


def outcome(url, prompt="a red circle", **fields):
    """'image' or the error's code, for one request on its own gRPC stream."""
    with LdmClient(url, "grpc", timeout_s=TIMEOUT_S) as client:
        try:
            client.run(prompt, **fields)
            return "image", ""
        except InferenceServerException as exc:
            assert exc.status() != "DEADLINE_EXCEEDED", "a request hung"
            return str(exc.status()), str(exc.message())


def counters(server):
    m = metrics(server)
    return {k: m.get(f"ldm_{k}_total", 0) for k in ("images_completed", "failures", "cancellations")}


def test_a_faulty_sink_passes_the_steers_a_step_applied():
    """A steered job's progress carries `steer_applied`: the wrapper must take and pass it."""
    from serving.core.faults import FaultPlan
    from tests.support.fakes import RecordingSink

    inner = RecordingSink()
    sink = FaultPlan("finish_raise_at_call=2").sink(inner)
    sink.progress(3, 10, None, (1, 2))
    sink.progress(4, 10, None)
    assert inner.steered == [(3, (1, 2))] and inner.progress_log == [(3, 10), (4, 10)]


@pytest.fixture(scope="module")
def faulty_server(tiny_repo, triton_servers):
    """A server of this module's own: its faults are injected through its environment."""
    plan = "unet_raise_at_call=3,vae_raise_at_call=2,finish_raise_at_call=3"
    with triton_servers.running(tiny_repo, "tritonserver-faults", env={FAULTS_ENV: plan}) as server:
        yield server


def test_model_and_delivery_faults_touch_their_own_requests_alone(faulty_server):
    url = faulty_server.grpc_url
    # UNet call 3 raises: the request in that call (alone here) fails with INTERNAL
    code, message = outcome(url, steps=4, seed=1)
    assert code == "INTERNAL" and "denoising step failed: injected fault: unet call 3" in message
    assert outcome(url, steps=2, seed=2)[0] == "image"  # VAE call 1, finish call 1
    # VAE call 2 raises
    code, message = outcome(url, steps=2, seed=3)
    assert code == "INTERNAL" and "VAE decoding failed: injected fault: vae call 2" in message
    # finish call 3 raises (a client gone at the last step): of two batch-mates that finish
    # together or one after the other, that one alone fails; the other gets its image
    with ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(lambda seed: outcome(url, steps=3, seed=seed), (4, 5)))
    assert sorted(code for code, _ in pair) == ["INTERNAL", "image"], pair
    assert (
        "the image could not be delivered: injected fault: finish call 3" in [m for c, m in pair if c == "INTERNAL"][0]
    )
    assert outcome(url, steps=2, seed=6)[0] == "image"
    # none answered twice, none lost: 3 images and 3 failures, as the clients saw
    assert wait_for(
        lambda: counters(faulty_server)["images_completed"] == 3 and counters(faulty_server)["failures"] == 3
    ), counters(faulty_server)


def test_a_client_that_closes_its_stream_at_the_last_step_touches_nothing_else(faulty_server):
    before = counters(faulty_server)
    client = grpcclient.InferenceServerClient(faulty_server.grpc_url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = infer_inputs(request_arrays("a red circle", seed=7, steps=4, progress_every=1))
    with ThreadPoolExecutor(1) as pool:  # a batch-mate on its own stream
        mate = pool.submit(outcome, faulty_server.grpc_url, steps=6, seed=8)
        client.async_stream_infer("pipeline", inputs)
        while True:  # progress 1, 2, 3 of 4: leave before the last step's image
            result, error = responses.get(timeout=TIMEOUT_S)
            assert error is None
            if int(result.as_numpy("step")[0]) == 3:
                break
        client.stop_stream(cancel_requests=True)
        client.close()
        assert mate.result(TIMEOUT_S)[0] == "image"
    # the closed request ended once: as cancelled, or as an image whose send found no client
    assert wait_for(lambda: sum(counters(faulty_server).values()) == sum(before.values()) + 2), counters(faulty_server)
    assert outcome(faulty_server.grpc_url, steps=2, seed=9)[0] == "image"


def test_killing_the_pipeline_stub_mid_load(tiny_repo, triton_servers):
    """What Triton 2.51's python backend does when the stub process of the decoupled `pipeline`
    dies, as this test found it (docs/reliability.md tables it): the requests the stub held get
    no answer at all (their response senders died with it) and end at their client's timeout
    (DEADLINE_EXCEEDED from serving.client); later requests fail at once with "Stub process
    'pipeline_0_0' is not healthy." (no status over a gRPC stream); Triton neither restarts the
    stub nor marks the model unready: server and model keep reporting ready. Only a probe that
    runs a generation notices. The assertions pin that behaviour, so a Triton that changes it
    fails here and gets looked at."""
    # a server of this test's own (its stub is killed), stopped here: how it stops is asserted
    server = triton_servers.start(tiny_repo, "tritonserver-stub-killed")
    client_timeout_s = 10.0  # none of these gets an answer: keep the waits short
    try:
        [stub] = server.stub_pids()
        started = queue.Queue()

        def request(seed, steps, on_progress=None):
            with LdmClient(server.grpc_url, "grpc", timeout_s=client_timeout_s) as client:
                try:
                    client.run("a red circle", seed=seed, steps=steps, progress_every=1, on_progress=on_progress)
                    return "image", ""
                except InferenceServerException as exc:
                    return str(exc.status()), str(exc.message())[:200]

        def first_progress(generation):
            if len(generation.progress) == 1:
                started.put(True)

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(request, seed, 150, first_progress) for seed in range(3)]
            for _ in futures:
                started.get(timeout=TIMEOUT_S)  # all three mid-generation
            os.kill(stub, signal.SIGKILL)
            held = [f.result(client_timeout_s + 30) for f in futures]  # each ends by its client's timeout
        later = [request(7 + i, 2) for i in range(3)]
        with httpclient.InferenceServerClient(server.http_url) as http:
            ready = http.is_server_ready(), http.is_model_ready("pipeline")
        print(
            f"\nkilled the pipeline stub {stub}: held requests {held}; later requests {later}; "
            f"server, model ready {ready}; pipeline stubs now {server.stub_pids()}"
        )
        assert [code for code, _ in held] == ["DEADLINE_EXCEEDED"] * 3
        assert all(code != "image" and "is not healthy" in message for code, message in later)
        assert ready == (True, True) and server.stub_pids() == []
    finally:
        assert server.stop() is not None  # and the server still stops, its process group killed
