"""What a grant may carry beyond tool/target/operation: MCP argument constraints and a task budget.

One canonical JSON shape, used in policy rules, Mint requests and the token's ``grants`` claim::

    "arguments": [{"name": "path", "prefix": "/srv/reports"}, {"name": "mode", "one_of": ["r"]},
                  {"name": "limit", "max": 100}, {"name": "query", "required": true}],
    "budget": {"max_calls": 100, "rate_per_second": 2.0, "burst": 5}

A grant's constraints must all hold; a request is allowed when some grant covering it has all
of its constraints hold (``enforce``). Both verifier twins compile these with ``compile_extras``:
this is not hot code (once per token), so one implementation keeps the twins identical.
"""

from __future__ import annotations

import copy
import math
import unicodedata
from typing import Any, Mapping, Protocol, Sequence

from . import errors, reasons
from .tokens import SENSITIVITY_RANK

MAX_CONSTRAINTS = 32
MAX_ONE_OF = 64
MAX_TEXT = 1024
MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000
INT_LIMIT = 1 << 53  # I-JSON (RFC 7493 §2.2): integers beyond this are not exact in every parser
_ARGUMENT_KEYS = frozenset({"name", "prefix", "one_of", "max", "required"})
_BUDGET_KEYS = frozenset({"max_calls", "rate_per_second", "burst"})


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
    """A task's call budget under one grant: total calls, and a rate with a burst (GCRA)."""

    __slots__ = ("max_calls", "rate", "burst")

    def __init__(self, max_calls: int, rate: float, burst: int) -> None:
        self.max_calls, self.rate, self.burst = max_calls, rate, burst  # 0: no total / no rate limit

    def __repr__(self) -> str:
        return f"Budget(max_calls={self.max_calls}, rate={self.rate}, burst={self.burst})"


class Extras:
    """A grant's compiled constraints: ``arguments`` (possibly empty) and ``budget`` (or None)."""

    __slots__ = ("arguments", "budget")

    def __init__(self, arguments: tuple[Argument, ...], budget: Budget | None) -> None:
        self.arguments, self.budget = arguments, budget

    def __repr__(self) -> str:
        return f"Extras({self.arguments!r}, {self.budget!r})"


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


