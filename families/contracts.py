"""The export contract of each component, declared once.

A contract names the tensors a component takes and returns, which axes are dynamic, how to make
a valid sample input, and the min/opt/max shapes an optimiser (TensorRT) should build for.
ONNX export, parity checks, Triton configs and the TensorRT command are all generated from it.
"""

from dataclasses import dataclass, replace

import numpy as np

from families.checkpoint import CheckpointInfo

BATCH = "batch"
HEIGHT, WIDTH = "height", "width"  # latent cells
IMAGE_HEIGHT, IMAGE_WIDTH = "image_height", "image_width"  # pixels
CONTEXTS = "contexts"  # text contexts per row of the regional UNet: the base prompt and each region
MAX_REGIONS = 8  # regions per request: the regional UNet takes up to MAX_REGIONS + 1 contexts per row


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple  # ints, or symbolic names of dynamic axes


@dataclass(frozen=True)
class ComponentContract:
    name: str  # the Triton model
    component: str  # what it runs: text_encoder, unet, unet_regional, vae_decoder or vae_encoder
    folders: tuple  # the checkpoint subfolders holding its weights (SDXL's text encoder: two)
    inputs: tuple
    outputs: tuple
    max_batch_size: int
    # sizes of symbolic axes: name -> (min, opt, max)
    axis_ranges: dict
    # whether an FP16 build (TensorRT --fp16, the torch runner on CUDA) may run it; False: FP32
    # (SDXL's VAE with force_upcast, which overflows in FP16: families/sdxl.py)
    fp16: bool = True

    def dynamic_axes(self) -> dict:
        """torch.onnx.export's dynamic_axes: tensor name -> {axis index: symbolic name}."""
        return {
            spec.name: {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)}
            for spec in self.inputs + self.outputs
        }

    def shape(self, spec: TensorSpec, sizes: dict) -> tuple:
        return tuple(sizes[d] if isinstance(d, str) else d for d in spec.dims)

    def profile(self) -> dict:
        """Input name -> (min shape, opt shape, max shape)."""
        return {
            spec.name: tuple(self.shape(spec, {axis: r[k] for axis, r in self.axis_ranges.items()}) for k in range(3))
            for spec in self.inputs
        }


