"""What a grant may carry beyond tool/target/operation: MCP argument constraints and a task budget.

One canonical JSON shape, used in policy rules, Mint requests and the token's ``grants`` claim::

    "arguments": [{"name": "path", "prefix": "/srv/reports"}, {"name": "mode", "one_of": ["r"]},
                  {"name": "limit", "max": 100}, {"name": "query", "required": true}],
    "budget": {"max_calls": 100, "window": 86400, "rate_per_second": 2.0, "burst": 5}

A budget may also be a list of budgets over distinct windows (``[{"max_calls": 3}, {"max_calls": 50,
"window": 2592000}]``): each binds, and each is counted under its own window. Budgets of different
windows are never merged into one: 3 calls a day and 3 calls a year are not "3 calls a year".

A grant's constraints must all hold; a request is allowed when some grant covering it has all
of its constraints hold, and, when the current policy allows it only under constraints, some
matching rule's hold too (``enforce``). Both verifier twins compile these with ``compile_extras``:
this is not hot code (once per token), so one implementation keeps the twins identical.
"""

from __future__ import annotations

import copy
import math
import unicodedata
from typing import Any, Mapping, Protocol, Sequence

from .. import errors, reasons
from .tokens import SENSITIVITY_RANK

MAX_CONSTRAINTS = 32
MAX_ONE_OF = 64
MAX_TEXT = 1024
MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000
DEFAULT_WINDOW = 86_400  # budget.window when a budget names none: max_calls per agent and tool per day
MAX_WINDOW = 366 * 86_400
MAX_BUDGETS = 8  # windows one rule or request may name
# Windows one token grant may carry: mint adds the request's to the rule's, and each delegation the
# child agent's rule's; every one is a counter per agent of the chain (authority/budgets.py bounds those).
MAX_GRANT_BUDGETS = 32
INT_LIMIT = 1 << 53  # I-JSON (RFC 7493 §2.2): integers beyond this are not exact in every parser
_ARGUMENT_KEYS = frozenset({"name", "prefix", "one_of", "max", "required"})
_BUDGET_KEYS = frozenset({"max_calls", "window", "rate_per_second", "burst"})


def _number(value: Any) -> bool:
    # bool is an int subclass: true is never 1 here. JSON parsing already refused NaN/Infinity.
    return type(value) in (int, float) and math.isfinite(value) and -INT_LIMIT <= value <= INT_LIMIT


def path_unsafe(value: str) -> bool:
    """Whether a path could mean something else to the tool than it says: refused, never normalised.

    Control characters (NUL ends C strings), ``%`` (the tool may percent-decode), ``\\`` (a separator
    on Windows), compatibility characters that NFKC folds to ASCII (fullwidth ``．．／``), and any
    segment of dots only (``..`` climbs; ``...`` does on some systems).
    """
    if any(c < " " or c == "\x7f" for c in value) or "%" in value or "\\" in value:
        return True
    if unicodedata.normalize("NFKC", value) != value:
        return True
    return any(len(seg) >= 2 and seg.strip(".") == "" for seg in value.split("/"))


def under_prefix(value: str, prefix: str) -> bool:
    """Path-segment prefix: ``/data`` covers ``/data`` and ``/data/x``, never ``/database``."""
    return value == prefix or value.startswith(prefix if prefix.endswith("/") else prefix + "/")


