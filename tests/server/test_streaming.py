"""Streaming, cancellation, deadlines, overload and metrics against a real tritonserver."""

from concurrent.futures import ThreadPoolExecutor
import queue
import shutil
import threading
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.cli import pipeline_parameters
from export.repository import write_pipeline_config
from serving.client.kserve import LdmClient, infer_inputs, request_arrays
from tests.support.server_metrics import idle_metrics, metrics, wait_for

MAX_ACTIVE, MAX_QUEUE = 2, 4


@pytest.fixture(scope="module")
def small_server(tiny_repo, tmp_path_factory, triton_servers):
    """The tiny model with a small admission bound, to overload it on purpose."""
    repo = tmp_path_factory.mktemp("small") / "repo"
    shutil.copytree(tiny_repo, repo)
    params = pipeline_parameters(max_active=MAX_ACTIVE, max_queue=MAX_QUEUE)
    write_pipeline_config(repo, params)
    with triton_servers.running(repo, "tritonserver-small") as server:
        yield server


def test_stream_reports_progress_and_previews_then_the_image(server):
    with LdmClient(server.grpc_url) as client:
        result = client.run("a red circle", seed=2, steps=10, progress_every=2, preview_every=5)
    assert result.progress == [(2, 10), (4, 10), (5, 10), (6, 10), (8, 10)]
    assert len(result.previews) == 1 and result.previews[0].shape == (8, 8, 3)
    assert result.image.shape == (32, 32, 3)


def test_closing_the_stream_cancels_the_request_within_a_step(server):
    before = idle_metrics(server)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = infer_inputs(request_arrays("a red circle", seed=1, steps=150, progress_every=1))
    client.async_stream_infer("pipeline", inputs)
    for _ in range(3):
        result, error = responses.get(timeout=30)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_for(lambda: metrics(server)["ldm_cancellations_total"] == before["ldm_cancellations_total"] + 1)
    after = metrics(server)
    assert after["ldm_active_requests"] == 0
    # it left before its 150 steps (tiny steps take ~ms, so how many ran before the cancel
    # arrived depends on the machine; "within one step" is checked in test_engine.py)
    assert after["ldm_unet_steps_total"] - before["ldm_unet_steps_total"] < 150
    with LdmClient(server.grpc_url) as again:
        assert again.generate("a blue circle", steps=2).shape == (32, 32, 3)


def test_timeout_ends_the_request_with_a_coded_error(server):
    # 0.1 ms: passed before the first step on any machine (the text encoder's BLS call alone
    # takes longer), so the test does not depend on how long 150 steps take
    with LdmClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.generate("a red circle", steps=150, timeout_s=1e-4)
    assert info.value.status() == "UNAVAILABLE" and "deadline exceeded" in info.value.message()
    with LdmClient(server.http_url, "http") as client:
        with pytest.raises(InferenceServerException) as info:
            client.generate("a red circle", steps=150, timeout_s=1e-4)
    assert info.value.status() == "UNAVAILABLE"


def test_burst_of_five_times_capacity_every_request_ends(small_server):
    capacity = MAX_ACTIVE + MAX_QUEUE
    burst = 5 * capacity

    def one(i):
        protocol, url = ("grpc", small_server.grpc_url) if i % 3 else ("http", small_server.http_url)
        with LdmClient(url, protocol, timeout_s=120) as client:
            try:
                image = client.generate("a red circle", seed=i, steps=60)
                return "image" if image.shape == (32, 32, 3) else "bad image"
            except InferenceServerException as exc:
                return exc.status()

    with ThreadPoolExecutor(burst) as pool:
        outcomes = list(pool.map(one, range(burst)))
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print("burst outcomes:", counts)
    assert set(outcomes) <= {"image", "UNAVAILABLE"}, counts
    # at least the queue's worth is accepted (more when the engine admits some mid-burst)
    assert counts.get("image", 0) >= MAX_QUEUE and counts.get("UNAVAILABLE", 0) >= 1, counts

    # metrics are copied out every 0.5 s
    def observed():
        m = metrics(small_server)
        return m["ldm_images_completed_total"], m["ldm_rejections_total"]

    expected = (counts["image"], counts["UNAVAILABLE"])
    assert wait_for(lambda: observed() == expected, timeout=5), (observed(), expected)
    assert urllib.request.urlopen(f"http://{small_server.http_url}/v2/health/ready").status == 200


def test_http_burst_is_batched_and_the_overflow_is_refused_at_once(small_server):
    """Over Triton's HTTP endpoint (the unary front), 5x capacity at once: the accepted requests
    share the engine (more than the front's old 4 at a time would allow is not needed: the
    queue's worth is), and every refused one is answered before the first image is ready, not
    held in a queue in front of the pipeline."""
    capacity = MAX_ACTIVE + MAX_QUEUE
    burst = 5 * capacity
    answers = queue.Queue()  # outcomes in the order they come back
    clients = [LdmClient(small_server.http_url, "http", timeout_s=300) for _ in range(burst)]
    go = threading.Barrier(burst)  # clients are made first; then all requests leave together

    def one(i):
        go.wait()
        try:
            clients[i].generate("a red circle", seed=i, steps=150)
            answers.put("image")
        except InferenceServerException as exc:
            answers.put(exc.status())

    with ThreadPoolExecutor(burst) as pool:
        list(pool.map(one, range(burst)))
    for client in clients:
        client.close()
    order = [answers.get_nowait() for _ in range(burst)]
    counts = {o: order.count(o) for o in set(order)}
    print("HTTP burst outcomes in order of arrival:", order)
    assert set(order) <= {"image", "UNAVAILABLE"}, counts
    assert counts.get("image", 0) >= MAX_QUEUE and counts.get("UNAVAILABLE", 0) >= 1, counts
    first_image = order.index("image")
    assert "UNAVAILABLE" not in order[first_image:], order
    assert urllib.request.urlopen(f"http://{small_server.http_url}/v2/health/ready").status == 200


