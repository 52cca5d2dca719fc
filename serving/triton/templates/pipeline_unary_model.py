"""Triton python-backend model `pipeline_unary`: one request, one response, for HTTP and unary
gRPC clients (decoupled models answer only gRPC streams). Forwards to the decoupled `pipeline`
through BLS, so these requests join the same step-level batch as streamed ones.

Copied by `ldm export` into pipeline_unary/1/model.py."""
import triton_python_backend_utils as pb_utils

from serving.core.errors import parse_coded_message

OUTPUTS = ("image", "seed")


class TritonPythonModel:
    def execute(self, requests):
        return [self._forward(request) for request in requests]

    def _forward(self, request):
        bls = pb_utils.InferenceRequest(
            model_name="pipeline", inputs=request.inputs(), requested_output_names=list(OUTPUTS)
        )
        for response in bls.exec(decoupled=True):
            if response.has_error():
                # BLS drops the status code of a decoupled model's error; the message carries it
                code, _ = parse_coded_message(response.error().message())
                status = getattr(pb_utils.TritonError, code or "INTERNAL", pb_utils.TritonError.INTERNAL)
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(response.error().message(), status))
            tensors = [pb_utils.get_output_tensor_by_name(response, n) for n in OUTPUTS]
            if all(t is not None for t in tensors):
                return pb_utils.InferenceResponse(tensors)
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError("pipeline ended without an image", pb_utils.TritonError.INTERNAL)
        )
