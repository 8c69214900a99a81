"""Offline verification: a token checked with the JWKS and a Token Status List, without the daemon.

For services that do not call Check. What it cannot know is what the list does not say: a revocation
after the list was fetched (up to its ttl), and a policy change (policy is asked only online).
"""

from __future__ import annotations

import functools
import json
import time
import zlib
from typing import Any, Mapping

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from . import errors
from .decision._bitset_py import Bitset
from .decision._strict_py import b64url_decode, json_object
from .decision._token_py import _time, check_header, valid_public_key
from .decision._verify_py import RevocationIndex, Verifier
from .decision.tokens import ALGORITHM, TOKEN_TYPE
from .state.statuslist import TYP

MAX_LIST_BYTES = 64 << 20  # 512 Mi statuses; a list that inflates past this is refused, not inflated
BOUNDARY = "agentauthz_boundary"  # the daemon's JWKS names each key's trust boundary (audience)


def _keys(jwks: Mapping[str, Any] | str | bytes) -> dict[str, tuple[bytes, str | None]]:
    """kid -> (Ed25519 public key, trust boundary if named) of every EdDSA signing key in ``jwks``."""
    try:
        doc = json.loads(jwks) if isinstance(jwks, (str, bytes)) else jwks
        entries = doc["keys"]
    except (ValueError, TypeError, KeyError):
        raise errors.KeySetInvalid("not a JWK Set") from None
    if not isinstance(entries, list):
        raise errors.KeySetInvalid("keys must be a list")
    keys: dict[str, tuple[bytes, str | None]] = {}
    for jwk in entries:
        if not isinstance(jwk, dict):
            raise errors.KeySetInvalid("a key is not a JSON object")
        if "d" in jwk:
            raise errors.KeySetInvalid("the key set carries a private key; refusing to use it")
        # Other key types, algorithms and uses are not ours to judge: they can verify no EdDSA token.
        if (jwk.get("kty"), jwk.get("crv")) != ("OKP", "Ed25519") or jwk.get("alg", ALGORITHM) != ALGORITHM \
                or jwk.get("use", "sig") != "sig":
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or not kid or not isinstance(x, str) or kid in keys:
            raise errors.KeySetInvalid("each key needs a unique kid and an x")
        try:
            raw = b64url_decode(x)
        except errors.TokenMalformed:
            raise errors.KeySetInvalid(f"key {kid}: x is not canonical base64url") from None
        if len(raw) != 32:
            raise errors.KeySetInvalid(f"key {kid}: x is not a 32-byte Ed25519 key")
        if not valid_public_key(raw):  # RFC 8032 §5.1.3: a small-order key would vouch for forgeries
            raise errors.KeySetInvalid(f"key {kid}: x is not a canonical Ed25519 public key of prime order")
        boundary = jwk.get(BOUNDARY)
        keys[kid] = raw, boundary if isinstance(boundary, str) else None
    return keys


def _unverified_claims(token: str) -> dict[str, Any]:
    # Only to learn which iss/aud to expect when the caller named none; verified right after.
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise errors.TokenMalformed("token must have exactly three segments")
    return json_object(b64url_decode(parts[1]), "claims")


def _verify_token(token: str, keys: dict[str, tuple[bytes, str | None]], issuer: str | None,
                  audience: str | None, now: float, leeway: int, max_lifetime: int) -> Any:
    if issuer is None or audience is None:
        peeked = _unverified_claims(token)
        issuer = peeked.get("iss") if issuer is None else issuer
        audience = peeked.get("aud") if audience is None else audience
        if not isinstance(issuer, str) or not issuer:
            raise errors.TokenIssuerMismatch("token has no iss")
        if not isinstance(audience, str) or not audience:
            raise errors.TokenAudienceMismatch("token has no single aud")
    # The daemon's own pure verifier: strict header, canonical base64url, signature, claims, act chain.
    verifier = Verifier(issuer=issuer, audiences={audience}, token_type=TOKEN_TYPE,
                        revocations=RevocationIndex(Bitset(64)), leeway=leeway, max_lifetime=max_lifetime,
                        cache_size=1)
    verifier.set_keys({kid: key for kid, (key, _) in keys.items()})
    entry = verifier.verify(token, now)
    # A key of another trust boundary (audience) must not vouch for this one's tokens.
    boundary = keys[entry.kid][1]
    if boundary is not None and boundary != entry.claims["aud"]:
        raise errors.TokenAudienceMismatch("signed by a key of another trust boundary")
    return entry


