"""The image-conditioned evaluation of `ldm eval`: inpainting and img2img recolouring on the
default model's world, with fixed seeded sets, independent of where images come from.

An editor is any `edit(prompts, seeds, init_images, masks, strength, guidance_scale, steps) ->
uint8 [N, 64, 64, 3]` (masks None for img2img): diffusers' img2img and inpainting pipelines on the
checkpoint in process (`checkpoint_editor`), or the running service (`service_editor`).

- Inpainting: a two-object scene of the grammar with one object rendered alone; the half of the
  image where the other object belongs is masked and the two-object caption is the prompt. The
  result must pass the caption (both objects, their relation, the background) and keep the
  rendered object: the kept half's pixels identical to the input, and the evaluator reading the
  same object there.
- Recolouring: a one-object scene; the prompt is the same caption with another colour (a seen
  colour-shape combination). At each strength: whole-prompt accuracy of the new caption, and how
  far the object moved (bounding-box centre, pixels). More strength should follow the prompt
  more and the input less: both curves rise with strength.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from training.data import HELD_OUT_COMBOS, OBJECT_COLOURS, Scene, render, sample_scene
from training.evaluate import read_image, score

STRENGTHS = (0.3, 0.5, 0.7, 0.9)
INPAINT_TARGET = 0.85  # whole-prompt accuracy on seen combinations
SEED = 4321
MAX_KEPT_SHIFT = 1.0  # pixels: the kept object is "read back the same" within this


@dataclass(frozen=True)
class InpaintCase:
    scene: Scene  # the two-object scene the result must show
    kept: int  # index of the object rendered in the input
    mask: np.ndarray  # uint8 [64, 64], 255 over the half where the other object belongs

    @property
    def init_image(self) -> np.ndarray:
        return render(replace(self.scene, objects=(self.scene.objects[self.kept],)))

    @property
    def kept_half(self) -> np.ndarray:
        return self.mask == 0


def _inside(obj, axis: int, low: float, high: float) -> bool:
    centre = obj.cx if axis == 1 else obj.cy
    return low <= centre - obj.half and centre + obj.half <= high


def inpaint_cases(count: int) -> list:
    """`count` seen-combination two-object scenes whose objects sit in opposite halves (along
    their relation's axis), each keeping object i % 2."""
    rng = np.random.default_rng([SEED, 0])
    cases = []
    while len(cases) < count:
        scene = sample_scene(rng, two_objects=True, held_out=False)
        kept = len(cases) % 2
        axis = 1 if scene.relation in ("left of", "right of") else 0
        keep_obj, add_obj = scene.objects[kept], scene.objects[1 - kept]
        add_first = (add_obj.cx if axis == 1 else add_obj.cy) < 32
        kept_range, added_range = ((32, 64), (0, 32)) if add_first else ((0, 32), (32, 64))
        if not (_inside(keep_obj, axis, *kept_range) and _inside(add_obj, axis, *added_range)):
            continue
        mask = np.zeros((64, 64), np.uint8)
        index = [slice(None), slice(None)]
        index[axis] = slice(*added_range)
        mask[tuple(index)] = 255
        cases.append(InpaintCase(scene, kept, mask))
    return cases


def recolour_cases(count: int) -> list:
    """(input scene, target scene): the same one-object scene in another colour, seen combos only."""
    rng = np.random.default_rng([SEED, 1])
    colours = sorted(OBJECT_COLOURS)
    cases = []
    for _ in range(count):
        scene = sample_scene(rng, two_objects=False, held_out=False)
        obj = scene.objects[0]
        choices = [c for c in colours if c != obj.colour and (c, obj.shape) not in HELD_OUT_COMBOS]
        target = replace(scene, objects=(replace(obj, colour=choices[rng.integers(len(choices))]),))
        cases.append((scene, target))
    return cases


def evaluate_inpainting(edit, count: int, steps: int = 25, guidance_scale: float = 5.0) -> dict:
    cases = inpaint_cases(count)
    inputs = [c.init_image for c in cases]
    images = edit(
        [c.scene.caption for c in cases], range(count), inputs, [c.mask for c in cases], 1.0, guidance_scale, steps
    )
    kept_pixels = [np.array_equal(im[c.kept_half], x[c.kept_half]) for c, im, x in zip(cases, images, inputs)]
    kept_object = [_same_object(x, im, c.kept_half) for c, im, x in zip(cases, images, inputs)]
    result = score([c.scene for c in cases], images)
    return {
        **result,
        "kept_half_identical": float(np.mean(kept_pixels)),
        "kept_object_read_back": float(np.mean(kept_object)),
    }


def _same_object(before: np.ndarray, after: np.ndarray, region: np.ndarray) -> bool:
    """The evaluator reads the same object (colour, shape, size; centre within a pixel) in
    `region` of both images."""

    def found(image):
        _, objects = read_image(np.where(region[..., None], image, image[0, 0]))
        return objects[0] if objects else None

    a, b = found(before), found(after)
    return (
        a is not None
        and b is not None
        and (a.colour, a.shape, a.size) == (b.colour, b.shape, b.size)
        and max(abs(a.cx - b.cx), abs(a.cy - b.cy)) <= MAX_KEPT_SHIFT
    )


def evaluate_recolouring(edit, count: int, strengths=STRENGTHS, steps: int = 25, guidance_scale: float = 5.0) -> dict:
    """{strength: {prompt_accuracy, mean_shift_px, lost}}: accuracy of the recoloured caption,
    mean centre shift of the largest object read in the result (over images with one), and how
    many results had no object at all."""
    cases = recolour_cases(count)
    inputs = [render(scene) for scene, _ in cases]
    origins = [read_image(x)[1][0] for x in inputs]
    out = {}
    for strength in strengths:
        images = edit([t.caption for _, t in cases], range(count), inputs, None, strength, guidance_scale, steps)
        shifts = []
        for origin, image in zip(origins, images):
            objects = read_image(image)[1]
            if objects:
                shifts.append(float(np.hypot(objects[0].cx - origin.cx, objects[0].cy - origin.cy)))
        out[strength] = {
            "prompt_accuracy": score([t for _, t in cases], images)["prompt_accuracy"],
            "mean_shift_px": float(np.mean(shifts)) if shifts else float("nan"),
            "lost": count - len(shifts),
        }
    return out


def monotone(values) -> bool:
    return all(b >= a for a, b in zip(values, values[1:]))


def checkpoint_editor(pipe, batch_size: int = 32):
    """diffusers' img2img and inpainting pipelines on `pipe`'s components; one generator per image."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    for p in (img2img, inpaint):
        p.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def edit(prompts, seeds, init_images, masks, strength, guidance_scale, steps):
        seeds, out = list(seeds), []
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            kwargs = dict(
                prompt=[prompts[i] for i in chunk],
                image=[Image.fromarray(init_images[i]) for i in chunk],
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(int(seeds[i])) for i in chunk],
                output_type="np",
            )
            if masks is None:
                images = img2img(**kwargs).images
            else:
                images = inpaint(
                    mask_image=[Image.fromarray(masks[i]) for i in chunk], height=64, width=64, **kwargs
                ).images
            out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        return np.concatenate(out)

    return edit


def service_editor(url: str, protocol: str, workers: int = 8):
    """The running service; requests in flight together (batching does not change an image)."""
    from serving.client.kserve import LdmClient

    def edit(prompts, seeds, init_images, masks, strength, guidance_scale, steps):
        def one(i):
            fields = dict(
                init_image=init_images[i],
                strength=strength,
                seed=int(seeds[i]),
                steps=steps,
                guidance_scale=guidance_scale,
            )
            if masks is not None:
                fields["mask"] = masks[i]
            with LdmClient(url, protocol=protocol) as client:
                return client.generate(prompts[i], **fields)

        seeds = list(seeds)
        with ThreadPoolExecutor(workers) as pool:
            return np.stack(list(pool.map(one, range(len(prompts)))))

    return edit
