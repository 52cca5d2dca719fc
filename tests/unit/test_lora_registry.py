"""The LoRA registry (serving/core/lora.py) without models: residency under a byte budget and a
column limit, least-recently-used eviction of idle adapters only, adapters read again on demand
(nothing lost), the bank's column layout and every row's scales, and the refusals naming the field."""

from types import SimpleNamespace

import numpy as np
import pytest

from serving.core.errors import ResourceExhausted
from serving.core.lora import LoraRefused, LoraRegistry

LAYERS = {"l1": (3, 2), "l2": (2, 4)}


def adapter(name, rank, layers=("l1", "l2"), fill=1.0):
    matrices = {
        layer: (
            np.full((LAYERS[layer][0], rank), fill, np.float32),
            np.full((rank, LAYERS[layer][1]), fill, np.float32),
        )
        for layer in layers
    }
    return SimpleNamespace(name=name, rank=rank, denoiser=matrices, text={}, nbytes=100 * rank)


def registry(budget=10_000, columns=256, **ranks):
    reads = []

    def read(path, name):
        reads.append(name)
        return adapter(name, ranks[name], fill=float(len(reads)))

    r = LoraRegistry(read, LAYERS, budget_bytes=budget, max_columns=columns)
    for name in ranks:
        r.register(name, f"/loras/{name}.safetensors")
    return r, reads


def test_bank_columns_and_row_scales():
    r, _ = registry(a=2, b=3)
    r.hold((("a", 1.0), ("b", 0.5)))
    rows = [(), (("b", 0.5),), (("a", -2.0), ("b", 1.0))]
    bank = r.bank(rows)
    assert bank.columns == {"a": (0, 2), "b": (2, 5)} and bank.width == 5
    assert bank.layers["l1"][0].shape == (3, 5) and bank.layers["l2"][1].shape == (5, 4)
    np.testing.assert_array_equal(r.scales(rows, bank), [[0, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0.5], [-2, -2, 1, 1, 1]])
    # a call pays for the adapters its rows use: b alone is 3 columns; none is one zero column
    only_b = r.bank([(("b", 1.0),)])
    assert only_b.columns == {"b": (0, 3)} and only_b.width == 3
    assert r.bank([(), ()]).width == 1 and not r.bank([()]).layers["l1"][0].any()


def test_idle_adapters_are_evicted_least_recently_used_first_and_read_again_on_demand():
    r, reads = registry(budget=500, a=2, b=2, c=2)  # 200 bytes each: two fit
    for name in ("a", "b"):
        r.hold(((name, 1.0),))
        r.release(((name, 1.0),))
    r.hold((("c", 1.0),))  # a is the least recently used idle one
    assert list(r.resident) == ["b", "c"]
    r.release((("c", 1.0),))
    r.hold((("a", 1.0),))  # evicted, not lost: read again
    assert reads == ["a", "b", "c", "a"] and list(r.resident) == ["c", "a"]


def test_a_held_adapter_is_never_evicted_and_a_full_bank_is_resource_exhausted():
    r, _ = registry(budget=300, columns=4, a=2, b=2, c=2)
    r.hold((("a", 1.0),))
    r.hold((("b", 1.0),))  # over the byte budget, but a is held: both stay
    assert set(r.resident) == {"a", "b"}
    with pytest.raises(ResourceExhausted, match="LoRA bank full"):
        r.hold((("c", 1.0),))  # 4 columns held, c needs 2 more
    assert r.holds["c"] == 0  # a refused hold holds nothing
    assert not r.unregister("a")  # in use
    r.release((("a", 1.0),))
    assert r.unregister("a") and "a" not in r.names()


@pytest.mark.parametrize(
    "loras, field, message",
    [
        ((("zz", 1.0),), "loras[0].name", "no adapter named 'zz'; loaded: a, b"),
        ((("a", float("nan")),), "loras[0].weight", "must be a finite number in [-4.0, 4.0], got nan"),
        ((("a", 4.5),), "loras[0].weight", "got 4.5"),
        ((("a", 1.0), ("a", 0.5)), "loras[1].name", "'a' is named twice"),
        (tuple((f"x{i}", 1.0) for i in range(5)), "loras", "at most 4 per request"),
    ],
)
def test_refusals_name_the_field(loras, field, message):
    r, _ = registry(a=2, b=2)
    with pytest.raises(LoraRefused) as refused:
        r.check(loras)
    assert refused.value.field == field and message in str(refused.value)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"lora_weights": np.array([b""], object)}, "must be numbers (FP32), got object"),  # found by the fuzzer
        (
            {"lora_names": np.array([b"a"], object), "lora_weights": np.array([1.0, 2.0], np.float32)},
            "one weight per name",
        ),
    ],
)
def test_lora_fields_of_the_wrong_kind_are_invalid_input_naming_lora_weights(inputs, message):
    from serving.core.request import InvalidInput, _loras

    with pytest.raises(InvalidInput, match="lora_weights") as refused:
        _loras(inputs)
    assert message in str(refused.value)


def test_lora_fields_give_name_weight_pairs():
    from serving.core.request import _loras

    names = np.array([b"a", b"b"], object)
    assert _loras({"lora_names": names, "lora_weights": np.array([0.5, -1], np.float32)}) == (("a", 0.5), ("b", -1.0))
    assert _loras({"lora_names": names}) == (("a", 1.0), ("b", 1.0))  # weight 1 by default
