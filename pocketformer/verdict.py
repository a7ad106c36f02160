"""Budget verdicts backed by a stated confidence: PASS, FAIL or INCONCLUSIVE, each with its interval.

- Accuracy drop. The candidate and the reference predict the same examples, so the drop is a paired difference:
  drop = (lost - gained) / n, where `lost` examples the reference gets right and the candidate wrong, `gained` the
  opposite (the discordant pairs McNemar's test counts). Its interval is Tango's score interval for a difference of
  paired proportions (Tango 1998, Statistics in Medicine 17:891): unlike a bootstrap or a test conditioned on the
  discordant pairs, it does not collapse to [0, 0] when no pair is discordant (12 examples that all agree still
  leave a drop of up to 24 points possible at 95%).
- Latency. The p50 of repeated runs, with a distribution-free interval for the median from the order statistics of
  those runs (binomial ranks): the run-to-run spread.
- Size. A file's size is exact: PASS or FAIL.
A verdict is PASS when the interval's upper end is within the budget, FAIL when its lower end is over it,
INCONCLUSIVE when it straddles the budget, with the number of examples that would settle it at the same rates.
The interval is two-sided at the stated confidence (default 95%): when the true drop is at the budget, PASS (or
FAIL) comes out about half the rest of the time, 2.5% each. About: Tango's interval is asymptotic; exact enumeration
over n = 50..400 found a wrong PASS up to 2.6% and a wrong FAIL up to 5.0% (few discordant pairs, a drop of 1 point
at n = 400). Each verdict is one test: many rows or targets judged together err more often, together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Annotated, Any, Literal, Optional

import numpy as np
from pydantic import Field

DEFAULT_CONFIDENCE = 0.95
# A two-sided confidence, as every setting that takes one declares it.
Confidence = Annotated[float, Field(ge=0.5, lt=1, description="two-sided confidence of each verdict's interval")]
Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]
METHOD = "Tango score interval of the paired accuracy difference (McNemar's discordant pairs)"
# Counts where a search for "examples needed" stops: beyond it, the answer is "far more than any split".
MAX_EXAMPLES = 10_000_000


def z_of(confidence: float) -> float:
    """The normal quantile of a two-sided interval at `confidence`."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence {confidence} is outside [0.5, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


# -- the paired accuracy difference ------------------------------------------------------------------------------

def _score(lost: float, gained: float, n: float, delta: float) -> float:
    """Tango's score statistic for a hypothesised drop `delta` (a fraction): (lost - gained - n delta) / its standard
    error under the constrained maximum-likelihood rates (p_lost = q + delta, p_gained = q)."""
    rest = n - lost - gained
    b = lost * (1 - delta) + gained * (1 - 3 * delta) - 2 * rest * delta
    c = gained * delta * (1 - delta)
    q = (b + math.sqrt(max(b * b + 8 * n * c, 0.0))) / (4 * n)
    num = lost - gained - n * delta
    var = n * (2 * q + delta - delta * delta)
    if var <= 1e-15:
        return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def _root(f, lo: float, hi: float, iterations: int = 52) -> float:
    """x in [lo, hi] where the decreasing f crosses 0, by bisection (52 halvings: float precision)."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@lru_cache(maxsize=4096)  # calibration asks the same counts again and again
def drop_bound(lost: float, gained: float, n: float, confidence: float, side: Literal["low", "high"]) -> float:
    """One end of drop_interval."""
    if n <= 0:
        return -1.0 if side == "low" else 1.0
    z = z_of(confidence)
    point = (lost - gained) / n
    if side == "low":
        if _score(lost, gained, n, -1 + 1e-12) <= z:
            return -1.0
        return min(point, _root(lambda d: _score(lost, gained, n, d) - z, -1.0, point))
    if _score(lost, gained, n, 1 - 1e-12) >= -z:
        return 1.0
    return max(point, _root(lambda d: _score(lost, gained, n, d) + z, point, 1.0))


def drop_interval(lost: float, gained: float, n: float, confidence: float = DEFAULT_CONFIDENCE
                  ) -> tuple[float, float]:
    """The two-sided interval of the paired drop (a fraction in [-1, 1]) at `confidence`. Counts may be fractional
    (scaled, to ask what a larger sample at the same rates would show)."""
    return drop_bound(lost, gained, n, confidence, "low"), drop_bound(lost, gained, n, confidence, "high")


def verdict_of(low: float, high: float, budget: float) -> Verdict:
    """PASS: the whole interval within the budget; FAIL: the whole interval over it; else INCONCLUSIVE."""
    if high <= budget:
        return "PASS"
    if low > budget:
        return "FAIL"
    return "INCONCLUSIVE"


def examples_needed(lost: int, gained: int, n: int, budget: float, confidence: float) -> Optional[int]:
    """About how many examples, at the observed rates of lost and gained examples, would make the interval of the
    drop (a fraction) clear `budget` on one side; None when the point estimate sits on the budget or no sample up to
    MAX_EXAMPLES would."""
    if n <= 0 or (lost - gained) / n == budget:
        return None

    def settles(m: int) -> bool:
        low, high = drop_interval(lost * m / n, gained * m / n, m, confidence)
        return verdict_of(low, high, budget) != "INCONCLUSIVE"

    hi = n
    while not settles(hi):
        hi *= 2
        if hi > MAX_EXAMPLES:
            return None
    lo = hi // 2
    while hi - lo > max(1, lo // 100):  # about: within 1%
        mid = (lo + hi) // 2
        if settles(mid):
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class PairedDrop:
    """The accuracy drop (points) of a candidate against a reference on the same `n` examples, with its interval."""

    n: int
    lost: int  # the reference right, the candidate wrong
    gained: int  # the reference wrong, the candidate right
    confidence: float

    @property
    def drop(self) -> float:
        return 100.0 * (self.lost - self.gained) / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        low, high = drop_interval(self.lost, self.gained, self.n, self.confidence)
        return 100.0 * low, 100.0 * high

    @property
    def upper(self) -> float:
        """The interval's upper end alone (points): what a PASS needs within the budget."""
        return 100.0 * drop_bound(self.lost, self.gained, self.n, self.confidence, "high")


