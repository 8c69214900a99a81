"""The API listener's TLS front (agentauthz/serve/tls_front.py), against a real daemon and real certificates.

The daemon terminates the agents' TLS itself and pipes the bytes to its gRPC server on a loopback port.
Here: a genuine SVID still mints a token bound to its certificate; the loopback port refuses anyone who
did not come through the front; handshakes that go wrong (garbage, TLS 1.0, a client that hangs up, a
client that never finishes) are closed and counted and leave the daemon serving; many calls at once
and a megabyte each way pass through intact; a stop drains.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from processes import Daemon, http_get, wait_for

from agentauthz.identity.devca import CertAndKey, DevPki, ensure_dev_pki, make_ca, make_leaf
from agentauthz.identity.spiffe import IdentityError
from agentauthz.serve.tls_front import Peers, TlsFront
from agentauthz.v1 import agentauthz_pb2 as pb
from agentauthz.v1 import agentauthz_pb2_grpc as pb_grpc

AGENT = "spiffe://dev.local/agent/alpha"
READ = pb.Grant(tool="demo", target="*", operations=["read"])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("tls-front") / "state").start()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def pki(daemon: Daemon) -> DevPki:
    return ensure_dev_pki(daemon.state_dir)


@pytest.fixture(scope="module")
def leaf(pki: DevPki) -> CertAndKey:
    return make_leaf(pki.ca, [AGENT])


def credentials(pki: DevPki, leaf: CertAndKey) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(pki.ca_cert_pem, leaf.key_pem, leaf.cert_pem)


def channel(d: Daemon, pki: DevPki, leaf: CertAndKey) -> grpc.Channel:
    # A subchannel pool of its own: each channel is its own TCP (and TLS) connection.
    return grpc.secure_channel(d.api_address, credentials(pki, leaf),
                               options=[("grpc.use_local_subchannel_pool", 1)])


def mint(d: Daemon, pki: DevPki, leaf: CertAndKey, task: str = "front") -> pb.MintResponse:
    with channel(d, pki, leaf) as ch:
        return pb_grpc.AgentAuthzStub(ch).Mint(pb.MintRequest(task=task, grants=[READ]), timeout=10)


def handshakes(d: Daemon) -> dict[str, float]:
    """agentauthz_api_tls_handshakes by outcome, from /metrics."""
    status, body = http_get(f"http://127.0.0.1:{d.http_port}/metrics")[:2]
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else body
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^agentauthz_api_tls_handshakes_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def backend_port(d: Daemon) -> int:
    found = re.search(r"gRPC behind it on 127\.0\.0\.1:(\d+)", d.log())
    assert found, d.log()
    return int(found.group(1))


def test_a_valid_svid_mints_a_token_bound_to_its_certificate(daemon: Daemon, pki: DevPki,
                                                           leaf: CertAndKey) -> None:
    minted = mint(daemon, pki, leaf)
    assert minted.agent == AGENT and minted.token
    claims = json.loads(base64.urlsafe_b64decode(minted.token.split(".")[1] + "=="))
    digest = hashlib.sha256(leaf.certificate.public_bytes(Encoding.DER)).digest()
    assert claims["cnf"]["x5t#S256"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_the_loopback_grpc_port_refuses_whoever_did_not_come_through_the_front(daemon: Daemon) -> None:
    def authn() -> list[dict[str, Any]]:
        return [r for r in daemon.audit_records() if r["kind"] == "authn"]
    before = len(authn())
    with grpc.insecure_channel(f"127.0.0.1:{backend_port(daemon)}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.AgentAuthzStub(ch).Mint(pb.MintRequest(task="direct", grants=[READ]), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == "identity_invalid: the connection did not come through the TLS front"
    wait_for(lambda: len(authn()) > before, 10, "authn record")
    new = authn()[before:]
    assert [(r["decision"], r["detail"]) for r in new] == [
        (False, "the connection did not come through the TLS front")]


def _tls10_client_hello() -> bytes:
    """A ClientHello offering TLS 1.0 only (one TLS 1.0 suite, no extensions), byte by byte."""
    body = b"\x03\x01" + os.urandom(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    handshake = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def _exchange(port: int, data: bytes, linger_reset: bool = False) -> bytes:
    """Send ``data``; return what the daemon answers before it closes (or b"" once we hang up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if not data:  # connect and hang up at once
            return b""
        s.sendall(data)
        if linger_reset:  # hang up with a RST, mid-handshake
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        return answer


def test_broken_handshakes_are_closed_counted_and_leave_the_daemon_serving(
        daemon: Daemon, pki: DevPki, leaf: CertAndKey) -> None:
    before = handshakes(daemon)
    garbage = _exchange(daemon.api_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(512))
    assert garbage[:1] in (b"", b"\x15")  # nothing, or a TLS alert: then closed
    old = _exchange(daemon.api_port, _tls10_client_hello())
    assert old[:1] == b"\x15", old  # an alert (protocol_version), then closed
    _exchange(daemon.api_port, _tls10_client_hello()[:20], linger_reset=True)  # half a hello, then RST
    _exchange(daemon.api_port, b"")  # connect and hang up
    # A client that completes the handshake and then vanishes without a word.
    tls = ssl.create_default_context(cadata=pki.ca_cert_pem.decode())
    tls.set_alpn_protocols(["h2"])
    cert_file = daemon.state_dir.parent / "front-leaf.pem"
    cert_file.write_bytes(leaf.cert_pem + leaf.key_pem)
    tls.load_cert_chain(cert_file)
    with socket.create_connection(("127.0.0.1", daemon.api_port), timeout=10) as raw:
        with tls.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == "h2" and s.version() in ("TLSv1.3", "TLSv1.2")
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: handshakes(daemon).get("failed", 0) >= before.get("failed", 0) + 2, 10,
             "the failed handshakes counted")
    assert mint(daemon, pki, leaf).token
    assert daemon.healthz() == 200
    assert "Traceback" not in daemon.log() and "Error" not in daemon.log(), daemon.log()


