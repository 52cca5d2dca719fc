"""TensorRT engines from the ONNX exports, with the contract's min/opt/max shapes.

Plans are specific to the GPU and TensorRT version they are built on, so they are built on the
serving node (`ldm export --backend tensorrt` there, or the deployment's init Job), never shipped.
Neither the development machines nor the lent GPU machine have TensorRT: there the export says so.
"""

import shutil
import subprocess

from families.contracts import ComponentContract


def trtexec_command(contract: ComponentContract, onnx_path, plan_path, fp16: bool = True) -> list:
    profile = contract.profile()

    def shapes(k):
        return ",".join(f"{name}:{'x'.join(map(str, dims[k]))}" for name, dims in profile.items())

    command = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={shapes(0)}",
        f"--optShapes={shapes(1)}",
        f"--maxShapes={shapes(2)}",
    ]
    return command + (["--fp16"] if fp16 and contract.fp16 else [])


class TensorRTUnavailable(RuntimeError):
    pass


def build_plan(contract: ComponentContract, onnx_path, plan_path, log=print) -> None:
    """With `trtexec` when it is on PATH, else with TensorRT's Python API when it imports."""
    if shutil.which("trtexec") is not None:
        command = trtexec_command(contract, onnx_path, plan_path)
        log("  " + " ".join(command))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed here (no trtexec on PATH, no tensorrt Python package), so no "
            "TensorRT plan can be built on this machine. Build plans on the GPU node that serves them "
            "(the NGC Triton image has trtexec), or export with --backend python or onnxruntime."
        ) from None
    log(f"  {contract.name}: building a TensorRT {tensorrt.__version__} plan with its Python API")
    build_with_python_api(tensorrt, contract, onnx_path, plan_path)


def build_with_python_api(trt, contract: ComponentContract, onnx_path, plan_path, fp16: bool = True) -> None:
    """The same engine trtexec_command builds: one optimisation profile from the contract."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{contract.name}: TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16 and contract.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (smallest, optimal, largest) in contract.profile().items():
        profile.set_shape(name, smallest, optimal, largest)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{contract.name}: TensorRT failed to build a plan from {onnx_path}")
    with open(plan_path, "wb") as f:
        f.write(plan)
