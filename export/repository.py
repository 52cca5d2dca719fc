"""Writes a Triton model repository for a diffusers checkpoint: ONNX per component served as a
Triton model, configs generated from the contracts, the pipeline's model code and assets, and a
copy of the checkpoints' weights when the pipeline runs components with torch in its process.

A repository serves one or more *models* (checkpoints of any family: families/), the first the
default; its Triton models keep their plain names (unet, text_encoder, ...), a further model's
are prefixed with its name (sdxl-unet). A model may hold several UNet *variants*, one per layout
(families/checkpoint.py): the primary checkpoint's, plus an inpainting and/or an x4-upscaler
checkpoint. Each variant's components are exported with their own contracts; a component whose
files are identical to one already exported (the same text encoder or VAE) is exported once and
shared. pipeline/1/pipeline.json's models table names each model's family and each variant's
models, tokenizers and schedule. A base primary of a family with regions' attention mode also
gets the regional UNet from its UNet's weights.
"""

from dataclasses import replace
import filecmp
import json
import os
from pathlib import Path
import shutil

from families.checkpoint import LAYOUTS, CheckpointInfo
from families import FAMILIES
from families.contracts import component_contracts, lora_contract, token_input_names
from export.onnx_export import export_component
from export.placement import bls_pool_bytes
from export.preview_fit import fit_preview
from export.tensorrt import build_plan
from export.triton_config import component_config, pipeline_config, to_pbtxt, unary_config
from serving.core.variants import TASKS, variant_for
from serving.models.assemble import CHECKPOINT_COPY

TEMPLATES = Path(__file__).resolve().parent.parent / "serving" / "triton" / "templates"
MAX_BATCH = {"text_encoder": 64, "unet": 64, "unet_regional": 64, "vae_decoder": 16, "vae_encoder": 16}
# the components each variant uses (the upscaler concatenates its low-res input in pixel space)
VARIANT_COMPONENTS = {
    "base": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    "inpaint": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    "upscale": ("text_encoder", "unet", "vae_decoder"),
}


def write_repository(
    checkpoint,
    repo,
    backend: str = "python",
    gpu: bool = False,
    max_size: int | None = None,
    pipeline_parameters: dict | None = None,
    log=print,
    variants: dict | None = None,
    models: dict | None = None,
    name: str | None = None,
) -> dict:
    """Exports `checkpoint` (and the extra variant checkpoints in `variants`, {"inpaint": DIR,
    "upscale": DIR}) into `repo` as the default model, named `name` (default: the folder's name),
    and each checkpoint of `models` ({name: DIR}) as a further model beside it: as Triton models
    the components `pipeline_parameters` serve that way (those the pipeline does not run with
    torch); returns each export's stamp."""
    default = name or Path(checkpoint).resolve().name
    checkpoints = {default: read_variants(checkpoint, variants or {})}
    for model, path in (models or {}).items():
        if model in checkpoints:
            raise ValueError(f"two models named {model!r}: name them apart (NAME=DIR)")
        checkpoints[model] = read_variants(path, {})
    repo = Path(repo)
    parameters = pipeline_parameters or {}
    served = served_components(parameters)
    primary = next(iter(checkpoints[default].values()))
    log(
        f"exporting {', '.join(f'{m}={next(iter(i.values())).path}' for m, i in checkpoints.items())} -> {repo} "
        f"({backend} backend{', GPU' if gpu else ''}; models: {', '.join(served) or 'none'})"
    )
    stamps, named, model_contracts, tables = {}, [], {}, {}
    for model, infos in checkpoints.items():
        first = next(iter(infos.values()))
        size = max_size or 2 * first.native_size
        prefix = "" if model == default else f"{model}-"
        tables[model] = {}
        for variant, info in infos.items():
            contracts = component_contracts(info, size, MAX_BATCH)
            kinds = VARIANT_COMPONENTS[variant] + (
                ("unet_regional",) if info is first and "unet_regional" in contracts else ()
            )
            components = {}
            for kind in kinds:
                contract = contracts[kind]
                shared = next(
                    (
                        m
                        for k, other, m in named
                        if k == kind
                        and other.family == info.family
                        and all(same_files(other, info, f) for f in contract.folders)
                    ),
                    None,
                )
                if shared is None:
                    shared = prefix + (kind if info is first else f"{kind}_{variant}")
                    named.append((kind, info, shared))
                    if kind in served:
                        model_contracts[shared] = replace(contract, name=shared)
                        stamps[shared] = _export_model(model_contracts[shared], info, repo, backend, gpu, log)
                components[kind] = shared
            tables[model][variant] = components
    _remove_stale_models(repo, set(model_contracts))

    pipeline_dir = repo / "pipeline" / "1"
    for old in [*pipeline_dir.glob(f"{CHECKPOINT_COPY}*"), *pipeline_dir.glob("*tokenizer*")]:
        shutil.rmtree(old)
    lora = parameters.get("lora") == "true"
    model_infos = {
        model: _model_info(
            model,
            model == default,
            infos,
            tables[model],
            served,
            pipeline_dir,
            repo,
            max_size or 2 * next(iter(infos.values())).native_size,
            lora,
            log,
        )
        for model, infos in checkpoints.items()
    }
    placement = {
        "gpu": gpu,
        **(bls_pool_bytes(model_contracts, tuple(model_contracts), primary.vae_factor) if gpu else {}),
    }
    pipeline_info = {
        **model_infos[default],  # readers of an export with one model find its facts at the top
        "served": list(served),
        "placement": placement,
        "default_model": default,
        "models": model_infos,
    }
    _write(pipeline_dir / "pipeline.json", json.dumps(pipeline_info, indent=1))
    _write(pipeline_dir / "scheduler_config.json", json.dumps(primary.scheduler_config, indent=1))
    _copy(TEMPLATES / "pipeline_model.py", pipeline_dir / "model.py")
    # the gateway prices work relative to the native size (serving/gateway/costs.py) and lists the models
    write_pipeline_config(
        repo,
        {**parameters, "native_size": primary.native_size, "models": json.dumps(model_list(model_infos, default))},
        gpu,
    )
    if gpu:
        log(
            f"  tritonserver needs --cuda-memory-pool-byte-size=<gpu>:{placement['cuda_memory_pool_bytes']} "
            f"--pinned-memory-pool-byte-size={placement['pinned_memory_pool_bytes']} (ldm serve passes them)"
        )
    _copy(TEMPLATES / "pipeline_unary_model.py", repo / "pipeline_unary" / "1" / "model.py")
    _write(repo / "pipeline_unary" / "config.pbtxt", to_pbtxt(unary_config()))
    log(f"model repository ready: {repo}")
    return stamps


