"""The agents' API listener: TLS terminated by the daemon, so that every refused identity is answered.

When gRPC's own TLS verifies client certificates, one it cannot verify fails the handshake: the caller
sees UNAVAILABLE and the daemon never learns of it, so nothing is audited. Here the handshake completes
for any certificate, or none; identity/spiffe.py judges the chain; and the bytes go on, in plaintext over
loopback, to the API's gRPC server. The verdict (the accepted chain, or the IdentityError saying why
not) waits in ``Peers`` under the backend connection's address, where api.py looks it up at each call,
answering UNAUTHENTICATED with the reason and recording it.

One memory-BIO OpenSSL connection per client, driven from asyncio protocols: no thread per connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from ..config import host_port
from ..identity.spiffe import IdentityError, Svid, peer_from_der_chain
from . import listeners

log = logging.getLogger("agentauthz.tls_front")  # the name operators filter on, kept across the layout

HANDSHAKE_TIMEOUT = 10.0  # a client that has not finished its handshake by then is closed
# At most this many handshakes at once: a new connection closes the oldest, so that silent sockets
# held open by someone without any credential never keep an agent's handshake (milliseconds) out.
MAX_PENDING_HANDSHAKES = 256
# A connection whose chain was refused is closed this long after its handshake: time to be answered
# UNAUTHENTICATED with the reason, nothing else to do; and at most this many are open at once (a new
# one closes the oldest), so that no credential-less client holds sockets, memory or file descriptors.
REFUSED_LINGER = 10.0
MAX_REFUSED = 256
CHUNK = 64 * 1024
BACKEND_HOST = "127.0.0.1"


# Why a connection's chain was refused, or the accepted chain (DER, leaf first).
Verdict = Union[IdentityError, list[bytes]]


class Peers:
    """The verdict on each connection's certificate chain, by the address the gRPC server sees for it."""

    def __init__(self, trust_domain: str, bundle: list[x509.Certificate]) -> None:
        self.trust_domain, self.bundle = trust_domain, bundle
        self._by_peer: dict[str, Verdict] = {}
        # An accepted chain's Svid and the span in which every certificate it rests on is valid: the
        # chain is judged again (a DER parse and a signature per certificate) only outside that span.
        self._accepted: dict[str, tuple[Svid, datetime, datetime]] = {}

    def judge(self, chain: list[bytes]) -> Verdict:
        try:
            self.svid(chain)
        except IdentityError as exc:
            return exc
        return chain

    def svid(self, chain: list[bytes]) -> Svid:
        return peer_from_der_chain(chain, self.trust_domain, self.bundle)

    def identity(self, grpc_peer: str) -> Svid:
        """The Svid behind ``context.peer()``; IdentityError saying why there is none."""
        verdict = self._by_peer.get(grpc_peer)
        if verdict is None:  # someone on this host dialled the backend port directly
            raise IdentityError("the connection did not come through the TLS front")
        if isinstance(verdict, IdentityError):
            raise verdict
        now = datetime.now(timezone.utc)
        accepted = self._accepted.get(grpc_peer)
        if accepted is not None and accepted[1] <= now <= accepted[2]:
            return accepted[0]
        # Outside the span, judged again, as gRPC's TLS peer was at every call: a certificate (or CA)
        # that expires while its connection stays open stops authenticating then.
        svid = self.svid(verdict)
        certs = [*(x509.load_der_x509_certificate(der) for der in verdict), *self.bundle]
        self._accepted[grpc_peer] = (svid, max(c.not_valid_before_utc for c in certs),
                                     min(c.not_valid_after_utc for c in certs))
        return svid

    def add(self, port: int, verdict: Verdict) -> str:
        key = f"ipv4:{BACKEND_HOST}:{port}"
        self._by_peer[key] = verdict
        return key

    def remove(self, key: str) -> None:
        self._by_peer.pop(key, None)
        self._accepted.pop(key, None)


