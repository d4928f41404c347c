"""The contract cannot break by accident: `make buf-breaking` (part of `make test`) compares
protos/ with the last released copy, shown here on a scratch copy of the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"
PROTO = Path("protos/orchestrator/v1/orchestrator.proto")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    for name in ("Makefile", "buf.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("protos", "releases"):
        shutil.copytree(ROOT / name, tmp_path / name)
    return tmp_path


def breaking(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(root), "buf-breaking", f"BUF={BUF}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def edit(root: Path, pattern: str, replacement: str) -> None:
    path = root / PROTO
    text, count = re.subn(pattern, replacement, path.read_text(), count=1)
    assert count == 1, pattern
    path.write_text(text)


def test_the_contract_matches_its_release(scratch: Path) -> None:
    done = breaking(scratch)
    assert done.returncode == 0, done.stdout + done.stderr


def test_renumbering_a_field_fails(scratch: Path) -> None:
    edit(scratch, r"(message Execution \{\s*//[^\n]*\s*string run_id = )1;", r"\g<1>99;")
    done = breaking(scratch)
    assert done.returncode != 0
    assert 'field "1" with name "run_id" on message "Execution" was deleted' in done.stdout


def test_an_added_field_passes(scratch: Path) -> None:
    edit(scratch, r"(message Execution \{)", r"\1\n  string scratch_note = 9999;")
    done = breaking(scratch)
    assert done.returncode == 0, done.stdout + done.stderr
