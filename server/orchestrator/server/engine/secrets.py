"""Secret values: a `secret:` prefix marks one. Only the tool sees it; everything the run
records (outputs, errors, events, snapshots) has it replaced by a placeholder."""

from __future__ import annotations

from typing import Any

PREFIX = "secret:"
REDACTED = "[REDACTED]"
# In a "restricted" plan every resolved parameter string is secret; shorter ones than this
# would redact ordinary words in outputs.
MIN_RESTRICTED_LENGTH = 4


def unwrap(value: Any, secrets: set[str]) -> Any:
    """`value` with every `secret:` prefix removed; the secrets are added to `secrets`."""
    if isinstance(value, str):
        if value.startswith(PREFIX):
            secret = value[len(PREFIX) :]
            if secret:
                secrets.add(secret)
            return secret
        return value
    if isinstance(value, dict):
        return {k: unwrap(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v, secrets) for v in value]
    return value


def collect_strings(value: Any, into: set[str]) -> None:
    """Every string of `value` long enough to be worth redacting (restricted plans)."""
    if isinstance(value, str):
        if len(value) >= MIN_RESTRICTED_LENGTH:
            into.add(value)
    elif isinstance(value, dict):
        for item in value.values():
            collect_strings(item, into)
    elif isinstance(value, list):
        for item in value:
            collect_strings(item, into)


def redact(value: Any, secrets: set[str]) -> Any:
    """`value` with every occurrence of a secret replaced by the placeholder."""
    if not secrets:
        return value
    if isinstance(value, str):
        # Longest first, so a secret that contains another is replaced whole.
        for secret in sorted(secrets, key=len, reverse=True):
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    return value