class Argument:
    """One compiled constraint on a ``tools/call`` argument (a top-level key of ``params.arguments``)."""

    __slots__ = ("name", "prefix", "one_of", "max", "required")

    def __init__(self, name: str, prefix: str | None, one_of: frozenset[str] | None,
                 maximum: int | float | None, required: bool) -> None:
        self.name, self.prefix, self.one_of, self.max, self.required = name, prefix, one_of, maximum, required

    def problem(self, arguments: Mapping[str, Any]) -> str | None:
        """None when this constraint holds for ``arguments``, else the reason it does not."""
        value = arguments.get(self.name)
        if value is None:  # absent and JSON null alike: nothing is passed, nothing can escape
            return reasons.ARGUMENT_MISSING if self.required else None
        if self.prefix is not None or self.one_of is not None:
            if type(value) is not str:
                return reasons.ARGUMENT_TYPE
            if self.prefix is not None:
                if path_unsafe(value):
                    return reasons.ARGUMENT_PATH_UNSAFE
                if not under_prefix(value, self.prefix):
                    return reasons.ARGUMENT_OUTSIDE_PREFIX
            if self.one_of is not None and value not in self.one_of:
                return reasons.ARGUMENT_NOT_ALLOWED
        elif self.max is not None:
            if not _number(value):
                return reasons.ARGUMENT_TYPE
            if value > self.max:
                return reasons.ARGUMENT_ABOVE_MAX
        return None

    def __repr__(self) -> str:
        return (f"Argument({self.name!r}, prefix={self.prefix!r}, one_of={self.one_of!r}, max={self.max!r}, "
                f"required={self.required})")


class Budget:
    """A call budget: total calls per window (seconds), and a rate with a burst (GCRA)."""

    __slots__ = ("max_calls", "rate", "burst", "window")

    def __init__(self, max_calls: int, rate: float, burst: int, window: int = DEFAULT_WINDOW) -> None:
        self.max_calls, self.rate, self.burst = max_calls, rate, burst  # 0: no total / no rate limit
        self.window = window

    def tighter(self, other: Budget) -> Budget:
        """Both budgets at once, for one counter (``other`` has the same window): each limit the lower."""
        calls = min(filter(None, (self.max_calls, other.max_calls)), default=0)
        rated = [b for b in (self, other) if b.rate]
        return Budget(calls, min((b.rate for b in rated), default=0.0),
                      min((b.burst for b in rated), default=1), self.window)

    def __repr__(self) -> str:
        return (f"Budget(max_calls={self.max_calls}, rate={self.rate}, burst={self.burst}, "
                f"window={self.window})")


class Extras:
    """A grant's compiled constraints: ``arguments`` (possibly empty) and ``budgets`` (one per window,
    all binding; None when it has none)."""

    __slots__ = ("arguments", "budgets")

    def __init__(self, arguments: tuple[Argument, ...], budgets: tuple[Budget, ...] | None) -> None:
        self.arguments, self.budgets = arguments, budgets or None

    @property
    def budget(self) -> Budget | None:
        """The shortest window's budget (the only one of most grants)."""
        return self.budgets[0] if self.budgets else None

    def __repr__(self) -> str:
        return f"Extras({self.arguments!r}, {self.budgets!r})"


# -- validation: one set of rules for policy files, Mint requests and tokens ---------------------


def _text(value: Any, what: str) -> str:
    if type(value) is not str or not value or len(value) > MAX_TEXT:
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_TEXT} characters")
    return value


