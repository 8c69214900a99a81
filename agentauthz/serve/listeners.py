"""The daemon's listen addresses, held before anything is created, and named when one is not free."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from ..config import LISTENERS, host_port
from ..errors import ConfigError

# A Check listener on unix:PATH (check_listen, http_check_listen) believes what its caller says Envoy
# saw: read and write for the socket's owner and group only (Envoy's), whatever the daemon's umask.
UNIX_SOCKET_MODE = 0o660


def taken(name: str, address: str, why: object) -> ConfigError:
    """The one-line error for listener ``name`` (a Config field) that cannot listen on ``address``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(why, OSError) and why.errno:  # asyncio's own text repeats the address
        why = os.strerror(why.errno).lower()
    return ConfigError(f"cannot listen on {address} ({flag}, or {name} in the config): {why}; stop what "
                       f"listens there or choose another address with {flag}")


# The Check listeners: every worker process binds them too, with SO_REUSEPORT (gRPC's default, granian's).
SHARED = frozenset({"check_listen", "http_check_listen"})


class Reserved:
    """The daemon's configured TCP addresses, each held by a bound socket that does not listen, from the
    daemon's first moment until its listeners are bound there (``release``).

    Until a listener binds, its port is like any other to the kernel: if it lies in the ephemeral range,
    a connection opened meanwhile (to Redis in cluster mode, the HTTP Check's readiness probe, which then
    even connects to itself) may take it as its source port, or bind(0) may pick it (the API's backend),
    and the daemon stops at start with "address already in use". A port some socket has bound is neither:
    connect(2) skips it, bind(0) takes another.
    """

    def __init__(self, held: list[socket.socket]) -> None:
        self._held = held

    def release(self) -> None:
        """Close them (once every listener is bound; a forked worker at once: its copies hold nothing)."""
        for held in self._held:
            held.close()
        self._held = []


def reserve(config: Any) -> Reserved:
    """Hold every listener's TCP address (``Reserved``); raise ``taken`` for the first one something
    else already holds, before the state directory is made or touched.

    Each address is first bound as the listeners bind (SO_REUSEADDR, so that connections of a daemon
    that just stopped, lingering in TIME_WAIT, do not count), which any listener there fails, ours or
    not. gRPC and granian bind the Check listeners with SO_REUSEPORT too, and would share them with
    another daemon's without a word: so those are then held with SO_REUSEPORT alone, which our own
    Check listeners and workers bind beside, and which fails that first bind of another daemon starting
    meanwhile (but for the microseconds between the two binds). The other listeners (no
    SO_REUSEPORT) fail to bind beside another daemon's.
    """
    held: list[socket.socket] = []
    try:
        for name in LISTENERS:
            address = getattr(config, name)
            if not address:
                continue  # a listener that is off (http_check_listen)
            why = (_unix_problem(address[5:]) if address.startswith("unix:")
                   else _tcp_hold(address, held, name in SHARED))
            if why:
                raise taken(name, address, why)
    except BaseException:
        Reserved(held).release()
        raise
    return Reserved(held)


def _unix_problem(path: str) -> str | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return None  # nothing accepts there: gRPC replaces a stale socket file
    return "address already in use"


def _tcp_hold(address: str, held: list[socket.socket], shared: bool) -> str | None:
    """Bind a socket to each of ``address``'s addresses onto ``held`` (``reserve``); why one cannot be."""
    try:
        host, port = host_port(address)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except ValueError:
        return None  # config validation names a malformed address
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, where in infos:
        hold, why = _bound(family, kind, proto, where, socket.SO_REUSEADDR)
        if hold is not None and shared:  # checked: now held as the Check listeners bind
            hold.close()
            hold, _ = _bound(family, kind, proto, where, socket.SO_REUSEPORT)
            if hold is None:  # another program's connection lingers there in TIME_WAIT, which SO_REUSEPORT
                # alone does not pass but the listeners' own bind does: held as checked, then
                hold, why = _bound(family, kind, proto, where, socket.SO_REUSEADDR)
        if why:
            return why
        if hold is not None:
            held.append(hold)
    return None


def _bound(family: int, kind: int, proto: int, where: Any, option: int) -> tuple[socket.socket | None, str]:
    """A socket with ``option`` bound to ``where``, or why not: "" for a failure the listener's own bind
    names (an address not on this host)."""
    hold = socket.socket(family, kind, proto)
    hold.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        hold.bind(where)
    except OSError as exc:
        hold.close()
        taken_here = exc.errno in (errno.EADDRINUSE, errno.EACCES)
        return None, (exc.strerror or str(exc)).lower() if taken_here else ""
    return hold, ""
