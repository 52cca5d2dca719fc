"""Prompt tokenization with the checkpoint's own tokenizer (CLIP BPE or our word-level one)."""

from typing import Any
from collections import OrderedDict
import threading

import numpy as np
from transformers import AutoTokenizer

from serving.core.interfaces import Array
from serving.core.request import InvalidInput


class PromptTokenizer:
    def __init__(self, tokenizer_dir: Any, max_tokens: int) -> None:
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

    def encode(self, texts: Any) -> Array:
        """int64 [len(texts), max_tokens], padded as StableDiffusionPipeline pads."""
        with self.lock:
            ids = self.tokenizer(
                list(texts), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="np"
            ).input_ids
        out: Array = ids.astype(np.int64)
        return out


class TextTokenizers:
    """The tokenizers of a text encoder component, one per token-id input (SDXL's two encoders read
    one prompt through two tokenizers): input name -> PromptTokenizer."""

    def __init__(self, tokenizers: dict[str, Any], checked: tuple[Any, ...] | None = None):
        self.tokenizers = tokenizers
        # the inputs whose length refuses a prompt; the others truncate it, as the family's
        # pipeline does (Flux's CLIP)
        self.checked = tuple(tokenizers) if checked is None else tuple(checked)

    def check(self, field: str, text: str) -> None:
        for name in self.checked:
            self.tokenizers[name].check(field, text)

    def encode(self, texts: Any) -> dict[str, Any]:
        """Input name -> int64 [len(texts), max_tokens]."""
        return {name: tokenizer.encode(texts) for name, tokenizer in self.tokenizers.items()}


class CachedTextEncoder:
    """Text embeddings for a batch of texts in one text-encoder call (one per `max_batch` rows past
    the model's max batch size), each distinct token sequence encoded once: within the batch, and
    across batches through a bounded LRU cache keyed by token ids (identical prompts of many
    requests, and a steered job's unchanged negative prompt, cost nothing after the first).

    An embedding is a dict: denoiser input name -> that text's value (`outputs` maps the text
    encoder's output names to them: its context, and SDXL's pooled text_embeds). The text None is
    the unconditional embedding of a job without a negative prompt: the encoding of "", or zeros
    where the family's checkpoint says so (SDXL's force_zeros_for_empty_prompt)."""

    def __init__(
        self,
        tokenizers: TextTokenizers,
        encode_text: Any,
        outputs: dict[str, Any],
        zero_unconditional: bool = False,
        capacity: int = 1024,
        max_batch: int | None = None,
        lora: Any = None,
    ) -> None:
        """lora: the model's LoraRegistry where the text encoder takes mixed LoRA inputs: a text is
        encoded with the text-encoder parts of its job's adapters, and cached per adapter set."""
        self.tokenizers = tokenizers
        self.encode_text = encode_text  # **{input name: int64 [N, L]} -> {output name: float32 [N, ...]}
        self.outputs = outputs
        self.zero_unconditional = zero_unconditional
        self.capacity = capacity
        self.max_batch = max_batch  # rows one text-encoder call takes (its model's max batch size); None: any
        self.lora = lora
        self.cache: OrderedDict[bytes, Any] = OrderedDict()
        self.calls = 0  # text-encoder calls made (rows encoded: self.rows)
        self.rows = 0

    def encode(self, texts: Any, loras: list[Any] | None = None) -> list[Any]:
        """One embedding per text, in order; loras: each text's adapter set (its job's), where
        the text encoder takes LoRA inputs."""
        texts = list(texts)
        ids = self.tokenizers.encode(["" if t is None else t for t in texts])
        names = list(ids)
        sets = [self.lora.text_part(s) for s in loras] if self.lora is not None and loras else [()] * len(texts)
        rows = [tuple(ids[n][i] for n in names) for i in range(len(texts))]
        keys = [b"".join(r.tobytes() for r in row) + repr(s).encode() for row, s in zip(rows, sets)]
        missing = {}
        for key, row, adapters in zip(keys, rows, sets):
            if key not in self.cache and key not in missing:
                missing[key] = (row, adapters)
        pending = list(missing.items())
        size = self.max_batch or max(1, len(pending))
        for start in range(0, len(pending), size):  # more than one call only past the model's max batch
            chunk = pending[start : start + size]
            inputs = {n: np.stack([row[k] for _, (row, _) in chunk]) for k, n in enumerate(names)}
            if self.lora is not None:  # every text's adapter weights over the text bank's columns (0: none)
                sets = [adapters for _, (_, adapters) in chunk]
                bank = self.lora.text_bank(sets)
                inputs["lora_scales"] = self.lora.scales(sets, bank)
                for layer, (a, b) in bank.layers.items():
                    inputs[f"lora_A.{layer}"], inputs[f"lora_B.{layer}"] = a, b
            outputs = self.encode_text(**inputs)
            self.calls += 1
            self.rows += len(chunk)
            for i, (key, _) in enumerate(chunk):
                self.cache[key] = {
                    self.outputs[name]: value[i] for name, value in outputs.items() if name in self.outputs
                }
        out = []
        for text, key in zip(texts, keys):
            self.cache.move_to_end(key)
            embedding = self.cache[key]
            if text is None and self.zero_unconditional:
                embedding = {name: np.zeros_like(value) for name, value in embedding.items()}
            out.append(embedding)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return out
