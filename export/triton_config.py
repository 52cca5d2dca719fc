"""Triton model configurations, generated from the export contracts and written as config.pbtxt
with Triton's own protobuf schema (so a typo cannot produce a config Triton would refuse)."""

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from families.contracts import ComponentContract
from serving.core.request import FIELDS

DTYPES = {
    "float32": mc.TYPE_FP32,
    "int64": mc.TYPE_INT64,
    "int32": mc.TYPE_INT32,
    "uint8": mc.TYPE_UINT8,
    "bool": mc.TYPE_BOOL,
    "bytes": mc.TYPE_STRING,
}
BACKENDS = ("python", "onnxruntime", "tensorrt")

PIPELINE_OUTPUTS = (
    ("image", "uint8", [-1, -1, 3]),
    ("seed", "int64", [1]),
    ("step", "int32", [1]),
    ("total_steps", "int32", [1]),
    ("preview", "uint8", [-1, -1, 3]),
    # steering (serving/core/steering.py): a steer message's answer, and the steer ids a
    # generation's step first used, next to that step's `step`
    ("steer_id", "int32", [1]),
    ("steer_applied", "int32", [-1]),
    # a status message's answer (serving/triton/control.py)
    ("accepting", "bool", [1]),
    ("active", "int32", [1]),
    ("queued", "int32", [1]),
)
UNARY_OUTPUTS = PIPELINE_OUTPUTS[:2]


def _dims(contract: ComponentContract, spec) -> list:
    # Triton adds the batch axis itself when max_batch_size > 0
    return [-1 if isinstance(d, str) else d for d in spec.dims[1:]]


def component_config(contract: ComponentContract, backend: str, gpu: bool) -> mc.ModelConfig:
    config = mc.ModelConfig(name=contract.name, max_batch_size=contract.max_batch_size)
    if backend == "python":
        config.backend = "python"
    elif backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
    elif backend == "tensorrt":
        config.platform = "tensorrt_plan"
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for spec in contract.inputs:
        tensor = config.input.add(name=spec.name, data_type=DTYPES[spec.dtype], dims=_dims(contract, spec) or [1])
        if len(spec.dims) == 1:
            # one value per row: Triton needs dims, so callers send [B, 1] and the model sees [B]
            tensor.reshape.SetInParent()
    for spec in contract.outputs:
        config.output.add(name=spec.name, data_type=DTYPES[spec.dtype], dims=_dims(contract, spec))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.dynamic_batching.SetInParent()
    return config


def pipeline_config(parameters: dict, gpu: bool = False) -> mc.ModelConfig:
    """The decoupled pipeline model: streams progress and previews, then the image. On GPU its
    instance is KIND_GPU: Triton names the device, where the torch runner puts its modules."""
    config = mc.ModelConfig(name="pipeline", backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    # every input optional here: steer and cancel messages carry a subset (a steer may leave
    # out the prompt); the pipeline's parser answers a generation without a prompt INVALID_ARG
    for f in FIELDS:
        config.input.add(name=f.name, data_type=DTYPES[f.dtype], dims=f.dims, optional=True)
    for name, dtype, dims in PIPELINE_OUTPUTS:
        config.output.add(name=name, data_type=DTYPES[dtype], dims=dims)
    # one instance (per GPU): its engine batches all requests; several would split the batch
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU, count=1)
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def unary_config(max_in_flight: int = 256) -> mc.ModelConfig:
    """Request/response front of `pipeline` for HTTP and unary gRPC clients."""
    config = mc.ModelConfig(name="pipeline_unary", backend="python", max_batch_size=0)
    for f in FIELDS:
        if not f.streaming_only:
            config.input.add(name=f.name, data_type=DTYPES[f.dtype], dims=f.dims, optional=not f.required)
    for name, dtype, dims in UNARY_OUTPUTS:
        config.output.add(name=name, data_type=DTYPES[dtype], dims=dims)
    # one instance: its execute only hands each request to a forwarding thread (its model.py);
    # max_in_flight bounds those threads, the pipeline's queue bounds the work
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters["max_in_flight"].string_value = str(max_in_flight)
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)
