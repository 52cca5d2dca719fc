"""Second stage: the text encoder and the UNet, trained jointly on L_LDM (eq. 3 of the paper),
in its v-parameterisation (the same objective up to a per-timestep weight; see build_scheduler).

Latents come from the frozen first-stage VAE; the caption goes through our word-level
tokenizer and a small CLIPTextModel whose last_hidden_state is the UNet's cross-attention
context, exactly as diffusers' StableDiffusionPipeline feeds it at inference (padding to
max_length, no attention mask). Captions are replaced by "" 10% of the time, so the same
network also learns the unconditional score used by classifier-free guidance.

Scenes are encoded once into a pool of posteriors (mean, std) and each step draws a batch from
it with a fresh latent sample and noise: the VAE encoder costs more per image (~0.4 GFLOP) than
a UNet training step, and the world is small (a few thousand distinct captions), so a pool of
16k scenes already shows each caption several times.
"""

import copy
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.autoencoder import to_tensor
from training.data import IMAGE_SIZE, eval_scenes, training_batch, vocabulary
from training.tokenizer import build_word_tokenizer

TEXT_MAX_LENGTH = 16  # the longest caption is 13 tokens with <bos> and <eos>
TEXT_HIDDEN = 128
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0  # low-noise steps weigh at most this (Min-SNR, Hang et al. 2023)


def text_config(
    tokenizer, hidden: int = TEXT_HIDDEN, mlp: int = 4 * TEXT_HIDDEN, layers: int = 3, **extra
) -> CLIPTextConfig:
    """A CLIP text config sized for `tokenizer`'s vocabulary and special tokens, 4 heads; `extra`
    (projection_dim) for CLIPTextModelWithProjection."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is read at the first <eos>
        **extra,
    )


def build_text_encoder(
    tokenizer, hidden: int = TEXT_HIDDEN, mlp: int = 4 * TEXT_HIDDEN, layers: int = 3
) -> CLIPTextModel:
    """A CLIPTextModel sized for `tokenizer`'s vocabulary and special tokens, 4 heads."""
    return CLIPTextModel(text_config(tokenizer, hidden, mlp, layers))


def build_unet() -> UNet2DConditionModel:
    # 16x16 latents: plain ResNet blocks at 16x16 (self-attention over 256 tokens costs most
    # and buys little here), cross-attention at 8x8 and 4x4 where one cell spans 8-16 pixels.
    # Narrow at 16x16, where each channel costs 4x more than at 8x8: 2 shared CPU cores.
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 96, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=1,  # flat backgrounds: see build_vae on GroupNorm erasing them
    )


