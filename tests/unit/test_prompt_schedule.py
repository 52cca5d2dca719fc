"""Prompt schedules (A1111 prompt editing and alternation): the accepted subset, its step
semantics, escapes, and the position-naming errors."""

import pytest

from serving.core.prompt_schedule import joint_schedule, schedule
from serving.core.request import InvalidInput


@pytest.mark.parametrize("text", ["a red circle", "photo: a cat | a dog", "x (y:1.2) z", "", "  "])
def test_text_without_brackets_or_backslashes_is_used_exactly(text):
    assert schedule(text, 25) == [(0, text)]


@pytest.mark.parametrize(
    "text, steps, expected",
    [
        ("a [cat:dog:10] here", 25, [(0, "a cat here"), (10, "a dog here")]),
        ("a [cat:dog:0.5]", 25, [(0, "a cat"), (12, "a dog")]),  # floor(0.5 x 25)
        ("a [cat:dog:0.3]", 10, [(0, "a cat"), (3, "a dog")]),
        ("a [cat:dog: 4 ]", 10, [(0, "a cat"), (4, "a dog")]),
        ("a [cat:dog:4.9]", 10, [(0, "a cat"), (4, "a dog")]),  # a step number is floored too
        ("a [cat:dog:0]", 10, [(0, "a dog")]),
        ("a [cat:dog:10]", 10, [(0, "a cat")]),  # the switch step is past the last step
        ("a[ dog:3]", 6, [(0, "a"), (3, "a dog")]),  # [to:when]
        ("a[ dog::3]", 6, [(0, "a dog"), (3, "a")]),  # [from::when]
        (
            "[red|green|blue] ball",
            5,
            [(0, "red ball"), (1, "green ball"), (2, "blue ball"), (3, "red ball"), (4, "green ball")],
        ),
        ("[a|] b", 3, [(0, "a b"), (1, " b"), (2, "a b")]),
        ("[x:y:2] and [p|q]", 4, [(0, "x and p"), (1, "x and q"), (2, "y and p"), (3, "y and q")]),
        ("[x:y:1][x:y:1]", 3, [(0, "xx"), (1, "yy")]),
    ],
)
def test_editing_and_alternation_switch_at_the_documented_steps(text, steps, expected):
    assert schedule(text, steps) == expected


def test_escapes_stand_for_the_character():
    assert schedule(r"a \[b\] c\: d\|e \\ f \q", 4) == [(0, r"a [b] c: d|e \ f \q")]
    assert schedule(r"[a\:b:c\|d:2]", 4) == [(0, "a:b"), (2, "c|d")]


@pytest.mark.parametrize(
    "text, what, position",
    [
        ("a [b [c:d:1]:e:2]", "nesting is not supported", 5),
        ("a [b:c:2", "'[' is never closed", 2),
        ("a b] c", "']' without an opening '['", 3),
        ("a [word] b", "brackets need ':' (prompt editing) or '|' (alternation)", 2),
        ("[a:b|c]", "':' and '|' in one bracket", 4),
        ("[a|b:c]", "':' and '|' in one bracket", 4),
        ("[a:b:c:3]", "more than two ':'", 6),
        ("[a:b:soon]", "'when' must be a non-negative number, got 'soon'", 5),
        ("[a:b:-1]", "'when' must be a non-negative number", 5),
        ("[a:b:]", "'when' must be a non-negative number", 5),
        ("[a:b:" + "9" * 400 + "]", "'when' is too large", 5),  # read as inf: OverflowError, once
    ],
)
def test_malformed_schedules_name_the_field_and_position(text, what, position):
    with pytest.raises(InvalidInput) as info:
        schedule(text, 10, "negative_prompt")
    message = str(info.value)
    assert info.value.field == "negative_prompt"
    assert message.startswith("negative_prompt: prompt schedule syntax: ") and what in message
    assert message.endswith(f"at position {position}")


def test_joint_schedule_merges_the_prompt_and_negative_switches():
    assert joint_schedule("[a:b:2]", "[n|m]", 4) == [(0, "a", "n"), (1, "a", "m"), (2, "b", "n"), (3, "b", "m")]
    assert joint_schedule("plain", "", 25) == [(0, "plain", "")]


def test_a_schedule_uses_at_most_max_schedule_texts_distinct_texts():
    """An alternation makes a text per step: each would be encoded (a steer's under the engine's lock)."""
    from serving.core.prompt_schedule import MAX_SCHEDULE_TEXTS

    fits = "[" + "|".join(f"t{i}" for i in range(MAX_SCHEDULE_TEXTS)) + "]"
    assert len({text for _, text in schedule(fits, 150)}) == MAX_SCHEDULE_TEXTS
    too_many = "[" + "|".join(f"t{i}" for i in range(MAX_SCHEDULE_TEXTS + 1)) + "]"
    assert len(schedule(too_many, MAX_SCHEDULE_TEXTS)) == MAX_SCHEDULE_TEXTS  # fewer steps than options: fine
    with pytest.raises(InvalidInput) as info:
        schedule(too_many, 150, "negative_prompt")
    assert info.value.field == "negative_prompt" and f"at most {MAX_SCHEDULE_TEXTS} distinct texts" in str(info.value)