def test_unary_grpc_cancel_reaches_the_engine(small_server):
    """A unary gRPC client that cancels: Triton marks the front's request cancelled, the front
    sends the pipeline a cancel message, and the engine drops the job. The job is held in the
    admission queue (both active slots busy with long streams) so it cannot finish first."""
    running = [threading.Event() for _ in range(MAX_ACTIVE)]

    def blocker(started):
        with LdmClient(small_server.grpc_url) as client:
            client.run(
                "a blue square",
                steps=150,
                height=64,
                width=64,
                progress_every=1,
                on_progress=lambda generation: started.set(),
            )

    with ThreadPoolExecutor(MAX_ACTIVE) as pool:
        blockers = [pool.submit(blocker, started) for started in running]
        assert all(started.wait(60) for started in running)
        before = metrics(small_server)
        client = grpcclient.InferenceServerClient(small_server.grpc_url)
        inputs = infer_inputs(request_arrays("a red circle", seed=1, steps=150))
        call = client.async_infer("pipeline_unary", inputs, callback=lambda result, error: None)
        assert wait_for(lambda: metrics(small_server)["ldm_queue_length"] >= 1)
        call.cancel()
        assert wait_for(
            lambda: metrics(small_server)["ldm_cancellations_total"] == before["ldm_cancellations_total"] + 1
        )
        for b in blockers:
            b.result()
    assert wait_for(lambda: metrics(small_server)["ldm_active_requests"] == 0)
    client.close()
    with LdmClient(small_server.http_url, "http") as again:
        assert again.generate("a blue circle", steps=2).shape == (32, 32, 3)


def test_metrics_describe_the_batch(server):
    with LdmClient(server.grpc_url) as client:
        client.generate("a red circle", steps=4, guidance_scale=5.0)
    assert wait_for(lambda: metrics(server)["ldm_unet_rows_last_step"] >= 2, timeout=5)
    m = metrics(server)
    for name in (
        "ldm_queue_length",
        "ldm_active_requests",
        "ldm_step_latency_last_seconds",
        "ldm_images_completed_total",
        "ldm_cancellations_total",
        "ldm_rejections_total",
        "ldm_unet_rows_total",
        "ldm_step_seconds_total",
    ):
        assert name in m
    assert m["ldm_unet_rows_total"] >= m["ldm_unet_steps_total"] > 0  # 1 row per job without guidance, 2 with


def test_served_image_is_the_same_alone_and_in_a_crowd(server):
    target = dict(prompt="a large red circle on the left", seed=77, steps=15, guidance_scale=5.0)
    crowd = [
        dict(prompt=p, seed=i, steps=s, guidance_scale=g, eta=e)
        # long enough (tiny steps take milliseconds) that they overlap the target on any machine
        for i, (p, s, g, e) in enumerate(
            [
                ("a blue square", 130, 7.5, 0.0),
                ("a green star", 125, 1.0, 0.0),
                ("a yellow circle", 140, 3.0, 0.5),
                ("two cats", 135, 5.0, 1.0),
                ("a white circle", 130, 9.0, 0.0),
                ("a black square", 128, 5.0, 0.0),
                ("an orange star", 133, 2.0, 0.3),
                ("a purple circle", 126, 5.0, 0.0),
            ]
        )
    ]
    with LdmClient(server.grpc_url) as client:
        alone = client.generate(**target)

    started = [threading.Event() for _ in crowd]

    def one(fields, started=None):
        with LdmClient(server.grpc_url) as client:
            if started is None:
                return client.generate(**fields)
            return client.run(progress_every=1, on_progress=lambda _: started.set(), **fields).image

    before = idle_metrics(server)
    with ThreadPoolExecutor(len(crowd) + 1) as pool:
        futures = [pool.submit(one, fields, event) for fields, event in zip(crowd, started)]
        assert all(event.wait(120) for event in started)  # the crowd is mid-flight when the target arrives
        together = pool.submit(one, target).result()
        assert all(f.result().shape == (32, 32, 3) for f in futures)
    assert wait_for(lambda: metrics(server)["ldm_unet_steps_total"] > before["ldm_unet_steps_total"])
    after = metrics(server)
    mean_rows = (after["ldm_unet_rows_total"] - before["ldm_unet_rows_total"]) / (
        after["ldm_unet_steps_total"] - before["ldm_unet_steps_total"]
    )
    assert mean_rows > 3, mean_rows  # requests really shared UNet calls
    assert together.tobytes() == alone.tobytes()  # bit-identical, as the README says
