"""Fuzzing a real tritonserver (the session's, tiny checkpoint) over its KServe endpoints: the
decoupled `pipeline` over a gRPC stream, and `pipeline_unary` over HTTP, with the hostile
inputs of tests/support/fuzz_inputs.py sent as raw tensors (no client-side checks). Every request ends
in one answer within its timeout: an image, or an error naming a field (Triton's own checks of
dtype, shape and unknown inputs name the input too); the server stays ready; the images the
clients received are exactly those the engine counted as completed."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import queue

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.support.fuzz_inputs import ALIASES, EXTRA_NAMES, SPECS, check_answer, request_inputs
from serving.core.errors import parse_coded_message
from tests.support.server_metrics import idle_metrics, metrics, wait_for

TIMEOUT_S = 120.0  # no request may take longer (the tiny model answers in well under a second)
BATCH = 10  # requests in flight at once, one client each
# Triton's refusals: gRPC status, HTTP status, and none on a stream (stream errors lose their status)
TRITON_INVALID = ("INVALID_ARG", "StatusCode.INVALID_ARGUMENT", "400", "None")


def tensors(module, inputs):
    out = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        if value.dtype == object and module is httpclient:
            tensor.set_data_from_numpy(value, binary_data=True)
        else:
            tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out


def over_grpc(url, inputs):
    """(image, error) from one request on its own stream to the decoupled pipeline."""
    client = grpcclient.InferenceServerClient(url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("pipeline", tensors(grpcclient, inputs))
        while True:
            result, error = responses.get(timeout=TIMEOUT_S)  # queue.Empty: a request that hung
            if error is not None:
                return None, _error(error)
            if result.as_numpy("image") is not None:
                return result.as_numpy("image"), None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def over_http(url, inputs):
    client = httpclient.InferenceServerClient(url, network_timeout=TIMEOUT_S, connection_timeout=TIMEOUT_S)
    try:
        result = client.infer("pipeline_unary", tensors(httpclient, inputs))
        return result.as_numpy("image"), None
    except InferenceServerException as exc:
        return None, _error(exc)
    finally:
        client.close()


def _error(exc):
    code, message = parse_coded_message(str(exc.message()))
    return (code or str(exc.status()), message)


def classify(inputs, image, error):
    """check_answer, and for Triton's own refusals (before the pipeline sees the request):
    INVALID_ARG naming one of the request's inputs."""
    if (
        error is not None
        and error[0] in TRITON_INVALID
        and ALIASES.get(error[1].split(":")[0].split("[")[0], error[1].split(":")[0].split("[")[0]) not in SPECS
    ):
        named = [n for n in (*SPECS, *EXTRA_NAMES) if f"'{n}'" in error[1]]
        assert named, error  # e.g. unexpected datatype TYPE_FP64 for inference input 'steps'
        return "triton INVALID_ARG"
    if error is not None and error[0] in TRITON_INVALID:
        error = ("INVALID_ARG", error[1])
    return check_answer(inputs, image, error)


def fuzz_server(server, cases_per_protocol):
    before = idle_metrics(server)
    tally, images = Counter(), Counter()
    send = {"grpc": lambda i: over_grpc(server.grpc_url, i), "http": lambda i: over_http(server.http_url, i)}

    # half the requests of the contract's dtypes and shapes, so that they reach the pipeline
    grpc_inputs = st.one_of(request_inputs(streaming=True), request_inputs(streaming=True, typed=True))
    http_inputs = st.one_of(request_inputs(streaming=False), request_inputs(streaming=False, typed=True))

    @settings(
        max_examples=cases_per_protocol // BATCH,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(
        grpc_batch=st.lists(grpc_inputs, min_size=BATCH, max_size=BATCH),
        http_batch=st.lists(http_inputs, min_size=BATCH, max_size=BATCH),
    )
    def fuzz(grpc_batch, http_batch):
        work = [("grpc", i) for i in grpc_batch] + [("http", i) for i in http_batch]
        with ThreadPoolExecutor(len(work)) as pool:
            answers = list(pool.map(lambda w: send[w[0]](w[1]), work))
        for (protocol, inputs), (image, error) in zip(work, answers):
            outcome = classify(inputs, image, error)
            tally[f"{protocol} {outcome}"] += 1
            images[protocol] += outcome == "image"

    fuzz()
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert (
            client.is_server_ready() and client.is_model_ready("pipeline") and client.is_model_ready("pipeline_unary")
        )
    # no image answered twice, none lost: the engine's count moved by exactly what clients got
    completed = before.get("ldm_images_completed_total", 0) + sum(images.values())
    assert wait_for(lambda: metrics(server).get("ldm_images_completed_total") == completed), (
        metrics(server),
        completed,
    )
    return tally


def report(tally):
    total = sum(tally.values())
    print(
        f"\nfuzz over gRPC and HTTP: {total} requests; outcomes: "
        + ", ".join(f"{k} {v}" for k, v in tally.most_common())
    )


def test_fuzz_server_over_grpc_and_http(server):
    tally = fuzz_server(server, 60)
    report(tally)
    assert sum(tally.values()) == 120 and tally["grpc image"] > 0 and tally["http image"] > 0


@pytest.mark.slow
def test_fuzz_server_1000_requests(server):
    tally = fuzz_server(server, 500)  # 500 over gRPC, 500 over HTTP
    report(tally)
    assert sum(tally.values()) == 1000
