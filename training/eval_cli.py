"""`ldm eval`: prompt adherence and VAE PSNR of a checkpoint (in process) or of the service, and
the image-conditioned tasks (inpainting, img2img recolouring: training/edit_eval.py);
`ldm eval --regions`: regional-prompt adherence (training/regional_eval_cli.py);
`ldm eval --sampler S --steps N`: one sampler setting's held-out adherence and images/s through
the service; `ldm eval --sampler-table`: every setting of training/sampler_eval.py;
`ldm eval --loras`: the LoRA adapters of checkpoints/loras through the service (training/lora_eval.py).

The evaluator is validated on ground-truth renders first; below 98% its scores do not count and
the command fails. With --require-targets a missed target also fails the command.
"""

from pathlib import Path

from training import regional_eval_cli
from training.autoencoder import reconstruction_adherence
from training.eval_suite import (
    EVALUATOR_MIN_ACCURACY,
    adherence,
    checkpoint_generator,
    evaluator_accuracy,
    service_generator,
    targets,
    vae_psnr,
)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("checkpoints/ldm-shapes"),
        help="diffusers pipeline folder (generates in process; also gives the VAE for PSNR)",
    )
    parser.add_argument("--url", help="evaluate the running service instead, e.g. localhost:8001")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--prompts", type=int, default=100, help="prompts per set (seen, held-out)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    samplers = parser.add_argument_group("samplers (through the service: --url, or a server this command starts)")
    samplers.add_argument(
        "--sampler",
        help="measure this sampler (a name or A1111 name): held-out adherence at "
        "guidance 5 and images/s at 16 concurrent clients",
    )
    samplers.add_argument("--sigma-schedule", choices=("default", "karras"), help="default: the sampler name's")
    samplers.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=(0.0, 1.0),
        help="fractions of the run with classifier-free guidance",
    )
    samplers.add_argument(
        "--sampler-table",
        action="store_true",
        help="every setting of the samplers table (starts a server on --checkpoint)",
    )
    samplers.add_argument("--table-out", type=Path, help="with --sampler-table: write the rows as JSON here")
    parser.add_argument("--grid", type=Path, help="also write a sample grid PNG (checkpoint, g=5, held-out marked)")
    parser.add_argument(
        "--edit-prompts",
        type=int,
        default=100,
        help="scenes per image-conditioned set (inpainting, recolouring; 0: skip them)",
    )
    parser.add_argument("--require-targets", action="store_true", help="exit 1 if a target is missed")
    regional_eval_cli.add_arguments(parser)
    loras = parser.add_argument_group(
        "LoRA adapters (--loras: through the service, --url or a server this command starts)"
    )
    loras.add_argument(
        "--loras",
        action="store_true",
        help="measure the concept and style adapters (docs/loras.md): the concept drawn, the style's "
        "effect on held-out adherence, both in one request",
    )
    loras.add_argument(
        "--lora-dir",
        type=Path,
        default=Path("checkpoints/loras"),
        help="the adapters the started server loads (default: %(default)s)",
    )
    loras.add_argument(
        "--concept-lora", default="bar", help="the concept adapter's name on the server (default: %(default)s)"
    )
    loras.add_argument("--style-lora", default="tall", help="the style adapter's name (default: %(default)s)")
    loras.add_argument(
        "--kohya-style-lora",
        default="tall-kohya",
        help="the style adapter in kohya form, compared with --style-lora ('': skip; default: %(default)s)",
    )
    loras.add_argument("--lora-json", type=Path, help="write the numbers here")
    loras.add_argument("--lora-grid", type=Path, help="write a sample grid PNG here")


def run(args) -> int:
    if args.regions:
        return regional_eval_cli.run(args)
    if args.sampler_table:
        from training.sampler_eval import sampler_table

        return sampler_table(args.checkpoint, args.prompts, args.table_out)
    if args.sampler:
        return sampler_setting(args)
    if args.loras:
        return lora_adapters(args)
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
    print(
        f"generating from {source}: {args.prompts} prompts per set, {args.steps} DDIM steps, seeds 0..{args.prompts - 1}"
    )
    results = adherence(generate, args.prompts, steps=args.steps)
    print("\n| set | guidance | attribute accuracy | whole-prompt accuracy |\n|---|---|---|---|")
    for (name, g), r in results.items():
        print(f"| {name} | {g:g} | {r['attribute_accuracy']:.1%} | {r['prompt_accuracy']:.1%} |")
    if args.grid and pipe is not None:
        from training.samples import sample_grid

        sample_grid(pipe, args.grid, steps=args.steps)
        print(f"\nsample grid written to {args.grid}")
    if pipe is None:
        print("\nVAE PSNR: needs --checkpoint (the service does not expose its VAE)")
        psnr_db = None
    else:
        psnr_db = vae_psnr(pipe.vae)
        print(f"\nVAE PSNR on 256 held-out images: {psnr_db:.2f} dB")
        ceiling = reconstruction_adherence(pipe.vae)
        print(
            f"evaluator on VAE reconstructions of ground-truth renders (the ceiling for this VAE): "
            f"seen {ceiling['seen']:.1%}, held-out {ceiling['held-out']:.1%}"
        )
    checks = targets(results, psnr_db)
    if args.edit_prompts:
        checks += image_tasks(args, pipe)
    print("\n| target | measured | result |\n|---|---|---|")
    for t in checks:
        print(f"| {t.name} | {t.measured} | {'PASS' if t.passed else 'FAIL'} |")
    return 1 if args.require_targets and not all(t.passed for t in checks) else 0


