"""Error codes of the service and how they travel. Imports nothing from Triton.

INVALID_ARG: the client must change the request (the message starts with the field's name).
UNAVAILABLE: try again later or elsewhere (queue full, shutting down, deadline, a passing
             shortage such as GPU memory).
INTERNAL:    this request broke a model; replaying it blindly would break it again.
CANCELLED:   the client asked for it.
NOT_FOUND:   the request names something this server does not hold (a steer's unknown generation).
FAILED_PRECONDITION: the request is valid but its target's state forbids it (steering a
             generation that has finished).
PERMISSION_DENIED: a control message without the control secret (serving/triton/control.py).
"""

# as Triton's TritonError names them
INVALID_ARG = "INVALID_ARG"
UNAVAILABLE = "UNAVAILABLE"
CANCELLED = "CANCELLED"
INTERNAL = "INTERNAL"
NOT_FOUND = "NOT_FOUND"
FAILED_PRECONDITION = "FAILED_PRECONDITION"  # Triton has no such code: the message carries it
PERMISSION_DENIED = "PERMISSION_DENIED"  # nor this one


def coded_message(code: str, message: str) -> str:
    """Error text that carries its code: gRPC stream errors and BLS replies lose the status code,
    so clients and the unary front read it back from the message."""
    return f"[{code}] {message}"


def parse_coded_message(text: str) -> tuple[str | None, str]:
    """(code, message) from `coded_message` text; code is None for other text."""
    if text.startswith("[") and "] " in text:
        code, message = text[1:].split("] ", 1)
        if code.isupper():
            return code, message
    return None, text


class ResourceExhausted(RuntimeError):
    """A model call failed for a reason that passes (e.g. CUDA out of memory): the jobs in that
    call fail with UNAVAILABLE, so clients may retry, and the server keeps serving."""
