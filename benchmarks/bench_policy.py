"""Micro benchmarks: ``Policy.permits`` at 10 / 1,000 / 100,000 rules, cold and warm per-agent cache.

Run: ``python -m pytest benchmarks/bench_policy.py --benchmark-only``. Building the
100,000-rule policy from YAML text takes several seconds (once per module).
"""

from __future__ import annotations

import json

import pytest

from agentauthz.decision.policy import Policy

SIZES = [10, 1_000, 100_000]
DOMAIN = "spiffe://bench.test"


def policy_text(n: int) -> str:
    """A generated policy: one rule per agent, every tenth a team pattern, one domain-wide deny."""
    lines = ["version: 1", "defaults: {max_ttl: 300, max_delegation_depth: 2}", "rules:",
             f'  - {{"id": "no-secrets", "effect": "deny", "agents": ["{DOMAIN}/*"], "tool": "demo", '
             '"targets": ["secrets/*"], "operations": ["*"]}']
    for i in range(n - 1):
        agent = f"{DOMAIN}/team{i // 10}/*" if i % 10 == 9 else f"{DOMAIN}/agent/a{i}"
        rule = {"id": f"r{i}", "agents": [agent], "tool": f"tool{i % 7}" if i % 3 else "demo",
                "targets": ["repo/*", f"data/{i}"], "operations": ["read", "write"],
                "max_sensitivity": "internal"}
        lines.append(f"  - {json.dumps(rule)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def built() -> dict[int, tuple[Policy, Policy, str]]:
    """Per size: (policy without per-agent cache, policy with it, an agent that has a rule)."""
    out = {}
    for n in SIZES:
        text = policy_text(n)
        agent = f"{DOMAIN}/agent/a{(n // 2) // 3 * 3}"  # an exact rule on tool "demo"
        out[n] = (Policy.from_text(text, f"bench-{n}", cache_size=0), Policy.from_text(text, f"bench-{n}"),
                  agent)
        assert out[n][0].rule_count == n
    return out


@pytest.mark.parametrize("n", SIZES)
def test_permits_cold(benchmark, built, n: int) -> None:
    """Every call rebuilds the agent's view from the index (cache size 0)."""
    policy, _, agent = built[n]
    assert benchmark(policy.permits, agent, "demo", "repo/x", "read", 1) is None


@pytest.mark.parametrize("n", SIZES)
def test_permits_warm(benchmark, built, n: int) -> None:
    """The agent's view is cached: a dict hit, then the few rules for this tool."""
    _, policy, agent = built[n]
    assert benchmark(policy.permits, agent, "demo", "repo/x", "read", 1) is None


@pytest.mark.parametrize("n", SIZES)
def test_permits_warm_denied(benchmark, built, n: int) -> None:
    """A deny rule (domain-wide pattern) overriding the agent's allow, cached view."""
    _, policy, agent = built[n]
    assert benchmark(policy.permits, agent, "demo", "secrets/key", "read", 0) == "policy_denied"
