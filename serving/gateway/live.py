"""The gateway's live generations (`POST /v1/generations`, the gRPC Session): a bounded table
id -> the running generation, for steers and DELETE, and a bounded record of recently finished
ids, so that a late steer or DELETE answers 409 (finished) rather than 404 (unknown).

A generation id is `<replica>.<token>`: the name of the replica whose gateway and Triton run it
(serving/gateway/replicas.py routes a steer or DELETE for another replica's id there) and 128
random bits, so an id cannot be guessed. Image i of a generation is Triton request `<id>-<i>`.
Only the caller that started a generation may steer or cancel it; to anyone else it is unknown.
"""

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
import re
import secrets

from serving.core.errors import UNAVAILABLE
from serving.gateway.costs import SteerBudget
from serving.gateway.errors import FAILED_PRECONDITION, NOT_FOUND, ApiError

MAX_LIVE = 1024  # more live generations than the engine's queue holds: the engine refuses first
MAX_FINISHED = 4096
ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.[0-9a-f]{32}$")


def new_id(replica: str) -> str:
    return f"{replica}.{secrets.token_hex(16)}"


def is_id(text: str) -> bool:
    """Whether `text` is shaped as a generation id (anything else names no generation)."""
    return bool(ID.match(text))


@dataclass
class LiveGeneration:
    id: str
    caller: str
    n: int = 1
    cancelled: bool = False  # by DELETE or a Session's cancel
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the pipeline has answered (or it ended)
    _stream: Any = field(default=None, repr=False)  # the Triton stream, once open
    steer_budget: SteerBudget = field(default_factory=SteerBudget)  # its steers' caps (serving/gateway/costs.py)

    def triton_ids(self) -> list:
        return [f"{self.id}-{i}" for i in range(self.n)]

    def attach(self, stream) -> None:
        self._stream = stream
        if self.cancelled:
            stream.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self._stream is not None:
            self._stream.cancel()


class LiveTable:
    def __init__(self, max_live: int = MAX_LIVE, max_finished: int = MAX_FINISHED):
        self.max_live = max_live
        self.max_finished = max_finished
        self._live: dict = {}
        self._finished: OrderedDict = OrderedDict()  # id -> caller, oldest first

    def __len__(self) -> int:
        return len(self._live)

    def add(self, generation: LiveGeneration) -> LiveGeneration:
        if len(self._live) >= self.max_live:
            raise ApiError(
                UNAVAILABLE,
                f"this replica runs {self.max_live} live generations already; retry later",
                retry_after_s=2.0,
            )
        self._live[generation.id] = generation
        return generation

    def finish(self, generation: LiveGeneration) -> None:
        if self._live.pop(generation.id, None) is None:
            return
        self._finished[generation.id] = generation.caller
        while len(self._finished) > self.max_finished:
            self._finished.popitem(last=False)

    def get(self, generation_id: str, caller: str) -> LiveGeneration:
        """The caller's live generation; NOT_FOUND (never known, forgotten, or another caller's)
        or FAILED_PRECONDITION (it has finished)."""
        live = self._live.get(generation_id)
        if live is not None and live.caller == caller:
            return live
        if live is None and self._finished.get(generation_id) == caller:
            raise ApiError(FAILED_PRECONDITION, f"generation {generation_id} has finished")
        raise ApiError(NOT_FOUND, f"no generation with id {generation_id}")
