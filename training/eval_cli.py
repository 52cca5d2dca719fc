"""`ldm eval`: prompt adherence and VAE PSNR of a checkpoint (in process) or of the service;
`ldm eval --regions`: regional-prompt adherence (training/regional_eval_cli.py).

The evaluator is validated on ground-truth renders first; below 98% its scores do not count and
the command fails. With --require-targets a missed target also fails the command.
"""
from pathlib import Path

from training import regional_eval_cli
from training.autoencoder import reconstruction_adherence
from training.eval_suite import (EVALUATOR_MIN_ACCURACY, adherence, checkpoint_generator,
                                 evaluator_accuracy, service_generator, targets, vae_psnr)


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/ldm-shapes"),
                        help="diffusers pipeline folder (generates in process; also gives the VAE for PSNR)")
    parser.add_argument("--url", help="evaluate the running service instead, e.g. localhost:8001")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--prompts", type=int, default=100, help="prompts per set (seen, held-out)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--grid", type=Path, help="also write a sample grid PNG (checkpoint, g=5, held-out marked)")
    parser.add_argument("--require-targets", action="store_true", help="exit 1 if a target is missed")
    regional_eval_cli.add_arguments(parser)


def run(args) -> int:
    if args.regions:
        return regional_eval_cli.run(args)
    accuracy = evaluator_accuracy()
    print(f"evaluator accuracy on ground-truth renders: {accuracy:.1%} (must be >= {EVALUATOR_MIN_ACCURACY:.0%})")
    if accuracy < EVALUATOR_MIN_ACCURACY:
        print("evaluator not valid: scores would not count")
        return 1
    pipe = None
    if args.checkpoint.joinpath("model_index.json").exists():
        from training.generate import load_pipeline

        pipe = load_pipeline(args.checkpoint)
    if args.url:
        generate, source = service_generator(args.url, args.protocol), f"service at {args.url} ({args.protocol})"
    elif pipe is not None:
        generate, source = checkpoint_generator(pipe), f"checkpoint {args.checkpoint} (diffusers, in process)"
    else:
        print(f"no checkpoint at {args.checkpoint} and no --url")
        return 1
    print(f"generating from {source}: {args.prompts} prompts per set, {args.steps} DDIM steps, seeds 0..{args.prompts - 1}")
    results = adherence(generate, args.prompts, steps=args.steps)
    print(f"\n| set | guidance | attribute accuracy | whole-prompt accuracy |\n|---|---|---|---|")
    for (name, g), r in results.items():
        print(f"| {name} | {g:g} | {r['attribute_accuracy']:.1%} | {r['prompt_accuracy']:.1%} |")
    if args.grid and pipe is not None:
        from training.samples import sample_grid

        sample_grid(pipe, args.grid, steps=args.steps)
        print(f"\nsample grid written to {args.grid}")
    psnr_db = vae_psnr(pipe.vae) if pipe is not None else None
    if psnr_db is None:
        print("\nVAE PSNR: needs --checkpoint (the service does not expose its VAE)")
    else:
        print(f"\nVAE PSNR on 256 held-out images: {psnr_db:.2f} dB")
        ceiling = reconstruction_adherence(pipe.vae)
        print(f"evaluator on VAE reconstructions of ground-truth renders (the ceiling for this VAE): "
              f"seen {ceiling['seen']:.1%}, held-out {ceiling['held-out']:.1%}")
    print("\n| target | measured | result |\n|---|---|---|")
    checks = targets(results, psnr_db)
    for t in checks:
        print(f"| {t.name} | {t.measured} | {'PASS' if t.passed else 'FAIL'} |")
    return 1 if args.require_targets and not all(t.passed for t in checks) else 0
