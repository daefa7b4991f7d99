"""Options objects: frozen dataclasses that public functions take as ``options=`` or as keywords."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import TypeVar

T = TypeVar("T")


def merge_options(cls: type[T], options: T | None, overrides: Mapping, where: str) -> T:
    """``options`` (default: ``cls()``) with keyword ``overrides`` (field names of ``cls``) applied.

    ``where`` names the calling function in the errors: an unknown keyword, or ``options`` of
    another type, raise ``TypeError``.
    """
    names = {f.name for f in fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {bad}; its options ({cls.__name__}) are "
                        f"{sorted(names)}")
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"{where}(options=...) must be a {cls.__name__}, got {type(options).__name__}")
    return replace(options or cls(), **overrides)
