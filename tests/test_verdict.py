"""Budget verdicts as statistical tests: the paired drop's interval, what PASS, FAIL and INCONCLUSIVE mean, and
the p50's interval. Checked against the definition (the constrained maximum likelihood), by coverage over simulated
samples, and on the cases the issue names."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from pocketformer.verdict import (_score, accuracy_check, check_line, drop_interval, examples_needed,
                                  latency_check, mean_floor_check, median_interval, overall, paired_drop, size_check,
                                  unmeasured, verdict_of)


def constrained_rate(lost, gained, n, delta):
    """The maximum-likelihood rate of gained examples given a drop of `delta`, by numerical search."""
    rest = n - lost - gained

    def nll(q):
        return -sum(k * math.log(p) for k, p in ((lost, q + delta), (gained, q), (rest, 1 - 2 * q - delta)) if k)

    return minimize_scalar(nll, bounds=(max(0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12), method="bounded",
                           options={"xatol": 1e-13}).x


@pytest.mark.parametrize("lost,gained,n,delta", [(10, 5, 100, 0.02), (3, 0, 50, -0.05), (20, 30, 400, 0.01),
                                                 (7, 2, 30, 0.3)])
def test_the_score_uses_the_constrained_maximum_likelihood(lost, gained, n, delta):
    q = constrained_rate(lost, gained, n, delta)
    expected = (lost - gained - n * delta) / math.sqrt(n * (2 * q + delta - delta ** 2))
    assert _score(lost, gained, n, delta) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("p_lost,p_gained,n", [(0.03, 0.02, 200), (0.05, 0.05, 1000), (0.01, 0.0, 300)])
def test_the_interval_covers_the_true_drop_at_its_confidence(p_lost, p_gained, n):
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained], size=1000)
    truth = p_lost - p_gained
    covered = np.mean([lo <= truth <= hi for lo, hi in (drop_interval(b, c, n) for b, c, _ in counts)])
    assert covered >= 0.93


def test_no_discordant_pair_does_not_mean_no_possible_drop():
    """12 examples that all agree: the drop is 0, yet up to 24 points is possible at 95%; at 2,000 examples, 0.19."""
    assert drop_interval(0, 0, 12)[1] == pytest.approx(1.96 ** 2 / (12 + 1.96 ** 2), rel=1e-3)
    assert drop_interval(0, 0, 2000)[1] < 0.002


def test_the_point_estimate_passes_but_the_interval_does_not_inconclusive():
    """400 examples, 6 lost and 2 gained: a drop of 1.0 point, within a 1.5-point budget as a point estimate, but
    its 95% interval reaches past 1.5: INCONCLUSIVE, with how many examples would settle it."""
    ref = np.ones(400, bool)
    ref[:2] = False
    cand = ref.copy()
    cand[:2] = True  # gained
    cand[2:8] = False  # lost
    drop = paired_drop(ref, cand)
    assert (drop.lost, drop.gained, drop.drop) == (6, 2, 1.0)
    check = accuracy_check(drop, 1.5)
    assert check.value <= 1.5 < check.high and check.low < 1.5
    assert check.verdict == "INCONCLUSIVE" and not check.passed
    need = check.detail["examples_needed"]
    assert need > 400 and "400 examples cannot tell; need about" in check.detail["reason"]
    low, high = drop_interval(6 * need / 400, 2 * need / 400, need)
    assert verdict_of(100 * low, 100 * high, 1.5) == "PASS"  # at the same rates, that many would


def test_pass_and_fail_need_the_whole_interval_on_one_side():
    ref = np.ones(2000, bool)
    within = ref.copy()
    within[:4] = False  # 0.2 points lost
    over = ref.copy()
    over[:100] = False  # 5 points lost
    assert accuracy_check(paired_drop(ref, within), 1.5).verdict == "PASS"
    fail = accuracy_check(paired_drop(ref, over), 1.5)
    assert fail.verdict == "FAIL" and fail.low > 1.5


def test_examples_needed_is_none_when_the_drop_sits_on_the_budget():
    assert examples_needed(15, 0, 1000, 0.015, 0.95) is None
    assert examples_needed(0, 0, 12, 0.015, 0.95) == pytest.approx(250, rel=0.05)  # 1.96^2 (1 - b) / b


def test_paired_predictions_must_be_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        paired_drop(np.ones(3, bool), np.ones(4, bool))


def test_the_median_interval_covers_the_median_at_its_confidence():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(3.0, 0.3, size=(2000, 30))  # true median e^3
    covered = np.mean([lo <= math.exp(3.0) <= hi for lo, hi in (median_interval(s) for s in samples)])
    assert covered >= 0.94
    assert median_interval(np.arange(5.0)) is None  # 5 runs: even the whole range covers only 93.75%
    assert median_interval(np.arange(6.0)) == (0.0, 5.0)  # 6 runs: the whole range covers 96.9%
    check = latency_check(20.0, None, 5, 40.0)
    assert check.verdict == "INCONCLUSIVE" and "5 runs are too few" in check.detail["reason"]


def test_latency_and_size_verdicts_and_a_rows_verdict():
    assert latency_check(20.0, (19.0, 21.0), 50, 40.0).verdict == "PASS"
    assert latency_check(39.0, (37.0, 41.0), 50, 40.0).verdict == "INCONCLUSIVE"
    assert latency_check(45.0, (41.0, 49.0), 50, 40.0).verdict == "FAIL"
    assert size_check(10.0, 30.0).verdict == "PASS" and size_check(31.0, 30.0).verdict == "FAIL"
    checks = {"a": {"verdict": "PASS"}, "b": {"verdict": "INCONCLUSIVE"}}
    assert overall(checks) == "INCONCLUSIVE"
    assert overall({**checks, "c": {"verdict": "FAIL"}}) == "FAIL" and overall({}) == "PASS"


def test_non_finite_cosines_fail_and_one_example_gives_no_interval():
    bad = mean_floor_check(np.array([0.99, np.nan, 0.98]), 0.95)
    assert bad.verdict == "FAIL" and "1 outputs are not finite" in bad.detail["reason"]
    one = mean_floor_check(np.array([0.99]), 0.95)
    assert one.verdict == "INCONCLUSIVE" and (one.low, one.high) == (-1.0, 1.0)


def test_an_unmeasured_budget_is_inconclusive_and_says_why():
    line = check_line("latency_ms", unmeasured(40.0, "ms", "the runtime measures no latency here").to_json())
    assert line == ("latency_ms not measured vs budget 40: INCONCLUSIVE (the runtime measures no latency here)")


def test_a_check_reads_as_one_line_with_its_interval():
    ref = np.ones(12, bool)
    line = accuracy_check(paired_drop(ref, ref), 1.5).line("accuracy_drop")
    assert line.startswith("accuracy_drop +0.00 pts (95% interval -24.25..+24.25) vs budget 1.5: INCONCLUSIVE")
    assert "12 examples cannot tell; need about" in line


def test_a_cosine_floor_is_judged_by_the_means_interval():
    rng = np.random.default_rng(0)
    assert mean_floor_check(rng.normal(0.97, 0.02, 400), 0.95).verdict == "PASS"
    assert mean_floor_check(rng.normal(0.82, 0.10, 400), 0.95).verdict == "FAIL"
    close = mean_floor_check(rng.normal(0.951, 0.03, 40), 0.95)
    assert close.low < 0.95 <= close.high and close.verdict == "INCONCLUSIVE"
    assert close.detail["examples_needed"] > 40 and "40 examples cannot tell" in close.detail["reason"]
    # coverage of the mean's interval
    samples = rng.normal(0.9, 0.05, size=(2000, 30))
    covered = np.mean([(c := mean_floor_check(s, 0.5)).low <= 0.9 <= c.high for s in samples])
    assert covered >= 0.93
