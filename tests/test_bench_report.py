"""benchmarks.report.ratios judges load ratios on runs of the same round, not on medians of whole tables."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.report.markdown import handlers_section, instructions_section
from benchmarks.report.ratios import ratios


def table(**rows: list[Any]) -> dict[str, Any]:
    """A load table whose rows ran these rounds: rps, or (rps, p50 ms), or None for an invalid run."""
    def run(value: Any) -> dict[str, Any]:
        rps, p50 = value if isinstance(value, tuple) else (value or 1.0, 1.0)
        return {"rps": rps, "p50": p50, "cpu_us_per_request": {"server": 1e6 / rps},
                "valid": value is not None}
    return {"rows": {name: {"rounds": [run(v) for v in values], "summary": {"rps": 0.0, "p50": 0.0}}
                     for name, values in rows.items()}}


def figure(load: dict[str, Any], key: str) -> Any:
    return next(r for r in ratios(load, {}) if r["key"] == key)


def test_a_ratio_is_the_median_of_per_round_ratios() -> None:
    # Host speed halves, then doubles: per round warm/floor is 0.9, 0.95, 0.9; the medians' ratio
    # (200 / 400 = 0.5) would call it half as fast.
    load = {"tables": {"direct_h2load": table(floor=[100, 400, 800], warm=[90, 380, 720])}}
    r = figure(load, "warm_over_floor_direct_h2load")
    assert r["value"] == pytest.approx(0.9) and r["met"] is True
    # CPU a Check adds, per round: 1e6/90 - 1e6/100, 1e6/380 - 1e6/400, 1e6/720 - 1e6/800
    assert figure(load, "added_cpu_direct_h2load")["value"] == pytest.approx(1e6 / 720 - 1e6 / 800)


def test_a_round_with_an_invalid_run_is_left_out() -> None:
    load = {"tables": {"direct_h2load": table(floor=[100, 100, 100], warm=[50, None, 95])}}
    assert figure(load, "warm_over_floor_direct_h2load")["value"] == pytest.approx((0.5 + 0.95) / 2)
    load = {"tables": {"direct_h2load": table(floor=[None, None], warm=[50, 60])}}
    assert figure(load, "warm_over_floor_direct_h2load")["value"] is None  # nothing to compare


def test_added_latency_through_envoy_is_paired_per_round_too() -> None:
    load = {"tables": {"envoy_1": table(floor=[(1, 0.2), (1, 0.4), (1, 0.3)],
                                        ext_authz=[(1, 1.1), (1, 1.5), (1, 1.2)],
                                        ext_authz_floor=[(1, 1.0), (1, 1.3), (1, 1.1)],
                                        jwt_authn=[(1, 0.3), (1, 0.5), (1, 0.4)])}}
    added = figure(load, "envoy_added_p50_ms")
    assert added["value"] == pytest.approx(0.9) and added["met"] is True
    assert figure(load, "envoy_hop_added_p50_ms")["value"] == pytest.approx(0.8)
    assert figure(load, "envoy_answer_added_p50_ms")["value"] is None  # not in this table
    assert figure(load, "envoy_added_over_jwt")["value"] == pytest.approx(9.0)


def test_ratio_by_cpu_per_request_ignores_the_time_the_host_took() -> None:
    # Round 2: the host stole half of agentauthz's run, so its requests/s halved while a request
    # cost it the same CPU. By CPU per request warm/floor is 0.8 in every round.
    def run(rps: float, cpu_us: float) -> dict[str, Any]:
        return {"rps": rps, "p50": 1.0, "cpu_us_per_request": {"server": cpu_us}, "valid": True}
    rounds = {"floor": [run(100, 100), run(100, 100), run(100, 100)],
              "warm": [run(80, 125), run(40, 125), run(80, 125)]}
    load = {"tables": {"direct_h2load_pinned": {"rows": {
        name: {"rounds": runs, "summary": {"rps": 0.0, "p50": 0.0}} for name, runs in rounds.items()}}}}
    assert figure(load, "warm_over_floor_by_cpu_direct_h2load_pinned")["value"] == pytest.approx(0.8)
    assert figure(load, "warm_over_floor_direct_h2load_pinned")["value"] == pytest.approx(0.8)  # median
    rounds["warm"][0] = run(40, 125)  # two of three rounds robbed: requests/s can no longer tell
    assert figure(load, "warm_over_floor_direct_h2load_pinned")["value"] == pytest.approx(0.4)
    assert figure(load, "warm_over_floor_by_cpu_direct_h2load_pinned")["value"] == pytest.approx(0.8)


def test_steal_is_read_per_cpu_from_proc_stat() -> None:
    from benchmarks.load.procs import steal_seconds
    every, first = steal_seconds(None), steal_seconds({0})
    assert 0 <= first <= every  # one CPU's share of the total, never more
    assert steal_seconds(set()) == 0


def test_revocation_bits_per_token_counts_the_slots_each_token_took() -> None:
    window = 1 << 24
    one = {"revocation_memory": {"tokens": 2000, "slots": 2000, "window_slots": window,
                                 "bits_bytes": window // 8 + 16}}
    r = figure(one, "revocation_bits_per_token")
    assert r["value"] == pytest.approx(1 + 128 / window) and r["met"] is True
    assert "16 bytes" in r["title"]
    two = {"revocation_memory": {**one["revocation_memory"], "slots": 4000}}  # two slots a token
    assert figure(two, "revocation_bits_per_token")["met"] is False
    fat = {"revocation_memory": {**one["revocation_memory"], "bits_bytes": window // 4}}  # 2 bits a slot
    assert figure(fat, "revocation_bits_per_token")["met"] is False


def test_the_check_handler_over_the_bound_is_the_median_of_per_round_ratios() -> None:
    handlers = {"rounds": [{"check": 30.0, "bound": 25.0}, {"check": 60.0, "bound": 30.0},
                           {"check": 28.0, "bound": 28.0}]}
    by_key = {r["key"]: r for r in ratios({}, {}, None, handlers)}
    assert by_key["handler_check_over_bound"]["value"] == pytest.approx(1.2)  # not 118/83 = 1.42
    assert by_key["handler_check_us"]["value"] == 30.0 and by_key["handler_bound_us"]["value"] == 28.0
    assert all(r["value"] is None for r in ratios({}, {}) if r["key"].startswith("handler_"))


def test_the_check_beyond_its_record_is_the_median_of_per_round_differences() -> None:
    handlers = {"rounds": [{"check": 30.0, "record": 20.0, "decide": 6.0, "parse": 4.0, "bound": 28.0},
                           {"check": 40.0, "record": 22.0, "decide": 7.0, "parse": 5.0, "bound": 30.0},
                           {"check": 24.0, "record": 20.0, "decide": 5.0, "parse": 4.5, "bound": 26.0}]}
    by_key = {r["key"]: r for r in ratios({}, {}, None, handlers)}
    assert by_key["handler_check_beyond_record_us"]["value"] == 10.0  # 10, 18, 4: not 94 - 62 over 3
    assert by_key["handler_record_us"]["value"] == 20.0 and by_key["handler_decide_us"]["value"] == 6.0
    assert by_key["handler_parse_us"]["value"] == 4.5
    older = {"rounds": [{"check": 30.0, "bound": 25.0}]}  # a handlers.json without the steps
    keys = {r["key"] for r in ratios({}, {}, None, older)}
    assert "handler_record_us" not in keys and "handler_check_us" in keys


def test_the_report_says_when_the_handlers_were_not_measured() -> None:
    assert "Not measured" in handlers_section({"handlers": {}})[0]
    lines = handlers_section({"handlers": {"median_us": {"check": 28.7}, "rounds": [{"check": 28.7}],
                                           "check_waited": [0.011]}})
    assert any("| check | the whole warm Check | 28.7 | 28.7 |" in line for line in lines)
    assert "1.1%" in lines[-1]


def test_instruction_ratios_are_floor_over_each_server_and_each_checks_excess_over_its_bound() -> None:
    counts = {"floor": 300_000.0, "record": 340_000.0, "warm": 360_000.0, "verify": 500_000.0,
              "cold": 600_000.0, "naive": 1_200_000.0}
    instructions = {"instructions_per_check": counts, "requests": 1000, "valgrind": "valgrind-3.19.0"}
    by_key = {r["key"]: r for r in ratios({}, {}, None, None, instructions)}
    assert by_key["instructions_floor_over_warm"]["value"] == pytest.approx(300 / 360)
    assert by_key["instructions_floor_over_record"]["value"] == pytest.approx(300 / 340)
    assert by_key["instructions_floor_over_cold"]["value"] == pytest.approx(0.5)
    assert by_key["instructions_warm_beyond_record"]["value"] == 20_000.0
    assert by_key["instructions_cold_beyond_verify"]["value"] == 100_000.0
    assert by_key["instructions_naive_over_cold"]["value"] == 2.0
    assert not any(key.startswith("instructions") for key in {r["key"] for r in ratios({}, {})})
    lines = instructions_section({"instructions": instructions})
    assert "| warm | 360,000 | 0.83 |" in lines and "| cold | 600,000 | 0.50 |" in lines
    assert "Not measured" in instructions_section({})[0]


def test_the_answer_server_answers_what_agentauthz_allows_with() -> None:
    # Through Envoy the hop's bound is only honest if Envoy has the same answer to act on.
    from envoy.service.auth.v3 import external_auth_pb2

    from agentauthz.decision._check_py import DECISION_ID_CHARS, HEADER_AGENT, HEADER_TASK, HEADER_TOKEN_ID
    from benchmarks.load.servers import allow_answer
    answer = external_auth_pb2.CheckResponse.FromString(allow_answer())
    assert answer.status.code == 0
    assert [h.header.key for h in answer.ok_response.headers] == [HEADER_AGENT, HEADER_TASK, HEADER_TOKEN_ID]
    assert all(h.header.value for h in answer.ok_response.headers)
    assert list(answer.ok_response.headers_to_remove) == ["authorization"]
    assert len(answer.dynamic_metadata.fields["decision_id"].string_value) == DECISION_ID_CHARS