def default_max_connections() -> int:
    """Connections the front keeps open at once: a share of the file descriptors this process may
    open (each costs three: the client's, and both ends of its loopback connection to the API)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 16384
    return max(64, min(16384, (soft - 256) // 4))


def server_context(key_pem: bytes, cert_pem: bytes, bundle: list[x509.Certificate]) -> SSL.Context:
    """TLS 1.2+ with ALPN h2, the daemon's server certificate, and a client certificate asked for."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # Forward-secret AEAD suites only for TLS 1.2; OpenSSL prefers TLS 1.3 when the client offers it.
    ctx.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20")
    # No resumption: a resumed session would skip the certificate this front must judge every time.
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_session_id(b"agentauthz-api")
    chain = x509.load_pem_x509_certificates(cert_pem)
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    key = serialization.load_pem_private_key(key_pem, password=None)
    ctx.use_privatekey(key)  # type: ignore[arg-type]  # the daemon's server key: EC or RSA
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for ca in bundle:  # OpenSSL's verdict is a second opinion; the CA names tell clients which cert to send
        store.add_cert(crypto.X509.from_cryptography(ca))
        ctx.add_client_ca(ca)

    def keep_going(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        # Accept whatever is presented, so the handshake completes and the refusal can be answered;
        # remember OpenSSL's first objection for judge().
        client = conn.get_app_data()
        if not ok and client is not None and client.objection is None:
            client.objection = (errno, depth)
        return True
    ctx.set_verify(SSL.VERIFY_PEER, keep_going)
    ctx.set_alpn_select_callback(lambda conn, offered: b"h2" if b"h2" in offered
                                 else SSL.NO_OVERLAPPING_PROTOCOLS)
    return ctx


class TlsFront:
    """Accepts TLS on ``listen``; pipes each authenticated-or-not connection to the backend's port."""

    def __init__(self, listen: str, key_pem: bytes, cert_pem: bytes, peers: Peers, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_pending: int = MAX_PENDING_HANDSHAKES,
                 refused_linger: float = REFUSED_LINGER, max_refused: int = MAX_REFUSED,
                 max_connections: int | None = None) -> None:
        self.listen, self.peers = listen, peers
        self._backend: asyncio.Future[int] | None = None  # the API's gRPC server's port, named by start
        self.handshake_timeout, self.max_pending = handshake_timeout, max_pending
        self.refused_linger, self.max_refused = refused_linger, max_refused
        self.max_connections = default_max_connections() if max_connections is None else max_connections
        self.context = server_context(key_pem, cert_pem, peers.bundle)
        self.counts: Counter[str] = Counter()  # handshake outcomes, for /metrics
        # Oldest first (dicts keep insertion order): the handshakes under way, the refused connections.
        self.handshaking: dict[_Client, None] = {}
        self.refused: dict[_Client, None] = {}
        self.connections: set[_Client] = set()
        self._server: asyncio.Server | None = None

    @property
    def pending(self) -> int:
        """Handshakes under way."""
        return len(self.handshaking)

    async def bind(self) -> None:
        """Listen on ``listen``. Clients are accepted and their handshakes done at once; each one's bytes
        wait for ``start`` to name the backend. (Bound without listening, the port could still be the
        kernel's pick for another socket, the backend's included.)"""
        loop = asyncio.get_running_loop()
        self._backend = loop.create_future()
        try:
            if self.listen.startswith("unix:"):
                self._server = await loop.create_unix_server(lambda: _Client(self), self.listen[5:])
            else:
                host, port = host_port(self.listen)
                self._server = await loop.create_server(lambda: _Client(self), host or None, port)
        except (OSError, ValueError) as exc:
            raise listeners.taken("api_listen", self.listen, exc) from None

    def start(self, backend_port: int) -> None:
        """Pipe every client, those already waiting too, to ``backend_port``; after ``bind``."""
        assert self._backend is not None, "bind first"
        self._backend.set_result(backend_port)

    async def backend_port(self) -> int:
        """The backend's port, once ``start`` names it."""
        assert self._backend is not None
        return await asyncio.shield(self._backend)  # a client that leaves must not cancel it for all

    @property
    def port(self) -> int:
        """The TCP port listened on (``listen`` may ask for port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting; connections already open go on until ``abort`` or their end."""
        if self._server is not None:
            self._server.close()

    async def abort(self) -> None:
        """Close every connection still open (the gRPC server behind them has stopped), then wait."""
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()

    def judge(self, conn: SSL.Connection, objection: tuple[int, int] | None) -> Verdict:
        """spiffe.py's verdict on the chain the client presented (leaf first), OpenSSL's as a second."""
        leaf = conn.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return IdentityError("the caller presented no client certificate")
        # On the server side OpenSSL reports the chain without the leaf; keep it leaf first either way.
        sent = conn.get_peer_cert_chain(as_cryptography=True) or []
        chain = [leaf, *(c for c in sent if c != leaf)]
        verdict = self.peers.judge([c.public_bytes(Encoding.DER) for c in chain])
        if objection is not None and not isinstance(verdict, IdentityError):  # OpenSSL refused: say so
            return IdentityError(f"the TLS stack refused the chain (OpenSSL verify error {objection[0]} "
                                 f"at depth {objection[1]})")
        return verdict


class _Client(asyncio.Protocol):
    """The TLS side of one connection: handshake, judge, then decrypt to and encrypt from the backend."""

    def __init__(self, front: TlsFront) -> None:
        self.front = front
        self.tls = SSL.Connection(front.context, None)
        self.tls.set_accept_state()
        self.tls.set_app_data(self)
        self.objection: tuple[int, int] | None = None  # OpenSSL's (verify error, depth), if any
        self.transport: Any = None
        self.backend: _Backend | None = None
        self.handshaking = True
        self.closed = False
        self.early: list[bytes] = []  # decrypted before the backend connection was up
        self.timer: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        front = self.front
        if len(front.connections) >= front.max_connections:  # every one taken: shed it, never buffer it
            front.counts["busy"] += 1
            self.closed = True
            transport.abort()
            return
        if front.pending >= front.max_pending:  # the oldest is the likeliest never to finish
            next(iter(front.handshaking))._give_up("evicted")
        front.handshaking[self] = None
        front.connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(front.handshake_timeout, self._give_up, "timeout")

    def _give_up(self, outcome: str, why: object = "") -> None:
        """A handshake that ends before any certificate could be judged: count it, say so, close."""
        self.front.counts[outcome] += 1
        log.debug("api TLS handshake %s %s", outcome, why)
        self.close()

    def _flush(self) -> None:
        """Send whatever OpenSSL has written to its outgoing BIO (records, alerts, close_notify)."""
        chunks = []
        while True:
            try:
                chunks.append(self.tls.bio_read(CHUNK))
            except SSL.WantReadError:
                break
        if chunks and not self.transport.is_closing():
            self.transport.writelines(chunks)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.tls.bio_write(data)
        if self.handshaking:
            try:
                self.tls.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            except SSL.Error as exc:  # garbage, an old protocol, no common cipher: nothing to judge
                self._flush()  # the alert, so a real TLS client learns why
                self._give_up("failed", exc)
                return
            self._handshake_done()
        self._decrypt()

    def _handshake_done(self) -> None:
        front = self.front
        self.handshaking = False
        self.tls.set_app_data(None)  # only the verify callback needed it; no cycle to collect later
        front.handshaking.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        front.counts["completed"] += 1
        verdict = front.judge(self.tls, self.objection)
        if isinstance(verdict, IdentityError):  # answered, then closed: see REFUSED_LINGER
            if len(front.refused) >= front.max_refused:
                oldest = next(iter(front.refused))
                front.counts["refused_evicted"] += 1
                oldest.close()
            front.refused[self] = None
            self.timer = asyncio.get_running_loop().call_later(front.refused_linger, self.close)
        self.transport.pause_reading()  # until the backend connection is up
        self.connecting = asyncio.get_running_loop().create_task(self._connect(verdict))

    async def _connect(self, verdict: Verdict) -> None:
        loop = asyncio.get_running_loop()
        port = await self.front.backend_port()
        try:
            await loop.create_connection(lambda: _Backend(self, verdict), BACKEND_HOST, port)
        except OSError as exc:
            log.warning("api backend unreachable: %s", exc)
            self.close()
            return
        if self.closed:  # the client left while we connected
            assert self.backend is not None
            self.backend.close()
            return
        assert self.backend is not None
        self.backend.transport.writelines(self.early)
        self.early.clear()
        self.transport.resume_reading()

    def _decrypt(self) -> None:
        plain, done = [], False
        try:
            while True:
                plain.append(self.tls.recv(CHUNK))
        except SSL.WantReadError:
            self._flush()  # e.g. the answer to a TLS 1.3 key update
        except SSL.ZeroReturnError:  # close_notify: the client is done
            done = True
        except SSL.Error as exc:
            log.debug("api TLS connection error: %s", exc)
            done = True
        if self.backend is not None:
            self.backend.transport.writelines(plain)
        else:
            self.early.extend(plain)
        if done:
            self.close()

    def send(self, data: bytes) -> None:
        """Plaintext from the backend: encrypt and send to the client."""
        if self.closed:
            return
        try:
            self.tls.sendall(data)
        except SSL.Error as exc:
            log.debug("api TLS send failed: %s", exc)
            self.close()
            return
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:  # also after EOF: the transport closes
        if self.handshaking and not self.closed:
            self._give_up("aborted", exc or "by the client")
        self.close()

    # Flow control: while one side cannot take more, stop reading from the other.
    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.transport.resume_reading()

    def close(self) -> None:
        """Close both sides once: close_notify to the client, and the backend only after its entry."""
        if self.closed:
            return
        self.closed = True
        if self.handshaking:
            self.tls.set_app_data(None)
        self.front.handshaking.pop(self, None)
        self.front.refused.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        self.front.connections.discard(self)
        if self.backend is not None:
            self.backend.close()
        if self.transport is not None and not self.transport.is_closing():
            if not self.handshaking:
                try:
                    self.tls.shutdown()
                except SSL.Error:
                    pass
                self._flush()
            self.transport.close()


class _Backend(asyncio.Protocol):
    """The plaintext side: the gRPC API server on loopback, which learns the peer through ``Peers``."""

    def __init__(self, client: _Client, verdict: Verdict) -> None:
        self.client, self.verdict = client, verdict
        self.transport: Any = None
        self.key: str | None = None

    def connection_made(self, transport: Any) -> None:
        # Registered before a byte is sent, so the gRPC server never sees this connection unannounced.
        self.transport = transport
        self.key = self.client.front.peers.add(transport.get_extra_info("sockname")[1], self.verdict)
        self.client.backend = self

    def data_received(self, data: bytes) -> None:
        self.client.send(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.resume_reading()

    def close(self) -> None:
        # The entry goes first: once the socket is closed its port may be reused by someone else.
        if self.key is not None:
            self.client.front.peers.remove(self.key)
            self.key = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
