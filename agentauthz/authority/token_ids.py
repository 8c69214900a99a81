"""Token ids that carry their revocation slot and expiry, and prove who minted them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from .. import durable
from ..errors import StateError
from .outcomes import UNKNOWN_TOKEN_ID, Refused


class TokenIds:
    """Token ids that carry their revocation slot and expiry, and prove who minted them.

    ``<slot>.<exp>.<mac>`` with an HMAC over slot, expiry and the minting agent:
    Revoke-by-id needs no registry (it survives restarts for free), and only the
    agent that minted a token can name it for revocation.
    """

    def __init__(self, key: bytes, retired: tuple[bytes, ...] = ()) -> None:
        self._key = key
        self._retired = retired  # earlier keys: ids they signed still name their minting agent

    @property
    def key(self) -> bytes:
        return self._key

    @classmethod
    def open(cls, path: Path) -> TokenIds:
        if not path.exists():
            durable.write_new(path, os.urandom(32))
            durable.fsync_dir(path.parent)
        key = path.read_bytes()
        if len(key) != 32:
            raise StateError(f"{path}: token-id key must be 32 bytes")
        return cls(key)

    @staticmethod
    def _mac(key: bytes, slot: int, exp: int, agent: str) -> str:
        digest = hmac.new(key, f"{slot}.{exp}.{agent}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()

    def make(self, slot: int, exp: int, agent: str) -> str:
        return f"{slot}.{exp}.{self._mac(self._key, slot, exp, agent)}"

    def parse(self, token_id: str) -> tuple[int, int, str]:
        """(slot, exp, mac); raises Refused for anything that is not one of our ids."""
        parts = token_id.split(".")
        if len(parts) != 3 or not all(parts) or not parts[0].isdigit() or not parts[1].isdigit():
            raise Refused(UNKNOWN_TOKEN_ID, "not a token id issued here")
        return int(parts[0]), int(parts[1]), parts[2]

    def minted_by(self, token_id: str, agent: str) -> bool:
        slot, exp, mac = self.parse(token_id)
        return any(hmac.compare_digest(mac, self._mac(key, slot, exp, agent))
                   for key in (self._key, *self._retired))
