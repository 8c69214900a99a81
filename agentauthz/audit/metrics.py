"""Check counts every process keeps in shared memory, and the collectors /metrics reads.

Each Check process (the primary, row 0; worker N, row N) counts its decisions by reason, refused
check clients and its Check latency into its own row of one anonymous shared mapping, made before
any worker is forked. The primary reads every row when scraped: nothing crosses the worker channel,
a worker killed with SIGKILL loses no count it made (the count is in the mapping, not the process),
and its replacement counts on in the same row, so the sums never go backwards.
"""

from __future__ import annotations

import functools
import mmap
import threading
from collections import Counter
from typing import Any, Callable, Iterator

# Every decision reason the daemon answers has its own counter; anything else counts as "other".
from .. import errors, reasons

REASONS = tuple(sorted({value for name, value in vars(reasons).items()
                        if name.isupper() and isinstance(value, str)}))
OTHER = "other"
# Check latency bucket bounds (seconds): a warm allow takes tens of µs, one waiting on the disk ms.
LATENCY_BOUNDS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                  0.05, 0.1, 0.25, 1.0)
LATENCY_BOUNDS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BOUNDS)

# A row, in unsigned 64-bit counters: decisions by reason (then "other"), the warm path's allows,
# refused check clients, latency buckets (not cumulative; the last is +Inf), latency sum in ns.
_AT = {reason: at for at, reason in enumerate(REASONS)}
_OTHER_AT = len(REASONS)
WARM_ALLOWS = _OTHER_AT + 1
REFUSED = WARM_ALLOWS + 1
BUCKETS = REFUSED + 1
LATENCY = slice(BUCKETS, BUCKETS + len(LATENCY_BOUNDS) + 2)  # the buckets, then the sum
# Not a counter: 1 while the process's own audit log cannot be written (a worker's health loop sets
# it), so the primary's /healthz sees a worker's failing log as its gRPC health does.
AUDIT_FAILING = LATENCY.stop
ROW = -(-(AUDIT_FAILING + 1) // 8) * 8  # whole 64-byte cache lines: processes never share one


class MeterTable:
    """One row of counters per Check process, in memory shared with the processes forked after it."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._buffer = mmap.mmap(-1, processes * ROW * 8)  # anonymous and MAP_SHARED: zeroed
        self._view = memoryview(self._buffer).cast("Q")

    def row(self, process: int) -> memoryview:
        return self._view[process * ROW:(process + 1) * ROW]

    def audit_failing(self) -> bool:
        """Whether any worker's audit log cannot be written (its flag, row 1 on)."""
        return any(self.row(p)[AUDIT_FAILING] for p in range(1, self.processes))

    def sums(self) -> list[int]:
        """Every counter summed over the processes (read while they count: each a recent value)."""
        rows = [self.row(p).tolist() for p in range(self.processes)]
        return [sum(column) for column in zip(*rows, strict=True)]


class Decisions:
    """A row's decision counts by reason, used as the Counter it replaces: ``decisions[r] += 1``."""

    __slots__ = ("_row",)

    def __init__(self, row: memoryview) -> None:
        self._row = row

    def __getitem__(self, reason: str) -> int:
        return self._row[_AT.get(reason, _OTHER_AT)]  # type: ignore[no-any-return]

    def __setitem__(self, reason: str, count: int) -> None:
        self._row[_AT.get(reason, _OTHER_AT)] = count


def decision_counts(values: list[int]) -> Counter[str]:
    """Decisions by reason from a row's (or the summed rows') counters; the warm allows included."""
    counts = Counter({reason: values[at] for reason, at in _AT.items() if values[at]})
    if values[_OTHER_AT]:
        counts[OTHER] = values[_OTHER_AT]
    if values[WARM_ALLOWS]:
        counts[reasons.ALLOW] += values[WARM_ALLOWS]
    return counts


def latency_buckets(values: list[int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) buckets and the sum in seconds, for a HistogramMetricFamily."""
    counts = values[LATENCY][:-1]
    buckets, total = [], 0
    for bound, count in zip((*(repr(b) for b in LATENCY_BOUNDS), "+Inf"), counts, strict=True):
        total += count
        buckets.append((bound, float(total)))
    return buckets, values[LATENCY][-1] / 1e9


class Operations:
    """API operations as the audit log records them (mint, delegate, revoke, ban, approvals, ...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # API calls run on threads too
        self._counts: Counter[tuple[str, str, str]] = Counter()

    def count(self, kind: str, fields: dict[str, Any]) -> None:
        decision = fields.get("decision")
        reason = fields.get("reason", "")
        if reason and reason not in _AT and reason != errors.NOT_PERMITTED:
            reason = OTHER  # a label's values stay the vocabulary's, whatever a caller passes
        key = (kind, "" if decision is None else str(bool(decision)).lower(), reason)
        with self._lock:
            self._counts[key] += 1

    def counts(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._counts)


def _proc_name(pid: int) -> int | str:
    return pid or "self"


def process_metrics(processes: Callable[[], list[tuple[str, int]]]) -> Iterator[Any]:
    """prometheus_client's process metrics (CPU, memory, open fds, start time, ...) for each
    ``(name, pid)`` (pid 0: this process), labelled ``process``. A restarted worker's are its new
    process's: its process_start_time_seconds says so, as for any restarted process."""
    from prometheus_client import ProcessCollector
    from prometheus_client.core import Metric
    families: dict[str, Any] = {}
    for name, pid in processes():
        collector = ProcessCollector(pid=functools.partial(_proc_name, pid), registry=None)
        for family in collector.collect():
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "process": name}, sample.value)
    yield from families.values()
