"""`ldm eval --regions`: regional-prompt adherence of the default model, in process (the
diffusers components, training/regional_generate.py) or through the running service (--url).

The evaluator is validated on ground-truth renders of every layout first; below 98% the command
fails. With --require-targets a missed target also fails it.
"""

from typing import Any
from pathlib import Path

from training.eval_suite import EVALUATOR_MIN_ACCURACY
from training.regional_eval import (
    LAYOUTS,
    SINGLE_CAPTION,
    ReferenceGenerator,
    ServiceGenerator,
    evaluator_accuracy,
    region_scenes,
    regional_adherence,
)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("regional prompts (--regions)")
    group.add_argument("--regions", action="store_true", help="measure regional-prompt adherence instead")
    group.add_argument("--region-modes", default="latent,attention", help="modes to measure (default: %(default)s)")
    group.add_argument("--region-scenes", type=int, default=50, help="scenes per layout (default: %(default)s)")
    group.add_argument("--base-weight", type=float, default=0.2, help="base_prompt_weight (default: %(default)s)")


def run(args) -> int:
    accuracy = evaluator_accuracy()
    print(
        f"region evaluator on ground-truth renders of {len(LAYOUTS)} layouts: {accuracy:.1%} "
        f"(must be >= {EVALUATOR_MIN_ACCURACY:.0%})"
    )
    if accuracy < EVALUATOR_MIN_ACCURACY:
        print("evaluator not valid: scores would not count")
        return 1
    generate: Any
    if args.url:
        generate, source = ServiceGenerator(args.url, args.protocol), f"service at {args.url} ({args.protocol})"
    elif args.checkpoint.joinpath("model_index.json").exists():
        from training.generate import load_pipeline

        generate = ReferenceGenerator(load_pipeline(args.checkpoint))
        source = f"checkpoint {args.checkpoint} (diffusers components, in process)"
    else:
        print(f"no checkpoint at {args.checkpoint} and no --url")
        return 1
    modes = tuple(args.region_modes.split(","))
    print(
        f"generating from {source}: {args.region_scenes} scenes per layout, {args.steps} DDIM steps, guidance 5, "
        f"base_prompt_weight {args.base_weight}, seeds 0..{args.region_scenes - 1}"
    )
    results = regional_adherence(generate, args.region_scenes, modes, steps=args.steps, base_weight=args.base_weight)
    print(
        "\n| layout | regions | mode | per-region accuracy | colour / shape / clean | whole image | target | result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    missed = False
    for layout in LAYOUTS:
        for mode in modes + ((SINGLE_CAPTION,) if (layout.name, SINGLE_CAPTION) in results else ()):
            r = results[(layout.name, mode)]
            target, verdict = "reported", ""
            if layout.target is not None and mode != SINGLE_CAPTION:
                target = f">= {layout.target:.0%}"
                met = r["region_accuracy"] >= layout.target
                verdict = "PASS" if met else f"FAIL (by {layout.target - r['region_accuracy']:.1%})"
                missed = missed or not met
            print(
                f"| {layout.name} | {layout.count} | {mode} | {r['region_accuracy']:.1%} | {r['colour']:.0%} / "
                f"{r['shape']:.0%} / {r['clean']:.0%} | {r['image_accuracy']:.1%} | {target} | {verdict} |"
            )
    if args.grid:
        regional_grid(results, modes, args.grid)
        print(f"\nsample grid written to {args.grid}")
    return 1 if args.require_targets and missed else 0


def regional_grid(results, modes, path: Path) -> None:
    """Per layout: the regions of its first scene tinted with the colours they ask for, then the
    first scenes' images in each mode."""
    import numpy as np

    from training.data import OBJECT_COLOURS
    from training.samples import COLUMNS, draw_grid

    images, captions = [], []
    for layout in LAYOUTS:
        scenes = region_scenes(layout, 2)
        masks = layout.masks().astype(np.float32) / 255
        tint = np.full((64, 64, 3), 255.0)
        for mask, obj in zip(masks, scenes[0].objects):
            tint = tint * (1 - 0.6 * mask[..., None]) + 0.6 * mask[..., None] * np.array(OBJECT_COLOURS[obj.colour])
        images.append(tint.round().astype(np.uint8))
        captions.append(f"{layout.name}: {layout.divisions or str(layout.mask) + ' masks'}")
        cells = [(mode, i) for i in range(2) for mode in modes][: COLUMNS - 1]
        for mode, i in cells:
            images.append(results[(layout.name, mode)]["images"][i])
            scene = scenes[i]
            captions.append(
                f"{mode}: " + ", ".join(f"{o.colour} {o.shape} {p}" for o, p in zip(scene.objects, scene.positions))
            )
    draw_grid(images, captions, [False] * len(images), path)
