"""Running the models for the jobs the scheduler picked: text encoding on admission, one UNet
call per iteration for all chosen rows whatever their samplers, each sampler's update of its
jobs' rows (serving/core/samplers/), VAE decoding of finished jobs.

One Runner serves one UNet variant of one model (serving/core/variants.py); `models` is
anything with encode_text(**token ids) -> {output: array}, unet(sample, timestep, **named per-row
inputs), regional_unet (the same, with region_weights), decode(latents) and encode_image(images)
-> (mean, std) over numpy arrays: Triton BLS calls, ONNX Runtime or torch in this process.

Every job gives the call its rows and, by name, one value per row of every other input: its
conditioning's (the text context, SDXL's pooled text_embeds, regions' weights), its family's
(SDXL's time_ids: families/) and its image conditioning's (the inpainting UNet's channels after
the latents, the upscaler's class labels: serving/core/image_jobs.py, which also sets starting
latents at admission, edits latents after each update and pastes pixels back at the end). The
runner concatenates them by name and never asks which family or task a job is. A job outside
its guidance interval contributes its conditional rows only.
"""

from collections import defaultdict
from typing import Any

import numpy as np

from families import FAMILIES
from serving.core.image_jobs import admit_image_jobs, steer_masks
from serving.core.interfaces import Array, RunnerModels
from serving.core.regions import is_regional_network
from serving.core.sampler import DDIMSchedule, noise_generator
from serving.core.samplers import make_sampler
from serving.core.text import CachedTextEncoder
from serving.core.variants import VariantSpec


