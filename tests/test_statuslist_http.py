"""The status list as a consumer gets it from a real daemon: only the live range is published (each
token's bit where its idx says, decoded here from the draft alone), a token past the list's end is
refused, and the HTTP conventions of draft-ietf-oauth-status-list §8 (Accept, gzip, time)."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest
from processes import Daemon, wait_for

from agentauthz import errors
from agentauthz.client import Client, Identity, verify_offline
from agentauthz.config import Config
from agentauthz.decision import tokens
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.state import statuslist
from agentauthz.state.keys import _read_private

AGENT = "spiffe://dev.local/agent/alpha"
JWT = "application/statuslist+jwt"


def unpadded(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def claims_of(jwt: str) -> dict[str, Any]:
    return json.loads(unpadded(jwt.split(".")[1]))


def statuses(jwt: str) -> list[int]:
    """Every status a Status List Token holds, decoded from the draft (§4) with nothing of agentauthz:
    ZLIB, then each byte's statuses from its least significant bits up; the list's size is all of them."""
    listing = claims_of(jwt)["status_list"]
    bits, raw = listing["bits"], zlib.decompress(unpadded(listing["lst"]))
    return [byte >> shift & (1 << bits) - 1 for byte in raw for shift in range(0, 8, bits)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("statuslist-http") / "state", {"audiences": ["tools", "data"]}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Client:
    out = tmp_path_factory.mktemp("id")
    issue_svid(ensure_dev_pki(daemon.state_dir), AGENT, out)
    return Client(daemon.api_address, Identity.from_dir(out))


def get(daemon: Daemon, path: str = "/status-list", method: str = "GET",
        **headers: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body as sent) of one request; http.client adds no
    Accept and asks for no encoding but identity unless told."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    try:
        conn.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def status_list(daemon: Daemon, path: str = "/status-list") -> str:
    status, headers, body = get(daemon, path, Accept=JWT)
    assert (status, headers["content-type"]) == (200, JWT) and "content-encoding" not in headers
    return body.decode("ascii")


def idx(token: str) -> int:
    return claims_of(token)["status"]["status_list"]["idx"]


def test_the_list_spans_the_live_range_and_each_token_reads_its_bit(daemon: Daemon, client: Client) -> None:
    minted = [client.mint(f"live-{i}", ["demo:*:read"]) for i in range(7)]
    slots = [idx(m.token) for m in minted]
    assert slots == sorted(set(slots))
    listing = status_list(daemon)
    assert json.loads(unpadded(listing.split(".")[0]))["typ"] == "statuslist+jwt"
    found = statuses(listing)
    assert [found[s] for s in slots] == [0] * 7
    # Nothing has expired yet (the window's base is 0) and these are the latest slots: the list is
    # the live range and its headroom (about 513 bytes decompressed), where it was the 2 MiB window.
    capacity = Config().revocation_capacity
    assert len(found) == statuslist.list_end(0, slots[-1] + 1, capacity)
    assert len(found) == 8 * ((slots[-1] + 1 + statuslist.MIN_HEADROOM + 7) // 8)
    assert len(found) // 8 < 1024 < capacity // 8

    client.revoke(token_id=minted[3].token_id)
    wait_for(lambda: statuses(status_list(daemon))[slots[3]] == 1, 10, "the revoked token's bit")
    found = statuses(status_list(daemon))
    assert [found[s] for s in slots] == [0, 0, 0, 1, 0, 0, 0]
    # The daemon's own consumer reads the same bits.
    jwks = json.loads(get(daemon, "/.well-known/jwks.json")[2])
    with pytest.raises(errors.TokenRevoked):
        verify_offline(minted[3].token, jwks, status_list(daemon))
    assert verify_offline(minted[4].token, jwks, status_list(daemon))["jti"] == minted[4].token_id


def test_a_token_past_the_lists_end_is_refused_never_valid(daemon: Daemon, client: Client) -> None:
    """The draft (§8.3 step 6): an idx out of the list's bounds means no statement, so rejection."""
    real = client.mint("past-the-end", ["demo:*:read"])
    listing = status_list(daemon)
    end = len(statuses(listing))
    assert idx(real.token) < end  # every token handed out before a list was built lies inside it
    claims = claims_of(real.token)
    keys = daemon.state_dir / "keys"
    kid = next(k["kid"] for k in json.loads((keys / "keyring.json").read_text())["keys"]
               if k["state"] == "current")
    # A token the daemon's key signed with the first slot past the list (as a newer one would carry).
    newer = tokens.encode(tokens.build_claims(
        issuer=claims["iss"], audience=claims["aud"], subject=claims["sub"], task="past-the-end",
        grants=claims["grants"], issued_at=claims["iat"], ttl=60, slot=end,
        status_uri=claims["status"]["status_list"]["uri"]), _read_private(keys / f"{kid}.pem", kid), kid)
    jwks = json.loads(get(daemon, "/.well-known/jwks.json")[2])
    with pytest.raises(errors.StatusListTooShort):
        verify_offline(newer, jwks, listing)
    with pytest.raises(IndexError):
        statuses(listing)[end]
    assert verify_offline(real.token, jwks, listing)["jti"] == real.token_id