def paired_drop(reference_correct: np.ndarray, candidate_correct: np.ndarray,
                confidence: float = DEFAULT_CONFIDENCE) -> PairedDrop:
    """The paired drop from per-example correctness (booleans, same examples in the same order)."""
    ref, cand = np.asarray(reference_correct, dtype=bool), np.asarray(candidate_correct, dtype=bool)
    if ref.shape != cand.shape:
        raise ValueError(f"paired predictions need the same examples: {ref.shape} vs {cand.shape}")
    return PairedDrop(n=int(ref.size), lost=int((ref & ~cand).sum()), gained=int((~ref & cand).sum()),
                      confidence=confidence)


# -- checks: one budget each, as the report and report.json carry them --------------------------------------------

@dataclass
class Check:
    """One budget's verdict: the measured value, its interval at `confidence`, and what settles an INCONCLUSIVE."""

    budget: float
    value: Optional[float]  # None: not measured
    low: Optional[float]  # None: no interval
    high: Optional[float]
    verdict: Verdict
    confidence: Optional[float]  # None: exact (a file's size)
    method: str
    unit: str
    detail: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "interval": [self.low, self.high], "pass": self.passed}

    def line(self, name: str) -> str:
        return check_line(name, self.to_json())


def check_line(name: str, check: dict[str, Any]) -> str:
    """One budget's verdict as a line, from its JSON (Check.to_json, as report.json keeps it):
    `accuracy_drop +0.35 pts (95% interval -0.20..+0.90) vs budget 1.5: PASS`."""
    spec = {"pts": "+.2f", "cosine": ".4f"}.get(check["unit"], ".2f")
    value = "not measured" if check["value"] is None else f"{check['value']:{spec}} {check['unit']}"
    spread = "" if check["confidence"] is None or check["low"] is None else \
        f" ({check['confidence']:.0%} interval {check['low']:{spec}}..{check['high']:{spec}})"
    bound = "at least" if check["unit"] == "cosine" else "budget"
    text = f"{name} {value}{spread} vs {bound} {check['budget']:g}: {check['verdict']}"
    if check["verdict"] == "INCONCLUSIVE" and check["detail"].get("reason"):
        text += f" ({check['detail']['reason']})"
    return text


def accuracy_check(drop: PairedDrop, budget: float) -> Check:
    """Is the drop (points) within `budget` points, at the drop's confidence?"""
    low, high = drop.interval
    verdict = verdict_of(low, high, budget)
    detail: dict[str, Any] = {"examples": drop.n, "lost": drop.lost, "gained": drop.gained}
    if verdict == "INCONCLUSIVE":
        need = examples_needed(drop.lost, drop.gained, drop.n, budget / 100.0, drop.confidence)
        detail["examples_needed"] = need
        detail["reason"] = (f"{drop.n} examples cannot tell; need about {need:,}" if need else
                            "no examples" if not drop.n else
                            f"{drop.n} examples cannot tell, and more would not while the drop sits at the budget"
                            if drop.drop == budget else f"{drop.n} examples cannot tell; more than {MAX_EXAMPLES:,} "
                            f"would be needed")
    return Check(budget=budget, value=drop.drop, low=low, high=high, verdict=verdict, confidence=drop.confidence,
                 method=METHOD, unit="pts", detail=detail)


