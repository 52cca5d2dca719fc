"""Regional prompts without models: the request contract (divisions, masks, every bad
combination named), the weights both modes use, and each mode's rows and combine rule."""

import numpy as np
import pytest

from serving.core.config import PipelineConfig
from serving.core.regional_prompt import RegionalAttentionPrompt, RegionalPrompt
from serving.core.regions import RegionLimits, division_masks, parse_regions, region_weights
from serving.core.request import InvalidInput

LIMITS = RegionLimits(vae_factor=4)
TWO = ["a red circle on the left", "a blue square on the right"]


def texts(*values):
    return np.array([v.encode() for v in values], object)


def inputs(prompts=TWO, **fields):
    arrays = {"region_prompts": texts(*prompts)}
    for name, value in fields.items():
        arrays[name] = texts(value) if isinstance(value, str) else value
    return arrays


def test_divisions_follow_regional_prompters_columns_and_rows():
    halves = division_masks("1,1", 2, 64, 64)
    assert halves[0, :, :32].all() and not halves[0, :, 32:].any() and halves[1, :, 32:].all()
    uneven = division_masks("1, 3", 2, 64, 64)  # ratios, spaces allowed
    assert uneven[0].sum() == 16 * 64 and uneven[1].sum() == 48 * 64
    row_over_two = division_masks("1,2;1,1,1", 3, 64, 64)  # a top row of one cell over two halves
    assert row_over_two[0, :32].all() and not row_over_two[0, 32:].any()
    assert row_over_two[1, 32:, :32].all() and row_over_two[1].sum() == 32 * 32
    assert row_over_two[2, 32:, 32:].all() and row_over_two[2].sum() == 32 * 32
    rows = division_masks("1;1.5", 2, 40, 24)  # rows alone, decimal ratios, any size
    assert rows[0, :16].all() and rows[1, 16:].all() and rows.sum() == 40 * 24
    quadrants = division_masks("1,1,1;1,1,1", 4, 64, 64)
    assert [tuple(np.argwhere(m)[0]) for m in quadrants] == [(0, 0), (0, 32), (32, 0), (32, 32)]


@pytest.mark.parametrize(
    "divisions, count, expected",
    [
        ("1,1", 3, "makes 2 regions; region_prompts has 3"),
        ("1,x", 2, "'x' is not a positive number"),
        ("1,,1", 3, "'' is not a positive number"),
        ("0,1", 2, "'0' is not a positive number"),
        ("-1,1", 2, "not a positive number"),
        ("1,inf", 2, "not a positive number"),
        ("1,1;", 2, "'' is not a positive number"),
        ("1 BREAK 1", 2, "not a positive number"),
        ("1,1000", 2, "region 0 of '1,1000' gets no pixels"),
    ],
)
def test_bad_divisions_are_named(divisions, count, expected):
    with pytest.raises(InvalidInput, match="region_divisions") as info:
        parse_regions(inputs(["p"] * count, region_divisions=divisions), LIMITS, 64, 64)
    assert str(info.value).startswith("region_divisions: ") and expected in str(info.value)


def test_weights_sum_to_one_overlaps_share_and_uncovered_cells_take_the_base_prompt():
    masks = np.zeros((2, 16, 16), np.float32)
    masks[0, :, :8] = 1  # left half
    masks[1, :, 4:12] = 1  # overlaps the left half on columns 4..7
    weights = region_weights(masks, base_weight=0.2, vae_factor=4)
    assert weights.shape == (3, 4, 4) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[:, 0, 0], [0.2, 0.8, 0.0])  # region 0 alone
    np.testing.assert_allclose(weights[:, 0, 1], [0.2, 0.4, 0.4])  # the overlap, shared
    np.testing.assert_allclose(weights[:, 0, 3], [1.0, 0.0, 0.0])  # no region: the base prompt
    edge = region_weights(masks[:1], 0.0, vae_factor=16)  # one latent cell, half covered
    np.testing.assert_allclose(edge[:, 0, 0], [0.5, 0.5])


