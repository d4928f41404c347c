"""The README's buf curl walk-through, run verbatim against a live server so it never rots."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from orchestrator.server.app import Server

ROOT = Path(__file__).resolve().parent.parent


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- readme-walkthrough:start -->\s*```sh\n(.*?)```\s*<!-- readme-walkthrough:end -->",
        text,
        re.S,
    )
    assert block, "README.md has no walk-through block"
    return block.group(1)


@pytest.mark.subprocess
async def test_readme_buf_curl_walkthrough(server: Server) -> None:
    script = "set -euo pipefail\nset -x\n" + walkthrough()
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script,
        cwd=ROOT,
        env={**os.environ, "ADDR": server.address},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    output, trace = out.decode(), err.decode()
    assert proc.returncode == 0, f"{trace[-3000:]}\n{output[-2000:]}"
    assert trace.count("+ .venv/bin/buf curl") >= 10, "every command ran"
    for method in (
        "Execute",
        "GetExecution",
        "ListExecutions",
        "WatchExecution",
        "Pause",
        "Resume",
        "Cancel",
    ):
        assert f"orchestrator.v1.OrchestratorService/{method}" in output + trace
    assert '"status": "SERVING"' in output
    assert "EXECUTION_STATUS_COMPLETED" in output  # the watched run ran to its end
    assert '"status": "EXECUTION_STATUS_PAUSED"' in output
    assert '"status": "EXECUTION_STATUS_CANCELLED"' in output
