"""`ldm train`: the default model from scratch, seeded: VAE (then its decoder alone, so the
latent space stays put), then text encoder + UNet, then the shipped checkpoint folder (fp16 UNet,
checked against fp32).

Work files (logs, intermediate pipelines, sample grids) go to --work. One stage at a time is
possible: each reads what the previous ones left in --work.
"""

import time
from pathlib import Path

import torch

from training.autoencoder import finetune_decoder, train_vae
from training.package import package_checkpoint
from training.samples import sample_grid
from training.train import train_ldm


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("checkpoints/ldm-shapes"), help="checkpoint folder to write")
    parser.add_argument("--work", type=Path, default=Path("out/train"), help="logs, sample grids, intermediate weights")
    parser.add_argument("--stage", choices=("all", "vae", "ldm", "package"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--decoder-steps", type=int, default=1500, help="decoder-only fine-tune after the VAE")
    parser.add_argument("--decoder-lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=9000, help="text encoder + UNet steps")
    parser.add_argument(
        "--stop-after", type=int, help="end the ldm stage at this step (LR schedule still over --steps)"
    )
    parser.add_argument(
        "--resume",
        nargs=2,
        metavar=("FOLDER", "STEP"),
        help="continue the ldm stage from a pipeline saved at STEP (e.g. after --stop-after)",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--save-every", type=int, default=500, help="steps between saved pipelines and sample grids")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def run(args) -> int:
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log_file = open(args.work / f"train-{args.stage}.log", "a")

    def log(message: str) -> None:
        line = f"[{time.time() - start:7.0f}s] {message}"
        print(line, flush=True)
        print(line, file=log_file, flush=True)

    if args.stage in ("all", "vae"):
        vae = train_vae(args.vae_steps, args.vae_batch, args.vae_lr, args.seed, log)
        vae = finetune_decoder(vae, args.decoder_steps, args.vae_batch, args.decoder_lr, args.seed, log)
        vae.save_pretrained(args.work / "vae")
        log(f"vae saved, latent scaling factor {vae.config.scaling_factor:.4f}")
    if args.stage in ("all", "ldm"):
        vae = AutoencoderKL.from_pretrained(args.work / "vae")
        train_ldm(
            vae,
            args.steps,
            args.batch,
            args.lr,
            args.seed,
            log,
            args.work,
            args.save_every,
            sample_grid,
            args.stop_after,
            (args.resume[0], int(args.resume[1])) if args.resume else None,
        )
    if args.stage in ("all", "package"):
        report = package_checkpoint(args.work / "pipeline", args.out)
        log(f"checkpoint written to {args.out}: {report}")
    log(f"done in {(time.time() - start) / 60:.1f} min")
    return 0
