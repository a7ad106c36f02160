"""The pydantic check that a name in a config is one of a registry's (attention kinds, formats, runtimes): one line
naming the known ones, whatever registry it is."""

from __future__ import annotations

from typing import Callable, Mapping

from pydantic import field_validator


def member_of(field: str, registry: Callable[[], Mapping], what: str):
    """A field validator: `field` must name an entry of `registry()` (called at validation time, so entries
    registered after the model class was defined count), or be None where the field allows it."""

    def check(cls, v):
        known = registry()
        if v is not None and v not in known:
            raise ValueError(f"unknown {what} {v!r}; known: {', '.join(sorted(known))}")
        return v

    return field_validator(field)(classmethod(check))
