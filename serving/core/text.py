"""Prompt tokenization with the checkpoint's own tokenizer (CLIP BPE or our word-level one)."""
from collections import OrderedDict
import threading

import numpy as np
from transformers import AutoTokenizer

from serving.core.request import InvalidInput


class PromptTokenizer:
    def __init__(self, tokenizer_dir, max_tokens: int):
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.max_tokens = max_tokens
        # A fast tokenizer stores padding/truncation settings per call: validation (Triton's
        # thread) and encoding (the engine's thread) must not interleave, or batches come out ragged.
        self.lock = threading.Lock()

    def check(self, field: str, text: str) -> None:
        """Rejects a prompt longer than the text encoder reads (diffusers would truncate it silently)."""
        with self.lock:
            count = len(self.tokenizer(text).input_ids)
        if count > self.max_tokens:
            raise InvalidInput(
                field, f"is {count} tokens long; at most {self.max_tokens} tokens (special tokens included)"
            )

    def encode(self, texts) -> np.ndarray:
        """int64 [len(texts), max_tokens], padded as StableDiffusionPipeline pads."""
        with self.lock:
            ids = self.tokenizer(
                list(texts), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="np"
            ).input_ids
        return ids.astype(np.int64)


class CachedTextEncoder:
    """Text embeddings for a batch of texts in one text-encoder call (one per `max_batch` rows past
    the model's max batch size), each distinct token sequence encoded once: within the batch, and
    across batches through a bounded LRU cache keyed by token ids (identical prompts of many
    requests, and a steered job's unchanged negative prompt, cost nothing after the first)."""

    def __init__(self, tokenizer: PromptTokenizer, encode_ids, capacity: int = 1024, max_batch: int | None = None):
        self.tokenizer = tokenizer
        self.encode_ids = encode_ids  # int64 [N, L] -> float32 [N, L, D]
        self.capacity = capacity
        self.max_batch = max_batch  # rows one text-encoder call takes (its model's max batch size); None: any
        self.cache = OrderedDict()
        self.calls = 0  # text-encoder calls made (rows encoded: self.rows)
        self.rows = 0

    def encode(self, texts) -> list:
        """One float32 [L, D] embedding per text, in order."""
        ids = self.tokenizer.encode(texts)
        keys = [row.tobytes() for row in ids]
        missing = {}
        for key, row in zip(keys, ids):
            if key not in self.cache and key not in missing:
                missing[key] = row
        rows = list(missing.items())
        size = self.max_batch or max(1, len(rows))
        for start in range(0, len(rows), size):  # more than one call only past the model's max batch
            chunk = rows[start : start + size]
            embeddings = self.encode_ids(np.stack([row for _, row in chunk]))
            self.calls += 1
            self.rows += len(chunk)
            for (key, _), embedding in zip(chunk, embeddings):
                self.cache[key] = embedding
        out = []
        for key in keys:
            self.cache.move_to_end(key)
            out.append(self.cache[key])
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return out
