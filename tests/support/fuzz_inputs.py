"""Hypothesis strategies over every input of the pipeline's contract (serving.core.request.FIELDS):
each field absent, well-formed, or hostile (another dtype, another shape, empty, NaN/inf, huge
or negative, odd unicode, invalid UTF-8, huge text), plus inputs the contract does not name;
and the oracle every answer must satisfy."""

import re

from hypothesis import strategies as st
import numpy as np

from serving.core.request import FIELDS

SPECS = {f.name: f for f in FIELDS}
EXTRA_NAMES = ("promt", "images", "seed2", "extra")
WEIRD_TEXT = [
    "",
    " ",
    "\u200b",
    "\u200b\u200d\ufeff",
    "\u202e",
    "\x00",
    "a\x00b",
    "🐱" * 3,
    "\U0010ffff",
    "e\u0301",
    "a red circle",
    "a blue square on the left",
    "x" * 5000,
    "é" * 3000,
    "1,1",
    "1,2;1,1",
    "latent",
    "attention",
    "txt2img",
    "img2img",
    "inpaint",
    "upscale",
    "0,0",
    "nan",
    "-1",
    "1e309",
    ";",
    ",,,",
]
INVALID_UTF8 = [b"\xff", b"\xc3", b"a\xed\xa0\x80b", b"\x80" * 10]
INT_EDGES = [
    0,
    1,
    -1,
    2,
    3,
    4,
    8,
    16,
    24,
    32,
    40,
    48,
    56,
    64,
    72,
    100,
    150,
    151,
    1000,
    2**31 - 1,
    -(2**31),
    2**63 - 1,
    -(2**63),
]
FLOAT_EDGES = [
    0.0,
    -0.0,
    0.5,
    1.0,
    1.5,
    5.0,
    7.5,
    50.0,
    50.1,
    -1.0,
    1e-30,
    1e30,
    float("nan"),
    float("inf"),
    float("-inf"),
]


TEXT_ITEM = st.one_of(
    st.sampled_from(WEIRD_TEXT).map(str.encode),
    st.text(max_size=40).map(str.encode),
    st.sampled_from(INVALID_UTF8),
    st.binary(max_size=20),
)
GOOD_PROMPT = st.sampled_from(["a red circle", "a blue square on the left", "two cats", "a yellow star"]).map(
    str.encode
)
INTEGER = st.one_of(st.sampled_from(INT_EDGES), st.integers(-5, 200))
REAL = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(-2, 60, allow_nan=False, width=32))
ITEMS = {
    "bytes": TEXT_ITEM,
    "int32": INTEGER,
    "int64": INTEGER,
    "uint8": INTEGER,
    "float32": REAL,
    "bool": st.booleans(),
}
OTHER_DTYPES = ("bytes", "int32", "int64", "float32", "float64", "bool")


def _cast(values, dtype):
    """np.array of `values` as `dtype` (values that do not fit wrap, as a careless client's would)."""
    if dtype == "bytes":
        return np.array(values, dtype=object)
    try:
        return np.array(values).astype(dtype)
    except (OverflowError, ValueError, TypeError):
        return np.zeros(len(values), dtype=dtype)


SIDES = st.sampled_from([0, 1, 7, 8, 16, 24, 32, 33, 48, 64, 65, 96])


