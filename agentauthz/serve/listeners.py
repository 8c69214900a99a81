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


class Reserved:
    """The daemon's configured TCP addresses, each held by a bound socket that does not listen, from the
    daemon's first moment until its listeners are bound there (``release``).

    Until a listener binds, its port is like any other to the kernel: if it lies in the ephemeral range,
    a connection opened meanwhile (to Redis in cluster mode, the HTTP Check's readiness probe, which then
    even connects to itself) may take it as its source port, or bind(0) may pick it (the API's backend),
    and the daemon stops at start with "address already in use". A port some socket has bound is neither:
    connect(2) skips it, bind(0) takes another. These bind as the listeners do (SO_REUSEADDR, and not
    listening), so the listeners bind beside them.
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

    gRPC binds with SO_REUSEPORT (so that Check workers share one port), and would then share a port
    with another daemon's Check or Approvals listener without a word: these binds do not set it, so
    any listener there, ours or not, makes them fail.
    """
    held: list[socket.socket] = []
    try:
        for name in LISTENERS:
            address = getattr(config, name)
            if not address:
                continue  # a listener that is off (http_check_listen)
            why = _unix_problem(address[5:]) if address.startswith("unix:") else _tcp_hold(address, held)
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


def _tcp_hold(address: str, held: list[socket.socket]) -> str | None:
    """Bind a socket to each of ``address``'s addresses onto ``held``; why one cannot be, else None."""
    try:
        host, port = host_port(address)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except ValueError:
        return None  # config validation names a malformed address
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, where in infos:
        hold = socket.socket(family, kind, proto)
        held.append(hold)
        # As the listeners bind: a port whose old connections linger in TIME_WAIT is free.
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            hold.bind(where)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return (exc.strerror or str(exc)).lower()
            # Any other failure (an address not on this host) the listener's own bind names.
            held.remove(hold)
            hold.close()
    return None
