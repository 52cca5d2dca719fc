"""What the LoRA adapters do, measured with the project's evaluator (training/evaluate.py) and a
reader that also knows the adapters' concept and style, in two ways that run the same prompts:

- in process with diffusers: the base pipeline (StableDiffusionPipeline.from_pretrained
  (checkpoints/ldm-shapes)), the adapters loaded by `load_lora_weights` and combined by
  `set_adapters(names, weights)`:

    python -m training.lora_eval --concept checkpoints/loras/bar.safetensors \\
        --style checkpoints/loras/tall.safetensors [--kohya-style checkpoints/loras/tall-kohya.safetensors] \\
        [--prompts 100] [--grid docs/results/loras-diffusers.png]

- through the service, each image one request naming its adapters in `loras`, 16 at a time:
  `ldm eval --loras` (training/eval_cli.py; starts a server with --lora-dir checkpoints/loras,
  or measures the one at --url).

Measures (guidance 5, 25 DDIM steps, image i with seed i, as `ldm eval`):
- concept: on the concept's held-out prompts (a bar in a colour never rendered as a bar in
  training, alone or next to a seen object), how often a bar of the asked colour is drawn, by
  the base model and with the concept adapter at weight 1; and whole-prompt accuracy;
- style: the base model's own held-out prompts (eval_scenes(held_out=True)), scored by
  training/evaluate.py unchanged: the base, the style adapter at weight 0 (bytes compared), at
  weight 1; and how tall the drawn objects are (box width / height; the style draws 0.8);
- both adapters in one request, on the concept prompts: the concept drawn and objects drawn tall.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import CONCEPT_SHAPES, IMAGE_SIZE, STYLES, Scene, concept_eval_scenes, eval_scenes
from training.evaluate import Detected, _regions, read_regions, score
from training.evaluate import check as evaluate_check

RING_MIN_HOLE = 3  # pixels enclosed by an object's region (not its colour, not reachable from outside)
BAR_MIN_ASPECT = 1.6  # box width / height from which an object is a bar (drawn: 2.4, with the tall style 1.9)
TALL_ASPECT = (1.0 + STYLES["tall"][0] / STYLES["tall"][1]) / 2  # box width / height at most this: drawn tall
CONCEPT_TARGET, BASE_CONCEPT_LIMIT, STYLE_DROP_LIMIT = 0.90, 0.10, 0.05


@dataclass(frozen=True)
class Found(Detected):
    """An object as training/evaluate.py reads it (its shape may also be "ring" when it has a
    hole, "bar" when wide), plus its box and the area of its holes."""

    width: int
    height: int
    hole: int


def _hole_area(box: np.ndarray) -> int:
    """Pixels of a region's bounding box that are not the region and cannot reach the box's
    outside without crossing it (4-connected)."""
    free = ~np.pad(box, 1)
    outside = next(_regions(free))  # the scan starts at (0, 0), which is in the padding
    return int(free.sum()) - len(outside)


def read_objects(image: np.ndarray):
    """training/evaluate.read_image's reading (read_regions: same palette, thresholds, regions
    and shape rules), with each object's box and holes, and the adapters' shapes: "ring" when it
    has a hole, "bar" when wide: (background name or None, list of Found, largest first)."""
    background, regions = read_regions(image)
    objects = []
    for name, shape, size, ys, xs, box in regions:
        bh, bw = box.shape
        hole = _hole_area(box)
        if hole >= RING_MIN_HOLE:
            shape = "ring"
        elif bw >= BAR_MIN_ASPECT * bh:
            shape = "bar"
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        objects.append(Found(name, shape, size, cx, cy, len(xs), int(bw), int(bh), hole))
    return background, sorted(objects, key=lambda o: -o.area)


def check(scene: Scene, image: np.ndarray) -> dict:
    """training/evaluate.check's attributes, read by read_objects (so "ring" and "bar" are shapes)."""
    return evaluate_check(scene, image, read=read_objects)


def concept_scores(scenes, images) -> dict:
    """drawn: share of images with an object of the concept's colour read as the concept (the
    scene's object whose shape is in CONCEPT_SHAPES); prompt_accuracy: every stated attribute
    right (check above)."""
    drawn, passed = [], []
    for scene, image in zip(scenes, images):
        want = next(o for o in scene.objects if o.shape in CONCEPT_SHAPES)
        _, found = read_objects(image)
        drawn.append(any(o.colour == want.colour and o.shape == want.shape for o in found))
        passed.append(all(check(scene, image).values()))
    return {"drawn": float(np.mean(drawn)), "prompt_accuracy": float(np.mean(passed)), "count": len(drawn)}


