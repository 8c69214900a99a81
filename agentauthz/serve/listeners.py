"""The daemon's listen addresses, checked free before anything is created, and named when one is not."""

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


def refuse_taken(config: Any) -> None:
    """Raise ``taken`` for the first listener whose address something else already holds.

    gRPC binds with SO_REUSEPORT (so that Check workers share one port), and would then share a port
    with another daemon's Check or Approvals listener without a word: this bind does not set it, so
    any listener there, ours or not, makes it fail. Run before the state directory is touched.
    """
    for name in LISTENERS:
        address = getattr(config, name)
        if not address:
            continue  # a listener that is off (http_check_listen)
        why = _unix_problem(address[5:]) if address.startswith("unix:") else _tcp_problem(address)
        if why:
            raise taken(name, address, why)


def _unix_problem(path: str) -> str | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return None  # nothing accepts there: gRPC replaces a stale socket file
    return "address already in use"


def _tcp_problem(address: str) -> str | None:
    try:
        host, port = host_port(address)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except ValueError:
        return None  # config validation names a malformed address
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, where in infos:
        with socket.socket(family, kind, proto) as probe:
            # As the listeners bind: a port whose old connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return (exc.strerror or str(exc)).lower()
    return None
