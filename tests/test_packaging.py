"""Three distributions from one repository: the stubs install alone and call a running server;
the client adds the CLI without the server (issue 17). The wheels are built from this tree,
installed into a fresh virtualenv (their dependencies from the configured package index), and
the server they call runs on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.conftest import sqlite_url
from tests.process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROJECTS = {
    "orchestrator-rpc-stubs": ROOT / "generated",
    "orchestrator-rpc-client": ROOT / "clients",
    "orchestrator-rpc-server": ROOT,
}
# What a service that only wants the stubs gets, and what it must never get.
SERVER_ONLY = {"sqlalchemy", "asyncpg", "alembic", "aiosqlite", "grpcio-health-checking"}
STUBS_SCRIPT = """
import sys
import grpc
from orchestrator.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc

address, tenant = sys.argv[1:]
metadata = (("x-tenant-id", tenant),)
plan = pb.ExecutablePlan(
    plan_id="p",
    name="from the stubs alone",
    flows=[pb.Flow(flow_id="main", steps=[pb.Step(step_id="a", tool="core.echo")])],
    security_context=pb.SecurityContext(allowed_tools=["core.echo"]),
)
with grpc.insecure_channel(address) as channel:
    stub = pb_grpc.OrchestratorServiceStub(channel)
    request = pb.ExecuteRequest(executable_plan=plan, async_execution=False)
    run = stub.Execute(request, metadata=metadata)
    got = stub.GetExecution(pb.GetExecutionRequest(run_id=run.run_id), metadata=metadata)
    print(run.run_id, pb.ExecutionStatus.Name(got.execution.status))
"""


def run(
    *argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def installed(python: Path) -> set[str]:
    done = run(python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check")
    assert done.returncode == 0, done.stderr
    names = {p["name"].lower().replace("_", "-") for p in json.loads(done.stdout)}
    return names - {"pip", "setuptools", "wheel"}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    done = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "-w",
        out,
        *PROJECTS.values(),
    )
    assert done.returncode == 0, done.stderr
    built = {}
    for name in PROJECTS:
        (path,) = out.glob(name.replace("-", "_") + "-*.whl")
        built[name] = path
    return built


def test_one_version_and_internal_pins_agree() -> None:
    meta = {
        name: tomllib.loads((root / "pyproject.toml").read_text())["project"]
        for name, root in PROJECTS.items()
    }
    versions = {m["version"] for m in meta.values()}
    assert len(versions) == 1
    (version,) = versions
    for m in meta.values():
        for dep in m["dependencies"]:
            if dep.startswith("orchestrator-rpc-"):
                assert dep.endswith(f"=={version}"), dep
    assert all(m["name"] != "orchestrator" for m in meta.values()), "PyPI's is someone else's"


def test_each_wheel_holds_its_own_part(wheels: dict[str, Path]) -> None:
    def files(name: str) -> set[str]:
        with zipfile.ZipFile(wheels[name]) as wheel:
            return {n for n in wheel.namelist() if ".dist-info/" not in n}

    assert files("orchestrator-rpc-stubs") == {
        "orchestrator/v1/orchestrator.proto",
        "orchestrator/v1/orchestrator_connect.py",
        "orchestrator/v1/orchestrator_pb2.py",
        "orchestrator/v1/orchestrator_pb2.pyi",
        "orchestrator/v1/orchestrator_pb2_grpc.py",
        "orchestrator/v1/orchestrator_pb2_grpc.pyi",
        "orchestrator/v1/py.typed",
    }
    assert all(f.startswith("orchestrator/client/") for f in files("orchestrator-rpc-client"))
    server = files("orchestrator-rpc-server")
    assert all(f.startswith("orchestrator/server/") for f in server)
    assert "orchestrator/server/store/migrations/versions/0001_initial_schema.py" in server
    assert not any("__pycache__" in f for f in server)


@pytest.mark.subprocess
def test_the_stubs_alone_call_a_server_and_the_client_alone_runs_the_cli(
    tmp_path: Path, wheels: dict[str, Path]
) -> None:
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    pip = (python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
    done = run(*pip, wheels["orchestrator-rpc-stubs"])
    assert done.returncode == 0, done.stderr
    stubs_only = installed(python)
    assert stubs_only == {"orchestrator-rpc-stubs", "grpcio", "protobuf", "typing-extensions"} or (
        stubs_only == {"orchestrator-rpc-stubs", "grpcio", "protobuf"}
    ), stubs_only
    assert run(python, "-c", "import orchestrator.server").returncode != 0
    assert run(python, "-c", "import orchestrator.client").returncode != 0

    # py.typed: a caller's mypy reads the stubs' types (a wrong type is an error).
    script = tmp_path / "call.py"
    script.write_text(STUBS_SCRIPT)
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "from orchestrator.v1 import orchestrator_pb2 as pb\npb.GetExecutionRequest(run_id=1)\n"
    )
    mypy = (BIN / "mypy", "--python-executable", python, "--ignore-missing-imports")
    mypy_env = {**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "mypy-cache")}
    checked = run(*mypy, "--strict", script, cwd=tmp_path, env=mypy_env)
    assert checked.returncode == 0, checked.stdout
    checked = run(*mypy, wrong, cwd=tmp_path, env=mypy_env)
    assert checked.returncode == 1 and '"run_id"' in checked.stdout, checked.stdout

    tenant = str(uuid.uuid4())
    server = ServeProcess(sqlite_url(tmp_path / "o.db"), tmp_path / "serve.log")
    try:
        server.wait_serving()
        called = run(python, script, server.address, tenant, cwd=tmp_path)
        assert called.returncode == 0, called.stderr
        run_id, status = called.stdout.split()
        assert status == "EXECUTION_STATUS_COMPLETED"

        done = run(*pip, wheels["orchestrator-rpc-client"])
        assert done.returncode == 0, done.stderr
        with_client = installed(python)
        assert not (with_client & SERVER_ONLY), with_client
        assert {"typer", "rich", "grpcio-status"} <= with_client
        cli = venv / "bin" / "orchestrator"
        target = ("--address", server.address, "--tenant", tenant)
        got = run(cli, *target, "get", run_id, "-o", "json", cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["status"] == "EXECUTION_STATUS_COMPLETED"
        serve = run(cli, "serve", cwd=tmp_path)
        assert serve.returncode == 2
        assert "pip install orchestrator-rpc-server" in serve.stderr
        print(f"\nstubs alone: {len(stubs_only)} packages; with the client: {len(with_client)}")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.kill()