@st.composite
def _image(draw, dims):
    """A uint8 image of a random size (mostly the right rank), or of another dtype or rank."""
    rank = len(dims) if draw(st.integers(0, 9)) else draw(st.integers(1, 4))
    side = draw(st.sampled_from([None, 32])) if rank == len(dims) else None  # None: any side, else all 32
    shape = [draw(SIDES) if side is None else side for _ in range(rank)]
    if dims[-1] == 3 and rank == 3 and draw(st.integers(0, 4)):
        shape[-1] = 3
    if len(dims) == 3 and dims[0] == -1 and rank == 3:  # region masks: R regions first
        shape[0] = draw(st.integers(0, 9))
    dtype = "uint8" if draw(st.integers(0, 7)) else draw(st.sampled_from(["float32", "int32", "bool"]))
    kind = draw(st.sampled_from(["noise", "zeros", "full", "half"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "noise":
        array = rng.integers(0, 256, size=shape)
    elif kind == "zeros":
        array = np.zeros(shape)
    elif kind == "full":
        array = np.full(shape, 255)
    else:
        array = np.zeros(shape)
        if array.ndim >= 2:
            array[..., : max(1, array.shape[-1] // 2)] = 255
    return array.astype(dtype)


def _texts(*texts):
    return st.sampled_from([t.encode() for t in texts])


# values a well-meaning client sends (most requests should get past validation into the engine)
VALID = {
    "prompt": GOOD_PROMPT,
    "negative_prompt": _texts("", "blue", "a green triangle"),
    "seed": st.integers(0, 2**63 - 1),
    "steps": st.integers(1, 3),
    "guidance_scale": st.floats(0, 10, width=32),
    "height": st.sampled_from([8, 16, 24, 32, 48, 64]),
    "width": st.sampled_from([8, 16, 24, 32, 48, 64]),
    "eta": st.floats(0, 1, width=32),
    "progress_every": st.integers(0, 3),
    "preview_every": st.integers(0, 3),
    "timeout_s": st.sampled_from([0.0, 60.0, 1e-6]),
    "region_prompts": _texts("a cat", "a dog"),
    "region_negative_prompts": _texts("", "blurry"),
    "region_divisions": _texts("1,1", "1;1", "1,2"),
    "base_prompt_weight": st.floats(0, 1, width=32),
    "region_mode": _texts("latent", "attention"),
    "task": _texts("txt2img", "img2img", "inpaint", "upscale"),
    "strength": st.floats(0, 1, width=32),
    "mask_blur": st.integers(0, 4),
    "keep_unmasked": st.booleans(),
    "noise_level": st.integers(0, 350),
    "sampler": _texts("ddim", "euler", "Euler a", "DPM++ 2M Karras", "dpmpp_2m_sde", "unipc", "lcm", "heun"),
    "sigma_schedule": _texts("default", "karras"),
    "guidance_interval": st.floats(0, 1, width=32),
    "model": _texts("", "tiny", "no-such-model"),
    "original_size": st.integers(0, 64),
    "crop_top_left": st.integers(0, 8),
    "target_size": st.integers(0, 64),
    "true_cfg_scale": st.floats(0, 5, width=32),
    "lora_names": _texts("a", "no-such-adapter"),
    "lora_weights": st.floats(-5, 5, width=32),
}


KINDS = ["valid", "valid", "valid", "good", "good", "other_dtype", "empty", "two", "nested"]


@st.composite
def _field(draw, spec, typed=False):
    """typed: only the contract's dtype and shape (what gets past Triton's own checks)."""
    kind = draw(st.sampled_from(KINDS[:5] if typed else KINDS))
    item = ITEMS[spec.dtype]
    if spec.required and draw(st.integers(0, 9)) < 6:  # the prompt: mostly one the engine accepts
        kind = "valid"
    if kind == "valid":
        count = draw(st.integers(1, 2)) if spec.dims == (-1,) else 1
        return _cast([draw(VALID[spec.name]) for _ in range(count)], spec.dtype)
    if kind == "good":
        count = draw(st.integers(1, 10)) if spec.dims == (-1,) else 1
        return _cast([draw(item) for _ in range(count)], spec.dtype)
    if kind == "other_dtype":
        dtype = draw(st.sampled_from([d for d in OTHER_DTYPES if d != spec.dtype]))
        return _cast([draw(ITEMS.get(dtype, REAL))], dtype)
    if kind == "empty":
        return _cast([], spec.dtype)
    if kind == "two":
        return _cast([draw(item), draw(item)], spec.dtype)
    return _cast([draw(item)], spec.dtype).reshape(1, 1)


FIELD_VALUES = {
    typed: {f.name: (_image(f.dims) if f.dtype == "uint8" and len(f.dims) > 1 else _field(f, typed)) for f in FIELDS}
    for typed in (False, True)
}
OPTIONAL = {
    streaming: st.lists(
        st.sampled_from([f.name for f in FIELDS[1:] if streaming or not f.streaming_only]), max_size=8, unique=True
    )
    for streaming in (True, False)
}


@st.composite
def request_inputs(draw, streaming=True, typed=False):
    """One request's named input arrays: the prompt nine times in ten, up to 8 other fields,
    sometimes an input the contract does not have. typed: every field of its contract's dtype
    and shape (the values still hostile), and no unknown input."""
    names = (["prompt"] if draw(st.integers(0, 9)) else []) + draw(OPTIONAL[streaming])
    inputs = {name: draw(FIELD_VALUES[typed][name]) for name in names}
    if not typed and draw(st.integers(0, 19)) == 0:
        inputs[draw(st.sampled_from(EXTRA_NAMES))] = np.array([1], np.int32)
    return inputs


_FIELD_PREFIX = re.compile(r"^(?P<field>[a-z_]+)(\[\d+\])?(\.name|\.weight)?: ")
# the request's adapters are refused by their place in the request's list (loras[i].name), whichever
# field named them (lora_names, lora_weights or a <lora:> tag in the prompt)
ALIASES = {"loras": "lora_names"}


def check_answer(inputs: dict, image, error) -> str:
    """The oracle. An image: uint8 [H, W, 3]. An error: INVALID_ARG whose message starts with
    the name of a field of the request (`name: ` or `name[i]: `, `loras[i].name: `), NOT_FOUND
    for a model not served, or UNAVAILABLE for a deadline or a full queue. Returns the outcome's
    label for the tally."""
    if image is not None:
        assert error is None
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) > 0, (
            image.shape
        )
        return "image"
    code, message = error
    if code == "UNAVAILABLE":
        assert "deadline exceeded" in message or "overloaded" in message, message
        return "UNAVAILABLE"
    if code == "NOT_FOUND":  # a model the server does not serve, named
        assert message.startswith("model: no model named"), (message, _summary(inputs))
        return "NOT_FOUND model"
    assert code == "INVALID_ARG", (code, message, _summary(inputs))
    match = _FIELD_PREFIX.match(message)
    assert match and ALIASES.get(match["field"], match["field"]) in SPECS, (message, _summary(inputs))
    return f"INVALID_ARG {match['field']}"


def _summary(inputs: dict) -> dict:
    return {k: (v.dtype, v.shape, v.reshape(-1)[:3].tolist()) for k, v in inputs.items()}
