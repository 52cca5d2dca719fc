"""`ldm train-lora`: LoRA adapters for the shipped model (checkpoints/ldm-shapes), trained on
rendered scenes of the captioned-shapes world, seeded and deterministic, minutes on 2 CPU cores.

Two kinds (training/data.py holds both worlds, as additions to the base model's):
- `--concept ring`: a shape the base model never saw. Half of the training scenes hold a ring
  (alone, or next to a seen colour-shape combination; its captions are the grammar's with the
  word "ring"), the other half are the base model's own scenes (prior preservation, so the
  adapter does not draw rings where none is asked for). The ring colours of CONCEPT_HELD_OUT
  are never rendered: they are the held-out prompts. "ring" is not in the shipped tokenizer's
  vocabulary (it is <unk>), so by default the adapter has a text-encoder part as well.
- `--style tall`: the base model's scenes drawn in a style (every shape 1.25 times taller, same
  width, centre, colour), captions unchanged: the adapter changes how, not what.

What is trained: PEFT LoRA (LoraConfig) on the UNet's attention projections (to_q, to_k, to_v,
to_out.0) and, with --text-encoder, on the CLIP text encoder's (q_proj, k_proj, v_proj,
out_proj); everything else is frozen. The objective is the base model's (training/train.py):
v-prediction on the zero-terminal-SNR schedule, Min-SNR-5 weighting, 10% empty captions, latents
from a pool of scenes encoded once by the frozen VAE.

The file is written by diffusers' own StableDiffusionPipeline.save_lora_weights from PEFT's
get_peft_model_state_dict and diffusers' convert_state_dict_to_diffusers (keys `unet.…` and
`text_encoder.…`, the LoraConfig in the safetensors metadata), so
`StableDiffusionPipeline.load_lora_weights(file)` loads it. `--kohya FILE` writes the same
adapter in kohya-ss/A1111 form as well (training/lora_formats.py).
"""

from typing import Any
import math
import time
from pathlib import Path

import numpy as np
import torch

from training.data import CONCEPT_SHAPES, STYLES, render, sample_concept_scene, sample_scene

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CONCEPT_FRACTION = 0.5  # share of concept scenes in the concept adapter's pool; the rest: base scenes
DEFAULTS: dict[str, dict[str, Any]] = {  # per kind: rank, steps, text-encoder part
    "concept": {"rank": 8, "steps": 1200, "text_encoder": True},
    "style": {"rank": 8, "steps": 1200, "text_encoder": False},
}


