"""/metrics: a Prometheus collector over what the daemon counts anyway (nothing on the request path)."""

from __future__ import annotations

from typing import Any, Iterator

from .. import reasons
from ..audit import metrics, top_agents
from ..authority.core import Authority
from . import workers
from .tls_front import TlsFront


class Metrics:
    """Prometheus collector reading counters the daemon keeps anyway: nothing on the request path."""

    def __init__(self, authority: Authority, meters: metrics.MeterTable,
                 front: TlsFront | None = None, fleet: workers.Fleet | None = None,
                 denials: top_agents.DenialTable | None = None) -> None:
        self._authority = authority
        self._denials = denials
        self._meters = meters
        self._front = front
        self._fleet = fleet

    def _processes(self) -> list[tuple[str, int]]:
        """(name, pid) of the primary (0: this process) and each live worker, for the process metrics."""
        live = [(f"worker-{w.number}", w.pid) for w in self._fleet.workers if w.pid] if self._fleet else []
        return [("primary", 0), *live]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        # Every Check process's counters (metrics.MeterTable): the primary's, each worker's, and those
        # of workers since restarted, whose replacements count on from them.
        sums = self._meters.sums()
        decisions = CounterMetricFamily("agentauthz_check_decisions",
                                        "Check decisions by reason, every worker's", labels=["reason"])
        for reason, count in sorted(metrics.decision_counts(sums).items()):
            decisions.add_metric([reason], count)
        yield decisions
        if self._denials is not None:
            yield self._agent_denials(self._denials, sums)
        buckets, seconds = metrics.latency_buckets(sums)
        yield HistogramMetricFamily("agentauthz_check_duration_seconds",
                                    "Time the daemon took to decide and answer a Check, gRPC excluded",
                                    buckets=buckets, sum_value=seconds)
        yield CounterMetricFamily("agentauthz_check_clients_refused",
                                  "Checks over mTLS from a client not in check_clients, answered undecided",
                                  value=sums[metrics.REFUSED])
        operations = CounterMetricFamily(
            "agentauthz_operations", "API operations as audited: mint, delegate, revoke, ban, unban, rotate, "
            "approval_request, approval_decide; decision and reason as in their audit records",
            labels=["operation", "decision", "reason"])
        for labels, count in sorted(self._authority.operations.counts().items()):
            operations.add_metric(labels, count)
        yield operations
        yield from metrics.process_metrics(self._processes)
        if self._front is not None:
            handshakes = CounterMetricFamily(
                "agentauthz_api_tls_handshakes",
                "API TLS handshakes by outcome (completed, failed, aborted, timeout, evicted, busy, "
                "refused_evicted)",
                labels=["outcome"])
            for outcome, count in sorted(self._front.counts.items()):
                handshakes.add_metric([outcome], count)
            yield handshakes
        if self._fleet is not None:
            restarts = CounterMetricFamily(
                "agentauthz_worker_restarts", "Check workers restarted, by cause (died, unresponsive)",
                labels=["cause"])
            for cause, count in sorted(self._fleet.restarts.items()):
                restarts.add_metric([cause], count)
            yield restarts
        a = self._authority
        stats = a.revocations.stats()
        for name, value, helptext in (
            ("agentauthz_verified_cache_tokens", sum(v.cache_len() for v in a.verifiers.values()),
             "tokens in the verified caches"),
            ("agentauthz_revoked_tokens", stats["revoked_tokens"], "revoked tokens in the live window"),
            ("agentauthz_revocation_window_slots", stats["capacity"],
             "status slots in the revocation window, one bit each; every token holds one"),
            ("agentauthz_revocation_slots_in_use", stats["next_slot"] - stats["window_base"],
             "slots handed out inside the window; minting is refused once it reaches the window"),
            ("agentauthz_revocation_bits_bytes", a.revocation_bits_bytes,
             "memory of the revocation bits every worker shares"),
            ("agentauthz_audit_pending", a.audit.pending, "audit records not yet on disk"),
            ("agentauthz_audit_healthy", int(a.audit.healthy), "1 while the audit writer can write"),
            ("agentauthz_verification_keys", len(a.verification_keys()), "published keys"),
        ):
            yield GaugeMetricFamily(name, helptext, value=value)
        if a.cluster is not None:
            yield from cluster_metrics(a.cluster.status())


    def _agent_denials(self, table: top_agents.DenialTable, sums: list[int]) -> Any:
        from prometheus_client.core import CounterMetricFamily
        top_n = self._authority.config.metrics_top_agents
        family = CounterMetricFamily(
            "agentauthz_agent_denials", f"Check denials by reason of the {top_n} agents denied most (every "
            "worker's), the rest under agent=\"other\", those of tokens that did not verify under "
            "\"unverified\": at most metrics_top_agents + 1 agent values", labels=["agent", "reason"])
        denied = {r: n for r, n in metrics.decision_counts(sums).items() if r != reasons.ALLOW}
        for agent, reason, count in top_agents.top_agents(table.read(), denied, top_n):
            family.add_metric([agent, reason], count)
        return family


def cluster_metrics(status: dict[str, Any]) -> Iterator[Any]:
    """This node's view of the cluster: how stale, how far it has read, how often it recovered."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    yield GaugeMetricFamily("agentauthz_cluster_fresh", "1 while the revocation stream was read within "
                            "max_staleness; 0: Checks are denied revocation_stale",
                            value=int(status["fresh"]))
    yield GaugeMetricFamily("agentauthz_cluster_staleness_seconds", "seconds since the last completed read "
                            "of the revocation stream", value=status["staleness"])
    yield GaugeMetricFamily("agentauthz_cluster_last_applied_timestamp_seconds", "the time Redis gave the "
                            "last stream entry applied here", value=status["last_applied_ms"] / 1000)
    yield CounterMetricFamily("agentauthz_cluster_entries_applied", "revocation stream entries applied here",
                              value=status["applied"])
    yield CounterMetricFamily("agentauthz_cluster_recoveries", "times the engine lost its data and this node "
                              "re-published its revocations", value=status["recoveries"])
