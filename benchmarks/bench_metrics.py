"""What /metrics costs the warm allow: ``CheckService.check`` with and without its metering, side by side.

    pytest benchmarks/bench_metrics.py --benchmark-only

Every Check reads the clock at each end and counts its latency into a bucket array
(``Latency``, both twins): the warm allow inside ``WarmAllow`` (in C, for the native twin: no
Python call), every other Check in ``check``; the warm allow's own count lands in shared memory
instead of an attribute. "without" is ``check`` as it was before (``unmetered``) over a warm path
given no ``Latency``, on the same service, so the two differ by exactly the metering. The audit
log is a stand-in that takes every allow, so that a few ns are not lost in a file write's noise;
``latency-pair`` is the clock pair and the count as the full path calls them, from Python.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from bench_hotpath import AUDIENCE, NOW, implementations, token, verifier
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz

from agentauthz import reasons
from agentauthz.audit import metrics
from agentauthz.decision.policy import DEV_POLICY, Policy
from agentauthz.serve import extauthz

POLICY = Policy.from_text(DEV_POLICY.read_text())


class TakesEveryAllow:
    """The audit log as the warm allow sees it when its writer keeps up."""

    healthy = True

    def write_allow(self, *args: Any) -> bool:
        return True

    def record_check(self, *args: Any) -> bool:
        return True


def warm_request() -> Any:
    raw = ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            id="req-1", method="GET", path="/demo/reports", headers={"authorization": f"Bearer {token()}"})),
        context_extensions={"tool": "demo", "target": "reports", "operation": "read",
                            "sensitivity": "internal"})).SerializeToString()
    return extauthz.parse_check_request(raw)


async def unmetered(service: extauthz.CheckService, fields: Any, context: Any) -> bytes:
    """``CheckService.check`` before /metrics timed it: the same paths, no clock, no histogram."""
    decision_id = None
    try:
        if fields.__class__ is not tuple:
            if fields is None:
                return service._undecodable(service._ids.next())
            raise RuntimeError("the CheckRequest parser failed")
        decided = service.warm_path(fields)
        if decided.__class__ is bytes:
            return decided  # type: ignore[no-any-return]
        decision_id = service._ids.next()
        return await service._full(fields, decided, decision_id)
    except Exception:
        return service._failed(fields, decision_id)


def finished(coroutine: Any) -> bytes:
    """A warm allow never awaits: run its coroutine to the end without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("the warm allow awaited")


def service(hot: Any) -> extauthz.CheckService:
    v = verifier(hot)
    v.set_policy(POLICY)
    return extauthz.CheckService({AUDIENCE: v}, TakesEveryAllow(), lambda: POLICY, lambda: NOW, hot=hot)


def calls(hot: Any, metered: bool) -> tuple[extauthz.CheckService, Callable[[], bytes]]:
    s, fields = service(hot), warm_request()
    if metered:
        return s, lambda: finished(s.check(fields, None))
    s.warm_path = hot.WarmAllow(s._verifiers, lambda: POLICY, s._audit, s._ids, s._prepared, s._clock,
                            s._deny(reasons.AUDIT_UNAVAILABLE), s.decisions, s._first_allow,
                            s._meters[metrics.WARM_ALLOWS:metrics.WARM_ALLOWS + 1], None)
    return s, lambda: finished(unmetered(s, fields, None))


@pytest.mark.benchmark(group="warm-check-metering")
@pytest.mark.parametrize("metered", [False, True], ids=["without", "with"])
@pytest.mark.parametrize("hot", implementations())
def test_warm_check(benchmark: Any, hot: Any, metered: bool) -> None:
    s, call = calls(hot, metered)
    benchmark(call)
    counts = s.decision_counts()
    assert counts[reasons.ALLOW] == s.warm_path.allowed > 0 and set(counts) == {reasons.ALLOW}
    observed = sum(s._meters[metrics.LATENCY][:-1])
    assert observed == (s.warm_path.allowed if metered else 0)


@pytest.mark.benchmark(group="latency-pair")
@pytest.mark.parametrize("hot", implementations())
def test_latency_pair(benchmark: Any, hot: Any) -> None:
    latency = hot.Latency(metrics.MeterTable(1).row(0)[metrics.LATENCY], metrics.LATENCY_BOUNDS_NS)
    now, observe = latency.now, latency.observe
    benchmark(lambda: observe(now()))