def _model_info(
    model: str,
    is_default: bool,
    infos: dict,
    table: dict,
    served: tuple,
    pipeline_dir: Path,
    repo: Path,
    max_size: int,
    lora: bool,
    log,
) -> dict:
    """One model's entry of pipeline.json: its family, its default variant's sizes and its variants."""
    first = next(iter(infos.values()))
    prefix = "" if is_default else f"{model}-"
    copies = _copy_checkpoints_for_torch(infos, first, pipeline_dir, served, prefix)
    facts = {
        variant: _variant_facts(
            info,
            table[variant],
            served,
            _tokenizers(info, first, variant, pipeline_dir, prefix),
            copies.get(variant),
            repo,
            max_size,
        )
        for variant, info in infos.items()
    }
    family = FAMILIES[first.family]
    if (
        lora and family.lora
    ):  # the primary variant's denoiser and text encoder with mixed-adapter inputs, run in process
        contracts = component_contracts(first, max_size, MAX_BATCH)
        for component, layers in (
            ("unet", family.lora_layers(first)),
            ("text_encoder", family.text_lora_layers(first)),
        ):
            if not layers:
                continue
            contract = lora_contract(contracts[component], layers)
            export_component(
                replace(contract, name=f"{prefix}{contract.name}"),
                first,
                pipeline_dir / f"{prefix}{contract.name}.onnx",
                log=log,
            )
            facts[first.layout][f"lora_{component}"] = f"{prefix}{contract.name}.onnx"
            facts[first.layout][f"lora_{component}_layers"] = {layer: list(shape) for layer, shape in layers.items()}
    head = facts[first.layout]
    return {
        "family": first.family,
        "checkpoint": head["checkpoint"],
        **{
            k: head[k]
            for k in (
                "text_length",
                "latent_channels",
                "vae_factor",
                "size_multiple",
                "native_size",
                "max_size",
                "preview",
            )
        },
        "regional_unet": "unet_regional" in head["components"] and "unet_regional" in served,  # regions' attention mode
        "primary": first.layout,
        "variants": facts,
    }


