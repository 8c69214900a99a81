"""benchmarks/load/cluster.py's summaries: ratios paired per round, propagation percentiles, the table."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks.load.cluster import markdown, mint_summary, paired_ratio, propagation_summary


def table(**rows: list[float | None]) -> dict[str, Any]:
    """A load table whose rows ran these rounds (requests/s; None for an invalid run)."""
    return {"rows": {name: {"rounds": [{"rps": v or 1.0, "p50": 1.0, "valid": v is not None} for v in values]}
                     for name, values in rows.items()}}


def test_the_check_ratio_is_the_median_of_same_round_ratios() -> None:
    # The host halves, then doubles its speed: per round 0.9, 0.95, 0.9; the medians' ratio would say 0.95.
    t = table(cluster=[90, 190, 720], standalone=[100, 200, 800])
    assert paired_ratio(t, "cluster", "standalone") == pytest.approx(0.9)


def test_a_round_with_an_invalid_run_is_left_out_and_none_left_is_no_figure() -> None:
    t = table(cluster=[50, None, 95], standalone=[100, 100, 100])
    assert paired_ratio(t, "cluster", "standalone") == pytest.approx((0.5 + 0.95) / 2)
    assert paired_ratio(table(cluster=[1.0], standalone=[None]), "cluster", "standalone") is None


def test_mint_ratio_pairs_rounds() -> None:
    m = mint_summary({"cluster": [300.0, 150.0, 330.0], "standalone": [400.0, 200.0, 440.0]})
    assert m["ratio"] == pytest.approx(0.75)
    assert (m["cluster_per_s"], m["standalone_per_s"]) == (300.0, 400.0)


def test_propagation_percentiles_are_nearest_rank_and_an_allow_after_an_ack_fails_both_bars() -> None:
    s = propagation_summary([float(x) for x in range(1, 101)], 0)
    assert (s["p50"], s["p99"], s["max"], s["allows_after_ack"]) == (50.0, 99.0, 100.0, 0)
    assert s["target_met"] is False and s["within_hard_limit"] is True
    fast = propagation_summary([1.0, 2.0, 3.0], 1)
    assert (fast["revokes"], fast["max"]) == (3, 3.0)
    assert fast["target_met"] is False and fast["within_hard_limit"] is False  # honoured after its ack
    assert math.isnan(propagation_summary([], 0)["p99"])


def test_the_markdown_table_names_every_figure_and_the_opa_anchor() -> None:
    results = {"check": {"ratio": 0.97, "cluster_rps": 9700.0, "standalone_rps": 10000.0},
               "propagation": propagation_summary([1.0, 2.0, 3.0], 0),
               "mint": {"count": 200, "threads": 4, "ratio": None, "cluster_per_s": 300.0,
                        "standalone_per_s": 0.0},
               "budget": {"ratio": 0.5, "budgeted_rps": 5000.0, "unbudgeted_rps": 10000.0,
                          "budgeted_p50_ms": 1.2, "unbudgeted_p50_ms": 0.4}}
    text = markdown(results)
    assert "| 0.97 (9700 / 10000) | >= 0.95 |" in text
    assert "2.00 / 3.00 / 3.00 ms, allowed after the ack 0" in text
    assert "60-120 s" in text and "n/a (300 / 0)" in text and "1.200 / 0.400 ms" in text
