"""The LoRA adapters a served model knows, which of them are resident, and the bank and per-row
scales a denoiser call passes to its mixed-adapter layers (families/lora.py). Imports nothing
from Triton or torch: reading a file is the `read` callable's (serving/models/adapters.py).

An adapter is *registered* by name (a file's stem) with its file, and *resident* once read. The
resident adapters' matrices sit side by side in a bank per adapted layer, each adapter owning a
range of `rank` columns. Residency has a byte budget: reading one more evicts the least recently
used adapters no job holds (a job holds its adapters from admission to its end); an evicted
adapter stays registered and is read again when a request names it. A request names at most
`max_per_request` adapters, each with a weight in [-MAX_WEIGHT, MAX_WEIGHT].

A call's bank holds the adapters its rows use (cached per adapter set until the resident set
changes), so a call pays for the adapters it runs; its scales are one row per denoiser row: the
weight of each of the row's adapters over that adapter's columns, 0 elsewhere, so a row without
adapters adds exactly 0 (a call without adapters gets one zero column).
"""

from typing import Any
from collections import OrderedDict
from dataclasses import dataclass
import math
import threading

import numpy as np

from serving.core.errors import ResourceExhausted
from serving.core.interfaces import Array

MAX_WEIGHT = 4.0
DEFAULT_MAX_PER_REQUEST = 4
DEFAULT_BUDGET_BYTES = 512 * 2**20
DEFAULT_MAX_COLUMNS = 256


class AdapterRejected(ValueError):
    """A file that is not a LoRA adapter of the served model (the reader's refusal, naming why)."""


class LoraRefused(ValueError):
    """An adapter or adapter set that cannot be used: `field` names the request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Bank:
    """The resident adapters' matrices: layer -> (A [in, K], B [K, out]); columns: name -> (start, stop)."""

    layers: dict[str, Any]
    columns: dict[str, Any]
    width: int  # K: at least 1 (a zero column) so every graph input keeps its shape rank