def image_tasks(args, pipe) -> list:
    """Runs and prints the inpainting and recolouring sets; returns their targets."""
    from training.edit_eval import (
        INPAINT_TARGET,
        STRENGTHS,
        checkpoint_editor,
        evaluate_inpainting,
        evaluate_recolouring,
        monotone,
        service_editor,
    )
    from training.eval_suite import Target

    edit = service_editor(args.url, args.protocol) if args.url else checkpoint_editor(pipe)
    n = args.edit_prompts
    print(f"\nimage-conditioned tasks: {n} scenes a set, {args.steps} DDIM steps, guidance 5, seeds 0..{n - 1}")
    inpaint = evaluate_inpainting(edit, n, steps=args.steps)
    print("\n| inpainting (mask the empty half, two-object caption, strength 1) | measured |\n|---|---|")
    print(f"| whole-prompt accuracy (seen combinations) | {inpaint['prompt_accuracy']:.1%} |")
    print(f"| attribute accuracy | {inpaint['attribute_accuracy']:.1%} |")
    print(
        f"| kept object read back the same (colour, shape, size, centre within 1 px) | {inpaint['kept_object_read_back']:.1%} |"
    )
    print(f"| kept half pixel-identical to the input | {inpaint['kept_half_identical']:.1%} |")
    recolour = evaluate_recolouring(edit, n, steps=args.steps)
    print(
        "\n| recolouring: strength | whole-prompt accuracy (new colour) | mean position shift (px) | no object read |\n|---|---|---|---|"
    )
    for strength, r in recolour.items():
        print(f"| {strength:g} | {r['prompt_accuracy']:.1%} | {r['mean_shift_px']:.2f} | {r['lost']} |")
    accuracy = [recolour[s]["prompt_accuracy"] for s in STRENGTHS]
    shift = [recolour[s]["mean_shift_px"] for s in STRENGTHS]
    return [
        Target(
            f"inpainting whole-prompt accuracy, seen, g=5 >= {INPAINT_TARGET:.0%}",
            f"{inpaint['prompt_accuracy']:.1%}",
            inpaint["prompt_accuracy"] >= INPAINT_TARGET,
        ),
        Target(
            "inpainting keeps the object outside the mask (read back the same, every scene)",
            f"{inpaint['kept_object_read_back']:.1%} (pixel-identical: {inpaint['kept_half_identical']:.1%})",
            inpaint["kept_object_read_back"] == 1.0,
        ),
        Target(
            f"recolouring: accuracy and position shift both rise with strength {'/'.join(map(str, STRENGTHS))}",
            "accuracy " + " / ".join(f"{a:.0%}" for a in accuracy) + "; shift " + " / ".join(f"{s:.2f}" for s in shift),
            monotone(accuracy) and monotone(shift),
        ),
    ]


def sampler_setting(args) -> int:
    """One sampler setting through the service at --url (or a server started on --checkpoint)."""
    from training.sampler_eval import measure, report

    def run(url):
        row = measure(url, args.sampler, args.sigma_schedule, args.steps, tuple(args.guidance_interval), args.prompts)
        return report([row], target=False)

    return with_service(args, run)


def lora_adapters(args) -> int:
    """The adapters' measurements of training/lora_eval.py through the service: each image one
    request naming its adapters in `loras`, 16 concurrent clients."""
    import json

    from training.lora_eval import evaluate_adapters, service_generator, write_grid

    names = {"concept": args.concept_lora, "style": args.style_lora}
    if args.kohya_style_lora:
        names["style_kohya"] = args.kohya_style_lora

    def run(url):
        print(
            f"LoRA adapters through the service at {url}: {names}; {args.prompts} prompts per set, {args.steps} steps, "
            f"guidance 5, seeds 0..{args.prompts - 1}, 16 concurrent requests",
            flush=True,
        )
        generate = service_generator(url, names, steps=args.steps, protocol=args.protocol)
        out, images, concept_set, base_set = evaluate_adapters(
            generate,
            prompts=args.prompts,
            kohya_style=bool(args.kohya_style_lora),
            log=lambda line: print(line, flush=True),
        )
        print(json.dumps(out, indent=2))
        if args.lora_json:
            args.lora_json.write_text(json.dumps(out, indent=2) + "\n")
        if args.lora_grid:
            write_grid(images, concept_set, base_set, args.lora_grid)
        print("\n| target | result |\n|---|---|")
        for name, passed in out["targets"].items():
            print(f"| {name} | {'PASS' if passed else 'FAIL'} |")
        return 1 if args.require_targets and not all(out["targets"].values()) else 0

    return with_service(args, run, lora_dir=args.lora_dir)


def with_service(args, run, lora_dir=None) -> int:
    """run(grpc url) against --url, or against a server this command starts on --checkpoint
    (with the adapters of `lora_dir` when given) and stops."""
    if args.url:
        return run(args.url)
    import tempfile

    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.triton.server import TritonServer

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "model_repository"
        params = pipeline_parameters(max_queue=256, lora_dir=str(Path(lora_dir).resolve()) if lora_dir else "")
        write_repository(args.checkpoint, repo, pipeline_parameters=params, log=lambda *a: None)
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            return run(server.grpc_url)
