"""Checks of index and count arguments: an int is an int (not a float to truncate, not a bool), a list of
indices has no repeats, each within its range; every failure is one sentence naming the argument."""

from __future__ import annotations

import numbers


def index(value, what: str, kind: str = "layer index") -> int:
    """``value`` as an int, or TypeError: ``"{what}: 1.9 is not a layer index (an int)"``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}: {value!r} is not a {kind} (an int)")
    return int(value)


def indices(values, what: str, size: int, kind: str = "layer index") -> list[int]:
    """``values`` (an int or an iterable of ints) as a list of distinct ints within ``0 .. size - 1``."""
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = [values]
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{what} must be a list of {kind}es (ints), got {values!r}") from None
    out = [index(v, what, kind) for v in items]
    for v in out:
        if not 0 <= v < size:
            raise ValueError(f"{what}: {v} is out of range 0..{size - 1}")
    seen = set()
    for v in out:
        if v in seen:
            raise ValueError(f"{what}: {v} is given twice")
        seen.add(v)
    return out


def positive(value, what: str) -> int:
    """A positive int, or TypeError / ValueError: ``"ig_steps must be a positive integer, got 0"``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)