class Runner:
    def __init__(
        self, models: RunnerModels, variant: VariantSpec, text_encoder: CachedTextEncoder, lora: Any = None
    ) -> None:
        """lora: the model's LoraRegistry (serving/core/lora.py) where this variant's denoiser takes
        mixed LoRA inputs, else None."""
        self.models = models
        self.lora = lora
        self.variant = variant
        self.family = FAMILIES[variant.family]
        self.samplers: dict[tuple[str, str], Any] = {}  # (name, sigma schedule) -> Sampler, made on first use
        self.low_res_schedule = (
            DDIMSchedule.from_config(variant.low_res_scheduler_config) if variant.low_res_scheduler_config else None
        )
        self.text_encoder = text_encoder
        self.latent_channels = variant.latent_channels
        self.vae_factor = variant.vae_factor

    def admit(self, jobs: list[Any], steered: list[Any] | tuple[Any, ...] = ()) -> None:
        """Text-encodes the new texts of the new jobs' and the steered jobs' plans
        (serving/core/steering.py) in one call, draws the new jobs' starting latents, and
        VAE-encodes the input images of image-conditioned ones in one call per image size; steered
        inpainting jobs with a new mask get its image conditioning."""
        if self.lora is not None:  # resident before their texts are encoded, until the job ends (release)
            for job in (*jobs, *steered):
                if job.planned.loras != job.held_loras:  # a new job, or a steer of its adapters (from its next step)
                    self.lora.hold(job.planned.loras)
                    self.lora.release(job.held_loras)
                    job.held_loras = job.planned.loras
        owned = [(s, job.held_loras) for job in (*jobs, *steered) for s in job.plan.unencoded()]
        segments = [s for s, _ in owned]
        for segment, conditioning in zip(segments, self.encode([s.spec for s in segments], [a for _, a in owned])):
            segment.conditioning = conditioning
        noises = {}
        for job in jobs:
            r = job.planned
            job.rng = noise_generator(r.seed)
            shape = (self.latent_channels, r.height // self.vae_factor, r.width // self.vae_factor)
            noises[id(job)] = job.rng.standard_normal(shape, dtype=np.float32)
            run = job.sampler_run = self.sampler(r.sampler, r.sigma_schedule).start(
                r.steps, r.strength, r.eta, mu=self.family.shift_mu(r, self.variant), kept=r.denoising_steps
            )
            job.timesteps = run.denoising_timesteps
            job.latents = run.sampler.initial_latents(run, noises[id(job)])
            job.conditioning = guided_conditioning(job)
            job.row_inputs = self.family.row_inputs(r, self.variant)
        max_batch = self.variant.max_batch.get("vae_encoder")
        images = [j for j in jobs if j.request.image is not None]
        if images:
            admit_image_jobs(
                images,
                noises,
                self.models.encode_image,
                self.variant.name,
                self.vae_factor,
                self.low_res_schedule,
                max_batch,
            )
        masked = [
            j
            for j in steered
            if j.image_conditioning is not None and j.image_conditioning.source is not j.planned.image
        ]
        if masked:
            steer_masks(masked, self.models.encode_image, self.variant.name, self.vae_factor, max_batch)

    def sampler(self, name: str, sigma_schedule: str) -> Any:
        key = (name, sigma_schedule)
        if key not in self.samplers:
            self.samplers[key] = make_sampler(name, sigma_schedule, self.variant.scheduler_config)
        return self.samplers[key]

    def encode(self, prompts: list[Any], loras: list[Any] | None = None) -> list[Any]:
        """The conditioning of each prompt (anything with texts() and build()), from one
        text-encoder call over all their texts; loras: each prompt's job's adapter set."""
        texts = [t for p in prompts for t in p.texts()]
        sets = [s for p, s in zip(prompts, loras) for _ in p.texts()] if loras is not None else None
        embeddings = self.text_encoder.encode(texts, sets)
        out, start = [], 0
        for p in prompts:
            count = len(p.texts())
            out.append(p.build(embeddings[start : start + count]))
            start += count
        return out

    def step(self, jobs: list[Any]) -> None:
        """One denoising step for every job in `jobs` (one call key) with one UNet call: each
        job's rows sit together, and its conditioning combines their predictions; then each
        sampler updates the rows of its jobs."""
        runs = [j.sampler_run for j in jobs]
        positions = [run.begin + j.index for run, j in zip(runs, jobs)]
        t = np.array([run.timesteps[p] for run, p in zip(runs, positions)], dtype=np.float32)
        latents = np.stack([j.latents for j in jobs])
        scale = np.array([run.sampler.input_scale(run, p) for run, p in zip(runs, positions)], np.float32)
        rows = [j.conditioning.rows for j in jobs]
        sample = np.repeat(latents * scale[:, None, None, None], rows, axis=0)
        channels = [j.image_conditioning.channels for j in jobs if j.image_conditioning is not None]
        if channels and channels[0] is not None:  # concat-conditioned UNets: every job of the call has them
            sample = np.concatenate([sample, np.repeat(np.stack(channels), rows, axis=0)], axis=1)
        inputs = {"timestep": np.repeat(t, rows)}
        per_job = [
            {
                **j.conditioning.inputs(),
                **{name: np.repeat(value[None], n, axis=0) for name, value in j.denoiser_inputs().items()},
            }
            for j, n in zip(jobs, rows)
        ]
        for name in per_job[0]:
            inputs[name] = np.concatenate([values[name] for values in per_job])
        if self.lora is not None:  # every row's adapter weights over the bank's columns (0: none)
            sets = [j.held_loras for j in jobs]
            bank = self.lora.bank(sets)  # the adapters this call's rows use
            inputs["lora_scales"] = np.repeat(self.lora.scales(sets, bank), rows, axis=0)
            for layer, (a, b) in bank.layers.items():
                inputs[f"lora_A.{layer}"], inputs[f"lora_B.{layer}"] = a, b
        denoise = self.models.regional_unet if is_regional_network(jobs[0].network) else self.models.unet
        predictions = denoise(sample, **inputs)
        bounds = np.cumsum([0] + rows)
        outputs = np.stack([j.conditioning.combine(predictions[a:b]) for j, a, b in zip(jobs, bounds[:-1], bounds[1:])])
        by_sampler = defaultdict(list)
        for i, run in enumerate(runs):
            by_sampler[id(run.sampler)].append(i)
        for members in by_sampler.values():
            group = [jobs[i] for i in members]
            sampler = runs[members[0]].sampler
            noise = None
            drawn = [sampler.draws_noise(runs[i], positions[i]) for i in members]
            if any(drawn):  # from each job's own seed stream, in its step order: batch-invariant
                noise = np.stack(
                    [
                        j.rng.standard_normal(j.latent_shape, dtype=np.float32)
                        if d
                        else np.zeros(j.latent_shape, np.float32)
                        for j, d in zip(group, drawn)
                    ]
                )
            prev, x0 = sampler.step(
                [runs[i] for i in members], [positions[i] for i in members], outputs[members], latents[members], noise
            )
            for k, job in enumerate(group):
                job.latents = prev[k]
                job.pred_x0 = x0[k]
                job.index += 1
                if job.image_conditioning is not None:
                    job.image_conditioning.after_step(job)

    def release(self, jobs: list[Any]) -> None:
        """Jobs that ended (finished, failed, cancelled): their adapters may be evicted again."""
        if self.lora is not None:
            for job in jobs:
                self.lora.release(job.held_loras)
                job.held_loras = ()

    def decode(self, jobs: list[Any]) -> list[Any]:
        """uint8 [H, W, 3] images of finished jobs, one VAE call per latent size (more past the
        VAE decoder's max batch size)."""
        images: list[Any] = [None] * len(jobs)
        by_shape = defaultdict(list)
        for i, job in enumerate(jobs):
            by_shape[job.latent_shape].append(i)
        size = self.variant.max_batch.get("vae_decoder")
        calls = [
            group[start : start + (size or len(group))]
            for group in by_shape.values()
            for start in range(0, len(group), size or len(group))
        ]
        for indices in calls:
            pixels = self.models.decode(np.stack([jobs[i].latents for i in indices]))
            for i, image in zip(indices, pixels):
                images[i] = to_uint8(image)
                if jobs[i].image_conditioning is not None:
                    images[i] = jobs[i].image_conditioning.finish(images[i])
        return images


def guided_conditioning(job: Any) -> Any:
    """The conditioning of the job's next step: its plan's, without the unconditional rows
    outside its guidance interval (fractions of the steps it runs: step i of n is guided when
    lo <= i / n < hi)."""
    conditioning = job.plan.conditioning_at(job.index)
    lo, hi = job.request.guidance_interval
    if (lo, hi) == (0.0, 1.0) or job.timesteps is None:
        return conditioning
    fraction = job.index / len(job.timesteps)
    return conditioning if lo <= fraction < hi else conditioning.unguided()


def to_uint8(image: Array) -> Array:
    """[0, 1] floats to bytes, rounding as diffusers' numpy_to_pil does."""
    out: Array = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return out