def model_list(model_infos: dict, default: str) -> list:
    """What GET /v1/models lists (the pipeline's config parameter `models`): each model's name,
    family, sizes, tasks and scheduler config (the gateway derives its samplers from it)."""
    return [
        {
            "id": model,
            "family": info["family"],
            "default": model == default,
            "native_size": info["native_size"],
            "max_size": info["max_size"],
            "tasks": [t for t in TASKS if variant_for(t, info["variants"])],
            "scheduler_config": info["variants"][info["primary"]]["scheduler_config"],
        }
        for model, info in model_infos.items()
    ]


def read_variants(checkpoint, extra: dict) -> dict:
    """{variant name: CheckpointInfo}, the primary checkpoint first; each variant is named by its
    UNet's layout, detected from the UNet config."""
    primary = CheckpointInfo.read(checkpoint)
    infos = {primary.layout: primary}
    for name, path in extra.items():
        if path is None:
            continue
        if name not in LAYOUTS:
            raise ValueError(f"unknown variant {name!r}; variants are {LAYOUTS}")
        info = CheckpointInfo.read(path)
        if info.layout != name:
            raise ValueError(
                f"{name} checkpoint {path}: its UNet has the {info.layout} layout "
                f"(in_channels={info.unet_in_channels}), not {name}"
            )
        if name in infos:
            raise ValueError(f"two {name} checkpoints: {infos[name].path} and {path}")
        if info.latent_channels != primary.latent_channels:
            raise ValueError(
                f"{name} checkpoint {path}: {info.latent_channels} latent channels, "
                f"the primary checkpoint has {primary.latent_channels}"
            )
        infos[name] = info
    return infos


def same_files(a: CheckpointInfo, b: CheckpointInfo, folder: str) -> bool:
    """Whether two checkpoints' `folder`s hold the same component: the same files, JSON configs
    equal but for diffusers' bookkeeping keys (`_name_or_path`, `_diffusers_version`, ...),
    other files byte for byte."""
    files_a, files_b = a.component_files(folder), b.component_files(folder)
    if [f.name for f in files_a] != [f.name for f in files_b]:
        return False
    for fa, fb in zip(files_a, files_b):
        if fa.suffix == ".json":
            if _config(fa) != _config(fb):
                return False
        elif fa.stat().st_size != fb.stat().st_size or not filecmp.cmp(fa, fb, shallow=False):
            return False
    return True


def _config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _export_model(contract, info, repo: Path, backend: str, gpu: bool, log) -> dict:
    version_dir = repo / contract.name / "1"
    stamp = export_component(contract, info, version_dir / "model.onnx", log=log)
    if backend == "python":
        _copy(TEMPLATES / "component_model.py", version_dir / "model.py")
    elif backend == "tensorrt":
        plan = version_dir / "model.plan"
        if stamp["exported"] or not plan.exists():
            build_plan(contract, version_dir / "model.onnx", plan, log=log)
    _write(repo / contract.name / "config.pbtxt", to_pbtxt(component_config(contract, backend, gpu)))
    return stamp


def _remove_stale_models(repo: Path, exported: set) -> None:
    """Component models an earlier export left that this one does not serve: a variant or model
    no longer exported, or a component the pipeline now runs with torch (Triton would load them)."""
    if not repo.is_dir():
        return
    for model in repo.iterdir():
        if (model / "config.pbtxt").is_file() and model.name not in exported | {"pipeline", "pipeline_unary"}:
            shutil.rmtree(model)


def _copy_checkpoints_for_torch(
    infos: dict, primary: CheckpointInfo, pipeline_dir: Path, served: tuple, prefix: str
) -> dict:
    """{variant: folder in pipeline/1/} of the checkpoint copies the torch runner loads, when it
    runs any component: it serves wherever the repository goes (a container mounts the
    repository, not the checkpoint)."""
    if set(served) >= {"text_encoder", "unet", "vae_decoder", "vae_encoder"}:
        return {}
    copies = {}
    for variant, info in infos.items():
        copies[variant] = prefix + (CHECKPOINT_COPY if info is primary else f"{CHECKPOINT_COPY}_{variant}")
        shutil.copytree(info.path, pipeline_dir / copies[variant], copy_function=_link_or_copy)
    return copies