def median_interval(samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> Optional[tuple[float, float]]:
    """A distribution-free interval for the median of the population `samples` came from: the order statistics
    whose ranks a Binomial(n, 1/2) keeps within `confidence`; None when n is too small for any (fewer than 6 runs
    at 95%). The runs are taken as independent draws: iterations in one process share its state, so the interval
    is the spread within a run, not between processes or hosts."""
    from scipy.stats import binom

    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    k = int(binom.ppf((1 - confidence) / 2, n, 0.5)) if n else 0  # P(B < k) <= alpha / 2: x[k-1] .. x[n-k]
    if k < 1:
        return None
    return float(x[k - 1]), float(x[n - k])


def latency_check(p50: float, interval: Optional[tuple[float, float]], runs: Optional[int], budget: float,
                  confidence: float = DEFAULT_CONFIDENCE) -> Check:
    """Is the p50 latency within `budget` ms, given the interval of the median over the repeated runs
    (median_interval; None: too few runs for one)?"""
    detail: dict[str, Any] = {"runs": runs}
    if interval is None:
        detail["reason"] = f"{runs} runs are too few for a {confidence:.0%} interval of the p50; repeat more"
        return Check(budget=budget, value=p50, low=None, high=None, verdict="INCONCLUSIVE", confidence=None,
                     method="p50 of repeated runs", unit="ms", detail=detail)
    low, high = interval
    verdict = verdict_of(low, high, budget)
    if verdict == "INCONCLUSIVE":
        detail["reason"] = f"the p50's interval over {runs} runs straddles the budget; repeat more runs"
    return Check(budget=budget, value=p50, low=low, high=high, verdict=verdict, confidence=confidence,
                 method="p50 of repeated runs; order-statistic interval of the median", unit="ms", detail=detail)


def unmeasured(budget: float, unit: str, why: str) -> Check:
    """A budget the profile sets that this row could not measure: never a PASS."""
    return Check(budget=budget, value=None, low=None, high=None, verdict="INCONCLUSIVE", confidence=None,
                 method="not measured", unit=unit, detail={"reason": why})


def mean_floor_check(values: np.ndarray, floor: float, confidence: float = DEFAULT_CONFIDENCE) -> Check:
    """Is the mean of per-example `values` (an embedding model's cosine with the reference) at least `floor`? The
    mean's t-interval at `confidence`: PASS when its lower end is at or over the floor, FAIL when its upper end is
    under it, else INCONCLUSIVE with about how many examples at the same spread would settle it."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    method = "mean of per-example cosines with the reference; t-interval; a floor"
    if not np.isfinite(x).all():
        return Check(budget=floor, value=-1.0, low=-1.0, high=-1.0, verdict="FAIL", confidence=confidence,
                     method=method, unit="cosine",
                     detail={"examples": n, "reason": f"{int((~np.isfinite(x)).sum())} outputs are not finite"})
    if n < 2:
        return Check(budget=floor, value=float(x.mean()) if n else -1.0, low=-1.0, high=1.0, verdict="INCONCLUSIVE",
                     confidence=confidence, method=method, unit="cosine",
                     detail={"examples": n, "reason": f"{n} examples give no interval"})
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict: Verdict = "PASS" if low >= floor else "FAIL" if high < floor else "INCONCLUSIVE"
    detail: dict[str, Any] = {"examples": n, "sd": sd}
    if verdict == "INCONCLUSIVE":
        need = math.ceil((z_of(confidence) * sd / abs(mean - floor)) ** 2) if mean != floor else None
        detail.update(examples_needed=need, reason=f"{n} examples cannot tell" + (f"; need about {need:,}" if need
                                                                                   else ""))
    return Check(budget=floor, value=mean, low=low, high=high, verdict=verdict, confidence=confidence,
                 method=method, unit="cosine", detail=detail)


def size_check(size_mb: float, budget: float) -> Check:
    return Check(budget=budget, value=size_mb, low=size_mb, high=size_mb,
                 verdict="PASS" if size_mb <= budget else "FAIL", confidence=None, method="file size (exact)",
                 unit="MB", detail={})


def overall(checks: dict[str, dict[str, Any]]) -> Verdict:
    """A row's verdict: FAIL if any budget fails, else INCONCLUSIVE if any cannot tell, else PASS."""
    verdicts = {c["verdict"] for c in checks.values()}
    return "FAIL" if "FAIL" in verdicts else "INCONCLUSIVE" if "INCONCLUSIVE" in verdicts else "PASS"
