"""The README's walk-throughs (buf curl, the CLI, the client snippet), run verbatim against a
live server so they never rot."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from orchestrator.server.app import Server

ROOT = Path(__file__).resolve().parent.parent


def walkthrough(name: str = "walkthrough") -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(
        rf"<!-- readme-{name}:start -->\s*```sh\n(.*?)```\s*<!-- readme-{name}:end -->",
        text,
        re.S,
    )
    assert block, f"README.md has no {name} block"
    return block.group(1)


def checked(script: str) -> str:
    """`script` with each command's exit status checked: 0, or N where it says `# exit N`."""
    out = []
    for line in script.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        expected = re.search(r"#\s*exit (\d+)", line)
        code = expected.group(1) if expected else "0"
        out += [
            f"echo {shlex.quote('$ ' + line)}",
            line,
            f'rc=$?; [ "$rc" -eq {code} ] || {{ echo "exit $rc, not {code}: "'
            f"{shlex.quote(line)} >&2; exit 1; }}",
        ]
    return "\n".join(out) + "\n"


async def run_script(*command: str, env: dict[str, str]) -> tuple[int | None, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.subprocess
async def test_readme_buf_curl_walkthrough(server: Server) -> None:
    script = "set -euo pipefail\nset -x\n" + walkthrough()
    code, output, trace = await run_script("bash", "-c", script, env={"ADDR": server.address})
    assert code == 0, f"{trace[-3000:]}\n{output[-2000:]}"
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
    assert output.count('"type": "EVENT_TYPE_STEP_COMPLETED"') == 4  # its whole history
    assert '"status": "EXECUTION_STATUS_PAUSED"' in output
    assert '"status": "EXECUTION_STATUS_CANCELLED"' in output


@pytest.mark.subprocess
async def test_readme_cli_walkthrough(server: Server) -> None:
    bin_dir = str(Path(sys.executable).parent)
    env = {"ORCHESTRATOR_ADDRESS": server.address, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    code, output, errors = await run_script("bash", "-c", checked(walkthrough("cli")), env=env)
    assert code == 0, f"{errors[-3000:]}\n{output[-3000:]}"
    assert "error: INVALID_ARGUMENT VALIDATION_FAILED" in errors
    assert "error: FAILED_PRECONDITION PAUSE_FAILED" in errors
    assert output.count("COMPLETED") >= 5
    assert '"type":"EVENT_TYPE_STEP_COMPLETED"' in output  # `events` printed the history


@pytest.mark.subprocess
async def test_readme_client_snippet(server: Server, tenant: str) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The client library") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet, "README.md has no client snippet"
    code = snippet.group(1).replace("127.0.0.1:50051", server.address)
    code = f"TENANT = {tenant!r}\n" + code
    status, output, errors = await run_script(sys.executable, "-c", code, env={})
    assert status == 0, errors[-3000:]
    assert "STEP_COMPLETED merge" in output
    assert "'fetch': {'items': [1, 2, 3]}" in output
