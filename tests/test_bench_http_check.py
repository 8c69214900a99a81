"""benchmarks/load/http_figures.py: figures paired per round, verdicts, markdown, chart; Cerbos request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.load import cerbos
from benchmarks.load.h1load import http_request
from benchmarks.load.http_figures import added_p50, chart, cpu_ratio, figures, markdown, paired, rps_ratio


def run(rps: float | None, p50: float = 1.0, cpu: float = 10.0) -> dict[str, Any]:
    """One round's run (None: an invalid run)."""
    return {"rps": rps or 1.0, "p50": p50, "valid": rps is not None, "cpu_us_per_request": {"server": cpu}}


def table(**rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"title": "t", "generator": "h2load", "pinned": True, "rows": {
        name: {"label": name, "rounds": runs, "summary": {
            "rps": runs[0]["rps"], "p50": runs[0]["p50"], "p99": 2.0, "valid_rounds": len(runs),
            "rounds": len(runs), "cpu_us_per_request": runs[0]["cpu_us_per_request"]}}
        for name, runs in rows.items()}}


def test_a_ratio_is_the_median_of_same_round_ratios_and_invalid_rounds_are_left_out() -> None:
    # The host slows down, then speeds up: per round 4, 3, 2 (and an invalid round); medians' ratio says 3.5.
    t = table(http_warm=[run(4000), run(3000), run(None), run(9000)],
              cerbos=[run(1000), run(1000), run(1000), run(4500)])
    assert paired(t, "http_warm", "cerbos", rps_ratio) == pytest.approx(3.0)
    assert paired(t, "http_warm", "missing", rps_ratio) is None
    assert paired(table(a=[run(None)], b=[run(1.0)]), "a", "b", rps_ratio) is None


def test_cpu_ratio_is_the_throughput_ratio_by_cpu_and_added_latency_a_difference() -> None:
    assert cpu_ratio(run(1, cpu=50.0), run(1, cpu=200.0)) == pytest.approx(4.0)  # a costs a quarter: 4x
    assert added_p50(run(1, p50=0.45), run(1, p50=0.25)) == pytest.approx(0.20)


def test_figures_carry_targets_and_verdicts_and_a_missing_row_is_no_figure() -> None:
    direct = table(http_warm=[run(12000)], granian_floor=[run(20000)], cerbos=[run(3000)],
                   grpc_warm=[run(4000)], http_cold=[run(4000)])
    envoy_1 = table(floor=[run(1, p50=0.30)], http=[run(1, p50=0.50)], grpc=[run(1, p50=0.80)])
    found = {f["key"]: f for f in figures({"direct": direct, "envoy_1": envoy_1})}
    assert (found["http_warm_over_cerbos"]["value"], found["http_warm_over_cerbos"]["met"]) == (4.0, True)
    assert found["http_warm_over_granian_floor"]["met"] is False  # 0.60 < 0.70
    assert found["http_cold_over_cerbos"]["value"] == pytest.approx(4000 / 3000)
    assert found["http_cold_over_cerbos"]["met"] is False
    assert found["envoy_http_added_ms"]["value"] == pytest.approx(0.20)
    assert found["envoy_http_added_ms"]["met"] is True
    assert found["envoy_grpc_added_ms"]["met"] is None  # information, no target
    assert found["envoy_n_http_over_jwt"]["value"] is None and found["envoy_n_http_over_jwt"]["met"] is None


def test_markdown_and_chart_name_every_figure_and_row(tmp_path: Path) -> None:
    tables = {"direct": table(http_warm=[run(12000)], cerbos=[run(3000)], granian_floor=[run(20000)]),
              "envoy_1": table(floor=[run(1, p50=0.3)], http=[run(1, p50=0.5)]),
              "envoy_n": table(floor=[run(9000)], jwt_authn=[run(6000)], http=[run(7000)])}
    results = {"figures": figures(tables), "tables": tables, "http_transport": False}
    text = markdown(results)
    assert "| HTTP Check warm / Cerbos CheckResources, req/s on one core | 4.00 | ≥ 3 | met |" in text
    assert "| Envoy, 1 connection: HTTP ext_authz -> agentauthz, p50 over the proxy floor | 0.20 ms | " \
           "≤ 0.25 ms | met |" in text
    assert "| cerbos | 3000 | 1.000 | 2.000 | 10 | 1/1 |" in text
    assert "no HTTP Check" in text
    pytest.importorskip("matplotlib")
    chart(results, tmp_path / "http-check.png")
    assert (tmp_path / "http-check.png").read_bytes().startswith(b"\x89PNG")


def test_the_cerbos_request_is_checkresources_on_the_wire() -> None:
    assert cerbos._varint(300) == b"\xac\x02"
    message = cerbos.check_resources("p", "demo", "r", "read", {"sensitivity": "internal"})
    # principal (field 3: id "p", roles ["agent"]), then one ResourceEntry (field 4: actions, resource).
    assert message.startswith(b"\x1a\x0a\x0a\x01p\x1a\x05agent\x22")
    assert b"\x0a\x04read\x12" in message and b"\x0a\x0bsensitivity\x12\x0a\x1a\x08internal" in message


def test_the_http11_request_is_keep_alive_and_complete() -> None:
    assert http_request("GET", "h:1", "/demo/reports", {"authorization": "Bearer t"}) == \
        "GET /demo/reports HTTP/1.1\r\nhost: h:1\r\nauthorization: Bearer t\r\n\r\n"


def test_the_envoy_benchmarks_take_the_shipped_examples_read_route() -> None:
    """The load runs put the shipped examples' GET /demo/reports route in front of each Check, not a
    stand-in (a method matcher the extraction does not read would have failed every Envoy row)."""
    from benchmarks.load import envoy, http_envoy
    _, route, _ = envoy._example()
    settings = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]
    assert settings["context_extensions"]["operation"] == "read" and "route" in route
    _, _, route, source = http_envoy.http_mode("127.0.0.1:9194")
    assert source == "examples/envoy-http.yaml"
    mutations = route["typed_per_filter_config"]["envoy.filters.http.header_mutation"]["mutations"]
    assert {"key": "x-agentauthz-route-operation", "value": "read"} in \
        [m["append"]["header"] for m in mutations["request_mutations"]]
