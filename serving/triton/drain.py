"""Draining a running server before it stops (`ldm drain`; `ldm serve` does it on SIGTERM).

Why a message and not Triton's own shutdown: on SIGTERM tritonserver 2.51 refuses every new
inference at once, the pipeline's own BLS calls to text_encoder and vae_decoder included, and
unloads the component models, so a generation in flight fails at its VAE decode ("Server not
ready"). So the drain happens first, while Triton still serves: a drain message to the
`pipeline` model (a request whose parameter DRAIN_PARAMETER carries the grace in seconds)
makes its engine refuse new requests at once (UNAVAILABLE "server is shutting down", which
clients retry elsewhere), answers the message with one empty response once nothing more is
admitted, lets the generations in flight finish for up to the grace, fails those left with
UNAVAILABLE, and then answers the message's final response. Only then is tritonserver told to
stop, and it has nothing left in flight.

A drain message is a control message: it carries the control secret (serving/triton/control.py),
which `ldm drain` reads from LDM_CONTROL_SECRET, else the file LDM_CONTROL_SECRET_FILE names, else
the file `ldm serve` left for the server on that gRPC port.
"""

import queue
import time

from serving.triton.control import CONTROL_PARAMETER, secret_file, secret_from_env

# request parameter of a drain message to `pipeline`: the grace period in seconds (a string)
DRAIN_PARAMETER = "drain_grace_s"
DEFAULT_GRACE_S = 120.0


def add_arguments(parser):
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton's gRPC address (default: %(default)s)")
    parser.add_argument(
        "--grace-s",
        type=float,
        default=DEFAULT_GRACE_S,
        help="how long the generations in flight may finish; those left then get UNAVAILABLE (default: %(default)s)",
    )
    parser.add_argument(
        "--delay-s",
        type=float,
        default=0.0,
        help="keep admitting this long first (a Kubernetes preStop hook: while the endpoint's "
        "removal reaches the load balancers; default: %(default)s)",
    )


def control_secret_for(url: str) -> str:
    """The control secret for the server at `url` (the module's docstring says where from)."""
    secret = secret_from_env()
    if secret:
        return secret
    path = secret_file(int(url.rsplit(":", 1)[1]))
    if not path.is_file():
        raise RuntimeError(
            f"no control secret: set LDM_CONTROL_SECRET or LDM_CONTROL_SECRET_FILE, or run this as the "
            f"user of the `ldm serve` that wrote {path}"
        )
    return path.read_text().strip()


class Drain:
    """One drain message in flight on its own gRPC stream to `pipeline`."""

    def __init__(self, url: str, grace_s: float, control_secret: str):
        import numpy as np
        import tritonclient.grpc as grpcclient

        if not 0 <= grace_s < float("inf"):
            raise ValueError(f"grace_s must be a finite number >= 0, got {grace_s}")
        self.grace_s = grace_s
        self.responses = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        prompt = grpcclient.InferInput("prompt", [1], "BYTES")  # required by the config, ignored
        prompt.set_data_from_numpy(np.array([b""], dtype=np.object_))
        self.client.async_stream_infer(
            "pipeline",
            [prompt],
            parameters={DRAIN_PARAMETER: str(grace_s), CONTROL_PARAMETER: control_secret},
            enable_empty_final_response=True,
        )

    def _next(self, timeout: float):
        try:
            result, error = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the pipeline did not answer the drain message within {timeout:.0f} s") from None
        if error is not None:
            raise RuntimeError(f"drain message failed: {error}")
        return result

    def wait_admitting_nothing(self, timeout: float = 30.0) -> None:
        """Returns once the pipeline refuses new requests."""
        self._next(timeout)

    def wait_drained(self, slack_s: float = 30.0) -> None:
        """Returns once every request the pipeline took has its answer."""
        deadline = time.monotonic() + self.grace_s + slack_s
        while True:
            result = self._next(max(0.0, deadline - time.monotonic()))
            if result.get_response().parameters.get("triton_final_response").bool_param:
                return

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def drain(url: str, grace_s: float, control_secret: str, log=print) -> float:
    """Drains the pipeline at `url`; returns how long it took."""
    started = time.monotonic()
    message = Drain(url, grace_s, control_secret)
    try:
        message.wait_admitting_nothing()
        log(f"draining: admitting nothing; the generations in flight may finish for up to {grace_s:g} s")
        message.wait_drained()
    finally:
        message.close()
    seconds = time.monotonic() - started
    log(f"drained in {seconds:.1f} s")
    return seconds


def run(args) -> int:
    secret = control_secret_for(args.url)
    if args.delay_s > 0:
        time.sleep(args.delay_s)
    drain(args.url, args.grace_s, secret, log=lambda m: print(m, flush=True))
    return 0