def style_scores(images) -> dict:
    """Box width / height of the objects read: of the base shapes (the base model draws ~1, the
    tall style 0.8) and, apart, of the concept shapes (a bar is 2.4 wide, 1.9 in the tall style)."""
    base, concept = [], []
    for image in images:
        for o in read_objects(image)[1]:
            (concept if o.shape in CONCEPT_SHAPES else base).append(o.width / o.height)
    return {
        "objects": len(base),
        "median_aspect": float(np.median(base)) if base else float("nan"),
        "tall": float(np.mean(np.array(base) <= TALL_ASPECT)) if base else float("nan"),
        "concept_objects": len(concept),
        "concept_median_aspect": float(np.median(concept)) if concept else float("nan"),
    }


def _scores(scenes, images, *parts) -> dict:
    out = {}
    for part in parts:
        if part == "evaluator":  # training/evaluate.py, unchanged
            out.update({k: v for k, v in score(scenes, images).items() if k != "passed"})
        elif part == "concept":
            out.update(concept_scores(scenes, images))
        elif part == "style":
            out.update(style_scores(images))
        elif part == "concept shapes drawn":
            out[part] = float(np.mean([any(o.shape in CONCEPT_SHAPES for o in read_objects(im)[1]) for im in images]))
    return out


def diffusers_generator(checkpoint, files: dict, steps: int = 25, guidance: float = 5.0):
    """generate(captions, seeds, adapters) in process: diffusers' pipeline, the adapter files
    ({role: path}) loaded by `load_lora_weights` under their roles and combined per call by
    `set_adapters(roles, weights)`; no adapters: the base pipeline (LoRA layers disabled)."""
    from training.generate import load_pipeline, pipeline_images

    pipe = load_pipeline(checkpoint)
    loaded = False

    def generate(captions, seeds, adapters):
        nonlocal loaded
        if adapters and not loaded:
            for role, path in files.items():
                pipe.load_lora_weights(str(path), adapter_name=role)
            loaded = True
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([r for r, _ in adapters], [w for _, w in adapters])
        elif loaded:
            pipe.disable_lora()
        return pipeline_images(pipe, captions, seeds, guidance, steps)

    return generate


