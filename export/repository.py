"""Writes a Triton model repository for a diffusers checkpoint: ONNX per component, configs
generated from the contracts, the pipeline's model code and assets."""
import json
from pathlib import Path
import shutil

from export.checkpoint import CheckpointInfo
from export.contracts import component_contracts
from export.onnx_export import export_component
from export.preview_fit import fit_preview
from export.tensorrt import build_plan
from export.triton_config import component_config, pipeline_config, to_pbtxt, unary_config

TEMPLATES = Path(__file__).resolve().parent.parent / "serving" / "triton" / "templates"
MAX_BATCH = {"text_encoder": 64, "unet": 64, "unet_regional": 64, "vae_decoder": 16, "vae_encoder": 16}


def write_repository(
    checkpoint,
    repo,
    backend: str = "python",
    gpu: bool = False,
    max_size: int | None = None,
    pipeline_parameters: dict | None = None,
    unary_instances: int = 4,
    log=print,
) -> dict:
    """Exports every component of `checkpoint` into `repo`; returns each export's stamp."""
    info = CheckpointInfo.read(checkpoint)
    repo = Path(repo)
    max_size = max_size or 2 * info.native_size
    contracts = component_contracts(info, max_size, MAX_BATCH)
    log(f"exporting {info.path} -> {repo} ({backend} backend)")
    stamps = {}
    for name, contract in contracts.items():
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
    pipeline_info = {
        "checkpoint": str(info.path.resolve()),
        "text_length": info.text_length,
        "latent_channels": info.latent_channels,
        "vae_factor": info.vae_factor,
        "size_multiple": info.size_multiple,
        "native_size": info.native_size,
        "max_size": max_size,
        "regional_unet": "unet_regional" in contracts,  # regions' attention mode can be served
        "preview": fit_preview(
            repo / "vae_decoder" / "1" / "model.onnx", info.latent_channels, latent_size, info.vae_factor
        ),
    }
    _write(pipeline_dir / "pipeline.json", json.dumps(pipeline_info, indent=1))
    _write(pipeline_dir / "scheduler_config.json", json.dumps(info.scheduler_config, indent=1))
    if (pipeline_dir / "tokenizer").exists():
        shutil.rmtree(pipeline_dir / "tokenizer")
    shutil.copytree(info.path / "tokenizer", pipeline_dir / "tokenizer")
    _copy(TEMPLATES / "pipeline_model.py", pipeline_dir / "model.py")
    write_pipeline_config(repo, pipeline_parameters or {})
    _copy(TEMPLATES / "pipeline_unary_model.py", repo / "pipeline_unary" / "1" / "model.py")
    _write(repo / "pipeline_unary" / "config.pbtxt", to_pbtxt(unary_config(unary_instances)))
    log(f"model repository ready: {repo}")
    return stamps


def write_pipeline_config(repo, parameters: dict) -> None:
    """(Re)writes the pipeline's config.pbtxt: its defaults, limits and batching parameters."""
    _write(Path(repo) / "pipeline" / "config.pbtxt", to_pbtxt(pipeline_config(parameters)))


def has_artifacts(repo) -> bool:
    """Whether `repo` holds an export (one from before the regional UNet existed counts: it
    serves everything but regions' attention mode)."""
    repo = Path(repo)
    return all((repo / n / "1" / "model.onnx").is_file() for n in MAX_BATCH if n != "unet_regional") and (
        repo / "pipeline" / "config.pbtxt"
    ).is_file()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