def component_contracts(info: CheckpointInfo, max_image_size: int, max_batch: dict) -> dict:
    """The exported components of a checkpoint, by component (the names of their Triton models,
    until a repository with several variants renames them), from what its family declares
    (families/): the text encoder's inputs and outputs, the UNet's further per-row inputs, and
    whether a base checkpoint gets the regional UNet."""
    from families import FAMILIES  # the registry imports this module

    family = FAMILIES[info.family]
    lat_max = max_image_size // info.vae_factor
    lat_opt = min(info.native_size // info.vae_factor, lat_max)
    lat_min = 8 if lat_max >= 8 else lat_max
    latent = (BATCH, info.latent_channels, HEIGHT, WIDTH)
    # concat-conditioned UNets (inpainting, x4 upscaler) take extra channels after the latents
    unet_sample = (BATCH, info.unet_in_channels, HEIGHT, WIDTH)
    latent_axes = {HEIGHT: (lat_min, lat_opt, lat_max), WIDTH: (lat_min, lat_opt, lat_max)}
    image_axes = {
        IMAGE_HEIGHT: tuple(v * info.vae_factor for v in latent_axes[HEIGHT]),
        IMAGE_WIDTH: tuple(v * info.vae_factor for v in latent_axes[WIDTH]),
    }

    def batch_axis(name):
        return {BATCH: (1, min(4, max_batch[name]), max_batch[name])}

    vae_fp16 = not family.vae_fp32(info)

    contracts = {
        "text_encoder": ComponentContract(
            name="text_encoder",
            component="text_encoder",
            folders=tuple(e.folder for e in info.text_encoders),
            inputs=tuple(
                TensorSpec(name, "int64", (BATCH, encoder.length))
                for name, encoder in zip(family.token_inputs(info), info.text_encoders)
            ),
            outputs=family.text_outputs(info),
            max_batch_size=max_batch["text_encoder"],
            axis_ranges=batch_axis("text_encoder"),
        ),
        "unet": ComponentContract(
            name="unet",
            component="unet",
            folders=(family.denoiser_folder,),
            inputs=(
                TensorSpec("sample", "float32", unet_sample),
                # one timestep per row: requests at different steps share one call; fractional
                # for sigma-space samplers (Euler, Karras sigmas), integers for the others
                TensorSpec("timestep", "float32", (BATCH,)),
                TensorSpec("encoder_hidden_states", "float32", (BATCH, info.text_length, info.text_hidden)),
                *family.unet_row_inputs(info),
            ),
            outputs=(TensorSpec("noise_pred", "float32", latent),),
            max_batch_size=max_batch["unet"],
            axis_ranges={**batch_axis("unet"), **latent_axes},
        ),
        "vae_decoder": ComponentContract(
            name="vae_decoder",
            component="vae_decoder",
            folders=("vae",),
            inputs=(TensorSpec("latents", "float32", latent),),
            # NHWC in [0, 1]: the pipeline only rounds to uint8
            outputs=(TensorSpec("images", "float32", (BATCH, IMAGE_HEIGHT, IMAGE_WIDTH, 3)),),
            max_batch_size=max_batch["vae_decoder"],
            axis_ranges={**batch_axis("vae_decoder"), **latent_axes},
            fp16=vae_fp16,
        ),
        "vae_encoder": ComponentContract(
            name="vae_encoder",
            component="vae_encoder",
            folders=("vae",),
            inputs=(TensorSpec("images", "float32", (BATCH, IMAGE_HEIGHT, IMAGE_WIDTH, 3)),),
            # the posterior's mean and standard deviation, already in diffusion (scaled) units
            outputs=(
                TensorSpec("latents_mean", "float32", latent),
                TensorSpec("latents_std", "float32", latent),
            ),
            max_batch_size=max_batch["vae_encoder"],
            axis_ranges={**batch_axis("vae_encoder"), **image_axes},
            fp16=vae_fp16,
        ),
    }
    if info.layout == "base" and family.regional_attention:  # the regional UNet takes text contexts alone
        contracts["unet_regional"] = regional_unet_contract(contracts["unet"], max_batch["unet_regional"])
    return contracts


LORA_COLUMNS = "lora_columns"  # the bank's width: the resident adapters' ranks side by side
MAX_LORA_COLUMNS = 1024


def lora_contract(contract: ComponentContract, layers: dict) -> ComponentContract:
    """A component with mixed LoRA adapters (families/lora.py; the denoiser, the text encoder): its
    inputs, then the call's scales [rows, K] and each adapted layer's bank lora_A.<layer> [in, K],
    lora_B.<layer> [K, out]; named <component>_lora."""
    banks = []
    for layer, (fan_in, fan_out) in layers.items():
        banks += [
            TensorSpec(f"lora_A.{layer}", "float32", (fan_in, LORA_COLUMNS)),
            TensorSpec(f"lora_B.{layer}", "float32", (LORA_COLUMNS, fan_out)),
        ]
    name = f"{contract.component}_lora"
    return replace(
        contract,
        name=name,
        component=name,
        inputs=(*contract.inputs, TensorSpec("lora_scales", "float32", (BATCH, LORA_COLUMNS)), *banks),
        axis_ranges={**contract.axis_ranges, LORA_COLUMNS: (1, 16, MAX_LORA_COLUMNS)},
    )


def token_input_names(encoders: int) -> tuple:
    """The text encoder component's token-id inputs, one per tokenizer: input_ids, input_ids_2, ..."""
    return tuple("input_ids" if k == 0 else f"input_ids_{k + 1}" for k in range(encoders))


def regional_unet_contract(unet: ComponentContract, max_batch: int) -> ComponentContract:
    """Regional prompts' attention mode (families/regional_unet.py): the UNet's weights and tensors,
    with K text contexts per row and their region weights at the latent's resolution."""
    sample, timestep, context = unet.inputs
    batch, length, hidden = context.dims
    return replace(
        unet,
        name="unet_regional",
        component="unet_regional",
        inputs=(
            sample,
            timestep,
            TensorSpec(context.name, context.dtype, (batch, CONTEXTS, length, hidden)),
            TensorSpec("region_weights", "float32", (BATCH, CONTEXTS, HEIGHT, WIDTH)),
        ),
        max_batch_size=max_batch,
        axis_ranges={**unet.axis_ranges, BATCH: (1, min(4, max_batch), max_batch), CONTEXTS: (1, 3, MAX_REGIONS + 1)},
    )


def sample_inputs(contract: ComponentContract, info: CheckpointInfo, sizes: dict, seed: int) -> dict:
    """Random inputs in each tensor's valid range, for tracing and parity checks."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        shape = contract.shape(spec, sizes)
        if spec.name.startswith("input_ids"):  # input_ids, input_ids_2: each encoder's own vocabulary
            encoder = info.text_encoders[token_input_names(len(info.text_encoders)).index(spec.name)]
            out[spec.name] = rng.integers(0, encoder.vocab_size, shape, dtype=np.int64)
        elif spec.name == "timestep":
            out[spec.name] = rng.uniform(0, info.scheduler_config.get("num_train_timesteps", 1000), shape).astype(
                np.float32
            )
        elif spec.name == "class_labels":
            assert info.max_noise_level is not None  # an upscaler's
            out[spec.name] = rng.integers(0, info.max_noise_level + 1, shape)
        elif spec.name == "images":
            out[spec.name] = rng.random(shape, dtype=np.float32)
        elif spec.name.startswith("lora_"):  # small banks and scales: the adapters' effect stays in range
            out[spec.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif spec.name == "region_weights":  # non-negative, summing to 1 over the contexts of each cell
            weights = rng.random(shape, dtype=np.float32)
            out[spec.name] = weights / weights.sum(axis=1, keepdims=True)
        else:
            out[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return out