def canonical_arguments(raw: Any) -> list[dict[str, Any]]:
    """Validate argument constraints; returns them in canonical form. Raises ValueError."""
    if type(raw) is not list or not raw or len(raw) > MAX_CONSTRAINTS:
        raise ValueError(f"arguments must be a list of 1 to {MAX_CONSTRAINTS} constraints")
    out = []
    for i, item in enumerate(raw):
        what = f"arguments[{i}]"
        if type(item) is not dict:
            raise ValueError(f"{what} must be a mapping")
        unknown = item.keys() - _ARGUMENT_KEYS
        if unknown:
            raise ValueError(f"{what}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        c: dict[str, Any] = {"name": _text(item.get("name"), f"{what}.name")}
        if "prefix" in item:
            prefix = c["prefix"] = _text(item["prefix"], f"{what}.prefix")
            if path_unsafe(prefix):
                raise ValueError(f"{what}.prefix has characters or '..' segments a path may not carry")
        if "one_of" in item:
            one_of = item["one_of"]
            if (type(one_of) is not list or not one_of or len(one_of) > MAX_ONE_OF
                    or len(set(map(repr, one_of))) != len(one_of)):
                raise ValueError(f"{what}.one_of must be a list of 1 to {MAX_ONE_OF} distinct strings")
            c["one_of"] = [_text(v, f"{what}.one_of[]") for v in one_of]
        if "max" in item:
            if not _number(item["max"]):
                raise ValueError(f"{what}.max must be a finite number within ±2^53")
            c["max"] = item["max"]
        if "required" in item:
            if type(item["required"]) is not bool:
                raise ValueError(f"{what}.required must be true or false")
            if item["required"]:
                c["required"] = True
        if "max" in c and ("prefix" in c or "one_of" in c):
            raise ValueError(f"{what}: max (numbers) cannot be combined with prefix or one_of (strings)")
        if len(c) == 1 and "required" not in item:
            raise ValueError(f"{what} constrains nothing: give prefix, one_of, max or required")
        out.append(c)
    return out


def canonical_budget(raw: Any, most: int = MAX_BUDGETS) -> dict[str, Any] | list[dict[str, Any]]:
    """Validate a budget, or a list of at most ``most`` budgets over distinct windows; returns the
    canonical form: one budget as a mapping, several as a list ordered by window. Raises ValueError."""
    if type(raw) is not list:
        return _canonical_one(raw, "budget")
    if not raw or len(raw) > most:
        raise ValueError(f"budget must be a mapping or a list of 1 to {most} budgets")
    out = sorted((_canonical_one(b, f"budget[{i}]") for i, b in enumerate(raw)), key=window_of)
    if len({window_of(b) for b in out}) != len(out):
        raise ValueError("budget: each budget of a list must have its own window")
    return out[0] if len(out) == 1 else out


def window_of(budget: Mapping[str, Any]) -> int:
    return int(budget.get("window", DEFAULT_WINDOW))


def _canonical_one(raw: Any, what: str) -> dict[str, Any]:
    if type(raw) is not dict:
        raise ValueError(f"{what} must be a mapping")
    unknown = raw.keys() - _BUDGET_KEYS
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {}
    if "max_calls" in raw:
        calls = raw["max_calls"]
        if type(calls) is not int or not 1 <= calls <= INT_LIMIT:
            raise ValueError(f"{what}.max_calls must be an integer from 1 to 2^53")
        out["max_calls"] = calls
    if "window" in raw:
        window = raw["window"]
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"{what}.window must be an integer number of seconds from 1 to {MAX_WINDOW}")
        out["window"] = window
    if "rate_per_second" in raw:
        rate = raw["rate_per_second"]
        if not _number(rate) or not 0 < rate <= MAX_RATE:
            raise ValueError(f"{what}.rate_per_second must be a number above 0, at most {MAX_RATE:g}")
        out["rate_per_second"] = rate
    if "burst" in raw:
        burst = raw["burst"]
        if "rate_per_second" not in out or type(burst) is not int or not 1 <= burst <= MAX_BURST:
            raise ValueError(f"{what}.burst must be an integer from 1 to {MAX_BURST}, with rate_per_second")
        out["burst"] = burst
    if not out.keys() - {"window"}:
        raise ValueError(f"{what} limits nothing: give max_calls or rate_per_second")
    return out


