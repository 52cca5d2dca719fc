"""The inputs of image-conditioned requests (img2img, inpainting, upscaling), validated.
Imports nothing from Triton.

Tasks: txt2img (no image), img2img (`init_image`), inpaint (`init_image` and `mask`), upscale
(`init_image` is the low-resolution input). Without `task` it is inferred: an image and a mask
inpaint, an image alone is img2img, neither is txt2img; upscale must be named.

The mask is thresholded, not blended: values >= 128 are repainted, lower ones kept (diffusers
binarises its inpainting mask at 0.5 the same way). Soft edges come from `mask_blur`, a Gaussian
blur (sigma in pixels) of the thresholded mask used when the original pixels are pasted back
(`keep_unmasked`): pixels the blurred mask does not reach are the input's, exactly.
"""

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from families import FAMILIES

# InvalidInput and the field readers; request.py imports this module in turn (module imports
# keep the cycle safe in either import order)
from serving.core import request as fields
from serving.core.interfaces import Array
from serving.core.variants import TASKS, VARIANT_NAMES, variant_for

IMAGE_FIELDS = ("init_image", "mask", "strength", "mask_blur", "keep_unmasked", "noise_level")
TASK_FIELDS = {  # the image inputs each task takes
    "img2img": ("init_image", "strength"),
    "inpaint": ("init_image", "mask", "strength", "mask_blur", "keep_unmasked"),
    "upscale": ("init_image", "noise_level"),
}
# as diffusers' pipelines: img2img keeps a quarter of the schedule's noise steps for the image;
# inpainting starts the masked region from pure noise
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}
MASK_THRESHOLD = 128
MAX_MASK_BLUR = 64  # pixels
DEFAULT_NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline's


@dataclass(frozen=True, eq=False)
class ImageInput:
    task: str  # img2img, inpaint or upscale
    variant: str  # the UNet variant the task runs on (serving/core/variants.py)
    init_image: Array  # uint8 [H, W, 3]
    mask: Array | None  # inpaint: bool [H, W], True = repaint
    strength: float  # img2img, inpaint: the share of the schedule that is denoised
    mask_blur: int  # inpaint: sigma of the paste-back mask's blur, pixels
    keep_unmasked: bool  # inpaint: paste the input back outside the (blurred) mask
    noise_level: int  # upscale: noise added to the low-res input, passed as the UNet's class label
    output_size: tuple[Any, ...]  # (height, width) of the result


def parse_image_input(inputs: dict[str, Any], limits: Any, steps: int) -> ImageInput | None:
    """The image part of a request, or None for text-to-image; `limits.variants` says which
    tasks this server can run."""
    given = [n for n in IMAGE_FIELDS if inputs.get(n) is not None]
    task = _task(inputs, given)
    variant = variant_for(task, limits.variants) if limits.variants else ("base" if task == "txt2img" else None)
    if variant is None:
        wanted = "upscale" if task == "upscale" else "base"
        held = ", ".join(f"{name} ({VARIANT_NAMES[name]})" for name in limits.variants) or "text-to-image only"
        raise fields.InvalidInput(
            "task", f"{task} needs the {wanted} variant ({VARIANT_NAMES[wanted]} UNet); this server holds: {held}"
        )
    if task == "txt2img":
        if given:
            raise fields.InvalidInput(given[0], "is for tasks img2img, inpaint and upscale, not txt2img")
        return None
    for name in given:
        if name not in TASK_FIELDS[task]:
            raise fields.InvalidInput(name, f"is not used by task {task} (it takes {', '.join(TASK_FIELDS[task])})")
    spec = limits.variants[variant]
    image = _init_image(inputs, task, spec)
    factor = spec.vae_factor if task == "upscale" else 1
    strength = _strength(inputs, task, steps, limits.family) if task in DEFAULT_STRENGTH else 1.0
    return ImageInput(
        task=task,
        variant=variant,
        init_image=image,
        mask=_mask(inputs, image) if task == "inpaint" else None,
        strength=strength,
        mask_blur=fields._integer(inputs, "mask_blur", 0, 0, MAX_MASK_BLUR),
        keep_unmasked=_boolean(inputs, "keep_unmasked", True),
        noise_level=fields._integer(inputs, "noise_level", DEFAULT_NOISE_LEVEL, 0, spec.max_noise_level)
        if task == "upscale"
        else DEFAULT_NOISE_LEVEL,
        output_size=(image.shape[0] * factor, image.shape[1] * factor),
    )


