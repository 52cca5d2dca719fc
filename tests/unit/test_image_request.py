"""Parsing image-conditioned requests (no models): task inference, routing to variants, and every
bad combination named by its field."""

import numpy as np
import pytest

from serving.client.kserve import request_arrays
from serving.core.request import InvalidInput, RequestLimits, parse_request
from serving.core.variants import VariantSpec


def spec(name, vae_factor=4, size_multiple=8, max_size=64, max_noise_level=None):
    return VariantSpec(
        name=name,
        components={},
        tokenizers={"input_ids": "tokenizer"},
        text_length=16,
        latent_channels=4,
        vae_factor=vae_factor,
        size_multiple=size_multiple,
        native_size=32,
        max_size=max_size,
        scheduler_config={},
        max_noise_level=max_noise_level,
    )


BASE = RequestLimits(
    size_multiple=8, default_size=32, max_size=64, max_prompt_tokens=16, variants={"base": spec("base")}
)
ALL = RequestLimits(
    size_multiple=8,
    default_size=32,
    max_size=64,
    max_prompt_tokens=16,
    variants={"base": spec("base"), "inpaint": spec("inpaint"), "upscale": spec("upscale", max_noise_level=350)},
)
IMAGE = np.zeros((32, 48, 3), np.uint8)
MASK = np.zeros((32, 48), np.uint8)


def parse(limits=BASE, **fields):
    return parse_request(request_arrays("a red circle", **fields), limits, default_seed=1)


def test_task_is_inferred_and_routed():
    assert parse().image is None
    img2img = parse(init_image=IMAGE)
    assert (img2img.image.task, img2img.image.variant, img2img.image.strength) == ("img2img", "base", 0.75)
    assert (img2img.height, img2img.width) == (32, 48)  # from the image
    inpaint = parse(init_image=IMAGE, mask=MASK)
    assert (inpaint.image.task, inpaint.image.variant, inpaint.image.strength) == ("inpaint", "base", 1.0)
    assert parse(ALL, init_image=IMAGE, mask=MASK).image.variant == "inpaint"  # the inpainting UNet when there is one
    upscale = parse(ALL, task="upscale", init_image=IMAGE[:8, :12])
    assert (upscale.image.variant, upscale.image.noise_level, upscale.height, upscale.width) == ("upscale", 20, 32, 48)


def test_mask_is_thresholded_at_128():
    mask = np.array([[0, 127, 128, 255] * 12] * 32, np.uint8)
    parsed = parse(init_image=IMAGE, mask=mask).image.mask
    assert parsed.dtype == bool and parsed[0, :4].tolist() == [False, False, True, True]


def test_strength_keeps_the_decimal_the_client_wrote():
    # FP32 0.7 is 0.699999988: int(10 x that) would denoise 6 steps, diffusers' 0.7 denoises 7
    assert parse(init_image=IMAGE, strength=0.7, steps=10).image.strength == 0.7


BAD = [
    (BASE, dict(mask=MASK), "mask", "requires init_image"),
    (BASE, dict(strength=0.5), "strength", "requires init_image"),
    (BASE, dict(noise_level=10), "noise_level", "requires init_image"),
    (BASE, dict(task="txt2img", init_image=IMAGE), "init_image", "not txt2img"),
    (BASE, dict(task="paint", init_image=IMAGE), "task", "must be one of txt2img, img2img, inpaint, upscale"),
    (BASE, dict(task="upscale", init_image=IMAGE), "task", "upscale needs the upscale variant"),
    (BASE, dict(task="inpaint", init_image=IMAGE), "mask", "is required for task inpaint"),
    (BASE, dict(task="img2img"), "init_image", "is required for task img2img"),
    (BASE, dict(task="img2img", init_image=IMAGE, mask=MASK), "mask", "not used by task img2img"),
    (BASE, dict(init_image=IMAGE, keep_unmasked=False), "keep_unmasked", "not used by task img2img"),
    (BASE, dict(init_image=IMAGE, mask_blur=2), "mask_blur", "not used by task img2img"),
    (BASE, dict(init_image=IMAGE, noise_level=2), "noise_level", "not used by task img2img"),
    (BASE, dict(init_image=IMAGE, strength=0.0), "strength", "(0, 1]"),
    (BASE, dict(init_image=IMAGE, strength=1.5), "strength", "(0, 1]"),
    (BASE, dict(init_image=IMAGE, strength=float("nan")), "strength", "(0, 1]"),
    (BASE, dict(init_image=IMAGE, strength=0.05, steps=10), "strength", "leaves no denoising step"),
    (BASE, dict(init_image=IMAGE, steps=1), "strength", "leaves no denoising step"),  # the default 0.75
    (BASE, dict(init_image=np.zeros((36, 32, 3), np.uint8)), "init_image", "multiples of 8 in [8, 64]"),
    (BASE, dict(init_image=np.zeros((128, 64, 3), np.uint8)), "init_image", "multiples of 8 in [8, 64]"),
    (BASE, dict(init_image=IMAGE, height=48), "height", "must be 32 (init_image's height)"),
    (BASE, dict(init_image=IMAGE, mask=MASK[:, :32]), "mask", "of init_image's size [32, 48]"),
    (BASE, dict(init_image=IMAGE, mask=MASK, mask_blur=65), "mask_blur", "[0, 64]"),
    (ALL, dict(task="upscale", init_image=IMAGE[:8, :9]), "init_image", "multiples of 2 in [2, 16] (the output is 4x"),
    (ALL, dict(task="upscale", init_image=IMAGE[:8, :8], width=8), "width", "must be 32 (4 x init_image's width)"),
    (ALL, dict(task="upscale", init_image=IMAGE[:8, :8], noise_level=351), "noise_level", "[0, 350]"),
    (ALL, dict(task="upscale", init_image=IMAGE[:8, :8], strength=0.5), "strength", "not used by task upscale"),
    (ALL, dict(task="upscale", init_image=IMAGE[:8, :8], mask=MASK[:8, :8]), "mask", "not used by task upscale"),
]


@pytest.mark.parametrize("limits, fields, name, expected", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_combinations_name_the_field(limits, fields, name, expected):
    with pytest.raises(InvalidInput) as info:
        parse(limits, **fields)
    assert info.value.field == name and str(info.value).startswith(f"{name}: ") and expected in str(info.value), (
        info.value
    )


def test_wrong_dtype_and_rank_are_named_by_the_parser():
    inputs = request_arrays("a red circle")
    for name, value, expected in (
        ("init_image", IMAGE.astype(np.float32), "must be UINT8 [H, W, 3], got float32"),
        ("init_image", IMAGE[..., 0], "must be UINT8 [H, W, 3], got uint8 [32, 48]"),
        ("keep_unmasked", np.array([1], np.int32), "must be a boolean"),
    ):
        extra = {"mask": MASK} if name == "keep_unmasked" else {}
        with pytest.raises(InvalidInput) as info:
            parse_request({**inputs, "init_image": IMAGE, **extra, name: value}, BASE, default_seed=1)
        assert str(info.value).startswith(f"{name}: ") and expected in str(info.value), info.value
    with pytest.raises(InvalidInput, match=r"^mask: must be UINT8 \[H, W\]"):
        parse_request({**inputs, "init_image": IMAGE, "mask": MASK[..., None]}, BASE, default_seed=1)