def verify_status_list(status_list: str | bytes, keys: Mapping[str, bytes], *, uri: str, issuer: str,
                       now: float, leeway: int = 30, max_bytes: int = MAX_LIST_BYTES) -> tuple[int, bytes]:
    """(bits per status, the decompressed list) of a Status List Token for ``uri``; raises StatusListError."""
    if isinstance(status_list, bytes):  # an HTTP body as received
        try:
            status_list = status_list.decode("ascii")
        except UnicodeDecodeError:
            raise errors.StatusListInvalid("status list token is not ASCII") from None
    if not isinstance(status_list, str):
        raise errors.StatusListInvalid("status list token must be text")
    if len(status_list) > max_bytes:
        raise errors.StatusListTooLarge("status list token is larger than the list it may inflate to")
    parts = status_list.split(".")
    if len(parts) != 3:
        raise errors.StatusListInvalid("status list token must have exactly three segments")
    head, body, sig = parts
    try:
        # A token's header check: typ statuslist+jwt, EdDSA, kid, no key material, no crit.
        kid = check_header(json_object(b64url_decode(head), "header"), TYP)
        signature, payload = b64url_decode(sig), b64url_decode(body)
        key = keys.get(kid)
        if key is None:
            raise errors.TokenKeyUnknown("status list is signed by a key not in the JWKS")
        if len(signature) != 64:
            raise errors.TokenMalformed("signature must be 64 bytes")
        crypto_sign_open(signature + f"{head}.{body}".encode("ascii"), key)
        claims = json_object(payload, "claims")
        iat, exp = _time(claims, "iat"), _time(claims, "exp")
    except BadSignatureError:
        raise errors.StatusListInvalid("status list signature does not verify") from None
    except errors.TokenError as exc:
        raise errors.StatusListInvalid(f"status list refused: {exc}") from None
    if claims.get("sub") != uri:
        raise errors.StatusListMismatch(f"status list is for {claims.get('sub')!r}, the token names {uri!r}")
    if "iss" in claims and claims["iss"] != issuer:
        raise errors.StatusListMismatch("status list comes from another issuer")
    ttl = claims.get("ttl", exp - iat)
    if type(ttl) is not int or ttl <= 0:
        raise errors.StatusListInvalid("status list ttl must be a positive integer")
    if iat > now + leeway:
        raise errors.StatusListInvalid("status list was issued in the future")
    if now >= min(exp, iat + ttl) + leeway:
        raise errors.StatusListExpired("status list is past its exp or ttl: fetch a fresh one")
    listing = claims.get("status_list")
    bits = listing.get("bits") if isinstance(listing, dict) else None
    lst = listing.get("lst") if isinstance(listing, dict) else None
    if bits not in (1, 2, 4, 8) or type(bits) is not int or not isinstance(lst, str):
        raise errors.StatusListInvalid("status_list needs bits 1, 2, 4 or 8 and an lst")
    return bits, _inflate(lst, max_bytes)


@functools.lru_cache(maxsize=2)  # a service verifies many tokens against one list (or two, at a refresh)
def _inflate(lst: str, max_bytes: int) -> bytes:
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(b64url_decode(lst), max_bytes + 1)  # never more than the cap (+1)
    except (errors.TokenMalformed, zlib.error) as exc:
        raise errors.StatusListInvalid(f"lst is not base64url ZLIB: {exc}") from None
    if len(raw) > max_bytes:
        raise errors.StatusListTooLarge(f"status list inflates past {max_bytes} bytes")
    if not inflater.eof or inflater.unused_data:
        raise errors.StatusListInvalid("lst is a truncated or padded ZLIB stream")
    return raw


def status_at(raw: bytes, bits: int, idx: int) -> int:
    """The status of ``idx``: index i in byte i * bits // 8, least significant bits first (draft §4.1)."""
    byte, offset = divmod(idx * bits, 8)
    if byte >= len(raw):
        raise errors.StatusListTooShort(f"index {idx} lies beyond the status list ({len(raw) * 8 // bits})")
    return raw[byte] >> offset & (1 << bits) - 1


def verify_offline(token: str, jwks: Mapping[str, Any] | str | bytes, status_list: str | bytes, *,
                   issuer: str | None = None, audience: str | None = None, now: float | None = None,
                   leeway: int = 30, max_lifetime: int = 3600,
                   max_list_bytes: int = MAX_LIST_BYTES) -> dict[str, Any]:
    """The claims of ``token`` if it is valid and neither it nor any delegating ancestor is revoked.

    ``jwks``: the daemon's ``/.well-known/jwks.json``; ``status_list``: the body of the list the
    token names (``status.status_list.uri``: ``/status-list``, or ``/status-list/<boundary>``).
    Raises ``errors.TokenError`` (the token; ``TokenRevoked``/``DelegationRevoked`` for a set bit),
    ``errors.StatusListError`` (the list) or ``errors.KeySetInvalid``. ``max_lifetime`` mirrors the
    daemon's ``max_token_lifetime``.
    """
    now = time.time() if now is None else now
    keys = _keys(jwks)
    entry = _verify_token(token, keys, issuer, audience, now, leeway, max_lifetime)
    status = entry.claims["status"]["status_list"]
    uri = status.get("uri")
    if not isinstance(uri, str) or not uri:
        raise errors.TokenClaimsInvalid("status.status_list must carry the uri of its list")
    # Only the token's own boundary may vouch for its status (the daemon publishes each boundary's
    # list signed by its key): a key leaked from another boundary cannot clear this one's revocations.
    # A JWKS that names no boundaries lets any of its keys sign.
    aud = entry.claims["aud"]
    signers = {kid: key for kid, (key, boundary) in keys.items() if boundary is None or boundary == aud}
    bits, raw = verify_status_list(status_list, signers, uri=uri,
                                   issuer=entry.claims["iss"], now=now, leeway=leeway,
                                   max_bytes=max_list_bytes)
    for depth, slot in enumerate(entry.slots):
        if status_at(raw, bits, slot) != 0:
            if depth == 0:
                raise errors.TokenRevoked("the token's status is not valid")
            raise errors.DelegationRevoked(f"delegating ancestor {entry.subjects[depth]} is revoked")
    return dict(entry.claims)