def test_silent_sockets_without_end_never_keep_an_agent_from_its_handshake(daemon: Daemon, pki: DevPki,
                                                                             leaf: CertAndKey) -> None:
    """More silent connections than handshakes may be pending (256), each opened again as soon as it
    is closed: an agent still mints (before, every Mint failed UNAVAILABLE while it lasted)."""
    silent: list[socket.socket] = []
    stop = time.monotonic() + 30
    try:
        for _ in range(300):
            silent.append(socket.create_connection(("127.0.0.1", daemon.api_port), timeout=5))
        minted = []
        while len(minted) < 5 and time.monotonic() < stop:
            for i, sock in enumerate(silent):  # whatever the front closed is opened again
                try:
                    sock.setblocking(False)
                    if sock.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    sock.close()
                    silent[i] = socket.create_connection(("127.0.0.1", daemon.api_port), timeout=5)
            minted.append(mint(daemon, pki, leaf, f"through-the-flood-{len(minted)}"))
        assert len(minted) == 5 and all(m.token for m in minted)
        assert handshakes(daemon).get("evicted", 0) >= 44
    finally:
        for sock in silent:
            sock.close()


def test_many_concurrent_mints_over_several_connections(daemon: Daemon, pki: DevPki,
                                                        leaf: CertAndKey) -> None:
    channels = [channel(daemon, pki, leaf) for _ in range(4)]
    try:
        stubs = [pb_grpc.AgentAuthzStub(ch) for ch in channels]
        calls = [stubs[i % 4].Mint.future(pb.MintRequest(task=f"many-{i}", grants=[READ]), timeout=30)
                 for i in range(120)]
        minted = [c.result() for c in calls]
    finally:
        for ch in channels:
            ch.close()
    assert len({m.token_id for m in minted}) == 120
    assert {m.task for m in minted} == {f"many-{i}" for i in range(120)}


def test_a_megabyte_each_way_passes_intact(daemon: Daemon, pki: DevPki, leaf: CertAndKey) -> None:
    """Three concurrent Mints of ~1 MB on one connection; each response echoes every denied grant."""
    def request(n: int) -> pb.MintRequest:
        refused = [pb.Grant(tool="nope", target=f"{n}-{i}-" + os.urandom(500).hex(), operations=["read"])
                   for i in range(1000)]
        return pb.MintRequest(task=f"big-{n}", grants=[READ, *refused])
    requests = [request(n) for n in range(3)]
    assert all(r.ByteSize() > 1_000_000 for r in requests)
    with channel(daemon, pki, leaf) as ch:
        stub = pb_grpc.AgentAuthzStub(ch)
        answers = [c.result() for c in [stub.Mint.future(r, timeout=30) for r in requests]]
    for req, got in zip(requests, answers, strict=True):
        assert got.token and got.task == req.task
        assert [g.target for g in got.denied] == [g.target for g in req.grants[1:]]