def budgets_of(canonical: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A canonical budget as the list of its budgets (one per window)."""
    return [canonical] if isinstance(canonical, Mapping) else list(canonical)


def compile_arguments(canonical: Sequence[Mapping[str, Any]]) -> tuple[Argument, ...]:
    return tuple(Argument(c["name"], c.get("prefix"), frozenset(c["one_of"]) if "one_of" in c else None,
                          c.get("max"), c.get("required", False)) for c in canonical)


def compile_budget(canonical: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> tuple[Budget, ...]:
    return tuple(Budget(b.get("max_calls", 0), float(b.get("rate_per_second", 0.0)), b.get("burst", 1),
                        window_of(b)) for b in budgets_of(canonical))


def compile_extras(raw: Mapping[str, Any]) -> Extras | None:
    """A token grant's constraints, or None when it has none; raises TokenClaimsInvalid (both twins)."""
    if "arguments" not in raw and "budget" not in raw:
        return None
    try:
        arguments = compile_arguments(canonical_arguments(raw["arguments"])) if "arguments" in raw else ()
        budgets = compile_budget(canonical_budget(raw["budget"], MAX_GRANT_BUDGETS)) \
            if "budget" in raw else None
    except ValueError as exc:
        raise errors.TokenClaimsInvalid(f"grant {exc}") from None
    return Extras(arguments, budgets)


def tighten(granted: dict[str, Any], requested: Mapping[str, Any]) -> dict[str, Any]:
    """``granted`` (a policy-narrowed grant) with a request's own constraints added: they only tighten.

    Argument constraints all must hold, so adding the request's can only refuse more. Budgets
    combine limit by limit (``tighter_budget``).
    """
    out = copy.deepcopy(dict(granted))  # a token's grant never aliases a policy rule's lists
    arguments = out.get("arguments", [])
    arguments += [copy.deepcopy(c) for c in requested.get("arguments", ()) if c not in arguments]
    if arguments:
        out["arguments"] = arguments
    if "budget" in requested:
        out["budget"] = tighter_budget(out.get("budget"), requested["budget"])
    return out


def tighter_budget(one: Any, other: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """Two canonical budgets as one no looser than either (canonical form). Budgets of one window merge
    limit by limit: the lower max_calls, rate and burst (a limit only one side sets is kept; a rate
    without a burst has burst 1). Budgets of different windows are all kept, each counted on its own:
    merging 3 a day with 3 a year into 3 a year would let the daily one be spent again every day."""
    by_window: dict[int, list[Mapping[str, Any]]] = {}
    for b in budgets_of(one) if one is not None else []:
        by_window.setdefault(window_of(b), []).append(b)
    for b in budgets_of(other):
        by_window.setdefault(window_of(b), []).append(b)
    out = [_merged(sides) for _, sides in sorted(by_window.items())]
    return out[0] if len(out) == 1 else out


def _merged(sides: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Budgets of one window as one: each limit the lower."""
    out: dict[str, Any] = {}
    for key in ("max_calls", "rate_per_second"):
        values = [b[key] for b in sides if key in b]
        if values:
            out[key] = min(values)
    rated = [b for b in sides if "rate_per_second" in b]
    if any("burst" in b for b in rated):
        out["burst"] = min(b.get("burst", 1) for b in rated)
    if any("window" in b for b in sides):
        out["window"] = sides[0].get("window", DEFAULT_WINDOW)
    return out


class Constrained:
    """Policy's answer "allowed only under these constraints" (``Policy.permits``): the request is
    allowed when the constraints of one of ``alternatives`` (one per matching allow rule) hold."""

    __slots__ = ("alternatives",)

    def __init__(self, alternatives: tuple[Extras, ...]) -> None:
        self.alternatives = alternatives

    def __repr__(self) -> str:
        return f"Constrained({self.alternatives!r})"


# -- the decision, after the hot path allowed ------------------------------------------------


class Charger(Protocol):
    """What ``enforce`` asks of the budget table (``budgets.BudgetTable``)."""

    def charge(self, charges: Sequence[tuple[str, Budget]], now: float,
               owner: str | None = None) -> tuple[str, float]:
        """(ALLOW, 0) having counted the call under every key, or (reason, seconds until a retry may
        succeed) having counted it under none; ``owner``: the agent whose share of the table the
        call's counters take (the task's minting agent)."""


def budget_key(agent: str, tool: str, window: int) -> str:
    """Budgets count per agent, tool and window length: every token of the agent (any task name,
    renewals) and every budgeted grant for that tool draw on one counter, so neither a fresh task
    name nor narrowing a grant opens a fresh budget."""
    return f"{agent}\x00{tool}\x00{window}"


# Live counters (tools x windows, each a key per agent: budget_key) one task's minting agent may hold.
# A token may name any window, and each counter is kept for its window (up to 366 days): without a
# limit per agent one agent could fill the single-node table, or Redis, and deny the others' calls.
AGENT_COUNTERS = 128


def agent_of(key: str) -> str:
    """The agent a ``budget_key`` counts for (SPIFFE IDs carry no NUL)."""
    return key.split("\x00", 1)[0]


def enforce(entry: Any, tool: str, target: str, operation: str, sensitivity: str,
            arguments: Mapping[str, Any] | None, budgets: Charger | None, now: float,
            policy: Constrained | None = None) -> tuple[str, float]:
    """(ALLOW, 0) or (reason, retry_after) for a request the hot path allowed, when the token's grants
    or the current policy (``policy``, its ``Constrained`` answer) constrain it.

    ``arguments`` is None when the request carries none (not an MCP ``tools/call``): a grant or rule
    that constrains arguments cannot be checked then, so it does not cover the request. A call is
    counted under every agent of the token's delegation chain (``budget_key``), all or nothing:
    delegating never opens a fresh budget, and a child's budget binds the child agent.
    """
    level = SENSITIVITY_RANK[sensitivity]
    held = _terms([g.extras for g in entry.grants if g.covers(tool, target, operation, level)],
                  arguments, reasons.SCOPE_DENIED) if entry.constrained else None
    if isinstance(held, str):
        return held, 0.0
    ruled = _terms(policy.alternatives, arguments, reasons.POLICY_DENIED) if policy is not None else None
    if isinstance(ruled, str):
        return ruled, 0.0
    if held is None and ruled is None:
        return reasons.ALLOW, 0.0
    if budgets is None:
        return reasons.BUDGET_UNAVAILABLE, 0.0
    agents = tuple(dict.fromkeys(entry.subjects))  # an agent twice on a chain counts the call once
    denial = (reasons.BUDGET_EXHAUSTED, 0.0)
    for mine in held or (None,):  # any grant with room allows, under any rule with room
        for theirs in ruled or (None,):
            # Every budget of the grant and of the rule binds, each on its own window's counter.
            by_window: dict[int, Budget] = {}
            for budget in (*(mine or ()), *(theirs or ())):
                same = by_window.get(budget.window)
                by_window[budget.window] = budget if same is None else same.tighter(budget)
            reason, retry = budgets.charge([(budget_key(agent, tool, window), budget)
                                            for window, budget in by_window.items() for agent in agents], now,
                                           entry.subjects[-1])
            if reason == reasons.ALLOW:
                return reason, 0.0
            # A wait that may succeed says more than "never again"; the shortest wait most of all.
            if reason != reasons.BUDGET_EXHAUSTED and (denial[0] == reasons.BUDGET_EXHAUSTED
                                                       or retry < denial[1]):
                denial = (reason, retry)
    return denial


def _terms(alternatives: Sequence[Extras | None], arguments: Mapping[str, Any] | None,
           nothing: str) -> str | list[tuple[Budget, ...]] | None:
    """What one side (a token's covering grants, or the policy's matching rules) asks of a request:
    None (nothing more), the alternatives' budgets (one alternative must have room in all of its
    budgets), or the reason none holds."""
    problem = None
    budgeted = []
    for extras in alternatives:
        if extras is None:
            return None
        if extras.arguments:
            found = reasons.ARGUMENTS_UNAVAILABLE if arguments is None else next(
                filter(None, (c.problem(arguments) for c in extras.arguments)), None)
            if found is not None:
                problem = problem or found
                continue
        if extras.budgets is None:
            return None
        budgeted.append(extras.budgets)
    return budgeted or problem or nothing