def test_parsed_regions_carry_prompts_weights_and_defaults():
    regions = parse_regions(inputs(region_divisions="1,1"), LIMITS, 64, 32)
    assert regions.prompts == tuple(TWO) and regions.negative_prompts is None
    assert regions.base_weight == 0.2 and regions.mode == "latent" and regions.network == "base"
    assert regions.weights.shape == (3, 16, 8)
    np.testing.assert_allclose(regions.weights[1, :, :4], 0.8)
    np.testing.assert_allclose(regions.weights[1, :, 4:], 0.0)
    masks = np.zeros((2, 64, 32), np.uint8)
    masks[0, :32], masks[1, 32:] = 255, 128  # a soft mask counts by its value
    attention = parse_regions(
        inputs(
            region_masks=masks,
            base_prompt_weight=np.array([0.0], np.float32),
            region_mode="attention",
            region_negative_prompts=texts("blue", ""),
        ),
        LIMITS,
        64,
        32,
    )
    assert attention.network == "regional/3" and attention.negative_prompts == ("blue", "")
    np.testing.assert_allclose(attention.weights[:, 12, 0], [1 - 128 / 255, 0.0, 128 / 255], rtol=1e-6)
    assert parse_regions({"prompt": texts("x")}, LIMITS, 64, 64) is None


BAD = [
    (dict(region_divisions="1,1"), ["a"] * 9, "region_prompts", "1 to 8 texts"),
    (dict(region_divisions="1"), [" "], "region_prompts", "text 0 must not be empty"),
    (dict(), TWO, "region_divisions", "need region_divisions or region_masks"),
    (dict(region_divisions="1,1", region_masks=np.full((2, 64, 64), 255, np.uint8)), TWO, "region_masks", "not both"),
    (dict(region_masks=np.full((2, 32, 64), 255, np.uint8)), TWO, "region_masks", "shape [2, 64, 64]"),
    (dict(region_masks=np.full((3, 64, 64), 255, np.uint8)), TWO, "region_masks", "shape [2, 64, 64]"),
    (dict(region_masks=np.ones((2, 64, 64), np.float32)), TWO, "region_masks", "must be UINT8"),
    (
        dict(region_masks=np.stack([np.full((64, 64), 255, np.uint8), np.zeros((64, 64), np.uint8)])),
        TWO,
        "region_masks",
        "region 1 is empty",
    ),
    (
        dict(region_divisions="1,1", region_negative_prompts=texts("x")),
        TWO,
        "region_negative_prompts",
        "one text per region (2)",
    ),
    (
        dict(region_divisions="1,1", base_prompt_weight=np.array([1.5], np.float32)),
        TWO,
        "base_prompt_weight",
        "[0.0, 1.0]",
    ),
    (
        dict(region_divisions="1,1", base_prompt_weight=np.array([np.nan], np.float32)),
        TWO,
        "base_prompt_weight",
        "finite",
    ),
    (dict(region_divisions="1,1", region_mode="pixel"), TWO, "region_mode", "latent, attention"),
    (dict(region_divisions=texts("1", "1")), TWO, "region_divisions", "exactly one value"),
]


