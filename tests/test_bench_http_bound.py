"""The HTTP Check's bound (benchmarks/load/rsgi_bound.py, bound.py): its figures, its per-thread CPU split,
and the bound itself served by granian: the allow's headers, a verify that refuses, a chained log."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load.bound import DIR_ENV, JWKS_ENV, ChainedLog
from benchmarks.load.http_figures import figures, markdown
from benchmarks.load.procs import Process, free_port, http_get, process_tree, wait_for
from benchmarks.load.rsgi_servers import LOOP, REST, RUNTIME, batch_io_threads, split, thread_cpu

ROOT = Path(__file__).resolve().parents[1]


def run(rps: float, threads: dict[str, float] | None = None, cpu: float = 10.0) -> dict[str, Any]:
    out = {"rps": rps, "p50": 1.0, "valid": True, "cpu_us_per_request": {"server": cpu}}
    return {**out, "threads_us_per_request": threads} if threads else out


def table(**rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"title": "t", "generator": "mixed", "pinned": True, "rows": {
        name: {"label": name, "rounds": runs, "summary": {
            "rps": runs[0]["rps"], "p50": 1.0, "p99": 2.0, "valid_rounds": len(runs), "rounds": len(runs),
            "cpu_us_per_request": runs[0]["cpu_us_per_request"]}} for name, runs in rows.items()}}


def test_bound_figures_pair_each_check_with_its_bound_and_say_when_a_target_is_out_of_reach() -> None:
    direct = table(granian_floor=[run(40000), run(20000)], granian_bound_warm=[run(24000), run(12000)],
                   http_warm=[run(18000), run(9000)], cerbos=[run(4000, cpu=150.0), run(2000, cpu=150.0)],
                   granian_bound_cold=[run(8000, cpu=100.0), run(4000, cpu=100.0)],
                   http_cold=[run(5000), run(2500)])
    found = {f["key"]: f for f in figures({"direct": direct})}
    warm, cold = found["bound_warm_over_granian_floor"], found["bound_cold_over_cerbos"]
    assert warm["value"] == pytest.approx(0.60) and warm["target"] == "(bound)" and warm["met"] is None
    assert warm["title"].endswith("misses ≥ 0.70 itself, so the ≥ 0.70 target is out of reach by "
                                  "construction")
    assert cold["value"] == pytest.approx(2.0) and cold["title"].endswith("the ≥ 1.5 target is within reach")
    # By CPU the bound costs less than Cerbos by a third: 1.5, which reaches the target (≥ is inclusive).
    by_cpu = found["bound_cold_over_cerbos_by_cpu"]
    assert by_cpu["value"] == pytest.approx(1.5) and by_cpu["title"].endswith("target is within reach")
    assert found["http_warm_over_warm_bound"]["value"] == pytest.approx(0.75)
    assert found["http_cold_over_cold_bound"]["value"] == pytest.approx(0.625)
    # A Check that beats its stock-Python bound: the bound's miss proves nothing about reach.
    beaten = table(cerbos=[run(4000, cpu=150.0), run(2000, cpu=150.0)],
                   granian_bound_cold=[run(4000, cpu=200.0), run(2000, cpu=200.0)],
                   http_cold=[run(9000), run(4500)])
    found = {f["key"]: f for f in figures({"direct": beaten})}
    assert found["bound_cold_over_cerbos"]["value"] == pytest.approx(1.0)
    assert found["http_cold_over_cold_bound"]["value"] == pytest.approx(2.25)
    assert "bounds nothing" in found["bound_cold_over_cerbos"]["title"]
    assert "by construction" not in found["bound_cold_over_cerbos"]["title"]
    # Without the bound rows there is no bound figure, and its title claims nothing.
    bare = {f["key"]: f for f in figures({"direct": table(granian_floor=[run(1.0)], cerbos=[run(1.0)])})}
    assert bare["bound_warm_over_granian_floor"]["value"] is None
    assert "target" not in bare["bound_warm_over_granian_floor"]["title"]


def test_envoys_audited_allow_hop_bounds_the_latency_and_throughput_targets() -> None:
    def at(p50: float, rps: float = 1000.0) -> dict[str, Any]:
        return {**run(rps), "p50": p50}
    envoy_1 = table(floor=[at(0.30), at(0.40)], http=[at(0.70), at(0.80)], http_floor=[at(0.50), at(0.60)],
                    http_bound=[at(0.62), at(0.70)])
    envoy_n = table(jwt_authn=[at(1, 4000), at(1, 4000)], http=[at(1, 3600), at(1, 3700)],
                    http_floor=[at(1, 4400), at(1, 4400)], http_bound=[at(1, 3800), at(1, 3900)])
    found = {f["key"]: f for f in figures({"envoy_1": envoy_1, "envoy_n": envoy_n})}
    added = found["envoy_http_added_ms"]
    assert added["value"] == pytest.approx(0.40) and added["met"] is False
    hop, audited = found["envoy_http_hop_added_ms"], found["envoy_http_bound_added_ms"]
    assert hop["value"] == pytest.approx(0.20)
    assert hop["title"].endswith("the ≤ 0.25 ms target is within reach")
    assert audited["value"] == pytest.approx(0.31)
    assert audited["title"].endswith("misses ≤ 0.25 ms itself, so the ≤ 0.25 ms target is out of reach by "
                                     "construction")
    assert found["envoy_n_http_over_jwt"]["value"] == pytest.approx(0.9125)
    assert found["envoy_n_http_floor_over_jwt"]["title"].endswith("the ≥ 1.0 target is within reach")
    bound = found["envoy_n_http_bound_over_jwt"]
    assert bound["value"] == pytest.approx(0.9625) and bound["met"] is None
    assert bound["title"].endswith("misses ≥ 1.0 itself, so the ≥ 1.0 target is out of reach by construction")
    assert found["envoy_n_http_over_bound"]["value"] == pytest.approx((3600 / 3800 + 3700 / 3900) / 2)


def test_the_thread_split_charges_main_threads_the_busiest_other_and_the_rest() -> None:
    # Two processes (1 and 5): their main threads are the loops; thread 7 is the busiest other one.
    before = {(1, 1): 1.0, (1, 2): 0.0, (5, 5): 0.5, (5, 7): 2.0}
    after = {(1, 1): 1.5, (1, 2): 0.1, (5, 5): 0.6, (5, 7): 2.8, (5, 9): 0.05}  # 9 started during the run
    got = split(before, after, 10000)
    assert got[LOOP] == pytest.approx(60.0) and got[RUNTIME] == pytest.approx(80.0)
    assert got[REST] == pytest.approx(15.0)
    mine = thread_cpu(os.getpid())
    assert (os.getpid(), os.getpid()) in mine and all(v >= 0 for v in mine.values())


def test_markdown_shows_each_rows_thread_split_and_leaves_out_rows_without_one() -> None:
    threads = {LOOP: 8.0, RUNTIME: 17.0, REST: 1.0}
    direct = table(granian_floor=[run(40000, threads), run(41000, {**threads, LOOP: 10.0})],
                   cerbos=[run(4000)])
    text = markdown({"figures": figures({"direct": direct}), "tables": {"direct": direct},
                     "http_transport": True})
    assert f"| row | {LOOP} | {RUNTIME} | {REST} |" in text
    assert "| granian_floor | 9 | 17 | 1 |" in text
    assert "| cerbos | 4000 |" in text and "| cerbos | 9" not in text


def test_the_chained_log_links_each_record_to_the_one_before(tmp_path: Path) -> None:
    log = ChainedLog(str(tmp_path))
    for _ in range(3):
        log.append()
    lines = Path(log.path).read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3] and records[0]["prev"] == "0" * 64
    assert [r["prev"] for r in records[1:]] == [hashlib.sha256(line).hexdigest() for line in lines[:2]]
    assert all(r["decision"] is True and r["kind"] == "check" for r in records)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(key: Any, kid: str) -> str:
    head, claims = _b64(json.dumps({"alg": "EdDSA", "kid": kid}).encode()), _b64(b'{"sub":"a"}')
    return f"{head}.{claims}.{_b64(key.sign(f'{head}.{claims}'.encode()).signature)}"


def _get(address: str, token: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(f"http://{address}/demo/reports",
                                     headers={"authorization": f"Bearer {token}", "x-agentauthz-path": "/x"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def test_granian_serves_the_cold_bound_allowing_a_signed_token_refusing_a_forged_one(tmp_path: Path) -> None:
    pytest.importorskip("granian")
    from nacl.signing import SigningKey
    key, other = SigningKey.generate(), SigningKey.generate()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kid": "k1", "kty": "OKP", "crv": "Ed25519",
                                          "x": _b64(bytes(key.verify_key))}]}))
    address = f"127.0.0.1:{free_port()}"
    host, port = address.split(":")
    argv = [sys.executable, "-m", "granian", "--interface", "rsgi", "--host", host, "--port", port,
            "--workers", "1", "--runtime-threads", "1", "--no-ws", "--log-level", "warning",
            "benchmarks.load.rsgi_bound:app"]
    proc = Process("bound", argv, tmp_path, cwd=ROOT,
                   env={**os.environ, JWKS_ENV: str(jwks), DIR_ENV: str(tmp_path)})
    try:
        wait_for(lambda: proc.alive() and http_get(f"http://{address}/")[0] > 0, 30, "granian bound")
        status, headers = _get(address, _token(key, "k1"))
        assert status == 200
        assert headers["x-agentauthz-agent"] == "spiffe://dev.local/agent/bench"
        assert headers["x-envoy-auth-headers-to-remove"] == "authorization"
        assert len(headers["x-agentauthz-decision-id"]) == 32 and headers["x-agentauthz-token-id"]
        again = _get(address, _token(key, "k1"))[1]  # a decision of its own, as every allow of the Check
        assert again["x-agentauthz-decision-id"] != headers["x-agentauthz-decision-id"]
        assert len(again["x-agentauthz-decision-id"]) == 32
        assert _get(address, _token(other, "k1"))[0] == 500  # signed by another key: the verify refuses
        logs = list(tmp_path.glob("bound-*.jsonl"))
        assert len(logs) == 1 and len(logs[0].read_text().splitlines()) == 2  # the refusal wrote nothing
    finally:
        proc.stop()


def test_a_stock_granian_gets_the_daemons_scheduling_its_loop_threads_untouched(tmp_path: Path) -> None:
    pytest.importorskip("granian")
    address = f"127.0.0.1:{free_port()}"
    host, port = address.split(":")
    argv = [sys.executable, "-m", "granian", "--interface", "rsgi", "--host", host, "--port", port,
            "--workers", "1", "--runtime-threads", "1", "--no-ws", "--log-level", "warning",
            "benchmarks.load.rsgi_floor:app"]
    proc = Process("floor", argv, tmp_path, cwd=ROOT)
    try:
        wait_for(lambda: proc.alive() and http_get(f"http://{address}/")[0] > 0, 30, "granian floor")
        batch_io_threads(proc.pid)
        tree = process_tree(proc.pid)
        assert len(tree) == 2  # granian's supervisor and its worker
        others = []
        for pid in tree:
            policies = {int(t): os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}
            assert policies.pop(pid) == os.SCHED_OTHER
            others += policies.values()
        assert others and set(others) == {os.SCHED_BATCH}
        assert http_get(f"http://{address}/")[0] == 200
    finally:
        proc.stop()