def build_scheduler() -> DDIMScheduler:
    """SD's beta range, rescaled to zero terminal SNR (Lin et al. 2023) with v-prediction and
    trailing timesteps; the DDIM config the pipeline folder ships for inference.

    Why zero terminal SNR: with SD's schedule the last timestep still carries 7% of the signal,
    and on 16x16 latents the low frequencies of that signal (where the objects are, which colour
    is which) survive the noise, so the model can read the layout from the noisy latent instead of
    the text. Our first model (SD's schedule, epsilon) did exactly that at inference: it took the
    layout from the seed's noise and ignored the word order ("a yellow circle above a magenta
    square" and "a magenta square above a yellow circle" drew the same picture for each of 6 seeds;
    two-object relations right 13 of 40, chance). Retrained with this schedule it drew 22 of 24 of
    those layouts right by step 3,000, and relations stopped being the failure."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",  # the first inference step is t=999, where SNR is 0
        prediction_type="v_prediction",  # epsilon is undefined at SNR 0
    )


def make_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenize(tokenizer, captions) -> torch.Tensor:
    # The same call StableDiffusionPipeline.encode_prompt makes.
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def grid_prompts():
    """Fixed prompts for the periodic sample grids: 8 seen, 8 held-out (marked)."""
    seen = [(s.caption, False) for s in eval_scenes(8, held_out=False, seed=7)]
    held = [(s.caption, True) for s in eval_scenes(8, held_out=True, seed=7)]
    return seen + held


@torch.no_grad()
def ema_update(ema, model, decay: float):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def encode_pool(vae, rng, size: int, log, chunk: int = 256):
    """(posterior means, posterior stds, captions) of `size` fresh seen-combo scenes."""
    means, stds, captions = [], [], []
    for i in range(0, size, chunk):
        images, caps = training_batch(rng, min(chunk, size - i))
        posterior = vae.encode(to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += caps
        if (i // chunk) % 16 == 0:
            log(f"encoding latent pool {i + len(caps)}/{size}")
    return torch.cat(means), torch.cat(stds), captions


def batch_loss(
    rng,
    pool,
    batch_size: int,
    scaling_factor: float,
    noise_sched,
    tokenizer,
    text_encoder,
    unet,
    train_text_encoder: bool = True,
):
    """The objective on one batch drawn from `pool` (posterior means, stds, captions; captions
    dropped with CAPTION_DROPOUT): v-prediction, Min-SNR-weighted. The base model's training and
    `ldm train-lora` share it."""
    pool_mean, pool_std, pool_captions = pool
    index = torch.from_numpy(rng.integers(0, len(pool_captions), batch_size))
    captions = ["" if rng.random() < CAPTION_DROPOUT else pool_captions[i] for i in index.tolist()]
    eps = torch.randn_like(pool_mean[index])
    latents = (pool_mean[index] + pool_std[index] * eps) * scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,))
    noisy = noise_sched.add_noise(latents, noise, t)
    with torch.set_grad_enabled(train_text_encoder):
        context = text_encoder(tokenize(tokenizer, captions)).last_hidden_state
    pred = unet(noisy, t, context).sample
    # The v loss is an x0 loss weighted by snr + 1; clamping that weight at gamma + 1 keeps
    # the easy low-noise steps from dominating (Min-SNR) while the high-noise steps, where
    # the layout is decided, keep their full weight (plain Min-SNR would weigh them ~snr, i.e. ~0).
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    weight = (snr.clamp(max=MIN_SNR_GAMMA) + 1) / (snr + 1)
    target = noise_sched.get_velocity(latents, noise, t)
    return (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()


def train_ldm(
    vae,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log,
    out_dir: Path,
    save_every: int,
    sample_grid,
    stop_after=None,
    resume=None,
    pool_size: int = 16384,
    ema_decay: float = 0.999,
):
    """Train; every `save_every` steps (and at the end) write the EMA pipeline to
    out_dir/pipeline and call sample_grid(pipeline, path). `stop_after` ends training early
    without changing the LR schedule (which is laid out over `steps`). `resume=(folder, step)`
    continues a run stopped at `step` from the EMA weights it saved in `folder` (the optimizer
    state is not saved: AdamW restarts its moments). Returns the final EMA pipeline."""
    last = min(steps, stop_after or steps)
    first = resume[1] + 1 if resume else 1
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    tokenizer = build_word_tokenizer(vocabulary(), TEXT_MAX_LENGTH)
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    if resume:
        text_encoder = CLIPTextModel.from_pretrained(Path(resume[0]) / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(Path(resume[0]) / "unet")
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    vae.requires_grad_(False).eval()
    noise_sched = build_scheduler()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = 200

    def lr_factor(i):
        s = i + first - 1  # the global step
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    log(
        f"ldm: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M params; {steps} steps x {batch_size}"
    )
    pool_mean, pool_std, pool_captions = encode_pool(vae, rng, pool_size, log)
    running = None
    for step in range(first, last + 1):
        loss = batch_loss(
            rng,
            (pool_mean, pool_std, pool_captions),
            batch_size,
            vae.config.scaling_factor,
            noise_sched,
            tokenizer,
            text_encoder,
            unet,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # EMA warm-up: a short effective window early on, so early saves are not mostly init.
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"ldm step {step}/{steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e}")
        if step % save_every == 0 or step == last:
            pipe = make_pipeline(vae, ema_text, tokenizer, ema_unet)
            pipe.save_pretrained(out_dir / "pipeline")
            sample_grid(pipe, out_dir / f"samples-{step:06d}.png")
            log(f"saved {out_dir / 'pipeline'} and samples at step {step}")
    return make_pipeline(vae, ema_text, tokenizer, ema_unet)
