"""The in-process baselines the benchmark compares the server against, for the checkpoint's family
(families/: SD 1.x/2.x, SDXL).

(a) the family's diffusers text-to-image pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline)
    answering one request at a time: what a user would run instead of a server.
(c) the bare loop at batch 1: the family's text encoding (the exported text encoder; SDXL: its
    prompt_embeds and text_embeds, zeros for the empty negative prompt), a DDIM loop with one
    call per step of the UNet runner the in-process server uses (ONNX Runtime, LocalUnet) with the
    family's per-row inputs (SDXL: text_embeds and time_ids per row), the VAE decoder; no server,
    no scheduler: the floor of overhead. Both have guidance, so each UNet call has 2 rows."""

from types import SimpleNamespace
import time

import numpy as np

from families import FAMILIES
from families.checkpoint import CheckpointInfo
from serving.core.runner import to_uint8
from serving.core.sampler import DDIMSchedule, guided_noise, noise_generator
from serving.core.service import PipelineAssets, model_infos
from serving.core.text import PromptTokenizer, TextTokenizers
from serving.core.variants import VariantSpec
from serving.models.onnx import LocalModels

BASELINE_ROWS = 2  # UNet rows per call of both baselines: one prompt with classifier-free guidance


def diffusers_pipeline_class(checkpoint) -> str:
    """The family's text-to-image diffusers pipeline (the first class it serves) for a checkpoint."""
    return FAMILIES[CheckpointInfo.read(checkpoint).family].pipelines[0]


def load_diffusers_pipeline(checkpoint):
    """The checkpoint in its family's text-to-image diffusers pipeline, with DDIM (the served default
    of the checkpoints benchmarked: their schedulers are DDIM), without progress bars or watermark."""
    import inspect

    import diffusers

    cls = getattr(diffusers, diffusers_pipeline_class(checkpoint))
    extra = {"add_watermarker": False} if "add_watermarker" in inspect.signature(cls.__init__).parameters else {}
    pipe = cls.from_pretrained(checkpoint, local_files_only=True, **extra)
    if FAMILIES[CheckpointInfo.read(checkpoint).family].guidance == "cfg":  # flow models keep their flow scheduler
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_latencies(checkpoint, prompts, steps, guidance, size, cpu: list | None = None) -> list:
    """Seconds per image, one prompt at a time; `cpu` (a list) gets this process's CPU seconds per image."""
    import torch

    pipe = load_diffusers_pipeline(checkpoint)
    info = CheckpointInfo.read(checkpoint)
    # Flux: the T5 sequence as the served checkpoint's tokenizer sets it (FluxPipeline's default is 512)
    extra = {"max_sequence_length": info.text_length} if info.family == "flux" else {}
    latencies = []
    for i, prompt in enumerate(prompts):
        started_cpu, start = time.process_time(), time.perf_counter()
        pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(i),
            output_type="np",
            **extra,
        )
        latencies.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - started_cpu)
    return latencies


class BareLoop:
    """The bare loop over an exported repository's default model (its primary variant)."""

    def __init__(self, repo):
        assets = PipelineAssets.read(repo / "pipeline" / "1")
        infos = model_infos(assets.info)
        model = assets.info.get("default_model", next(iter(infos)))
        info = infos[model]
        self.spec = VariantSpec.table(info)[info["primary"]]
        self.family = FAMILIES[self.spec.family]
        self.models = LocalModels(repo, variant=self.spec.name, model=model)
        self.schedule = DDIMSchedule.from_config(self.spec.scheduler_config)
        self.tokenizers = TextTokenizers(
            {
                name: PromptTokenizer(
                    assets.tokenizer_dir.parent / folder, self.spec.token_lengths.get(name, self.spec.text_length)
                )
                for name, folder in self.spec.tokenizers.items()
            }
        )
        self.text_inputs = self.family.text_inputs()  # text encoder output -> denoiser input

    def conditioning(self, prompt: str) -> dict:
        """Denoiser input name -> [2, ...]: the prompt's row, then the unconditional row (the
        encoding of "", or zeros where the checkpoint says force_zeros_for_empty_prompt)."""
        texts = [prompt] if self.spec.zero_empty_negative else [prompt, ""]
        outputs = self.models.encode_text(**self.tokenizers.encode(texts))
        out = {}
        for name, value in outputs.items():
            if name in self.text_inputs:
                negative = np.zeros_like(value[:1]) if self.spec.zero_empty_negative else value[1:2]
                out[self.text_inputs[name]] = np.concatenate([value[:1], negative])
        return out

    def generate(self, prompt, seed, steps, guidance, size) -> np.ndarray:
        if self.family.guidance != "cfg":
            return self._generate_one_row(prompt, seed, steps, guidance, size)
        inputs = self.conditioning(prompt)
        request = SimpleNamespace(height=size, width=size, family_fields={})
        for name, value in self.family.row_inputs(request, self.spec.name).items():
            inputs[name] = np.repeat(np.asarray(value)[None], BASELINE_ROWS, axis=0)
        latent = size // self.spec.vae_factor
        x = noise_generator(seed).standard_normal((1, self.spec.latent_channels, latent, latent), dtype=np.float32)
        for t in self.schedule.timesteps(steps):
            eps_cond, eps_uncond = self.models.unet(
                np.concatenate([x, x]), timestep=np.full(BASELINE_ROWS, t, np.float32), **inputs
            )
            eps = guided_noise(eps_uncond[None], eps_cond[None], np.array([guidance]))
            t1 = np.array([t])
            x, _ = self.schedule.step(eps, t1, self.schedule.previous_timesteps(t1, np.array([steps])), x, np.zeros(1))
        return to_uint8(self.models.decode(x)[0])

    def _generate_one_row(self, prompt, seed, steps, guidance, size) -> np.ndarray:
        """Flux's loop: one row (guidance a model input where the checkpoint is distilled), its
        flow-matching schedule shifted for the image size, as FluxPipeline runs it."""
        from serving.core.samplers import make_sampler

        outputs = self.models.encode_text(**self.tokenizers.encode([prompt]))
        inputs = {self.text_inputs[name]: value for name, value in outputs.items() if name in self.text_inputs}
        if self.spec.distilled_guidance:
            inputs["guidance"] = np.full(1, guidance, np.float32)
        request = SimpleNamespace(height=size, width=size, family_fields={})
        sampler = make_sampler("flow_match_euler", "default", self.spec.scheduler_config)
        run = sampler.start(steps, 1.0, 0.0, mu=self.family.shift_mu(request, self.spec))
        latent = size // self.spec.vae_factor
        x = noise_generator(seed).standard_normal((1, self.spec.latent_channels, latent, latent), dtype=np.float32)
        for position in range(steps):
            out = self.models.unet(x, timestep=np.array([run.timesteps[position]], np.float32), **inputs)
            x, _ = sampler.step([run], [position], out, x, None)
        return to_uint8(self.models.decode(x)[0])

    def latencies(self, prompts, steps, guidance, size) -> list:
        out = []
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            self.generate(prompt, i, steps, guidance, size)
            out.append(time.perf_counter() - start)
        return out


BareOnnxLoop = BareLoop  # the name before the family layer