class LoraRegistry:
    def __init__(
        self,
        read: Any,
        layer_shapes: dict[str, Any],
        text_layer_shapes: dict[str, Any] | None = None,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        max_per_request: int = DEFAULT_MAX_PER_REQUEST,
        max_file_bytes: int = 64 * 2**20,
        max_columns: int = DEFAULT_MAX_COLUMNS,
    ) -> None:
        """read(path, name) -> serving.models.adapters.Adapter; layer_shapes, text_layer_shapes: the
        served denoiser's and text encoder's adapted layers {name: (in, out)} (the banks' rows and
        columns; no text layers: adapters with text-encoder parts are refused)."""
        self.read = read
        self.layer_shapes = layer_shapes
        self.text_layer_shapes = text_layer_shapes or {}
        self.budget_bytes = budget_bytes
        self.max_per_request = max_per_request
        self.max_file_bytes = max_file_bytes
        self.max_columns = max_columns  # the bank's width limit (the torch runner's fixed bank)
        self.files: dict[str, Any] = {}  # name -> path: every registered adapter
        self.resident: OrderedDict[str, Any] = OrderedDict()  # name -> Adapter, least recently used first
        self.holds: dict[str, int] = {}  # name -> jobs holding it
        self._banks: dict[
            tuple[str, tuple[str, ...]], Bank
        ] = {}  # (part, adapter names) -> Bank: the calls' banks, until the resident set changes
        self._lock = threading.Lock()  # registration (control calls) against the engine's reads

    def register(self, name: str, path: Any) -> bool:
        """Registers (or replaces) an adapter file; False (nothing done) when replacing one a job holds."""
        with self._lock:
            if self.holds.get(name):
                return False
            self.files[name] = path
            if self.resident.pop(name, None) is not None:  # a new file under an old name is read again
                self._banks.clear()
            return True

    def unregister(self, name: str) -> bool:
        """Forgets an adapter; False (nothing done) while a job holds it."""
        with self._lock:
            if self.holds.get(name):
                return False
            self.files.pop(name, None)
            if self.resident.pop(name, None) is not None:
                self._banks.clear()
            return True

    def names(self) -> list[Any]:
        return sorted(self.files)

    def check(self, loras: tuple[Any, ...]) -> None:
        """Refuses an adapter set a request may not use, naming the field."""
        if len(loras) > self.max_per_request:
            raise LoraRefused("loras", f"names {len(loras)} adapters; at most {self.max_per_request} per request")
        seen = set()
        for i, (name, weight) in enumerate(loras):
            if name not in self.files:
                known = ", ".join(self.names()) or "none"
                raise LoraRefused(f"loras[{i}].name", f"no adapter named {name!r}; loaded: {known}")
            if name in seen:
                raise LoraRefused(f"loras[{i}].name", f"{name!r} is named twice")
            seen.add(name)
            if not (math.isfinite(weight) and -MAX_WEIGHT <= weight <= MAX_WEIGHT):
                raise LoraRefused(
                    f"loras[{i}].weight", f"must be a finite number in [{-MAX_WEIGHT}, {MAX_WEIGHT}], got {weight}"
                )

    def hold(self, loras: tuple[Any, ...]) -> None:
        """A job starts using its adapters: they are made resident and cannot be evicted until `release`."""
        with self._lock:
            for name, _ in loras:
                self.holds[name] = self.holds.get(name, 0) + 1
            try:
                for name, _ in loras:
                    self._make_resident(name)
            except Exception:  # the job does not start: it holds nothing
                for name, _ in loras:
                    self.holds[name] -= 1
                raise

    def release(self, loras: tuple[Any, ...]) -> None:
        with self._lock:
            for name, _ in loras:
                self.holds[name] -= 1

    def bank(self, loras_per_row: list[Any] | None = None, part: str = "denoiser") -> Bank:
        """The bank of a call: the columns of the adapters its rows use (all resident ones when
        None), so a call pays for the adapters it runs, not for every resident one; cached per set."""
        with self._lock:
            names = (
                tuple(sorted({n for loras in loras_per_row for n, _ in loras}))
                if loras_per_row is not None
                else tuple(self.resident)
            )
            key = (part, names)
            if key not in self._banks:
                self._banks[key] = self._build(
                    self.layer_shapes if part == "denoiser" else self.text_layer_shapes, part, names
                )
            return self._banks[key]

    def text_bank(self, loras_per_row: list[Any] | None = None) -> Bank:
        return self.bank(loras_per_row, "text")

    def text_part(self, loras: tuple[Any, ...]) -> tuple[Any, ...]:
        """The adapters of a set that change the text encoder (the text cache's key part)."""
        return tuple((name, weight) for name, weight in loras if self.resident[name].text)

    def scales(self, loras_per_row: list[Any], bank: Bank) -> Array:
        """[rows, K]: each row's adapter weights over their columns of `bank` (the call's)."""
        out = np.zeros((len(loras_per_row), bank.width), np.float32)
        for row, loras in enumerate(loras_per_row):
            for name, weight in loras:
                start, stop = bank.columns[name]
                out[row, start:stop] = weight
        return out

    def _make_resident(self, name: str) -> None:
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        adapter = self.read(self.files[name], name)
        if adapter.text and not self.text_layer_shapes:
            raise AdapterRejected(f"{name}: has text-encoder layers, and this model's text encoder takes no LoRA")
        used = sum(a.nbytes for a in self.resident.values())
        columns = sum(a.rank for a in self.resident.values())
        for old in list(self.resident):  # least recently used first; a held adapter stays
            if used + adapter.nbytes <= self.budget_bytes and columns + adapter.rank <= self.max_columns:
                break
            if not self.holds.get(old):
                evicted = self.resident.pop(old)
                used, columns = used - evicted.nbytes, columns - evicted.rank
        if columns + adapter.rank > self.max_columns:
            raise ResourceExhausted(
                f"LoRA bank full: the adapters running generations hold take {columns} of "
                f"{self.max_columns} columns, {name!r} needs {adapter.rank}; retry later"
            )
        self.resident[name] = adapter
        self._banks.clear()

    def _build(self, shapes: dict[str, Any], part: str, names: tuple[Any, ...]) -> Bank:
        used = {name: self.resident[name] for name in names}
        columns, start = {}, 0
        for name, adapter in used.items():
            columns[name] = (start, start + adapter.rank)
            start += adapter.rank
        width = max(start, 1)
        layers = {}
        for layer, (fan_in, fan_out) in shapes.items():
            a = np.zeros((fan_in, width), np.float32)
            b = np.zeros((width, fan_out), np.float32)
            for name, adapter in used.items():
                matrices = getattr(adapter, part)
                if layer in matrices:
                    la, lb = matrices[layer]
                    first = columns[name][0]
                    a[:, first : first + la.shape[1]] = la
                    b[first : first + la.shape[1]] = lb
            layers[layer] = (a, b)
        return Bank(layers, columns, width)