def canonical_budget(raw: Any) -> dict[str, Any]:
    """Validate a budget; returns it in canonical form. Raises ValueError."""
    if type(raw) is not dict:
        raise ValueError("budget must be a mapping")
    unknown = raw.keys() - _BUDGET_KEYS
    if unknown:
        raise ValueError(f"budget: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {}
    if "max_calls" in raw:
        calls = raw["max_calls"]
        if type(calls) is not int or not 1 <= calls <= INT_LIMIT:
            raise ValueError("budget.max_calls must be an integer from 1 to 2^53")
        out["max_calls"] = calls
    if "rate_per_second" in raw:
        rate = raw["rate_per_second"]
        if not _number(rate) or not 0 < rate <= MAX_RATE:
            raise ValueError(f"budget.rate_per_second must be a number above 0, at most {MAX_RATE:g}")
        out["rate_per_second"] = rate
    if "burst" in raw:
        burst = raw["burst"]
        if "rate_per_second" not in out or type(burst) is not int or not 1 <= burst <= MAX_BURST:
            raise ValueError(f"budget.burst must be an integer from 1 to {MAX_BURST}, with rate_per_second")
        out["burst"] = burst
    if not out:
        raise ValueError("budget limits nothing: give max_calls or rate_per_second")
    return out


def compile_arguments(canonical: Sequence[Mapping[str, Any]]) -> tuple[Argument, ...]:
    return tuple(Argument(c["name"], c.get("prefix"), frozenset(c["one_of"]) if "one_of" in c else None,
                          c.get("max"), c.get("required", False)) for c in canonical)


def compile_budget(canonical: Mapping[str, Any]) -> Budget:
    return Budget(canonical.get("max_calls", 0), float(canonical.get("rate_per_second", 0.0)),
                  canonical.get("burst", 1))


def compile_extras(raw: Mapping[str, Any]) -> Extras | None:
    """A token grant's constraints, or None when it has none; raises TokenClaimsInvalid (both twins)."""
    if "arguments" not in raw and "budget" not in raw:
        return None
    try:
        arguments = compile_arguments(canonical_arguments(raw["arguments"])) if "arguments" in raw else ()
        budget = compile_budget(canonical_budget(raw["budget"])) if "budget" in raw else None
    except ValueError as exc:
        raise errors.TokenClaimsInvalid(f"grant {exc}") from None
    return Extras(arguments, budget)


def tighten(granted: dict[str, Any], requested: Mapping[str, Any]) -> dict[str, Any]:
    """``granted`` (a policy-narrowed grant) with a request's own constraints added: they only tighten.

    Argument constraints all must hold, so adding the request's can only refuse more. Budgets
    combine limit by limit, the lower one winning; a limit only one side sets is kept.
    """
    out = copy.deepcopy(dict(granted))  # a token's grant never aliases a policy rule's lists
    arguments = out.get("arguments", [])
    arguments += [copy.deepcopy(c) for c in requested.get("arguments", ()) if c not in arguments]
    if arguments:
        out["arguments"] = arguments
    if "budget" in requested:
        budget = out.setdefault("budget", {})
        for key, value in requested["budget"].items():
            budget[key] = min(budget[key], value) if key in budget else value
    return out


# -- the decision, after the hot path allowed ------------------------------------------------


class Charger(Protocol):
    """What ``enforce`` asks of the budget table (``budgets.BudgetTable``)."""

    def charge(self, key: str, budget: Budget, now: float, keep_until: int) -> tuple[str, float]:
        """(ALLOW, 0) having counted the call, or (reason, seconds until a retry may succeed)."""


def budget_key(task_key: str, tool: str) -> str:
    """Budgets count per task and tool: every token of the task (renewals, delegated children) and
    every budgeted grant for that tool draw on one counter, so narrowing a grant or delegating it
    never opens a fresh budget."""
    return f"{task_key}\x00{tool}"


def enforce(entry: Any, tool: str, target: str, operation: str, sensitivity: str,
            arguments: Mapping[str, Any] | None, budgets: Charger | None, now: float) -> tuple[str, float]:
    """(ALLOW, 0) or (reason, retry_after) for a token with constrained grants the hot path allowed.

    ``arguments`` is None when the request carries none (not an MCP ``tools/call``): a grant that
    constrains arguments cannot be checked then, so it does not cover the request.
    """
    level = SENSITIVITY_RANK[sensitivity]
    problem = None
    budgeted = []
    for grant in entry.grants:
        if not grant.covers(tool, target, operation, level):
            continue
        extras = grant.extras
        if extras is None:
            return reasons.ALLOW, 0.0
        if extras.arguments:
            found = reasons.ARGUMENTS_UNAVAILABLE if arguments is None else next(
                filter(None, (c.problem(arguments) for c in extras.arguments)), None)
            if found is not None:
                problem = problem or found
                continue
        if extras.budget is None:
            return reasons.ALLOW, 0.0
        budgeted.append(extras.budget)
    if not budgeted:
        return problem or reasons.SCOPE_DENIED, 0.0
    if budgets is None:
        return reasons.BUDGET_UNAVAILABLE, 0.0
    key = budget_key(entry.task_key, tool)
    # Kept a day past the token's expiry: a renewal of the task within that time finds its count.
    keep_until = int(entry.exp) + 86_400
    denial = (reasons.BUDGET_EXHAUSTED, 0.0)
    for budget in budgeted:  # any grant with room allows; a refused charge counts nothing
        reason, retry = budgets.charge(key, budget, now, keep_until)
        if reason == reasons.ALLOW:
            return reason, 0.0
        # A wait that may succeed says more than "never again"; the shortest wait most of all.
        if reason != reasons.BUDGET_EXHAUSTED and (denial[0] == reasons.BUDGET_EXHAUSTED
                                                   or retry < denial[1]):
            denial = (reason, retry)
    return denial
