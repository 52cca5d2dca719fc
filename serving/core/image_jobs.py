"""Image-conditioned jobs on the step-batched path: what img2img, inpainting and upscaling add to
a job at admission, at every step and at the end. Imports nothing from Triton.

At admission (one VAE-encoder call per image size over all jobs admitted together):
- img2img (SDEdit): the init image's latents, noised to the first of the last int(steps x
  strength) positions of its sampler's schedule (by that sampler's forward process, with the
  job's x_T as noise) are its starting latents; it denoises only those positions (diffusers'
  StableDiffusionImg2ImgPipeline);
- inpaint with the base UNet (latent blending, diffusers' StableDiffusionInpaintPipeline with a
  4-channel UNet): after every sampler update, the latents outside the mask are replaced by the
  init latents noised to the next timestep (with the same x_T noise; clean after the last step);
- inpaint with a 9-channel UNet: every row gets cat(mask at latent size, masked-image latents)
  after its latents (StableDiffusionInpaintPipeline's concat conditioning);
- upscale (StableDiffusionUpscalePipeline): every row gets the low-res image in [-1, 1], noised
  to `noise_level` by the upscaler's low-res schedule, and the noise level as class label.
With `keep_unmasked`, the decoded image outside the (blurred) mask is the input's, exactly.
A steer of an inpainting job's mask (`steer_masks`) rebuilds the mask's parts of its image
conditioning from its next step as a fresh job with that mask would have them: the latent-blend
mask, the 9-channel UNet's mask and masked-image latents (one more encoder call), the paste-back.

The VAE posterior is sampled (mean + std x noise from the request's image stream), as diffusers
samples it; the mask at latent size is the thresholded mask sampled at each cell's top-left
pixel (torch's nearest interpolation, which diffusers uses).
"""

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np

from serving.core.interfaces import Array
from serving.core.sampler import DDIMSchedule, image_noise_generator


@dataclass(eq=False)
class LatentBlend:
    """Latent-blend inpainting's per-step hook: keep the init latents (noised to the step)
    outside the mask."""

    init_latents: Any  # [C, h, w]
    noise: Array  # the job's x_T
    mask: Any  # float32 [1, h, w], 1 = repaint (None until _inpaint_conditioning sets it)

    def apply(self, job: Any) -> None:
        run = job.sampler_run  # noised to the next step's level (clean after the last step)
        kept = run.sampler.add_noise(run, self.init_latents, self.noise, run.begin + job.index)
        job.latents = ((1 - self.mask) * kept + self.mask * job.latents).astype(np.float32)


@dataclass(eq=False)
class ImageConditioning:
    """A job's image conditioning: extra UNet input channels for each of its rows, a per-step
    latent edit, and the paste-back of the input's pixels."""

    channels: Array | None = None  # [C_extra, h, w] after the latents of each row (inpaint, upscale UNets)
    row_inputs: dict[str, Any] = field(default_factory=dict)  # further UNet inputs per row: the upscaler's class_labels
    blend: LatentBlend | None = None  # inpaint with the base UNet
    paste_mask: Array | None = None  # float32 [H, W], 1 = generated; where 0 the output is the input
    init_image: Array | None = None  # uint8 [H, W, 3], for the paste-back
    source: object = None  # the request's ImageInput it was made from (a mask steer replaces that)

    def after_step(self, job: Any) -> None:
        if self.blend is not None:
            self.blend.apply(job)

    def finish(self, image: Array) -> Array:
        if self.paste_mask is None:
            return image
        weight = self.paste_mask[..., None]
        assert self.init_image is not None  # set with paste_mask
        return cast(
            Array, np.round(weight * image + (1 - weight) * self.init_image.astype(np.float32)).astype(np.uint8)
        )


def admit_image_jobs(
    jobs: list[Any],
    noises: dict[int, Any],
    encode_image: Any,
    layout: str,
    vae_factor: int,
    low_res_schedule: DDIMSchedule | None = None,
    max_batch: int | None = None,
) -> None:
    """Sets the starting latents and image conditioning of image-conditioned jobs whose sampler
    run (its strength's share of the schedule) and starting latents from noise are already set;
    `noises`: {id(job): its x_T draw}. `layout` is their variant's (base, inpaint, upscale);
    encode_image(images [N, H, W, 3] in [0, 1]) -> (mean, std), called with at most `max_batch`
    images."""
    latents = _encode(jobs, encode_image, layout, max_batch)
    for job in jobs:
        image, noise = job.planned.image, noises[id(job)]  # planned: the request as the engine last planned it
        run = job.sampler_run
        rng = image_noise_generator(job.request.seed)
        posterior = _posterior(latents[id(job)], rng)
        if image.task == "upscale":
            job.image_conditioning = _upscale_conditioning(image, rng, low_res_schedule)
            continue
        init = posterior.pop(0) if _needs_init_latents(image, layout) else None
        if image.task == "img2img":  # as diffusers' img2img: noised even at strength 1
            job.latents = run.sampler.add_noise(run, init, noise, run.begin)
            continue
        if image.strength < 1.0:  # as diffusers' inpainting: strength 1 starts from pure noise
            job.latents = run.sampler.add_noise(run, init, noise, run.begin)
        if layout == "inpaint":
            job.image_conditioning = _inpaint_conditioning(image, vae_factor, masked_latents=posterior[0])
        else:
            job.image_conditioning = _inpaint_conditioning(image, vae_factor, blend=LatentBlend(init, noise, None))


