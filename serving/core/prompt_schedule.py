"""Prompt schedules: the subset of AUTOMATIC1111's prompt editing we accept, parsed into the
texts a job's conditioning switches between (serving/core/steering.py installs them as the same
switches a live steer installs). Imports nothing from Triton.

Accepted, inside square brackets (one level, no nesting):
  [from:to:when]  `from` for the steps before the switch step, `to` from it on
  [to:when]       nothing, then `to`
  [from::when]    `from`, then nothing
  [a|b|...]       alternation: 0-based step i uses option i mod n (a new text every step)
`when` is a non-negative decimal number (spaces around it allowed): the switch step is
floor(when) when when >= 1, else floor(when x steps) — A1111's rule (its 1-based step s uses
`from` while s <= when) written 0-based, so `[A:B:10]` runs A for steps 0..9 and B from step 10.
`steps` is the number of denoising steps the job runs. A switch step at or past the end never
comes. Escapes `\\[ \\] \\: \\| \\\\` stand for the character itself, anywhere; any other backslash
is plain text; `:` and `|` outside brackets are plain text. A text with no `[`, `]` or `\\` is
used exactly as given.

Rejected with INVALID_ARG naming the field and the 0-based character position: a `[` inside
brackets (nesting), an unclosed `[`, a `]` with no `[`, a bracket with neither `:` nor `|` (A1111's
`[word]` de-emphasis is not supported), `:` and `|` in one bracket, more than two `:`, and a
`when` that is not a non-negative number. Emphasis `(word:1.2)`, `AND` and nesting are not
supported (parentheses are plain text). A schedule may use at most MAX_SCHEDULE_TEXTS distinct
texts: each is tokenized and encoded (for a steer under the engine's lock), and an alternation
would otherwise make one text per step.
"""

from dataclasses import dataclass
import math
import re
from typing import Any

from serving.core.request import InvalidInput

ESCAPABLE = "[]:|\\"
MAX_SCHEDULE_TEXTS = 32
_NUMBER = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*$")


@dataclass(frozen=True)
class _Edit:
    before: str
    after: str
    switch: int  # the first 0-based step that uses `after`

    def text(self, step: int) -> str:
        return self.before if step < self.switch else self.after


@dataclass(frozen=True)
class _Alternation:
    options: tuple[Any, ...]

    def text(self, step: int) -> str:
        out: str = self.options[step % len(self.options)]
        return out


class _SyntaxError(Exception):
    def __init__(self, what: str, position: int):
        super().__init__(f"prompt schedule syntax: {what} at position {position}")


def schedule(text: str, steps: int, field: str = "prompt") -> list[Any]:
    """[(from_step, text)]: the text each run of steps uses, from step 0, consecutive texts
    distinct. Raises InvalidInput(field, "prompt schedule syntax: <what> at position N")."""
    if not any(c in text for c in "[]\\"):
        return [(0, text)]
    try:
        parts = _parse(text, steps)
    except _SyntaxError as exc:
        raise InvalidInput(field, str(exc)) from None
    out: list[tuple[int, str]] = []
    for step in range(steps):
        current = "".join(p if isinstance(p, str) else p.text(step) for p in parts)
        if not out or out[-1][1] != current:
            out.append((step, current))
    distinct = len({text for _, text in out})
    if distinct > MAX_SCHEDULE_TEXTS:
        raise InvalidInput(
            field,
            f"a prompt schedule may use at most {MAX_SCHEDULE_TEXTS} distinct texts, this one "
            f"uses {distinct} over {steps} steps",
        )
    return out


def joint_schedule(prompt: str, negative_prompt: str, steps: int) -> list[Any]:
    """[(from_step, prompt text, negative prompt text)]: both fields' schedules merged."""
    positive, negative = schedule(prompt, steps, "prompt"), schedule(negative_prompt, steps, "negative_prompt")
    starts = sorted({s for s, _ in positive} | {s for s, _ in negative})
    return [(s, _text_at(positive, s), _text_at(negative, s)) for s in starts]


def _text_at(entries: list[Any], step: int) -> str:
    out: str = [text for start, text in entries if start <= step][-1]
    return out


def _parse(text: str, steps: int) -> list[Any]:
    """Plain strings, _Edit and _Alternation parts, in order."""
    parts, plain = [], []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPABLE:
            plain.append(text[i + 1])
            i += 2
        elif c == "]":
            raise _SyntaxError("']' without an opening '['", i)
        elif c == "[":
            part, i = _bracket(text, i, steps)
            parts.append("".join(plain))
            parts.append(part)
            plain = []
        else:
            plain.append(c)
            i += 1
    parts.append("".join(plain))
    return [p for p in parts if p != ""]


def _bracket(text: str, opening: int, steps: int) -> tuple[Any, ...]:
    """The part of the bracket opened at `opening`, and the index after its `]`."""
    pieces: list[list[str]] = [[]]
    starts = [opening + 1]
    separators: list[tuple[str, int]] = []  # (character, position)
    i = opening + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPABLE:
            pieces[-1].append(text[i + 1])
            i += 2
            continue
        if c == "[":
            raise _SyntaxError("'[' inside brackets (nesting is not supported)", i)
        if c == "]":
            return _bracket_part([("".join(p), s) for p, s in zip(pieces, starts)], separators, opening, steps), i + 1
        if c in ":|":
            separators.append((c, i))
            pieces.append([])
            starts.append(i + 1)
        else:
            pieces[-1].append(c)
        i += 1
    raise _SyntaxError("'[' is never closed", opening)


def _bracket_part(pieces: list[Any], separators: list[tuple[str, int]], opening: int, steps: int) -> Any:
    if not separators:
        raise _SyntaxError(
            "brackets need ':' (prompt editing) or '|' (alternation); [word] emphasis is not supported", opening
        )
    kinds = {c for c, _ in separators}
    if len(kinds) > 1:
        mixed = next(position for c, position in separators if c != separators[0][0])
        raise _SyntaxError("':' and '|' in one bracket", mixed)
    if separators[0][0] == "|":
        return _Alternation(tuple(text for text, _ in pieces))
    if len(separators) > 2:
        raise _SyntaxError("more than two ':' in one bracket", separators[2][1])
    when, position = pieces[-1]
    if not _NUMBER.match(when):
        raise _SyntaxError(f"'when' must be a non-negative number, got {when!r}", position)
    value = float(when)
    if not math.isfinite(value):  # hundreds of digits read as inf, which no step count can floor
        raise _SyntaxError(f"'when' is too large: {when[:20]}...", position)
    switch = math.floor(value) if value >= 1 else math.floor(value * steps)
    before = pieces[0][0] if len(pieces) == 3 else ""
    return _Edit(before, pieces[-2][0], switch)