def service_generator(
    url: str, names: dict, steps: int = 25, guidance: float = 5.0, concurrency: int = 16, protocol: str = "grpc"
):
    """generate(captions, seeds, adapters) through the service at `url`: each image one request
    (seed i, `loras` naming the server's adapters by role: {role: name}), `concurrency` at a time,
    as users send them; the server mixes their rows in its denoiser calls."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    from serving.client.kserve import LdmClient

    local = threading.local()  # a client streams one request at a time: one client per thread

    def generate(captions, seeds, adapters):
        loras = [(names[role], weight) for role, weight in adapters] or None

        def one(i):
            if not hasattr(local, "client"):
                local.client = LdmClient(url, protocol=protocol)
            return local.client.generate(
                captions[i],
                seed=int(seeds[i]),
                steps=steps,
                guidance_scale=guidance,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                loras=loras,
            )

        with ThreadPoolExecutor(concurrency) as pool:
            return np.stack(list(pool.map(one, range(len(captions)))))

    return generate


def evaluate_adapters(generate, concept: str = "bar", prompts: int = 100, kohya_style: bool = False, log=print):
    """Every number of docs/loras.md's measurements, made by `generate(captions, seeds, adapters)`
    (adapters: [(role, weight)] with roles "concept", "style" and, with kohya_style,
    "style_kohya"): (numbers, images by "<adapters>/<prompt set>", the concept's held-out scenes,
    the base model's held-out scenes)."""
    sets = {
        "concept": concept_eval_scenes(prompts, held_out=True, concept=concept),
        "held-out": eval_scenes(prompts, held_out=True),
    }
    seeds = list(range(prompts))
    out, images = {}, {}

    def run(adapters, weights, prompt_set, *parts):
        label = "+".join(f"{a}:{w:g}" for a, w in zip(adapters, weights)) or "base"
        key = f"{label}/{prompt_set}"
        images[key] = generate([s.caption for s in sets[prompt_set]], seeds, list(zip(adapters, weights)))
        out[key] = _scores(sets[prompt_set], images[key], *parts)
        log(f"{key}: {out[key]}")
        return key

    run([], [], "concept", "concept", "style")
    run([], [], "held-out", "evaluator", "style", "concept shapes drawn")
    run(["concept"], [1.0], "concept", "concept", "style")
    run(["concept"], [1.0], "held-out", "evaluator", "style", "concept shapes drawn")
    run(["style"], [0.0], "held-out", "evaluator")
    out["style:0 equals base, byte for byte"] = bool(
        np.array_equal(images["style:0/held-out"], images["base/held-out"])
    )
    run(["style"], [1.0], "held-out", "evaluator", "style", "concept shapes drawn")
    run(["concept", "style"], [1.0, 1.0], "concept", "concept", "style")
    if kohya_style:
        run(["style_kohya"], [1.0], "held-out", "evaluator")
        diff = np.abs(images["style_kohya:1/held-out"].astype(np.int16) - images["style:1/held-out"])
        out["kohya style file vs diffusers file, uint8"] = {"mean_abs": float(diff.mean()), "max_abs": int(diff.max())}
    base, style = out["base/held-out"]["prompt_accuracy"], out["style:1/held-out"]["prompt_accuracy"]
    alone, both = out["concept:1/concept"], out["concept:1+style:1/concept"]
    out["targets"] = {
        f"concept adapter at 1 draws the concept in >= {CONCEPT_TARGET:.0%} of held-out prompts": alone["drawn"]
        >= CONCEPT_TARGET,
        f"base model draws it in <= {BASE_CONCEPT_LIMIT:.0%}": out["base/concept"]["drawn"] <= BASE_CONCEPT_LIMIT,
        "style adapter at 0 gives the base's bytes": out["style:0 equals base, byte for byte"],
        f"style adapter at 1 lowers held-out accuracy by <= {STYLE_DROP_LIMIT * 100:.0f} points": base - style
        <= STYLE_DROP_LIMIT + 1e-9,
        # Both act: the concept is drawn as often as the target asks, the other objects are drawn
        # tall, and the concept objects are taller than the concept adapter alone draws them.
        "both adapters in one request both act": both["drawn"] >= CONCEPT_TARGET
        and both["tall"] >= 0.5
        and both["concept_median_aspect"] <= 0.9 * alone["concept_median_aspect"],
    }
    return out, images, sets["concept"], sets["held-out"]


def write_grid(images, concept_set, base_set, path: Path, columns: int = 8) -> None:
    """Rows: base / concept adapter / both on concept prompts; base / style adapter on held-out prompts."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [
        ("base", "base/concept"),
        ("concept:1", "concept:1/concept"),
        ("concept:1 style:1", "concept:1+style:1/concept"),
        ("base", "base/held-out"),
        ("style:1", "style:1/held-out"),
    ]
    cell, label_w = 96, 110
    sheet = Image.new("RGB", (label_w + columns * cell, len(rows) * cell + 30), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for r, (label, key) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill=(0, 0, 0), font=font)
        for c in range(columns):
            sheet.paste(
                Image.fromarray(images[key][c]).resize((cell - 4, cell - 4), Image.Resampling.NEAREST),
                (label_w + c * cell, r * cell + 2),
            )
    draw.text(
        (4, len(rows) * cell + 6),
        "rows 1-3: " + concept_set[0].caption + " ...; rows 4-5: " + base_set[0].caption + " ...",
        fill=(0, 0, 0),
        font=font,
    )
    sheet.save(path, optimize=True)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/ldm-shapes"))
    parser.add_argument("--concept", type=Path, required=True, help="the concept adapter (diffusers/PEFT file)")
    parser.add_argument("--style", type=Path, required=True, help="the style adapter (diffusers/PEFT file)")
    parser.add_argument("--concept-shape", choices=CONCEPT_SHAPES, default="bar", help="the shape --concept teaches")
    parser.add_argument("--kohya-style", type=Path, help="the style adapter in kohya form: compared with --style")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--grid", type=Path, help="write a sample grid PNG here")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = {
        "concept": args.concept,
        "style": args.style,
        **({"style_kohya": args.kohya_style} if args.kohya_style else {}),
    }
    generate = diffusers_generator(args.checkpoint, files, args.steps, args.guidance)
    out, images, concept_set, base_set = evaluate_adapters(
        generate, args.concept_shape, args.prompts, bool(args.kohya_style)
    )
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.grid:
        write_grid(images, concept_set, base_set, args.grid)
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
