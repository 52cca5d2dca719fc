"""Triton python-backend model `pipeline_unary`: one request, one response, for HTTP and unary
gRPC clients (decoupled models answer only gRPC streams). Forwards each request to the
decoupled `pipeline` through BLS on a thread of its own and answers through the request's
response sender, so `execute` returns at once and these requests reach the engine's bounded
queue and join the step-level batch like streamed ones (serving/triton/forwarding.py says why
and how cancellation travels).

Copied by `ldm export` into pipeline_unary/1/model.py."""

import json
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.core.errors import INTERNAL, UNAVAILABLE, coded_message, parse_coded_message
from serving.core.config import config_parameter
from serving.triton.control import CONTROL_PARAMETER, secret_from_env
from serving.triton.forwarding import CANCEL_PARAMETER, Forwards

OUTPUTS = ("image", "seed")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SWEEP_S = 0.1  # how often client cancellations are looked for


def _error(code, message):
    status = getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, status))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("pipeline_unary: must not be decoupled (it serves HTTP and unary gRPC)")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        try:
            self.forwards = Forwards(config_parameter(params, "max_in_flight", int, 256))
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.control_secret = secret_from_env() or ""  # what the pipeline asks of its cancel messages
        self.stopping = threading.Event()
        self.sweeper = threading.Thread(
            target=self.forwards.sweep_until,
            args=(self.stopping, SWEEP_S),
            kwargs={"log": lambda m: print(m, flush=True)},
            name="ldm-unary-cancel",
            daemon=True,
        )
        self.sweeper.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = uuid.uuid4().hex
            if not self.forwards.add(
                request_id, sender.is_cancelled, lambda rid=request_id: _cancel(rid, self.control_secret)
            ):
                message = f"server overloaded: {self.forwards.limit} HTTP/unary requests in flight, retry later"
                sender.send(_error(UNAVAILABLE, coded_message(UNAVAILABLE, message)), flags=FINAL)
                continue
            # the request's tensors are freed when execute returns: the thread gets copies
            inputs = [pb_utils.Tensor(t.name(), np.array(t.as_numpy(), copy=True)) for t in request.inputs()]
            bls = pb_utils.InferenceRequest(
                model_name="pipeline", request_id=request_id, inputs=inputs, requested_output_names=list(OUTPUTS)
            )
            threading.Thread(target=self._forward, args=(bls, sender, request_id), daemon=True).start()
        return None

    def _forward(self, bls, sender, request_id):
        response = _error(INTERNAL, coded_message(INTERNAL, "pipeline ended without an image"))
        try:
            for reply in bls.exec(decoupled=True):
                if reply.has_error():
                    # BLS drops the status code of a decoupled model's error; the message carries it
                    code, _ = parse_coded_message(reply.error().message())
                    response = _error(code or INTERNAL, reply.error().message())
                    break
                tensors = [pb_utils.get_output_tensor_by_name(reply, n) for n in OUTPUTS]
                if all(t is not None for t in tensors):
                    response = pb_utils.InferenceResponse(tensors)
                    break
        except Exception as exc:  # the one response is sent whatever broke
            response = _error(INTERNAL, coded_message(INTERNAL, f"pipeline_unary: forwarding failed: {exc}"))
        finally:
            self.forwards.remove(request_id)
            sender.send(response, flags=FINAL)

    def finalize(self):
        self.stopping.set()
        self.sweeper.join()


def _cancel(request_id, control_secret):
    """Asks `pipeline` to cancel one of the requests forwarded to it (a cancel message: its
    prompt is required by the config and ignored)."""
    message = pb_utils.InferenceRequest(
        model_name="pipeline",
        inputs=[pb_utils.Tensor("prompt", np.array([b""], dtype=np.object_))],
        requested_output_names=[],
        parameters={CANCEL_PARAMETER: request_id, CONTROL_PARAMETER: control_secret},
    )
    for _ in message.exec(decoupled=True):
        pass