def steered_mask(image: ImageInput | None, inputs: dict[str, Any]) -> ImageInput:
    """An inpainting request's image input with the steer's `mask` (checked as a request's)."""
    if image is None or image.task != "inpaint":
        raise fields.InvalidInput(
            "mask",
            f"can be steered in an inpainting generation only; this one is "
            f"{image.task if image is not None else 'txt2img'}",
        )
    return replace(image, mask=_mask(inputs, image.init_image))


def output_side(inputs: dict[str, Any], name: str, image: ImageInput) -> int:
    """`height` or `width` of an image-conditioned request: the image's (4x for the x4 upscaler);
    a value given must agree."""
    expected = image.output_size[0 if name == "height" else 1]
    value = fields._integer(inputs, name, expected, 1, 2**31 - 1)
    if value != expected:
        source = "4 x init_image's" if image.task == "upscale" else "init_image's"
        raise fields.InvalidInput(name, f"must be {expected} ({source} {name}) or be omitted, got {value}")
    size: int = value
    return size


def _task(inputs: dict[str, Any], given: list[Any]) -> str:
    task = fields._text(inputs, "task", required=False)
    if task:
        if task not in TASKS:
            raise fields.InvalidInput("task", f"must be one of {', '.join(TASKS)}, got {task!r}")
        return task
    if inputs.get("init_image") is not None:
        return "inpaint" if inputs.get("mask") is not None else "img2img"
    if given:
        raise fields.InvalidInput(given[0], "requires init_image")
    return "txt2img"


def _init_image(inputs: dict[str, Any], task: str, spec: Any) -> Array:
    value = inputs.get("init_image")
    if value is None:
        raise fields.InvalidInput("init_image", f"is required for task {task}")
    image = np.asarray(value)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise fields.InvalidInput("init_image", f"must be UINT8 [H, W, 3], got {_describe(image)}")
    # the upscaler's latent is its input's size; its output is that times its VAE's factor
    factor = spec.vae_factor if task == "upscale" else 1
    multiple, largest = spec.size_multiple // factor, spec.max_size // factor
    height, width = image.shape[:2]
    if any(side % multiple or not multiple <= side <= largest for side in (height, width)):
        note = f" (the output is {factor}x that)" if factor > 1 else ""
        raise fields.InvalidInput(
            "init_image",
            f"is {height}x{width} pixels; height and width must be multiples of "
            f"{multiple} in [{multiple}, {largest}]{note}",
        )
    return image


def _mask(inputs: dict[str, Any], image: Array) -> Array:
    value = inputs.get("mask")
    if value is None:
        raise fields.InvalidInput("mask", "is required for task inpaint")
    mask = np.asarray(value)
    if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
        raise fields.InvalidInput(
            "mask", f"must be UINT8 [H, W] of init_image's size {list(image.shape[:2])}, got {_describe(mask)}"
        )
    return mask >= MASK_THRESHOLD


def _strength(inputs: dict[str, Any], task: str, steps: int, family: str) -> float:
    value = fields._scalar(inputs, "strength")
    if value is None:
        value = DEFAULT_STRENGTH[task]
    if not isinstance(value, (int, float, np.integer, np.floating)) or not 0 < float(value) <= 1:
        raise fields.InvalidInput("strength", f"must be a finite number in (0, 1], got {value}")
    # the decimal the client wrote: FP32 0.7 is 0.69999999, and int(10 x 0.69999999) = 6 steps, not 7
    strength = float(str(np.float32(value)))
    if FAMILIES[family].kept_steps(steps, strength) < 1:
        raise fields.InvalidInput(
            "strength",
            f"leaves no denoising step: {steps} steps x strength {strength} keeps 0 "
            f"(family {family}'s rule); raise strength or steps",
        )
    return strength


def _boolean(inputs: dict[str, Any], name: str, default: bool) -> bool:
    value = fields._scalar(inputs, name)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):
        raise fields.InvalidInput(name, "must be a boolean (BOOL)")
    return bool(value)


def _describe(array: Array) -> str:
    return f"{array.dtype} {list(array.shape)}"
