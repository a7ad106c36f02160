"""How many units a stage touches: a fraction of a total or a count (one recipe type, one resolve), counts
rounded to multiples so matmul shapes stay kernel-friendly (one rounding function), and which units go given their
scores (shared by pruning encoders and language models)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import AfterValidator, BeforeValidator


def fraction_or_count(*, removal: bool):
    """A recipe field type: a fraction of some total (a float) or a whole count (an int), never true/false.

    removal=True: how much to take away, nothing allowed: a fraction in [0, 1) or a count >= 0 (1.0 would remove
    everything). removal=False: how much to keep, something required: a fraction in (0, 1] or a count >= 1."""
    rule = ("a fraction in [0, 1) or a whole count >= 0" if removal
            else "a fraction in (0, 1] or a whole count >= 1")

    def not_bool(v):  # before coercion, or `heads: true` would silently mean 1
        if isinstance(v, bool):
            raise ValueError(f"must be {rule}, not true/false")
        return v

    def in_range(v):
        ok = (v >= 0 and not (isinstance(v, float) and v >= 1)) if removal else \
            (v > 0 and not (isinstance(v, float) and v > 1))
        if not ok:
            raise ValueError(f"must be {rule}")
        return v

    return Annotated[Union[int, float], BeforeValidator(not_bool), AfterValidator(in_range)]


Removal = fraction_or_count(removal=True)
Size = fraction_or_count(removal=False)


def resolve(amount: Union[int, float], total: int, at_least: int = 0) -> int:
    """A fraction of `total` (rounded to the nearest unit) or a count, as a number of units: at least `at_least`,
    at most `total`."""
    n = int(round(amount * total)) if isinstance(amount, float) else int(amount)
    return min(total, max(at_least, n))


def round_to_multiple(n: float, multiple: int, mode: Literal["up", "nearest", "nearest_even"], limit: int) -> int:
    """`n` units as a multiple of `multiple`, at least one multiple and at most `limit`.

    up: the next multiple (factor ranks and basis sizes: never below what was asked). nearest: the nearest multiple,
    halves up (MatFormer's nested widths; extraction recomputes them from the stored fractions, so this rule is part
    of the checkpoint format). nearest_even: the nearest, halves to an even number of multiples (Python's round;
    pruned FFN widths have always rounded so)."""
    if mode == "up":
        steps = -int(-n // multiple)
    elif mode == "nearest":
        steps = int(n / multiple + 0.5)
    else:
        steps = round(n / multiple)
    return min(limit, max(multiple, steps * multiple))


# -- selection: which units go, given their scores ---------------------------------------------------------------

def _normalise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s / (s.norm() + 1e-12) if len(s) else s for s in scores]


def select_heads(scores: list[torch.Tensor], n_remove: int) -> list[list[int]]:
    """Heads to keep per layer: the globally lowest normalised scores go, each layer keeping at least one."""
    scores = _normalise(scores)
    keep = [set(range(len(s))) for s in scores]
    ranked = sorted((float(v), li, h) for li, s in enumerate(scores) for h, v in enumerate(s))
    removed = 0
    for _, li, h in ranked:
        if removed >= n_remove:
            break
        if len(keep[li]) > 1:
            keep[li].discard(h)
            removed += 1
    return [sorted(k) for k in keep]


def select_neurons(scores: list[torch.Tensor], n_remove: int, round_to: int) -> list[list[int]]:
    """Neurons to keep per layer: a global threshold on normalised scores, widths rounded to `round_to`."""
    scores = _normalise(scores)
    widths = [len(s) for s in scores]
    total = sum(widths)
    if n_remove <= 0 or total == 0:
        return [list(range(w)) for w in widths]
    # The n_remove globally lowest go; ties are broken by position, so equal scores (all zero, say) cannot take
    # more than asked, as a strict threshold would.
    owner = torch.cat([torch.full((w,), li, dtype=torch.long) for li, w in enumerate(widths)])
    lowest = torch.argsort(torch.cat(scores), stable=True)[:min(n_remove, total)]
    removed = torch.bincount(owner[lowest], minlength=len(widths)).tolist()
    keep = []
    for s, w, r in zip(scores, widths, removed):
        k = round_to_multiple(w - r, round_to, "nearest_even", w) if w >= round_to else w
        keep.append(sorted(torch.argsort(s, descending=True)[:k].tolist()))
    return keep
