"""TensorRT engines from the ONNX exports, with the contract's min/opt/max shapes.

Plans are specific to the GPU and TensorRT version they are built on, so they are built on the
serving node (`ldm export --backend tensorrt` there, or the deployment's init Job), never shipped.
"""
import shutil
import subprocess

from export.contracts import ComponentContract


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
    return command + (["--fp16"] if fp16 else [])


def build_plan(contract: ComponentContract, onnx_path, plan_path, log=print) -> None:
    if shutil.which("trtexec") is None:
        raise RuntimeError(
            "TensorRT's trtexec is not on PATH: build plans on a GPU node with TensorRT "
            "(the NGC Triton image has it), or export with --backend python/onnxruntime"
        )
    command = trtexec_command(contract, onnx_path, plan_path)
    log("  " + " ".join(command))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
