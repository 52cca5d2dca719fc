"""Export one component to ONNX, check it against torch, and skip the work when nothing changed."""

import hashlib
import json
from pathlib import Path
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

from families.checkpoint import CheckpointInfo
from families.contracts import HEIGHT, WIDTH, ComponentContract, sample_inputs
from families import FAMILIES, torch_module

OPSET = 17
# max |onnx - torch| allowed, relative to the largest |torch| output value (at least 1)
TOLERANCE = 1e-3
EXPORTER_VERSION = "1"


class ParityError(RuntimeError):
    pass


def cache_key(contract: ComponentContract, info: CheckpointInfo) -> str:
    """Changes whenever an input of the export changes: weights/config files, contract, tools."""
    h = hashlib.sha256()
    for path in (p for folder in contract.folders for p in info.component_files(folder)):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    h.update(repr(contract).encode())
    h.update(f"{EXPORTER_VERSION}:{torch.__version__}:{OPSET}:{info.vae_scaling_factor}".encode())
    return h.hexdigest()


def export_component(contract: ComponentContract, info: CheckpointInfo, onnx_path: Path, log=print) -> dict:
    """Writes `onnx_path` (and a `.json` stamp beside it) unless an up-to-date export is there.

    Returns the stamp: cache key, parity errors per batch size, and whether work was done."""
    onnx_path = Path(onnx_path)
    stamp_path = onnx_path.with_suffix(".json")
    key = cache_key(contract, info)
    if onnx_path.is_file() and stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("cache_key") == key:
            log(f"  {contract.name}: up to date ({onnx_path})")
            return {**stamp, "exported": False}

    start = time.perf_counter()
    module = torch_module(contract.component, info)
    opt = {axis: r[1] for axis, r in contract.axis_ranges.items()}
    example = sample_inputs(contract, info, {**opt, "batch": 2}, seed=0)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = onnx_path.with_name(onnx_path.name + ".tmp")
    args = tuple(torch.from_numpy(example[s.name]) for s in contract.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in diffusers
        if FAMILIES[info.family].dynamo_export(contract.component):
            _export_dynamo(module, args, contract, tmp_path)
        else:
            torch.onnx.export(
                module,
                args,
                str(tmp_path),
                input_names=[s.name for s in contract.inputs],
                output_names=[s.name for s in contract.outputs],
                dynamic_axes=contract.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
            )
    errors = check_parity(contract, info, module, tmp_path)
    tmp_path.replace(onnx_path)
    stamp = {"cache_key": key, "max_abs_error": errors, "seconds": round(time.perf_counter() - start, 2)}
    stamp_path.write_text(json.dumps(stamp, indent=1))
    log(f"  {contract.name}: exported in {stamp['seconds']} s, max abs error vs torch {errors}")
    return {**stamp, "exported": True}


def _export_dynamo(module, args: tuple, contract: ComponentContract, path: Path) -> None:
    """torch.export-based ONNX export (needs onnxscript), for modules the TorchScript exporter
    cannot export (Flux's RMSNorm). Latent sides are declared even (2 x a dimension): the module
    packs 2x2 patches."""
    from torch.export import Dim

    dims = {}
    for axis, (low, _, high) in contract.axis_ranges.items():
        if axis in (HEIGHT, WIDTH):
            dims[axis] = 2 * Dim(f"{axis}_half", min=max(1, low // 2), max=high // 2)
        else:
            dims[axis] = Dim(axis, min=max(low, 2) if axis == "batch" else low, max=high)
    shapes = {
        spec.name: {i: dims[d] for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in contract.inputs
    }
    program = torch.onnx.export(
        module,
        args,
        input_names=[s.name for s in contract.inputs],
        output_names=[s.name for s in contract.outputs],
        dynamic_shapes=shapes,
        opset_version=max(OPSET, 18),
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True returns the program
    program.save(str(path))


def check_parity(contract, info, module, onnx_path) -> dict:
    """max |onnx - torch| over all outputs at two batch sizes (and a non-default spatial size)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    errors = {}
    opt = {axis: r[1] for axis, r in contract.axis_ranges.items()}
    lo = {axis: r[0] for axis, r in contract.axis_ranges.items()}
    for label, sizes in (("batch1", {**opt, "batch": 1}), ("batch3", {**lo, "batch": 3})):
        inputs = sample_inputs(contract, info, sizes, seed=1)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(inputs[s.name]) for s in contract.inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run([s.name for s in contract.outputs], inputs)
        worst = 0.0
        for ref, out in zip(expected, got):
            ref = ref.numpy()
            if ref.shape != out.shape:
                raise ParityError(f"{contract.name}: ONNX output shape {out.shape} != torch {ref.shape} ({label})")
            err = float(np.abs(ref - out).max())
            if err > TOLERANCE * max(1.0, float(np.abs(ref).max())):
                raise ParityError(f"{contract.name}: max abs error {err:.3g} vs torch exceeds tolerance ({label})")
            worst = max(worst, err)
        errors[label] = float(f"{worst:.3g}")
    return errors
