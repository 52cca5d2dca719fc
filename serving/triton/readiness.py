"""`ldm ready`: whether the pipeline would take a generation now (a readiness probe).

Triton's own readiness (`/v2/health/ready`, the model's ready flag) stays true after a drain
message has stopped the pipeline's engine: the python backend of Triton 2.51 cannot mark its
model unready, and unloading it needs Triton's explicit model-control mode, which opens the
repository API. So this asks the engine itself with a status message (serving/triton/control.py;
it needs no secret): ready when Triton says the model is ready and the engine admits."""

import queue

DEFAULT_URL = "127.0.0.1:8001"


def engine_ready(url: str, timeout_s: float = 5.0) -> tuple:
    """(ready, why) for the pipeline at Triton gRPC address `url`."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from serving.triton.control import STATUS_PARAMETER

    client = grpcclient.InferenceServerClient(url)
    try:
        if not client.is_model_ready("pipeline", client_timeout=timeout_s):
            return False, "Triton: the pipeline model is not ready"
        answers = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        prompt = grpcclient.InferInput("prompt", [1], "BYTES")  # the status message ignores it
        prompt.set_data_from_numpy(np.array([b""], dtype=np.object_))
        client.async_stream_infer("pipeline", [prompt], parameters={STATUS_PARAMETER: "1"})
        result, error = answers.get(timeout=timeout_s)
        if error is not None:
            return False, f"status message failed: {error}"
        accepting = result.as_numpy("accepting")
        if accepting is None:
            return False, "the pipeline does not answer status messages (export it again)"
        if not accepting[0]:
            return False, "the engine admits nothing (drained or stopped)"
        return True, f"ready: {int(result.as_numpy('active')[0])} active, {int(result.as_numpy('queued')[0])} queued"
    except (InferenceServerException, queue.Empty) as exc:
        return False, f"Triton at {url} did not answer: {exc or 'timeout'}"
    finally:
        client.stop_stream()
        client.close()


def add_arguments(parser):
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton's gRPC address (default: %(default)s)")
    parser.add_argument(
        "--timeout-s", type=float, default=5.0, help="how long to wait for answers (default: %(default)s)"
    )


def run(args) -> int:
    ready, why = engine_ready(args.url, args.timeout_s)
    print(why, flush=True)
    return 0 if ready else 1
