"""Prompt tokenization with the checkpoint's own tokenizer (CLIP BPE or our word-level one)."""
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
