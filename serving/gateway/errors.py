"""The gateway's errors: one code per outcome, mapped to a gRPC status and an HTTP status.

A field error names the field of the gateway's own request (`Generation`, which uses the
pipeline's input names); each front renames it to what its clients sent (REST: `size` for
height and width, `image` for init_image, ...).
"""

import re

import grpc

from serving.core.errors import CANCELLED, INTERNAL, INVALID_ARG, UNAVAILABLE, parse_coded_message

RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # a rate limit: try again after Retry-After
UNIMPLEMENTED = "UNIMPLEMENTED"  # the served pipeline does not take an input the request uses
UNAUTHENTICATED = "UNAUTHENTICATED"
TOO_LARGE = "TOO_LARGE"  # request body or image over the gateway's limits
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
NOT_FOUND = "NOT_FOUND"  # no generation with that id (never had one, or forgotten)
FAILED_PRECONDITION = "FAILED_PRECONDITION"  # the generation has finished: too late to steer or cancel it
PERMISSION_DENIED = (
    "PERMISSION_DENIED"  # a browser request from a foreign page, or to an unknown Host (serving/gateway/browser.py)
)
UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"  # a JSON body without Content-Type: application/json

GRPC_STATUS = {
    INVALID_ARG: grpc.StatusCode.INVALID_ARGUMENT,
    TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    INTERNAL: grpc.StatusCode.INTERNAL,
    CANCELLED: grpc.StatusCode.CANCELLED,
    DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
}
HTTP_STATUS = {
    INVALID_ARG: 400,
    UNAUTHENTICATED: 401,
    PERMISSION_DENIED: 403,
    NOT_FOUND: 404,
    FAILED_PRECONDITION: 409,
    TOO_LARGE: 413,
    UNSUPPORTED_MEDIA_TYPE: 415,
    RESOURCE_EXHAUSTED: 429,
    CANCELLED: 499,
    INTERNAL: 500,
    UNIMPLEMENTED: 501,
    UNAVAILABLE: 503,
    DEADLINE_EXCEEDED: 504,
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None, retry_after_s: float | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def renamed(self, names: dict) -> "ApiError":
        """The same error naming the field as a front's clients know it."""
        if self.field not in names:
            return self
        return ApiError(self.code, self.message, names[self.field], self.retry_after_s)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(INVALID_ARG, message, field)


# a field the pipeline names: `steps`, `region_prompts[1]`, `loras[0].name`
FIELD_PATH = re.compile(r"[A-Za-z_]\w*(\[\d+\])?(\.[A-Za-z_]\w*(\[\d+\])?)*")


def from_pipeline(text: str) -> ApiError:
    """An error the pipeline answered (`[CODE] field: message`, serving/core/errors.py)."""
    code, message = parse_coded_message(text)
    if code is None:
        return ApiError(INTERNAL, f"pipeline: {text}")
    field = None
    if code == INVALID_ARG and ": " in message and FIELD_PATH.fullmatch(message.split(": ", 1)[0]):
        field, message = message.split(": ", 1)
    retry = 1.0 if code == UNAVAILABLE else None
    return ApiError(code if code in GRPC_STATUS else INTERNAL, message, field, retry)