def steer_masks(jobs: list[Any], encode_image: Any, layout: str, vae_factor: int, max_batch: int | None = None) -> None:
    """Gives inpainting jobs whose mask a steer changed (the image input of the request their
    plan was made from, job.planned, is no longer their conditioning's source) the image
    conditioning of that mask, from their next step. Their
    latents, timesteps and noise stay; the 9-channel UNet's masked-image latents are encoded
    again and drawn from the job's image stream as at admission, so a steer before step 0 gives
    what a fresh request with the new mask gives."""
    if layout != "inpaint":  # latent blending: the same init latents and noise, the new mask
        for job in jobs:
            job.image_conditioning = _inpaint_conditioning(
                job.planned.image, vae_factor, blend=job.image_conditioning.blend
            )
        return
    latents = _encode(jobs, encode_image, layout, max_batch)
    for job in jobs:
        masked = _posterior(latents[id(job)], image_noise_generator(job.request.seed))[-1]
        job.image_conditioning = _inpaint_conditioning(job.planned.image, vae_factor, masked_latents=masked)


def _posterior(encoded: list[Any], rng: np.random.Generator) -> list[Any]:
    """Samples of the VAE posteriors [(mean, std)] of a job's images, in order, from its image stream."""
    return [mean + std * rng.standard_normal(mean.shape, dtype=np.float32) for mean, std in encoded]


def _inpaint_conditioning(
    image: Any, vae_factor: int, masked_latents: Array | None = None, blend: LatentBlend | None = None
) -> ImageConditioning:
    """Inpainting's conditioning for `image`'s mask: with `masked_latents`, the 9-channel UNet's
    channels (mask at latent size, masked-image latents); else latent blending with `blend`'s
    init latents and noise; and the paste-back."""
    mask = image.mask[::vae_factor, ::vae_factor][None].astype(np.float32)
    conditioning = ImageConditioning(source=image)
    if masked_latents is not None:
        conditioning.channels = np.concatenate([mask, masked_latents])
    else:
        assert blend is not None  # one of the two is given
        conditioning.blend = replace(blend, mask=mask)
    if image.keep_unmasked:
        conditioning.paste_mask = gaussian_blur(image.mask.astype(np.float32), image.mask_blur)
        conditioning.init_image = image.init_image
    return conditioning


def _needs_init_latents(image: Any, layout: str) -> bool:
    # the 9-channel UNet sees the masked image; the init latents only start a partial schedule
    needs: bool = image.task in ("img2img", "inpaint") and (layout != "inpaint" or image.strength < 1.0)
    return needs


def _images_to_encode(image: Any, layout: str) -> list[Any]:
    """float32 [H, W, 3] images in [0, 1], in the order their posterior samples are drawn."""
    pixels = image.init_image.astype(np.float32) / 255
    out = [pixels] if _needs_init_latents(image, layout) else []
    if image.task == "inpaint" and layout == "inpaint":
        # diffusers zeroes the masked pixels in [-1, 1]: grey in [0, 1]
        out.append(np.where(image.mask[..., None], np.float32(0.5), pixels))
    return out


def _encode(jobs: list[Any], encode_image: Any, layout: str, max_batch: int | None) -> dict[int, list[Any]]:
    """{id(job): [(mean, std) per image it needs]}, from one encoder call per image size (more
    when they exceed the encoder's max batch)."""
    wanted = {id(job): _images_to_encode(job.planned.image, layout) for job in jobs}
    by_shape: defaultdict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for key, images in wanted.items():
        for k, pixels in enumerate(images):
            by_shape[pixels.shape].append((key, k, pixels))
    out: dict[int, list[Any]] = {key: [None] * len(images) for key, images in wanted.items()}
    for group in by_shape.values():
        size = max_batch or len(group)
        for start in range(0, len(group), size):
            members = group[start : start + size]
            mean, std = encode_image(np.stack([pixels for _, _, pixels in members]))
            for (key, k, _), m, s in zip(members, mean, std):
                out[key][k] = (m, s)
    return out


def _upscale_conditioning(
    image: Any, rng: np.random.Generator, low_res_schedule: DDIMSchedule | None
) -> ImageConditioning:
    assert low_res_schedule is not None  # an upscale variant's runner has one
    low_res = image.init_image.astype(np.float32).transpose(2, 0, 1) / 255 * 2 - 1
    noise = rng.standard_normal(low_res.shape, dtype=np.float32)
    return ImageConditioning(
        channels=low_res_schedule.add_noise(low_res, noise, image.noise_level),
        row_inputs={"class_labels": np.int64(image.noise_level)},
    )


def gaussian_blur(mask: Array, sigma: float) -> Array:
    """float32 [H, W] blurred by a Gaussian of `sigma` pixels truncated at 3 sigma (edges
    replicated); sigma 0 returns the mask. Far from the mask the result is exactly 0."""
    if sigma <= 0:
        return mask
    radius = int(3 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = mask.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        out = sum(w * np.take(padded, np.arange(i, i + mask.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return np.clip(out, 0.0, 1.0).astype(np.float32)