@pytest.mark.parametrize("path", ["/status-list", "/status-list/data"])
def test_gzip_when_the_client_accepts_it(daemon: Daemon, path: str) -> None:
    plain = status_list(daemon, path)
    for accept_encoding in ("gzip", "br, gzip;q=0.5", "*", "x-gzip", "GZIP"):
        status, headers, body = get(daemon, path, Accept=JWT, Accept_Encoding=accept_encoding)
        assert (status, headers["content-type"], headers.get("content-encoding")) == (200, JWT, "gzip"), \
            accept_encoding
        assert "Accept-Encoding" in headers["vary"] and int(headers["content-length"]) == len(body)
        assert claims_of(gzip.decompress(body).decode("ascii"))["sub"] == claims_of(plain)["sub"]
    for accept_encoding in ("identity", "gzip;q=0", "br", "*;q=0", "gzip;q=nope"):
        status, headers, body = get(daemon, path, Accept_Encoding=accept_encoding)
        assert (status, headers.get("content-encoding")) == (200, None), accept_encoding
        assert claims_of(body.decode("ascii"))["sub"] == claims_of(plain)["sub"]
    status, headers, body = get(daemon, path, "HEAD", Accept_Encoding="gzip")
    assert (status, headers["content-encoding"], body) == (200, "gzip", b"")
    assert int(headers["content-length"]) == len(get(daemon, path, Accept_Encoding="gzip")[2])


def test_the_jwt_is_served_to_whoever_accepts_it_and_406_to_whoever_does_not(daemon: Daemon) -> None:
    for accept in (JWT, "*/*", "application/*", "", "APPLICATION/StatusList+JWT",
                   "application/statuslist+cwt, application/statuslist+jwt;q=0.5",
                   "application/statuslist+cwt, */*;q=0.1"):
        status, headers, body = get(daemon, Accept=accept) if accept else get(daemon)
        assert (status, headers["content-type"]) == (200, JWT), accept
        assert statuses(body.decode("ascii"))
    for accept in ("application/statuslist+cwt", f"{JWT};q=0", "text/html", "application/json",
                   f"{JWT};q=0, */*", "application/*;q=0, application/statuslist+cwt"):
        for path in ("/status-list", "/status-list/data"):
            status, headers, body = get(daemon, path, Accept=accept)
            assert (status, headers["content-type"]) == (406, "application/json"), accept
            assert json.loads(body) == {"error": "not_acceptable", "available": [JWT]}
            assert "Accept" in headers["vary"]
    assert get(daemon, "/status-list", "HEAD", Accept="application/statuslist+cwt")[0] == 406


def test_a_historical_list_is_not_implemented(daemon: Daemon) -> None:
    """No history is kept: a time query is 501 (§8.4), never the current list passed off as an old one."""
    for query in ("?time=1686925000", "?time", "?x=1&time=0"):
        status, headers, body = get(daemon, "/status-list" + query, Accept=JWT)
        assert (status, json.loads(body)) == (501, {"error": "historical_status_not_supported"}), query
    assert get(daemon, "/status-list?x=1", Accept=JWT)[0] == 200  # any other query is ignored


def test_the_live_range_after_a_restart(tmp_path: Path) -> None:
    """Slots minted before a restart stay inside the list, and the next ones follow them."""
    d = Daemon(tmp_path / "state").start()
    try:
        issue_svid(ensure_dev_pki(d.state_dir), AGENT, tmp_path / "id")
        before = Client(d.api_address, Identity.from_dir(tmp_path / "id")).mint("before", ["demo:*:read"])
        d.stop()
        d.start()
        after = Client(d.api_address, Identity.from_dir(tmp_path / "id")).mint("after", ["demo:*:read"])
        found = statuses(status_list(d))
        assert idx(before.token) < idx(after.token) < len(found)
        assert found[idx(before.token)] == found[idx(after.token)] == 0
    finally:
        d.stop()
