"""Search ranges, declared in the config field a search may vary, beside its type, default and description:

    heads: Amount = Field(0, description="...", json_schema_extra=searchable(0, 0.5))

A range is an interval (`low`..`high`, optionally stepped or log-scaled) or a list of `choices`. `search_space(Config)`
collects them by field path ("gate.threshold" for a nested settings model). Every layer may import this module: it
imports nothing of pocketformer's.
"""

from __future__ import annotations

import typing
from typing import Any, Optional

from pydantic import BaseModel

KEY = "search"  # the key under json_schema_extra: the range also shows in the config's JSON schema


def searchable(low: Any = None, high: Any = None, *, step: Optional[float] = None, log: bool = False,
               choices: Optional[list[Any]] = None) -> dict[str, Any]:
    """The `json_schema_extra` of a field a search may vary: `low`..`high` (both included), or `choices`."""
    if choices is not None:
        if low is not None or high is not None or step is not None or log:
            raise ValueError("a search range is either choices or low..high, not both")
        if not choices:
            raise ValueError("choices must not be empty")
        return {KEY: {"choices": list(choices)}}
    if low is None or high is None or not low <= high:
        raise ValueError(f"a search range needs low <= high, got {low!r}..{high!r}")
    if log and low <= 0:
        raise ValueError("a log-scaled range needs low > 0")
    if step is not None and step <= 0:
        raise ValueError("step must be > 0")
    return {KEY: {"low": low, "high": high, **({"step": step} if step else {}), **({"log": True} if log else {})}}


def search_range(field) -> Optional[dict[str, Any]]:
    """The range a pydantic FieldInfo declares, or None."""
    extra = field.json_schema_extra
    return extra.get(KEY) if isinstance(extra, dict) else None


def settings_models(annotation) -> list[type[BaseModel]]:
    """The settings models an annotation holds: `Gate`, `list[WeightCandidate]`, `Optional[Gate]`..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in settings_models(arg)]


def search_space(config: type[BaseModel], prefix: str = "") -> dict[str, dict[str, Any]]:
    """{field path: range} of every searchable field of `config` and of the settings models its fields hold
    directly (not inside lists: a search varies a whole list through its field's `choices`)."""
    space = {}
    for name, field in config.model_fields.items():
        rng = search_range(field)
        if rng is not None:
            space[prefix + name] = rng
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            space.update(search_space(field.annotation, f"{prefix}{name}."))
    return space


def setting(path: str, value: Any) -> dict[str, Any]:
    """The settings mapping that gives field `path` ("gate.threshold") the value `value`."""
    head, _, rest = path.partition(".")
    return {head: setting(rest, value) if rest else value}


def endpoints(rng: dict[str, Any]) -> list[Any]:
    """The extreme values of a range: low and high, or every choice."""
    return list(rng["choices"]) if "choices" in rng else [rng["low"], rng["high"]]
