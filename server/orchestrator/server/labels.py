"""Run labels: Kubernetes label syntax and limits, checked at the edge of Execute and filters."""

from __future__ import annotations

import re
from collections.abc import Mapping

from orchestrator.server.errors import FieldViolation

MAX_LABELS = 64
MAX_NAME = 63
MAX_PREFIX = 253
# A name: at most 63 characters, alphanumeric at both ends, "-", "_" and "." inside.
NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
# A prefix: a DNS subdomain (lower-case labels joined by dots).
PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*")
SYNTAX = (
    'a key is [prefix/]name: a name of at most 63 characters ([A-Za-z0-9] at both ends, "-", '
    '"_", "." inside), a prefix a DNS subdomain of at most 253'
)


def label_violations(labels: Mapping[str, str], path: str) -> list[FieldViolation]:
    """One violation per bad label of `labels` (the field at `path`), and one for too many."""
    violations: list[FieldViolation] = []
    if len(labels) > MAX_LABELS:
        violations.append(FieldViolation(path, f"at most {MAX_LABELS} labels"))
    for key in sorted(labels):
        field = f"{path}[{key!r}]"
        prefix, slash, name = key.rpartition("/")
        if not _is_name(name) or (
            slash and (len(prefix) > MAX_PREFIX or not PREFIX.fullmatch(prefix))
        ):
            violations.append(
                FieldViolation(field, f"key {key[:80]!r} is not a label key: {SYNTAX}")
            )
            continue
        value = labels[key]
        if value and not _is_name(value):
            violations.append(
                FieldViolation(
                    field,
                    f"value {value[:80]!r} is not a label value: empty, or at most 63 "
                    'characters, [A-Za-z0-9] at both ends, "-", "_", "." inside',
                )
            )
    return violations


def _is_name(text: str) -> bool:
    return len(text) <= MAX_NAME and NAME.fullmatch(text) is not None
