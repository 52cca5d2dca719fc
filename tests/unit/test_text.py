"""Prompt tokenization shared by Triton's request thread and the engine thread."""

import sys
import threading

import numpy as np
import pytest

from serving.core.request import InvalidInput
from serving.core.text import PromptTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_repo):
    return PromptTokenizer(tiny_repo / "pipeline" / "1" / "tokenizer", 16)


def test_encode_pads_to_the_text_length_and_check_counts_tokens(tokenizer):
    ids = tokenizer.encode(["a red circle", ""])
    assert ids.shape == (2, 16) and ids.dtype == np.int64
    tokenizer.check("prompt", "red " * 14)
    with pytest.raises(InvalidInput, match="prompt: is 17 tokens long; at most 16"):
        tokenizer.check("prompt", "red " * 15)


def test_checking_and_encoding_from_two_threads_never_gives_ragged_batches(tokenizer):
    stop, errors = threading.Event(), []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so an unguarded interleaving shows at once

    def validate():
        while not stop.is_set():
            tokenizer.check("prompt", "a large red circle on the left of a blue background")

    checker = threading.Thread(target=validate)
    checker.start()
    try:
        for _ in range(2000):
            try:
                assert tokenizer.encode(["a red circle", "", "a blue square above a green star"]).shape == (3, 16)
            except Exception as exc:  # ragged output from interleaved settings
                errors.append(exc)
                break
    finally:
        stop.set()
        checker.join()
        sys.setswitchinterval(interval)
    assert not errors, errors


def test_cached_text_encoder_encodes_each_token_sequence_once(tokenizer):
    from serving.core.text import CachedTextEncoder, TextTokenizers

    seen = []

    def encode_ids(input_ids):
        seen.append(input_ids.copy())
        return {"hidden": input_ids[:, :, None].astype(np.float32) * np.ones((1, 1, 3), np.float32)}

    encoder = CachedTextEncoder(TextTokenizers({"input_ids": tokenizer}), encode_ids, {"hidden": "context"}, capacity=3)
    first = [e["context"] for e in encoder.encode(["a red circle", "", "a red circle"])]
    assert len(seen) == 1 and len(seen[0]) == 2  # the repeated prompt was encoded once
    np.testing.assert_array_equal(first[0], first[2])
    assert first[0].shape == (16, 3)
    again = [e["context"] for e in encoder.encode([None, "a blue square"])]
    assert len(seen) == 2 and len(seen[1]) == 1  # None (no negative prompt) is "": it came from the cache
    np.testing.assert_array_equal(again[0], first[1])
    encoder.encode(["a green star", "a yellow star"])  # capacity 3: the oldest entries leave
    assert len(encoder.cache) == 3
    encoder.encode(["a red circle"])
    assert len(seen) == 4  # it had been evicted, so it is encoded again


def test_zero_unconditional_is_zeros_for_none_and_the_encoding_for_an_explicit_text(tokenizer):
    """SDXL's force_zeros_for_empty_prompt: no negative prompt (None) is zeros in every input."""
    from serving.core.text import CachedTextEncoder, TextTokenizers

    def encode_ids(input_ids):
        return {
            "hidden": input_ids[:, :, None].astype(np.float32) + 1,
            "pooled": input_ids[:, :2].astype(np.float32) + 1,
        }

    encoder = CachedTextEncoder(
        TextTokenizers({"input_ids": tokenizer}),
        encode_ids,
        {"hidden": "context", "pooled": "pool"},
        zero_unconditional=True,
    )
    none, empty, prompt = encoder.encode([None, "", "a red circle"])
    assert not none["context"].any() and not none["pool"].any()
    assert empty["context"].any() and prompt["pool"].any()