def _tokenizers(info: CheckpointInfo, primary: CheckpointInfo, variant: str, pipeline_dir: Path, prefix: str) -> dict:
    """{token-id input: folder in pipeline/1/} of the variant's tokenizers: the model's primary
    variant's when identical."""
    out = {}
    for input_name, encoder in zip(token_input_names(len(info.text_encoders)), info.text_encoders):
        shared = info is primary or same_files(info, primary, encoder.tokenizer)
        name = prefix + (encoder.tokenizer if shared else f"{encoder.tokenizer}_{variant}")
        if not (pipeline_dir / name).exists():
            shutil.copytree(info.path / encoder.tokenizer, pipeline_dir / name)
        out[input_name] = name
    return out


def _variant_facts(
    info: CheckpointInfo,
    components: dict,
    served: tuple,
    tokenizers: dict,
    torch_copy: str | None,
    repo: Path,
    max_size: int,
) -> dict:
    """What the pipeline needs to run one variant: its models, tokenizer, schedule and sizes."""
    latent_size = info.native_size // info.vae_factor
    facts = {
        "checkpoint": str(info.path.resolve()),
        "components": components,
        "max_batch": {kind: MAX_BATCH[kind] for kind in components},  # rows per call each model accepts
        "family": info.family,
        "tokenizers": tokenizers,
        "text_outputs": [spec.name for spec in FAMILIES[info.family].text_outputs(info)],
        "zero_empty_negative": info.zero_empty_negative,
        "token_lengths": dict(zip(token_input_names(len(info.text_encoders)), (e.length for e in info.text_encoders))),
        "checked_inputs": list(FAMILIES[info.family].checked_inputs(info)),
        "distilled_guidance": info.distilled_guidance,
        "text_length": info.text_length,
        "latent_channels": info.latent_channels,
        "vae_factor": info.vae_factor,
        "size_multiple": info.size_multiple,
        "native_size": info.native_size,
        "max_size": max_size,
        "preview": fit_preview(
            _preview_decoder(repo, info, components["vae_decoder"], served),
            info.latent_channels,
            latent_size,
            info.vae_factor,
        ),
        "scheduler_config": info.scheduler_config,
    }
    if torch_copy is not None:
        facts["torch_checkpoint"] = torch_copy
    if info.layout == "upscale":
        facts["low_res_scheduler_config"] = info.low_res_scheduler_config
        facts["max_noise_level"] = info.max_noise_level
    return facts


def write_pipeline_config(repo, parameters: dict, gpu: bool = False) -> None:
    """(Re)writes the pipeline's config.pbtxt: its placement, runners, defaults, limits and batching;
    and the checkpoint's scheduler config (parameter scheduler_config), which the gateway lists
    the samplers that fit the served model by (GET /v1/samplers)."""
    config_file = Path(repo) / "pipeline" / "1" / "scheduler_config.json"
    if config_file.is_file() and "scheduler_config" not in parameters:
        parameters = {**parameters, "scheduler_config": json.dumps(json.loads(config_file.read_text()), sort_keys=True)}
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
    return tuple(n for n in MAX_BATCH if n in served)


def has_artifacts(repo) -> bool:
    """Whether `repo` holds a complete export: the pipeline and every model its variants serve."""
    repo = Path(repo)
    info_path = repo / "pipeline" / "1" / "pipeline.json"
    if not info_path.is_file() or not (repo / "pipeline" / "config.pbtxt").is_file():
        return False
    info = json.loads(info_path.read_text())
    served = set(info.get("served", MAX_BATCH))
    if "models" not in info:  # an export made before there could be several models
        return False
    variants = [facts for model in info["models"].values() for facts in model["variants"].values()]
    models = {m for facts in variants for kind, m in facts["components"].items() if kind in served}
    # components run by torch in the pipeline's process load from its copy of the checkpoint
    copies = {facts["torch_checkpoint"] for facts in variants if "torch_checkpoint" in facts}
    return (
        bool(variants)
        and all((repo / m / "1" / "model.onnx").is_file() for m in models)
        and all((repo / "pipeline" / "1" / c).is_dir() for c in copies)
    )


def _preview_decoder(repo: Path, info: CheckpointInfo, model: str, served: tuple):
    """The VAE decoder the preview map is fitted from: its ONNX export, else the torch module."""
    if "vae_decoder" in served:
        from serving.models.onnx import OnnxComponent

        decoder = OnnxComponent(repo / model / "1" / "model.onnx")
        return lambda latents: decoder(latents=latents)["images"]
    import torch

    from families import torch_module

    module = torch_module("vae_decoder", info)

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
