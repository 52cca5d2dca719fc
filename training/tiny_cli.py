"""`ldm tiny-checkpoint DIR [--kind sdxl]`: writes a tiny random-weight checkpoint
(training/tiny_checkpoint.py: offline, deterministic, seconds on a CPU) to export, serve or
benchmark a family without downloading one, e.g. `ldm bench --checkpoint DIR`."""


def add_arguments(parser):
    from training.tiny_checkpoint import KINDS

    parser.add_argument("path", help="folder to write the diffusers pipeline into")
    parser.add_argument("--kind", choices=KINDS, default="base", help="UNet layout and family (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from pathlib import Path

    from training.tiny_checkpoint import write_tiny_checkpoint

    path = Path(args.path)
    if path.exists() and any(path.iterdir()):
        print(f"{path} exists and is not empty: not overwritten")
        return 1
    write_tiny_checkpoint(path, seed=args.seed, kind=args.kind)
    print(f"wrote the tiny {args.kind!r} checkpoint to {path}")
    return 0
