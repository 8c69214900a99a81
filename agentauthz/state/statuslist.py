"""The revocation bitset published as an IETF Token Status List (draft-ietf-oauth-status-list).

``GET /status-list`` answers a JWT (``typ: statuslist+jwt``) signed by the daemon's current key,
and ``GET /status-list/<boundary>`` the same bits signed by that trust boundary's key, the list its
tokens name: a key that leaks from one boundary can then forge no list another boundary's tokens
trust (``agentauthz.offline``). Its ``status_list`` holds one bit per slot, index i in byte i // 8,
least significant bit first (draft §4.1), zlib-compressed and base64url-encoded.

Indices are the absolute slots tokens carry, and a list has no offset (it starts at index 0), so
the list runs from 0 to ``list_end``: every slot below the live window is published as invalid (its
token expired long ago, and a run of ones compresses to almost nothing), then the window's bits up
to the next slot to be handed out, then headroom as long as the live range (at least
``MIN_HEADROOM``) so that tokens minted while a consumer keeps its copy are still in it. A token
whose ``idx`` lies past a list's end is newer than the list: the draft has consumers refuse it
(``agentauthz.offline``: ``StatusListTooShort``), never read it as valid, and the daemon rebuilds
the list as soon as a slot past the published end is handed out.

Ending a task or revoking an agent is enforced online by cutoffs, not bits. So that offline
verifiers see those too, ``MintedSlots`` remembers which slots this process minted per task and per
agent, and marks them in a published-only overlay when the task ends or the agent is revoked. An
overlay rather than journaled bits: a bit would make Check answer ``token_revoked`` where it now
says ``task_ended``/``agent_revoked`` and cost an fsync per token; what the overlay loses on restart
is what the in-memory record of minted slots loses anyway, so either way tokens minted before a
restart are covered by the online cutoffs only (see README).
"""

from __future__ import annotations

import gzip
import threading
import zlib
from array import array
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from ..decision import tokens
from ..decision._bitset_py import HEADER_BYTES

TYP = "statuslist+jwt"
CONTENT_TYPE = "application/statuslist+jwt"
TTL = 60  # seconds a consumer may use one list; agentauthz.offline refuses an older one
LIFETIME = 2 * TTL  # exp: a hard bound even for consumers that ignore ttl
MIN_REBUILD_INTERVAL = 1.0  # a storm of revocations rebuilds the list at most once a second
SWEEP_INTERVAL = 30.0  # how often remembered slots of expired tokens are dropped
# Slots published past the next one to be handed out, at least: 512 bytes decompressed, so a list
# fetched from a quiet daemon still holds the next 4096 tokens.
MIN_HEADROOM = 4096
_ONES = memoryview(b"\xff" * (1 << 20))


