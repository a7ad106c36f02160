"""The report's arithmetic: the Pareto front and the ratios against the fp32 baseline."""

import pytest

from pocketformer.report import add_ratios, pareto_front


def test_pareto_front_keeps_only_points_no_other_beats_on_both_axes():
    # (latency ms, accuracy %): the second is slower and less accurate than the first.
    points = [(10.0, 80.0), (12.0, 79.0), (5.0, 70.0), (20.0, 85.0)]
    assert pareto_front(points) == [0, 2, 3]


def test_pareto_front_keeps_ties():
    assert pareto_front([(10.0, 80.0), (10.0, 80.0)]) == [0, 1]


def test_ratios_are_against_the_baseline_fp32_row_of_the_same_target():
    rows = [{"variant": "baseline.fp32", "target": "a", "latency_p50_ms": 40.0, "size_mb": 90.0},
            {"variant": "model.int8", "target": "a", "latency_p50_ms": 20.0, "size_mb": 22.5},
            {"variant": "baseline.fp32", "target": "b", "latency_p50_ms": 80.0, "size_mb": 90.0},
            {"variant": "model.int8", "target": "b", "latency_p50_ms": 80.0, "size_mb": 22.5}]
    add_ratios(rows)
    assert [r["speedup_vs_fp32"] for r in rows] == pytest.approx([1.0, 2.0, 1.0, 1.0])
    assert [r["size_ratio_vs_fp32"] for r in rows] == pytest.approx([1.0, 4.0, 1.0, 4.0])
