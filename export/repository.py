"""Writes a Triton model repository for a diffusers checkpoint: ONNX per component served as a
Triton model, configs generated from the contracts, the pipeline's model code and assets, and a
copy of the checkpoint's weights when the pipeline runs components with torch in its process."""
import json
import os
from pathlib import Path
import shutil

from export.checkpoint import CheckpointInfo
from export.contracts import component_contracts
from export.onnx_export import export_component
from export.placement import bls_pool_bytes
from export.preview_fit import fit_preview
from export.tensorrt import build_plan
from export.triton_config import component_config, pipeline_config, to_pbtxt, unary_config
from serving.models.assemble import CHECKPOINT_COPY

TEMPLATES = Path(__file__).resolve().parent.parent / "serving" / "triton" / "templates"
MAX_BATCH = {"text_encoder": 64, "unet": 64, "unet_regional": 64, "vae_decoder": 16, "vae_encoder": 16}
COMPONENTS = tuple(MAX_BATCH)


def write_repository(
    checkpoint,
    repo,
    backend: str = "python",
    gpu: bool = False,
    max_size: int | None = None,
    pipeline_parameters: dict | None = None,
    log=print,
) -> dict:
    """Exports the components `pipeline_parameters` serve as Triton models into `repo` (those the
    pipeline does not run with torch); returns each export's stamp."""
    info = CheckpointInfo.read(checkpoint)
    repo = Path(repo)
    parameters = pipeline_parameters or {}
    max_size = max_size or 2 * info.native_size
    contracts = component_contracts(info, max_size, MAX_BATCH)
    served = served_components(parameters)
    log(f"exporting {info.path} -> {repo} ({backend} backend{', GPU' if gpu else ''}; models: {', '.join(served) or 'none'})")
    stamps = {}
    for name in set(contracts) - set(served):
        if (repo / name).exists():  # now run in the pipeline's process: no model of its own
            shutil.rmtree(repo / name)
    for name in served:
        contract = contracts[name]
        version_dir = repo / name / "1"
        stamps[name] = export_component(contract, info, version_dir / "model.onnx", log=log)
        if backend == "python":
            _copy(TEMPLATES / "component_model.py", version_dir / "model.py")
        elif backend == "tensorrt":
            plan = version_dir / "model.plan"
            if stamps[name]["exported"] or not plan.exists():
                build_plan(contract, version_dir / "model.onnx", plan, log=log)
        _write(repo / name / "config.pbtxt", to_pbtxt(component_config(contract, backend, gpu)))

    pipeline_dir = repo / "pipeline" / "1"
    latent_size = info.native_size // info.vae_factor
    if (pipeline_dir / CHECKPOINT_COPY).exists():
        shutil.rmtree(pipeline_dir / CHECKPOINT_COPY)
    if served != COMPONENTS:
        # the torch runner loads the weights from the repository, so it serves wherever the
        # repository goes (a container mounts the repository, not the checkpoint)
        shutil.copytree(info.path, pipeline_dir / CHECKPOINT_COPY, copy_function=_link_or_copy)
    placement = {"gpu": gpu, **(bls_pool_bytes(contracts, served, info.vae_factor) if gpu else {})}
    pipeline_info = {
        "checkpoint": str(info.path.resolve()),
        "components": list(served),
        "placement": placement,
        "text_length": info.text_length,
        "latent_channels": info.latent_channels,
        "vae_factor": info.vae_factor,
        "size_multiple": info.size_multiple,
        "native_size": info.native_size,
        "max_size": max_size,
        "regional_unet": "unet_regional" in served,  # regions' attention mode can be served
        "preview": fit_preview(_preview_decoder(repo, info, served), info.latent_channels, latent_size, info.vae_factor),
    }
    _write(pipeline_dir / "pipeline.json", json.dumps(pipeline_info, indent=1))
    _write(pipeline_dir / "scheduler_config.json", json.dumps(info.scheduler_config, indent=1))
    if (pipeline_dir / "tokenizer").exists():
        shutil.rmtree(pipeline_dir / "tokenizer")
    shutil.copytree(info.path / "tokenizer", pipeline_dir / "tokenizer")
    _copy(TEMPLATES / "pipeline_model.py", pipeline_dir / "model.py")
    write_pipeline_config(repo, parameters, gpu)
    if gpu:
        log(f"  tritonserver needs --cuda-memory-pool-byte-size=<gpu>:{placement['cuda_memory_pool_bytes']} "
            f"--pinned-memory-pool-byte-size={placement['pinned_memory_pool_bytes']} (ldm serve passes them)")
    _copy(TEMPLATES / "pipeline_unary_model.py", repo / "pipeline_unary" / "1" / "model.py")
    _write(repo / "pipeline_unary" / "config.pbtxt", to_pbtxt(unary_config()))
    log(f"model repository ready: {repo}")
    return stamps


def write_pipeline_config(repo, parameters: dict, gpu: bool = False) -> None:
    """(Re)writes the pipeline's config.pbtxt: its placement, runners, defaults, limits and batching."""
    _write(Path(repo) / "pipeline" / "config.pbtxt", to_pbtxt(pipeline_config(parameters, gpu)))


def served_components(parameters: dict) -> tuple:
    """The components served as Triton models: those the pipeline reaches by BLS, and the UNet
    unless torch runs it (in-process ONNX Runtime reads the unet model's ONNX file)."""
    served = []
    if parameters.get("text_vae", "bls") == "bls":
        served += ["text_encoder", "vae_decoder", "vae_encoder"]
    if parameters.get("unet", "inprocess") != "torch":
        # with the regional UNet beside it (regions' attention mode); the torch runner serves
        # regions in latent mode only
        served += ["unet", "unet_regional"]
    return tuple(n for n in COMPONENTS if n in served)


def has_artifacts(repo) -> bool:
    """Whether `repo` holds an export (one from before the regional UNet existed counts: it
    serves everything but regions' attention mode)."""
    repo = Path(repo)
    info_path = repo / "pipeline" / "1" / "pipeline.json"
    if not (info_path.is_file() and (repo / "pipeline" / "config.pbtxt").is_file()):
        return False
    served = json.loads(info_path.read_text()).get("components", [n for n in COMPONENTS if n != "unet_regional"])
    return all((repo / n / "1" / "model.onnx").is_file() for n in served)


def _preview_decoder(repo: Path, info: CheckpointInfo, served: tuple):
    """The VAE decoder the preview map is fitted from: its ONNX export, else the torch module."""
    if "vae_decoder" in served:
        from serving.models.onnx import OnnxComponent

        decoder = OnnxComponent(repo / "vae_decoder" / "1" / "model.onnx")
        return lambda latents: decoder(latents=latents)["images"]
    import torch

    from export.torch_modules import load_module

    module = load_module("vae_decoder", info)

    def decode(latents):
        with torch.inference_mode():
            return module(torch.from_numpy(latents)).numpy()

    return decode


def _link_or_copy(source, target):
    """A hard link where the filesystem allows one (weights can be gigabytes), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