def add_arguments(parser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--concept", choices=CONCEPT_SHAPES, help="teach a new shape word")
    what.add_argument("--style", choices=sorted(STYLES), help="teach a drawing style")
    parser.add_argument("--out", type=Path, required=True, help="the adapter's .safetensors file (diffusers/PEFT keys)")
    parser.add_argument(
        "--kohya", type=Path, help="also write it in kohya-ss/A1111 form (lora_unet_*, lora_te_*, alpha)"
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/ldm-shapes"))
    parser.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 1200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-encoder-lr", type=float, help="learning rate of the text-encoder part (default: --lr)")
    parser.add_argument("--pool", type=int, default=4096, help="scenes encoded once into the latent pool")
    te = parser.add_mutually_exclusive_group()
    te.add_argument(
        "--text-encoder",
        dest="text_encoder",
        action="store_true",
        default=None,
        help="also train the text encoder's attention projections (default for --concept)",
    )
    te.add_argument("--no-text-encoder", dest="text_encoder", action="store_false")
    parser.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also write the adapter every N steps (FILE-stepN.safetensors; 0: only at the end)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def run(args) -> int:
    torch.set_num_threads(args.threads)
    kind = "concept" if args.concept else "style"
    defaults = DEFAULTS[kind]
    rank = args.rank or defaults["rank"]
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {message}", flush=True)

    adapter = train_lora(
        args.checkpoint,
        concept=args.concept,
        style=args.style,
        rank=rank,
        alpha=args.alpha or rank,
        steps=args.steps or defaults["steps"],
        seed=args.seed,
        batch_size=args.batch,
        lr=args.lr,
        text_encoder_lr=args.text_encoder_lr,
        pool_size=args.pool,
        text_encoder=defaults["text_encoder"] if args.text_encoder is None else args.text_encoder,
        log=log,
        save_every=args.save_every,
        save=lambda pipe, step: save_lora(pipe, args.out.with_name(f"{args.out.stem}-step{step}.safetensors")),
    )
    save_lora(adapter, args.out)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    if args.kohya:
        from training.lora_formats import save_kohya

        save_kohya(args.out, args.kohya)
        log(f"wrote {args.kohya} ({args.kohya.stat().st_size / 1024:.0f} KiB, kohya-ss/A1111 keys)")
    log(f"done in {(time.time() - start) / 60:.1f} min")
    return 0


def scene_images(rng: np.random.Generator, count: int, concept=None, style=None):
    """(uint8 images, captions) of `count` training scenes for the adapter."""
    scenes = []
    for _ in range(count):
        if concept and rng.random() < CONCEPT_FRACTION:
            scenes.append(sample_concept_scene(rng, concept))
        else:
            scenes.append(sample_scene(rng))
    return np.stack([render(s, style) for s in scenes]), [s.caption for s in scenes]


@torch.no_grad()
def encode_pool(vae, rng, size: int, concept, style, chunk: int = 256):
    """(posterior means, posterior stds, captions) of `size` training scenes."""
    from training.autoencoder import to_tensor

    means, stds, captions = [], [], []
    for i in range(0, size, chunk):
        images, caps = scene_images(rng, min(chunk, size - i), concept, style)
        posterior = vae.encode(to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += caps
    return torch.cat(means), torch.cat(stds), captions


def train_lora(
    checkpoint,
    concept=None,
    style=None,
    rank: int = 8,
    alpha: float = None,
    steps: int = 1200,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    text_encoder_lr: float = None,
    pool_size: int = 4096,
    text_encoder: bool = False,
    log=print,
    warmup: int = 50,
    save_every: int = 0,
    save=None,
):
    """Fine-tunes LoRA adapters of `checkpoint` on one concept or one style; returns the pipeline
    with the adapters in place (PEFT adapter "default" on its UNet and, with text_encoder, on its
    text encoder). Deterministic for a given seed and thread count."""
    from peft import LoraConfig, inject_adapter_in_model

    from training.generate import load_pipeline
    from training.train import batch_loss

    if (concept is None) == (style is None):
        raise ValueError("train one concept or one style")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    pipe = load_pipeline(checkpoint)
    unet, vae, encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, encoder):
        module.requires_grad_(False).eval()
    alpha = alpha or rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    if text_encoder:
        # What transformers' CLIPTextModel.add_adapter does (peft's inject_adapter_in_model, which
        # also sets `peft_config` on the model), without its PEFT >= 0.22 gate: we run peft 0.21,
        # whose loading side (load_adapter, used by diffusers' load_lora_weights) has no gate.
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS),
            encoder,
            "default",
        )
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for p in encoder.parameters() if p.requires_grad]
    params = unet_params + text_params
    text_encoder_lr = lr if text_encoder_lr is None else text_encoder_lr
    what = f"concept {concept!r}" if concept else f"style {style!r}"
    log(
        f"lora {what}: rank {rank}, alpha {alpha:g}, {sum(p.numel() for p in params) / 1e3:.1f} k params "
        f"(text encoder part: {f'yes, lr {text_encoder_lr:g}' if text_encoder else 'no'}); {steps} steps x {batch_size}, "
        f"lr {lr:g}, seed {seed}"
    )
    groups = [{"params": unet_params, "lr": lr}] + (
        [{"params": text_params, "lr": text_encoder_lr}] if text_params else []
    )
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    )
    noise_sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    pool = encode_pool(vae, rng, pool_size, concept, style)
    log(f"encoded a pool of {pool_size} scenes, e.g. {pool[2][0]!r}")
    running = None
    unet.train()
    encoder.train(text_encoder)
    for step in range(1, steps + 1):
        loss = batch_loss(
            rng,
            pool,
            batch_size,
            vae.config.scaling_factor,
            noise_sched,
            tokenizer,
            encoder,
            unet,
            train_text_encoder=text_encoder,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps:
            log(f"lora step {step}/{steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e}")
        if save_every and save and step % save_every == 0 and step < steps:
            save(pipe, step)
    unet.eval()
    encoder.eval()
    return pipe


def adapter_state_dicts(pipe):
    """(UNet layers, text-encoder layers or None): PEFT's state dicts of adapter "default",
    converted by diffusers to its own LoRA keys (what its training scripts save)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    text = None
    if getattr(pipe.text_encoder, "peft_config", None):
        text = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
    return unet, text


def save_lora(pipe, path: Path) -> None:
    """Writes the adapters of `pipe` with diffusers' StableDiffusionPipeline.save_lora_weights
    (the LoraConfig of each part goes into the safetensors metadata, as diffusers' scripts do)."""
    from diffusers import StableDiffusionPipeline

    from training.lora_formats import canonical_header

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unet, text = adapter_state_dicts(pipe)
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=unet,
        text_encoder_lora_layers=text,
        weight_name=path.name,
        unet_lora_adapter_metadata=_metadata(pipe.unet),
        text_encoder_lora_adapter_metadata=_metadata(pipe.text_encoder) if text else None,
    )
    canonical_header(path)


def _metadata(module) -> dict:
    """The LoraConfig of adapter "default" as a dict; PEFT keeps target_modules as a set, whose
    order varies with the interpreter's hash seed: sorted, the same run writes the same bytes."""
    config = module.peft_config["default"].to_dict()
    return {
        key: sorted(value) if isinstance(value, (set, list)) and all(isinstance(v, str) for v in value) else value
        for key, value in config.items()
    }


if __name__ == "__main__":  # python -m training.lora_train ... (the same as ldm train-lora ...)
    import sys

    from serving.cli import main

    sys.exit(main(["train-lora", *sys.argv[1:]]))