def pack(invalid: Iterable[int], size: int) -> bytes:
    """A 1-bit status list of ``size`` entries with the ``invalid`` indices set (draft §4.1 bit order)."""
    raw = bytearray((size + 7) // 8)
    for i in invalid:
        if not 0 <= i < size:
            raise ValueError(f"index {i} is outside a list of {size}")
        raw[i >> 3] |= 1 << (i & 7)
    return bytes(raw)


def encode_lst(raw: bytes) -> str:
    """The ``lst`` member: ZLIB (RFC 1950) at the best compression, then base64url."""
    return tokens.b64url(zlib.compress(raw, 9))


def list_end(base: int, next_slot: int, capacity: int, min_headroom: int = MIN_HEADROOM) -> int:
    """One past the last index published: the live range ``[base, next_slot)`` and as much headroom
    again (at least ``min_headroom``), within the window, rounded up to whole bytes."""
    end = min(next_slot + max(min_headroom, next_slot - base), base + capacity)
    return -(-end // 8) * 8


def accepts_jwt(accept: str | None) -> bool:
    """Whether an Accept header admits ``application/statuslist+jwt``, the one representation served.

    The most specific range naming it decides (RFC 9110 §12.5.1): ``application/statuslist+cwt``
    alone does not, ``*/*`` does; no header, or a blank one, admits anything.
    """
    if accept is None or not accept.strip():
        return True
    specificity, weight = -1, 0.0
    for item in accept.split(","):
        media, *params = item.split(";")
        rank = {CONTENT_TYPE: 2, "application/*": 1, "*/*": 0}.get(media.strip().lower(), -1)
        if rank > specificity:
            specificity, weight = rank, _weight(params)
    return weight > 0


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header admits gzip (``gzip``, ``x-gzip`` or ``*``, with q > 0)."""
    weights: dict[str, float] = {}
    for item in (accept_encoding or "").split(","):
        coding, *params = item.split(";")
        weights.setdefault(coding.strip().lower(), _weight(params))
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


def _weight(params: list[str]) -> float:
    """The ``q`` of a header item; 1 if it has none, 0 if it is not a number from 0 to 1."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0 <= q <= 1 else 0.0
    return 1.0


def list_claims(uri: str, issuer: str, lst: str, iat: int, ttl: int = TTL,
                lifetime: int = LIFETIME) -> dict[str, Any]:
    """The claims of a Status List Token; ``sub`` is the uri the tokens name."""
    return {"iss": issuer, "sub": uri, "iat": iat, "exp": iat + lifetime, "ttl": ttl,
            "status_list": {"bits": 1, "lst": lst}}


def chain(subject: str, act: Mapping[str, Any] | None) -> list[str]:
    """The holder, then each delegating agent up the ``act`` chain; the last is the task's root agent."""
    subjects = [subject]
    while act:
        subjects.append(act["sub"])
        act = act.get("act")
    return subjects


class _Run:
    """Slots minted for one task or agent, oldest first, with their expiries."""

    __slots__ = ("slots", "exps")

    def __init__(self) -> None:
        self.slots = array("Q")
        self.exps = array("q")


class MintedSlots:
    """Which slots this process minted, per task key and per agent, while their tokens live; the overlay."""

    def __init__(self, cutoffs: Any, *, leeway: int, clock: Callable[[], float]) -> None:
        self._cutoffs = cutoffs  # the RevocationIndex: task key / agent -> cutoff
        self._leeway, self._clock = leeway, clock
        self._lock = threading.Lock()
        self._tasks: dict[str, _Run] = {}
        self._agents: dict[str, _Run] = {}
        self._marked: dict[int, int] = {}  # slot -> exp: published invalid though its bit is clear
        self.revision = 0  # bumped whenever _marked grows
        self._swept = clock()

    def remember(self, task_key: str, subjects: Sequence[str], slot: int, exp: int,
                 iat: int | None = None) -> None:
        now = self._clock()
        iat = int(now) if iat is None else iat
        with self._lock:
            self._add(self._tasks, task_key, slot, exp)
            for subject in subjects:
                self._add(self._agents, subject, slot, exp)
            # The task ended or an agent was revoked between this mint and now: the mark that
            # came with it has already run, so mark this one here. An ended task's every token,
            # whatever its iat, as Check decides (RevocationIndex.revoke_task).
            cutoffs = [self._cutoffs.agents.get(s) for s in subjects]
            if task_key in self._cutoffs.tasks or any(cut is not None and iat <= cut for cut in cutoffs):
                self._mark(slot, exp)
            if now - self._swept >= SWEEP_INTERVAL:
                self._sweep(now)

    def mark_task(self, task_key: str) -> int:
        """Publish every remembered token of the task as invalid; returns how many."""
        with self._lock:
            return self._mark_run(self._tasks.pop(task_key, None))

    def mark_agent(self, agent: str) -> int:
        """Publish every remembered token held or delegated by ``agent`` as invalid; returns how many."""
        with self._lock:
            return self._mark_run(self._agents.pop(agent, None))

    def marked(self) -> list[int]:
        with self._lock:
            return list(self._marked)

    def __len__(self) -> int:
        """Slots remembered (a slot counts once per task and once per agent) plus slots marked."""
        with self._lock:
            runs = [*self._tasks.values(), *self._agents.values()]
            return sum(len(r.slots) for r in runs) + len(self._marked)

    def _add(self, runs: dict[str, _Run], name: str, slot: int, exp: int) -> None:
        run = runs.get(name)
        if run is None:
            run = runs[name] = _Run()
        run.slots.append(slot)
        run.exps.append(exp)

    def _mark_run(self, run: _Run | None) -> int:
        # Every remembered token was minted before this call, so (to the second) at or before the
        # cutoff; one minted within the cutoff's second after it is marked too: offline refuses a
        # token Check would still allow, never the reverse.
        if run is None:
            return 0
        for slot, exp in zip(run.slots, run.exps, strict=True):
            self._mark(slot, exp)
        return len(run.slots)

    def _mark(self, slot: int, exp: int) -> None:
        self._marked[slot] = max(exp, self._marked.get(slot, exp))
        self.revision += 1

    def _sweep(self, now: float) -> None:
        # Runs are in mint order but expiries are not: drop the dead prefix only. An expired token
        # behind a longer-lived one stays until that one expires, so memory is bounded by the tokens
        # minted within one maximum lifetime.
        self._swept = now
        dead = now - self._leeway
        for runs in (self._tasks, self._agents):
            for name, run in list(runs.items()):
                n = 0
                while n < len(run.exps) and run.exps[n] < dead:
                    n += 1
                if n == len(run.exps):
                    del runs[name]
                elif n:
                    del run.slots[:n], run.exps[:n]
        self._marked = {slot: exp for slot, exp in self._marked.items() if exp >= dead}


class _Published(NamedTuple):
    jwt: str
    iat: int
    built: float
    state: tuple[int, int, str]  # (bit revision, overlay revision, signing kid) it was built from
    end: int  # one past its last index: every slot handed out before it was built lies below


class StatusListPublisher:
    """Builds, signs and caches the daemon's Status List Token; rebuilt only when something moved."""

    def __init__(self, bits_buffer: Any, *, capacity: int, store: Any, index: Any,
                 lists: Mapping[str, tuple[Any, str]], issuer: str, leeway: int,
                 clock: Callable[[], float], ttl: int = TTL, lifetime: int = LIFETIME,
                 min_interval: float = MIN_REBUILD_INTERVAL, min_headroom: int = MIN_HEADROOM) -> None:
        """``lists``: trust boundary -> (its keyring, the URI its list is published at); the first is
        the default boundary's. ``store``: the RevocationStore, whose ``next_slot`` bounds the list."""
        if capacity <= 0 or capacity % 64 or not 0 < ttl <= lifetime or min_headroom < 0:
            raise ValueError("capacity must be a positive multiple of 64, 0 < ttl <= lifetime and "
                             "min_headroom >= 0")
        self.minted = MintedSlots(index, leeway=leeway, clock=clock)
        # The same bytes the Check path reads (header, then the ring of capacity bits).
        self._view = memoryview(bits_buffer)
        self._capacity, self._store, self._lists = capacity, store, dict(lists)
        self._default = next(iter(self._lists))
        self._issuer, self._clock = issuer, clock
        self._ttl, self._lifetime, self._min_interval = ttl, lifetime, min_interval
        self._min_headroom = min_headroom
        self._lock = threading.Lock()
        self._cached: dict[str, _Published] = {}  # boundary -> its list as last built
        # (bit revision, overlay revision, next slot) -> the compressed list and its end
        self._lst: tuple[tuple[int, int, int], str, int] | None = None
        self._gzipped: dict[str, tuple[str, bytes]] = {}  # boundary -> (its list, gzip-compressed)
        # The all-ones prefix below the window only grows: compress it once, incrementally, and
        # start each build from a copy of that compressor.
        self._prefix = zlib.compressobj(9)
        self._prefix_out = bytearray()
        self._prefix_len = 0
        self.builds = 0

    # -- fed by Authority ------------------------------------------------------

    def remember_minted(self, task_key: str, subjects: Sequence[str], slot: int, exp: int, *,
                        iat: int | None = None) -> None:
        """Record a token this process minted, so ending its task or revoking an agent shows offline.

        ``subjects``: the holder, then every delegating agent up the ``act`` chain.
        """
        self.minted.remember(task_key, subjects, slot, exp, iat)

    def task_ended(self, task_key: str) -> None:
        self.minted.mark_task(task_key)

    def agent_revoked(self, agent: str) -> None:
        self.minted.mark_agent(agent)

    # -- published -------------------------------------------------------------

    def uri(self, boundary: str) -> str:
        """Where the list ``boundary``'s tokens name is published."""
        return self._lists[boundary][1]

    def token(self, boundary: str | None = None) -> str:
        """The current Status List Token (compact JWS) of ``boundary`` (default: the default's);
        KeyError for a boundary this daemon does not serve."""
        boundary = boundary or self._default
        keyring, uri = self._lists[boundary]
        with self._lock:
            now = self._clock()
            kid, key = keyring.signer()
            next_slot = self._store.next_slot
            state = (self._store.revision, self.minted.revision, kid)
            cached = self._cached.get(boundary)
            # Fresh (under half its ttl, so a fetcher always gets most of one), holding every slot
            # handed out (consumers refuse a token past a list's end), and either nothing moved or
            # it was built under a second ago; a new signer always rebuilds.
            if cached is not None and 0 <= now - cached.iat < self._ttl / 2 and cached.state[2] == kid \
                    and next_slot <= cached.end and (
                    cached.state == state or now - cached.built < self._min_interval):
                return cached.jwt
            iat = int(now)
            moved = (state[0], state[1], next_slot)
            if self._lst is None or self._lst[0] != moved:  # the boundaries' lists share their bits
                compressed, end = self._compressed()
                self._lst = moved, tokens.b64url(compressed), end
            _, lst, end = self._lst
            jwt = tokens.encode(list_claims(uri, self._issuer, lst, iat, self._ttl, self._lifetime),
                                key, kid, typ=TYP)
            self._cached[boundary] = _Published(jwt, iat, now, state, end)
            self.builds += 1
            return jwt

    def body(self, boundary: str | None = None, *, gzipped: bool = False) -> bytes:
        """The current token as an HTTP body: ASCII, or gzip-compressed (once per list built)."""
        boundary = boundary or self._default
        jwt = self.token(boundary)
        if not gzipped:
            return jwt.encode("ascii")
        last = self._gzipped.get(boundary)
        if last is None or last[0] is not jwt:
            last = self._gzipped[boundary] = jwt, gzip.compress(jwt.encode("ascii"), 9, mtime=0)
        return last[1]

    def _compressed(self) -> tuple[bytes, int]:
        """The ZLIB list and its end: ones up to the window's base, then the window up to the end."""
        base, end, tail = self._window()
        whole = base // 8
        for slot in self.minted.marked():
            k = slot - 8 * whole  # below: already one; past the end: never handed out
            if 0 <= k < 8 * len(tail):
                tail[k >> 3] |= 1 << (k & 7)
        while self._prefix_len < whole:
            n = min(len(_ONES), whole - self._prefix_len)
            self._prefix_out += self._prefix.compress(_ONES[:n])
            self._prefix_len += n
        z = self._prefix.copy()
        return bytes(self._prefix_out) + z.compress(tail) + z.flush(), end

    def _window(self) -> tuple[int, int, bytearray]:
        """(base, end, the bits of slots 8 * (base // 8) to end) as one consistent snapshot, without
        the writer's lock; only the bytes the list needs are copied.

        The writer clears bits behind the window before it moves the base, so a copy is retried
        when the base moved meanwhile. A copy racing the clear under an unchanged base may show
        a bit of a slot that is leaving the window clear: such tokens have expired.
        """
        view, cap = self._view, self._capacity
        ring_bytes = cap // 8
        while True:
            base = int.from_bytes(view[:8], "little")
            # Read after the base: the next slot only grows and is never below the base.
            end = list_end(base, max(base, self._store.next_slot), cap, self._min_headroom)
            whole, shift = divmod(base, 8)
            n = end // 8 - whole
            at = base % cap // 8  # the ring byte of slot 8 * whole (cap % 64 == 0)
            tail = bytearray()
            while len(tail) < n:  # the ring wraps: at most twice round
                take = min(n - len(tail), ring_bytes - at)
                tail += view[HEADER_BYTES + at:HEADER_BYTES + at + take]
                at = 0
            if int.from_bytes(view[:8], "little") == base:
                break
        if shift:  # a block size that is not a multiple of 8; never with the daemon's defaults
            tail[0] |= (1 << shift) - 1  # slots 8 * whole to base - 1: below the window
            if end > base + cap:  # the last byte's ring bits past the window are its first slots'
                tail[-1] &= (1 << (base + cap - (end - 8))) - 1
        return base, end, tail
