"""How many units a stage touches: a fraction of a total or a count (one recipe type, one resolve), and counts
rounded to multiples so matmul shapes stay kernel-friendly (one rounding function)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

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
