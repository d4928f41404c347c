"""Who may do what: API keys bound to tenants, and tenant capability policies (issue 7).

Both come from JSON files named in the settings and are re-read on SIGHUP. Keys are kept only
as SHA-256 digests and compared in constant time; they are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from orchestrator.server.errors import PermissionDenied, Unauthenticated

log = structlog.get_logger("orchestrator.security")


@dataclass(frozen=True)
class ApiKey:
    """A key's name, the SHA-256 digest of its secret, and the tenants it may act for."""

    name: str
    digest: bytes
    tenants: frozenset[str]


class KeyRing:
    """The API keys of `--auth-keys`: `{"keys": [{"name", "sha256", "tenants": [...]}]}`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: tuple[ApiKey, ...] = ()
        self.reload()

    def reload(self) -> None:
        data = json.loads(self.path.read_text())
        keys = []
        for entry in data["keys"]:
            digest = bytes.fromhex(entry["sha256"])
            if len(digest) != 32:
                raise ValueError(f"key {entry.get('name')!r}: sha256 must be 64 hex digits")
            tenants = frozenset(str(uuid.UUID(t)) for t in entry["tenants"])
            keys.append(ApiKey(str(entry.get("name", "")), digest, tenants))
        self.keys = tuple(keys)
        log.info("security.keys_loaded", keys=len(self.keys))

    def authorize(self, authorization: str, tenant_id: str) -> str:
        """The name of the key `authorization` carries, if it may act for `tenant_id`."""
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated(
                "an API key is required: authorization: Bearer <key>", reason="API_KEY_INVALID"
            )
        presented = hashlib.sha256(secret.strip().encode()).digest()
        found: ApiKey | None = None
        # Compare with every key, in constant time, so timing says nothing about which matched.
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        if found is None:
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        if tenant_id not in found.tenants:
            raise PermissionDenied(
                "the API key may not act for this tenant", reason="TENANT_NOT_ALLOWED"
            )
        return found.name


class TenantPolicy:
    """Capabilities granted per tenant (`--tenant-policy`):
    `{"tenants": {"<uuid>": {"capabilities": [...]}}, "default": {"capabilities": [...]}}`.
    A tenant not listed gets the default, or nothing when there is no default."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._grants: dict[str, frozenset[str]] = {}
        self._default: frozenset[str] = frozenset()
        self._weights: dict[str, float] = {}
        self._default_weight = 1.0
        self.reload()

    def reload(self) -> None:
        data = json.loads(self.path.read_text())
        self._grants = {
            str(uuid.UUID(tenant)): frozenset(entry.get("capabilities", []))
            for tenant, entry in data.get("tenants", {}).items()
        }
        self._default = frozenset(data.get("default", {}).get("capabilities", []))
        self._weights = {
            str(uuid.UUID(tenant)): _weight(entry.get("weight", 1.0), tenant)
            for tenant, entry in data.get("tenants", {}).items()
        }
        self._default_weight = _weight(data.get("default", {}).get("weight", 1.0), "default")
        log.info("security.policy_loaded", tenants=len(self._grants))

    def granted(self, tenant_id: str) -> frozenset[str]:
        return self._grants.get(tenant_id, self._default)

    def weight(self, tenant_id: str) -> float:
        """The tenant's share of step slots relative to the others (default 1)."""
        return self._weights.get(tenant_id, self._default_weight)


def _weight(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1000:
        raise ValueError(f"tenant policy: {where}: weight must be a number in (0, 1000]")
    return float(value)


class ExecuteRateLimiter:
    """Execute calls per tenant: a token bucket per tenant, per replica.

    Any UUID in x-tenant-id names a tenant, so the buckets are bounded: past `max_tenants`
    the least recently used go (a bucket unused for burst/rate seconds is full again, the
    same as none; one dropped earlier forgives that tenant at most one burst)."""

    def __init__(self, rate: float, burst: int, max_tenants: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.max_tenants = max_tenants
        # tenant -> (tokens, last refill), least recently used first.
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        """Tenants with a bucket."""
        return len(self._buckets)

    def take(self, tenant_id: str, now: float) -> float:
        """0 when the call may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        tokens, last = self._buckets.pop(tenant_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[tenant_id] = (tokens, now)
        while len(self._buckets) > self.max_tenants:
            del self._buckets[next(iter(self._buckets))]
        return wait