@pytest.mark.parametrize("fields, prompts, field, expected", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_region_fields_are_named(fields, prompts, field, expected):
    with pytest.raises(InvalidInput) as info:
        parse_regions(inputs(prompts, **fields), LIMITS, 64, 64)
    assert str(info.value).startswith(f"{field}: ") and expected in str(info.value), info.value


@pytest.mark.parametrize(
    "field", ["region_divisions", "region_masks", "region_negative_prompts", "base_prompt_weight", "region_mode"]
)
def test_region_fields_without_region_prompts_are_refused(field):
    with pytest.raises(InvalidInput, match=f"^{field}: needs region_prompts"):
        parse_regions({field: texts("1,1")}, LIMITS, 64, 64)


def _regions(mode="latent", negatives=None, base_weight=0.2):
    fields = dict(region_divisions="1,1", region_mode=mode, base_prompt_weight=np.array([base_weight], np.float32))
    if negatives:
        fields["region_negative_prompts"] = texts(*negatives)
    return parse_regions(inputs(**fields), LIMITS, 16, 16)


def test_latent_mode_rows_and_combine_rule():
    regions = _regions()
    prompt = RegionalPrompt("base", "neg", 7.0, regions)
    assert prompt.rows == 4 and prompt.texts() == ["base", *TWO, "neg"]  # R + 2
    rng = np.random.default_rng(0)
    embeddings = [{"encoder_hidden_states": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]
    conditioning = prompt.build(embeddings)
    assert conditioning.rows == 4 and conditioning.inputs()["encoder_hidden_states"].shape == (4, 16, 8)
    predictions = rng.standard_normal((4, 4, 4, 4)).astype(np.float32)
    c, u, w = predictions[:3], predictions[3], regions.weights
    expected = u + 7.0 * sum(w[k] * (c[k] - u) for k in range(3))  # uncond + sum_r w_r m_r (cond_r - uncond)
    np.testing.assert_allclose(conditioning.combine(predictions), expected, rtol=1e-5, atol=1e-5)

    unguided = RegionalPrompt("base", "neg", 1.0, regions)
    assert unguided.rows == 3 and unguided.texts() == ["base", *TWO]
    np.testing.assert_allclose(
        unguided.build(embeddings[:3]).combine(predictions[:3]),
        sum(w[k] * c[k] for k in range(3)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_region_negatives_add_one_row_per_distinct_text():
    regions = _regions(negatives=["neg", "green"])  # region 0 repeats the request's negative prompt
    prompt = RegionalPrompt("base", "neg", 5.0, regions)
    assert prompt.rows == 5 and prompt.texts() == ["base", *TWO, "neg", "green"]
    rng = np.random.default_rng(1)
    conditioning = prompt.build(
        [{"encoder_hidden_states": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(5)]
    )
    predictions = rng.standard_normal((5, 4, 4, 4)).astype(np.float32)
    c, w = predictions[:3], regions.weights
    u = [predictions[3], predictions[3], predictions[4]]  # base and region 0 against "neg", region 1 against "green"
    expected = sum(w[k] * (u[k] + 5.0 * (c[k] - u[k])) for k in range(3))
    np.testing.assert_allclose(conditioning.combine(predictions), expected, rtol=1e-5, atol=1e-5)


def test_attention_mode_is_two_rows_carrying_every_context():
    regions = _regions("attention", negatives=["neg", "green"])
    prompt = RegionalAttentionPrompt("base", "neg", 5.0, regions)
    assert prompt.rows == 2 and prompt.texts() == ["base", *TWO, "neg", "neg", "green"]
    rng = np.random.default_rng(2)
    conditioning = prompt.build(
        [{"encoder_hidden_states": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(6)]
    )
    inputs = conditioning.inputs()
    assert inputs["encoder_hidden_states"].shape == (2, 3, 16, 8) and inputs["region_weights"].shape == (2, 3, 4, 4)
    predictions = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        conditioning.combine(predictions),
        predictions[1] + 5.0 * (predictions[0] - predictions[1]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert RegionalAttentionPrompt("base", "", 0.0, regions).rows == 1


def test_attention_mode_needs_an_export_with_the_regional_unet():
    older = RegionLimits(vae_factor=4, attention=False)
    assert RegionLimits.from_config(PipelineConfig(), {"vae_factor": 4}) == older  # pipeline.json of an older export
    assert parse_regions(inputs(region_divisions="1,1"), older, 64, 64).mode == "latent"
    with pytest.raises(InvalidInput, match="^region_mode: attention needs the regional UNet"):
        parse_regions(inputs(region_divisions="1,1", region_mode="attention"), older, 64, 64)
    with pytest.raises(ValueError, match="default_region_mode=attention needs the regional UNet"):
        RegionLimits.from_config(PipelineConfig.parse({"default_region_mode": "attention"}), {"vae_factor": 4})
    assert RegionLimits.from_config(PipelineConfig(), {"vae_factor": 4, "regional_unet": True}).attention
