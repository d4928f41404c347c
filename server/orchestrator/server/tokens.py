"""Opaque, tamper-evident tokens (page tokens, watch cursors): payload + HMAC-SHA256."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from orchestrator.server.errors import InvalidArgument


class TokenCodec:
    """Signs and checks tokens with a server-wide key (kept in the store, shared by replicas)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sign(self, kind: str, body: bytes) -> bytes:
        return hmac.new(self._key, kind.encode() + b"\0" + body, hashlib.sha256).digest()[:16]

    def encode(self, kind: str, payload: dict[str, Any]) -> str:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        raw = self._sign(kind, body) + body
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def decode(self, kind: str, token: str, *, field: str) -> dict[str, Any]:
        """The payload of a token this server made for `kind`; INVALID_ARGUMENT otherwise."""
        problem = InvalidArgument(
            f"{field} is not a token this service issued",
            reason="INVALID_PAGE_TOKEN" if kind == "page" else "INVALID_CURSOR",
        )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise problem from None
        signature, body = raw[:16], raw[16:]
        if len(signature) != 16 or not hmac.compare_digest(signature, self._sign(kind, body)):
            raise problem
        try:
            payload = json.loads(body)
        except ValueError:
            raise problem from None
        if not isinstance(payload, dict):
            raise problem
        return payload