def test_configured_pki_with_an_intermediate(tmp_path: Path) -> None:
    """A production-shaped trust domain: root in the bundle, SVIDs and the server under an intermediate."""
    root = make_ca("prod root", "prod.example", path_length=1)
    inter = make_ca("prod intermediate", "prod.example", issuer=root)
    server = make_leaf(inter, ["spiffe://prod.example/agentauthz"], hosts=["localhost"])
    for name, data in {"server.pem": server.cert_pem + inter.cert_pem, "server.key": server.key_pem,
                       "bundle.pem": root.cert_pem}.items():
        (tmp_path / name).write_bytes(data)
    d = Daemon(tmp_path / "state", {"trust_domain": "prod.example", "tls_cert": str(tmp_path / "server.pem"),
                                    "tls_key": str(tmp_path / "server.key"),
                                    "trust_bundle": str(tmp_path / "bundle.pem"),
                                    "policy_file": str(_policy(tmp_path))}).start()
    try:
        agent = make_leaf(inter, ["spiffe://prod.example/agent/alpha"])
        creds = grpc.ssl_channel_credentials(root.cert_pem, agent.key_pem, agent.cert_pem + inter.cert_pem)
        with grpc.secure_channel(d.api_address, creds) as ch:
            minted = pb_grpc.AgentAuthzStub(ch).Mint(pb.MintRequest(task="prod", grants=[READ]), timeout=10)
        assert minted.agent == "spiffe://prod.example/agent/alpha" and minted.token
        # Without its intermediate the leaf chains to nothing in the bundle: answered, not dropped.
        creds = grpc.ssl_channel_credentials(root.cert_pem, agent.key_pem, agent.cert_pem)
        with grpc.secure_channel(d.api_address, creds) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AgentAuthzStub(ch).Mint(pb.MintRequest(task="prod", grants=[READ]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "is not in the trust bundle" in err.value.details()
    finally:
        assert d.stop() == 0


def _policy(work: Path) -> Path:
    path = work / "policy.yaml"
    path.write_text("version: 1\nrules:\n  - {id: read, agents: ['spiffe://prod.example/agent/*'],"
                    " tool: demo, targets: ['*'], operations: [read]}\n")
    return path


def test_a_stop_drains_open_connections(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state").start()
    pki = ensure_dev_pki(d.state_dir)
    leaf = make_leaf(pki.ca, [AGENT])
    idle = socket.create_connection(("127.0.0.1", d.api_port))  # mid-handshake: never says a word
    ch = channel(d, pki, leaf)
    try:
        assert pb_grpc.AgentAuthzStub(ch).Mint(pb.MintRequest(task="open", grants=[READ]), timeout=10).token
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 15
        assert "Traceback" not in d.log()
    finally:
        ch.close()
        idle.close()


# -- the front in this process, with short limits -----------------------------------------------------------


def test_slow_handshakes_time_out_a_flood_is_shed_and_nothing_is_left_behind() -> None:
    async def scenario() -> None:
        ca = make_ca()
        server = make_leaf(ca, ["spiffe://dev.local/agentauthz"], hosts=["localhost"])
        peers = Peers("dev.local", [ca.certificate])
        front = TlsFront("127.0.0.1:0", server.key_pem, server.cert_pem, peers, handshake_timeout=0.5,
                         max_pending=2, max_connections=4)
        await front.bind()
        front.start(9)  # discard: nothing listens there
        try:
            slow = [await asyncio.open_connection("127.0.0.1", front.port) for _ in range(2)]
            await asyncio.sleep(0.1)
            # One more: the oldest silent one makes room, at once (before: the new one was shed).
            newest = await asyncio.open_connection("127.0.0.1", front.port)
            assert await asyncio.wait_for(slow[0][0].read(), 2) == b""
            assert front.counts["evicted"] == 1 and front.pending == 2
            for r, _ in (slow[1], newest):  # closed by the daemon after the handshake timeout
                assert await asyncio.wait_for(r.read(), 3) == b""
            assert front.counts["timeout"] == 2 and front.pending == 0 and not front.connections
            for _, w in (*slow, newest):
                w.close()
            # Garbage is refused (an alert, then closed); a client hanging up mid-hello is forgotten.
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(b"\x16\x03\x01\x00\x05hello" + os.urandom(64))
            assert (await asyncio.wait_for(reader.read(), 2))[:1] == b"\x15"
            writer.close()
            _, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(_tls10_client_hello()[:20])
            await writer.drain()
            writer.close()
            for _ in range(100):
                if front.counts["aborted"] and front.counts["failed"]:
                    break
                await asyncio.sleep(0.02)
            assert (front.counts["failed"], front.counts["aborted"]) == (1, 1)
            assert front.pending == 0 and not front.connections
        finally:
            front.close()
            await front.abort()
    asyncio.run(scenario())


def test_credential_less_connections_are_answered_then_closed_and_never_take_every_socket() -> None:
    """A client that completes its handshake with no certificate (or a refused one) can only be told
    UNAUTHENTICATED: it is closed after ``refused_linger``, at most ``max_refused`` are open at once
    (a new one closes the oldest), and past ``max_connections`` new connections are shed. Before, each
    stayed open for good: thousands of them ran the daemon out of file descriptors."""
    async def scenario() -> None:
        ca = make_ca()
        server = make_leaf(ca, ["spiffe://dev.local/agentauthz"], hosts=["localhost"])
        front = TlsFront("127.0.0.1:0", server.key_pem, server.cert_pem, Peers("dev.local", [ca.certificate]),
                         refused_linger=1.0, max_refused=2, max_connections=3)
        backend = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # takes, never answers
        await front.bind()
        front.start(backend.sockets[0].getsockname()[1])
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        try:
            refused = [await asyncio.open_connection("127.0.0.1", front.port, ssl=client) for _ in range(3)]
            assert await asyncio.wait_for(refused[0][0].read(), 2) == b""  # the oldest made room
            assert front.counts["refused_evicted"] == 1 and len(front.refused) == 2
            # Two refused and one silent connection are all max_connections allows: the next is shed.
            silent = await asyncio.open_connection("127.0.0.1", front.port)
            await asyncio.sleep(0.1)
            shed = await asyncio.open_connection("127.0.0.1", front.port)
            assert await asyncio.wait_for(shed[0].read(), 2) == b"" and front.counts["busy"] == 1
            for r, _ in refused[1:]:  # answered (nothing to answer here), then closed
                assert await asyncio.wait_for(r.read(), 3) == b""
            assert not front.refused and len(front.connections) == 1  # the silent one, until its timeout
            for _, w in (*refused, silent, shed):
                w.close()
        finally:
            front.close()
            await front.abort()
            backend.close()
    asyncio.run(scenario())


def test_peers_refuse_an_unknown_connection_and_forget_a_closed_one() -> None:
    ca = make_ca()
    peers = Peers("dev.local", [ca.certificate])
    with pytest.raises(IdentityError, match="did not come through the TLS front"):
        peers.identity("ipv4:127.0.0.1:4242")
    key = peers.add(4242, IdentityError("certificate expired at then"))
    with pytest.raises(IdentityError, match="expired at then"):
        peers.identity(key)
    # An accepted chain stops working the moment its certificate expires, connection open or not.
    soon = make_leaf(ca, [AGENT], not_after=datetime.now(timezone.utc) + timedelta(seconds=2))
    verdict = peers.judge([soon.certificate.public_bytes(Encoding.DER)])
    assert isinstance(verdict, list)
    key = peers.add(4242, verdict)
    assert peers.identity(key).spiffe_id == AGENT
    time.sleep(2.1)
    with pytest.raises(IdentityError, match="expired at"):
        peers.identity(key)
    with pytest.raises(IdentityError, match="did not come through"):
        peers.identity("ipv4:127.0.0.2:4242")  # another loopback address, the same port: not ours
    peers.remove(key)
    with pytest.raises(IdentityError, match="did not come through"):  # a closed connection is forgotten
        peers.identity(key)
