"""The `orchestrator` CLI, run in-process against a real server: output, exit codes, errors."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from typer.testing import CliRunner, Result

from orchestrator.client import OrchestratorClient
from orchestrator.client.cli import app
from orchestrator.server.app import Server
from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import EXAMPLES, plan_of

Invoke = Callable[..., Coroutine[Any, Any, Result]]
runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet_server_logs() -> Iterator[None]:
    """The server shares this process: keep its log lines out of the CLI's captured stdout."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(io.StringIO()))
    yield
    structlog.configure(**saved)


@pytest.fixture
async def client(server: Server, tenant: str) -> AsyncIterator[OrchestratorClient]:
    async with OrchestratorClient(server.address, tenant) as c:
        yield c


@pytest.fixture
def invoke(server: Server, tenant: str) -> Invoke:
    """Run `orchestrator ARGS...` in a thread (the server runs on this test's loop)."""

    async def run(*args: str, env: dict[str, str] | None = None) -> Result:
        environment = {
            "ORCHESTRATOR_ADDRESS": server.address,
            "ORCHESTRATOR_TENANT": tenant,
            **(env or {}),
        }
        return await asyncio.to_thread(runner.invoke, app, list(args), env=environment)

    return run


def write(tmp_path: Path, name: str, plan: pb.ExecutablePlan | dict[str, Any]) -> str:
    from google.protobuf import json_format

    data = json_format.MessageToDict(plan) if isinstance(plan, pb.ExecutablePlan) else plan
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def plans(tmp_path: Path) -> dict[str, str]:
    """Plan files: quick, failing, slow, asking a person, invalid, echoing its parameters."""
    return {
        "quick": write(
            tmp_path,
            "quick.json",
            plan_of(*({"stepId": f"s{i}", "tool": "core.echo"} for i in range(3))),
        ),
        "failing": write(
            tmp_path,
            "failing.json",
            plan_of({"stepId": "f", "tool": "core.fail", "parameters": {"message": "boom"}}),
        ),
        "slow": write(
            tmp_path,
            "slow.json",
            plan_of({"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 30}}),
        ),
        "steps": write(
            tmp_path,
            "steps.json",
            plan_of(
                *(
                    {"stepId": f"w{i}", "tool": "core.wait", "parameters": {"seconds": 0.1}}
                    for i in range(4)
                )
            ),
        ),
        "ask": write(
            tmp_path,
            "ask.json",
            plan_of(
                {
                    "stepId": "ask",
                    "tool": "core.clarify",
                    "parameters": {"category": "input", "prompt": "How many?"},
                }
            ),
        ),
        "invalid": write(
            tmp_path,
            "invalid.json",
            plan_of(
                {"stepId": "a", "tool": "core.echo", "dependsOn": ["ghost"]},
                {"stepId": "b", "tool": "core.echo", "dependsOn": ["b"]},
            ),
        ),
        "params": write(
            tmp_path,
            "params.json",
            plan_of(
                {
                    "stepId": "p",
                    "tool": "core.echo",
                    "parameters": {
                        "n": "{{ params.n }}",
                        "name": "{{ params.name }}",
                        "obj": "{{ params.obj }}",
                        "v": "{{ vars.v }}",
                    },
                }
            ),
        ),
    }


def ok(result: Result, code: int = 0) -> Result:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def run_id_of(result: Result) -> str:
    data = json.loads(result.stdout)
    return str(data["runId"])


# ---------------------------------------------------------------- execute


async def test_execute_prints_the_run_as_a_table_or_json(
    invoke: Invoke, plans: dict[str, str], client: OrchestratorClient
) -> None:
    table = ok(await invoke("execute", plans["quick"], "--triggered-by", "cli"))
    assert "run" in table.stdout and "status" in table.stdout
    as_json = ok(await invoke("execute", plans["quick"], "--output", "json"))
    response = json.loads(as_json.stdout)
    assert response["success"] is True
    uuid.UUID(response["runId"])
    runs = [e async for e in client.list()]
    assert runs[0].run_id == response["runId"]
    # The table named the first run by its id.
    assert runs[1].run_id in table.stdout
    assert runs[1].triggered_by == "cli"


async def test_execute_params_vars_wait_exit_codes(
    invoke: Invoke, plans: dict[str, str], client: OrchestratorClient
) -> None:
    done = ok(
        await invoke(
            "execute",
            plans["params"],
            "--param",
            "n=5",
            "--param",
            "name=ada",
            "-p",
            'obj={"a": [1, true]}',
            "--var",
            "v=null",
            "--wait",
            "-o",
            "json",
        )
    )
    final = json.loads(done.stdout)
    assert final["status"] == "EXECUTION_STATUS_COMPLETED"
    assert final["results"]["p"] == {"n": 5, "name": "ada", "obj": {"a": [1, True]}, "v": None}
    table = ok(await invoke("execute", plans["quick"], "--wait"))
    assert "COMPLETED" in table.stdout
    assert table.stdout.strip().splitlines()[-1].endswith("COMPLETED")
    failed = ok(await invoke("execute", plans["failing"], "--wait"), 1)
    assert "FAILED" in failed.stdout and "boom" in failed.stdout


async def test_execute_watch_dry_run_and_idempotency_key(
    invoke: Invoke, plans: dict[str, str]
) -> None:
    watched = ok(await invoke("execute", plans["steps"], "--watch"))
    lines = watched.stdout.strip().splitlines()
    # The run id first, so that another terminal can pause or cancel it meanwhile.
    assert lines[0].startswith("run ") and lines[-1].startswith(lines[0] + " ")
    uuid.UUID(lines[0].split()[1])
    assert "SNAPSHOT" in lines[1]
    assert sum("STEP_COMPLETED" in line for line in lines) == 4
    assert "RUN_STATUS_CHANGED" in lines[-2] and "COMPLETED" in lines[-2]
    assert lines[-1].startswith("run ") and lines[-1].endswith("COMPLETED")
    failed = ok(await invoke("execute", plans["failing"], "--watch", "-o", "json"), 1)
    events = [json.loads(line) for line in failed.stdout.splitlines()]
    assert events[-1]["type"] == "EVENT_TYPE_RUN_STATUS_CHANGED"
    assert events[-1]["execution"]["status"] == "EXECUTION_STATUS_FAILED"
    dry = json.loads(ok(await invoke("execute", plans["quick"], "--dry-run", "-o", "json")).stdout)
    assert dry["execution"]["dryRun"] is True
    first = await invoke("execute", plans["quick"], "--idempotency-key", "k1", "-o", "json")
    again = await invoke("execute", plans["quick"], "--idempotency-key", "k1", "-o", "json")
    assert run_id_of(ok(first)) == run_id_of(ok(again))
    reused = ok(await invoke("execute", plans["steps"], "--idempotency-key", "k1"), 1)
    assert reused.stderr.startswith("error: ALREADY_EXISTS IDEMPOTENCY_KEY_REUSED: ")


async def test_an_invalid_plan_prints_reason_and_violations_without_traceback(
    invoke: Invoke, plans: dict[str, str], tmp_path: Path
) -> None:
    result = ok(await invoke("execute", plans["invalid"]), 1)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT VALIDATION_FAILED: ")
    assert '  - executable_plan.flows[0].steps[0].depends_on[0]: unknown step "ghost"' in lines
    assert any(
        line.startswith("  - executable_plan.flows[0].steps[1].depends_on[0]: ") for line in lines
    )
    assert result.stdout == ""
    # Not allowed by the security context: PERMISSION_DENIED, unless validation is off.
    denied_plan = plan_of({"stepId": "e", "tool": "core.echo"})
    denied_plan.security_context.ClearField("allowed_tools")
    denied = write(tmp_path, "denied.json", denied_plan)
    result = ok(await invoke("execute", denied), 1)
    assert result.stderr.startswith("error: PERMISSION_DENIED CAPABILITY_DENIED: ")
    assert "  - " in result.stderr
    ok(await invoke("execute", denied, "--no-validate-capabilities", "--wait"))


async def test_usage_errors_exit_2(invoke: Invoke, plans: dict[str, str], tmp_path: Path) -> None:
    missing = ok(await invoke("execute", str(tmp_path / "nowhere.json")), 2)
    assert "nowhere.json" in missing.stderr
    (tmp_path / "bad.json").write_text("{not json")
    ok(await invoke("execute", str(tmp_path / "bad.json")), 2)
    ok(await invoke("execute", plans["quick"], "--param", "novalue"), 2)
    ok(await invoke("execute", plans["quick"], "--wait", "--watch"), 2)
    ok(await invoke("get", "x", env={"ORCHESTRATOR_TENANT": ""}), 2)
    ok(await invoke("list", "--status", "sleeping"), 2)
    ok(await invoke("get", "x", "--output", "yaml"), 2)
    # A tenant that is not a UUID is the server's to refuse.
    bad_tenant = ok(await invoke("get", "x", env={"ORCHESTRATOR_TENANT": "nope"}), 1)
    assert bad_tenant.stderr.startswith("error: INVALID_ARGUMENT INVALID_TENANT_ID: ")


async def test_unreachable_server_is_an_error_not_a_traceback(invoke: Invoke) -> None:
    result = ok(await invoke("--address", "127.0.0.1:1", "get", str(uuid.uuid4())), 1)
    assert result.stderr.startswith("error: UNAVAILABLE")


# ---------------------------------------------------------------- get / list


async def test_get_as_table_and_json_and_not_found(
    invoke: Invoke, client: OrchestratorClient
) -> None:
    run = await client.execute(EXAMPLES / "sequential.json", parameters={"name": "ada"}, wait=True)
    table = ok(await invoke("get", run.run_id))
    for text in (run.run_id, "COMPLETED", "greet", "remember", "report", "hello ada"):
        assert text in table.stdout
    data = json.loads(ok(await invoke("get", run.run_id, "-o", "json")).stdout)
    assert data["runId"] == run.run_id
    assert data["status"] == "EXECUTION_STATUS_COMPLETED"
    assert data["results"]["greet"] == {"message": "hello ada"}
    missing = str(uuid.uuid4())
    result = ok(await invoke("get", missing), 1)
    assert (
        result.stderr == f"error: NOT_FOUND EXECUTION_NOT_FOUND: execution '{missing}' not found\n"
    )


async def test_list_filters_limits_and_prints_an_array(
    invoke: Invoke, client: OrchestratorClient, plans: dict[str, str]
) -> None:
    done = [(await client.execute(plans["quick"], dry_run=True)).run_id for _ in range(5)]
    slow = (await client.execute(plans["slow"])).run_id
    everything = json.loads(ok(await invoke("list", "-o", "json", "--page-size", "2")).stdout)
    assert [e["runId"] for e in everything] == [slow, *reversed(done)]
    limited = json.loads(
        ok(await invoke("list", "--status", "completed", "--limit", "3", "-o", "json")).stdout
    )
    assert [e["runId"] for e in limited] == list(reversed(done))[:3]
    active = json.loads(
        ok(await invoke("list", "-s", "RUNNING", "-s", "pending", "-o", "json")).stdout
    )
    assert [e["runId"] for e in active] == [slow]
    table = ok(await invoke("list", "--limit", "2"))
    assert slow in table.stdout and done[-1] in table.stdout and done[0] not in table.stdout
    empty = ok(await invoke("list", "-o", "json", env={"ORCHESTRATOR_TENANT": str(uuid.uuid4())}))
    assert json.loads(empty.stdout) == []
    await client.cancel(slow)


# ---------------------------------------------------------------- watch


async def test_watch_exit_codes_completed_failed_cancelled(
    invoke: Invoke, client: OrchestratorClient, plans: dict[str, str]
) -> None:
    completed = await client.execute(plans["steps"])
    lines = ok(await invoke("watch", completed.run_id)).stdout.strip().splitlines()
    sequences = [int(line.split()[0]) for line in lines[:-1]]
    assert sequences[1:] == list(range(sequences[0] + 1, sequences[0] + len(sequences)))
    assert lines[-1] == f"run {completed.run_id} COMPLETED"
    # A finished run: its snapshot, then the status line.
    again = ok(await invoke("watch", completed.run_id)).stdout.strip().splitlines()
    assert len(again) == 2 and "SNAPSHOT" in again[0]

    failing = await client.execute(plans["failing"])
    failed = ok(await invoke("watch", failing.run_id), 1)
    assert failed.stdout.strip().splitlines()[-1].startswith(f"run {failing.run_id} FAILED: ")

    slow = await client.execute(plans["slow"])
    watcher = asyncio.create_task(invoke("watch", slow.run_id, "-o", "json"))
    async for event in client.watch(slow.run_id):  # until the step runs, whenever we joined
        if any(s.status == pb.STEP_STATUS_RUNNING for s in event.execution.steps):
            break
    await client.cancel(slow.run_id, reason="enough")
    cancelled = ok(await watcher, 2)
    events = [json.loads(line) for line in cancelled.stdout.strip().splitlines()]
    assert events[0]["type"] == "EVENT_TYPE_SNAPSHOT"
    assert events[-1]["execution"]["status"] == "EXECUTION_STATUS_CANCELLED"
    seqs = [int(e["sequence"]) for e in events[1:]]
    assert seqs == sorted(set(seqs))

    missing = ok(await invoke("watch", str(uuid.uuid4())), 1)
    assert missing.stderr.startswith("error: NOT_FOUND EXECUTION_NOT_FOUND: ")


# ---------------------------------------------------------------- pause / resume / cancel / respond


async def test_pause_resume_cancel_in_both_formats(
    invoke: Invoke, client: OrchestratorClient, plans: dict[str, str]
) -> None:
    run = (await client.execute(plans["slow"])).run_id
    paused = ok(await invoke("pause", run, "--reason", "look"))
    assert paused.stdout.startswith(f"run {run} PAUSED")
    assert (await client.get(run)).status == pb.EXECUTION_STATUS_PAUSED
    again = ok(await invoke("pause", run), 1)
    assert again.stderr.startswith("error: FAILED_PRECONDITION PAUSE_FAILED: ")
    resumed = json.loads(ok(await invoke("resume", run, "-o", "json")).stdout)
    assert resumed["success"] is True and resumed["status"] == "EXECUTION_STATUS_RUNNING"
    cancelled = ok(await invoke("cancel", run, "--reason", "done"))
    assert cancelled.stdout.startswith(f"run {run} CANCELLED")
    assert (await client.get(run)).status == pb.EXECUTION_STATUS_CANCELLED
    refused = ok(await invoke("cancel", run, "-o", "json"), 1)
    assert refused.stderr.startswith("error: FAILED_PRECONDITION CANCEL_FAILED: ")
    finished = (await client.execute(plans["quick"], wait=True)).run_id
    not_paused = ok(await invoke("pause", finished), 1)
    assert not_paused.stderr.startswith("error: FAILED_PRECONDITION PAUSE_FAILED: ")
    assert ok(await invoke("resume", run), 1).stderr.startswith(
        "error: FAILED_PRECONDITION RESUME_FAILED: "
    )


async def clarification_of(client: OrchestratorClient, run_id: str) -> str:
    async for event in client.watch(run_id):  # the request, or a snapshot taken after it
        if (
            event.type == pb.EVENT_TYPE_CLARIFICATION_REQUESTED
            or event.execution.pending_clarifications
        ):
            break
    (clar,) = (await client.get(run_id)).pending_clarifications
    return clar.clarification_id


async def test_respond_parses_json_values_else_strings(
    invoke: Invoke,
    client: OrchestratorClient,
    plans: dict[str, str],
) -> None:
    first = (await client.execute(plans["ask"])).run_id
    table = await invoke("respond", first, await clarification_of(client, first), '{"n": [1, 2]}')
    assert first in ok(table).stdout
    final = await client.wait(first, timeout=15)
    assert final.status == pb.EXECUTION_STATUS_COMPLETED
    from google.protobuf import json_format

    assert json_format.MessageToDict(final.results)["ask"] == {"n": [1, 2]}

    second = (await client.execute(plans["ask"])).run_id
    clar = await clarification_of(client, second)
    answered = json.loads(
        ok(
            await invoke("respond", second, clar, "three", "--responded-by", "ops", "-o", "json")
        ).stdout
    )
    ask = next(s for s in answered["steps"] if s["stepId"] == "ask")
    assert ask["output"] == "three"
    assert ask["status"] == "STEP_STATUS_COMPLETED"
    missing = ok(await invoke("respond", second, "nope", "1"), 1)
    assert missing.stderr.startswith("error: NOT_FOUND CLARIFICATION_NOT_FOUND: ")


async def test_signal_sends_a_json_payload_once_per_request_id(
    invoke: Invoke, client: OrchestratorClient, tmp_path: Path
) -> None:
    plan = write(
        tmp_path,
        "signal.json",
        plan_of(
            {
                "stepId": "w",
                "tool": "core.wait_for_signal",
                "parameters": {"signal_name": "paid", "timeout_seconds": 30},
            }
        ),
    )
    run = (await client.execute(plan)).run_id
    sent = ok(await invoke("signal", run, "paid", '{"amount": 3}', "--request-id", "k"))
    assert run in sent.stdout
    again = json.loads(
        ok(await invoke("signal", run, "paid", "{}", "--request-id", "k", "-o", "json")).stdout
    )
    assert again["runId"] == run
    final = await client.wait(run, timeout=15)
    assert final.status == pb.EXECUTION_STATUS_COMPLETED
    from google.protobuf import json_format

    assert json_format.MessageToDict(final.steps[0].output) == {"amount": 3}
    finished = ok(await invoke("signal", run, "paid"), 1)
    assert finished.stderr.startswith("error: FAILED_PRECONDITION SIGNAL_FAILED: ")


async def test_webhook_create_list_deliveries_delete(invoke: Invoke) -> None:
    # The test server has no --http-allow: a loopback target is refused, naming the field.
    refused = ok(await invoke("webhook", "create", "http://127.0.0.1:9/x"), 1)
    assert refused.stderr.startswith("error: INVALID_ARGUMENT VALIDATION_FAILED: ")
    assert "webhook.url" in refused.stderr
    made = json.loads(
        ok(
            await invoke(
                "webhook",
                "create",
                "https://1.1.1.1/in",  # an address literal: nothing is resolved, and no run sends
                "--event",
                "run.status_changed",
                "--label",
                "env=prod",
                "-o",
                "json",
            )
        ).stdout
    )
    assert made["secret"].startswith("whsec_")
    listed = json.loads(ok(await invoke("webhook", "list", "-o", "json")).stdout)
    assert [(w["webhookId"], w.get("secret", "")) for w in listed] == [(made["webhookId"], "")]
    table = ok(await invoke("webhook", "list")).stdout
    assert made["webhookId"] in table and "env=prod" in table
    assert (
        json.loads(
            ok(await invoke("webhook", "deliveries", made["webhookId"], "-o", "json")).stdout
        )
        == []
    )
    ok(await invoke("webhook", "delete", made["webhookId"]))
    gone = ok(await invoke("webhook", "delete", made["webhookId"]), 1)
    assert gone.stderr.startswith("error: NOT_FOUND WEBHOOK_NOT_FOUND: ")


# ---------------------------------------------------------------- serve


def test_serve_flags_set_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr("orchestrator.server.serve.run", seen.append)
    monkeypatch.setenv("ORCHESTRATOR_LEASE_SECONDS", "7")
    result = runner.invoke(
        app,
        [
            "serve",
            "--port",
            "6001",
            "--replica-id",
            "r-1",
            "--retention-seconds",
            "3600",
            "--metrics-port",
            "9464",
            "--heartbeat-seconds",
            "2.5",
            "--max-steps-in-flight",
            "8",
            "--log-level",
            "DEBUG",
            "--no-execute",
        ],
    )
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert settings.port == 6001
    assert settings.replica_id == "r-1"
    assert settings.lease_seconds == 7  # from the environment: no flag given
    assert settings.retention_seconds == 3600
    assert settings.metrics_port == 9464
    assert settings.heartbeat_seconds == 2.5
    assert settings.max_steps_in_flight == 8
    assert settings.log_level == "debug"
    assert settings.execute is False
    result = runner.invoke(app, ["serve", "--lease-seconds", "3"])
    assert seen[-1].lease_seconds == 3
    bad = runner.invoke(app, ["serve", "--log-level", "loud"])
    assert bad.exit_code == 2
    bad = runner.invoke(app, ["serve", "--log-format", "xml"])
    assert bad.exit_code == 2
    assert len(seen) == 2


async def test_retry_goes_on_where_the_run_failed(
    invoke: Invoke, client: OrchestratorClient, tmp_path: Path, plans: dict[str, str]
) -> None:
    flaky = write(
        tmp_path,
        "flaky.json",
        plan_of(
            {"stepId": "a", "tool": "core.echo"},
            {
                "stepId": "b",
                "tool": "core.fail",
                "parameters": {"fail_times": 1, "retryable": False},
            },
        ),
    )
    failed = await client.execute(flaky, wait=True)
    assert failed.execution.status == pb.EXECUTION_STATUS_FAILED
    watched = ok(await invoke("retry", failed.run_id, "--reason", "fixed", "--watch"))
    assert watched.stdout.strip().splitlines()[-1] == f"run {failed.run_id} COMPLETED"
    done = await client.get(failed.run_id)
    assert {s.step_id: s.attempts for s in done.steps} == {"a": 1, "b": 2}
    assert done.retry_count == 1

    # A completed run goes again only from named steps.
    refused = ok(await invoke("retry", failed.run_id), 1)
    assert refused.stderr.startswith("error: FAILED_PRECONDITION RETRY_FAILED: ")
    again = json.loads(ok(await invoke("retry", failed.run_id, "--step", "b", "-o", "json")).stdout)
    assert again["status"] == "EXECUTION_STATUS_RUNNING"
    assert again["retryCount"] == 2
    final = await client.wait(failed.run_id)
    assert {s.step_id: s.attempts for s in final.steps} == {"a": 1, "b": 3}


async def test_events_exports_the_whole_history_as_json_lines(
    invoke: Invoke, client: OrchestratorClient, plans: dict[str, str]
) -> None:
    run = await client.execute(plans["quick"], wait=True)
    lines = ok(await invoke("events", run.run_id)).stdout.splitlines()
    exported = [json.loads(line) for line in lines]
    final = await client.get(run.run_id)
    assert [int(e["sequence"]) for e in exported] == list(range(1, final.last_sequence + 1))
    assert exported[0]["type"] == "EVENT_TYPE_RUN_STATUS_CHANGED"
    assert exported[-1]["execution"]["status"] == "EXECUTION_STATUS_COMPLETED"
    steps = [e["stepId"] for e in exported if e["type"] == "EVENT_TYPE_STEP_COMPLETED"]
    assert steps == ["s0", "s1", "s2"]
    missing = ok(await invoke("events", str(uuid.uuid4())), 1)
    assert missing.stderr.startswith("error: NOT_FOUND ")


async def test_quiet_labels_and_progress_of_a_failed_run(
    invoke: Invoke, client: OrchestratorClient, plans: dict[str, str]
) -> None:
    quiet = ok(await invoke("execute", plans["quick"], "-q", "--label", "env=prod", "-l", "t=a"))
    run_id = quiet.stdout.strip()
    uuid.UUID(run_id)  # the id alone, for RUN=$(orchestrator execute -q ...)
    waited = ok(await invoke("execute", plans["failing"], "-q", "--wait", "--label", "env=dev"), 1)
    failed_id = waited.stdout.strip()
    uuid.UUID(failed_id)
    assert dict((await client.get(run_id)).labels) == {"env": "prod", "t": "a"}

    assert ok(await invoke("list", "-q", "--label", "env=prod")).stdout.split() == [run_id]
    assert ok(await invoke("list", "-q", "--label", "env=prod", "-l", "t=b")).stdout == ""
    assert ok(await invoke("list", "-q", "--plan-id", "test")).stdout.split()[:2] == [
        failed_id,
        run_id,
    ]
    table = ok(await invoke("list", "--label", "env=prod")).stdout
    assert "env=prod,t=a" in table and "test plan" in table
    bad = ok(await invoke("execute", plans["quick"], "--label", "env=not ok"), 1)
    assert bad.stderr.startswith("error: INVALID_ARGUMENT VALIDATION_FAILED: ")
    assert "labels['env']" in bad.stderr
    usage = await invoke("list", "--label", "novalue")
    assert usage.exit_code == 2

    shown = ok(await invoke("get", failed_id)).stdout
    assert "progress" in shown and "100%" not in shown
    assert "0% (0/1 steps completed)" in shown


async def test_execute_with_a_concurrency_key_shows_why_a_run_waits(
    invoke: Invoke, client: OrchestratorClient, plans: dict[str, str]
) -> None:
    keyed = ("--concurrency-key", "deploy/prod", "--priority", "2", "-q")
    first = ok(await invoke("execute", plans["slow"], *keyed)).stdout.strip()
    second = ok(await invoke("execute", plans["slow"], *keyed)).stdout.strip()
    waiting: list[str] = []

    async def opened() -> bool:  # on PostgreSQL, once a replica has claimed it
        waiting.append((await client.get(second)).waiting_reason)
        return waiting[-1] == "CONCURRENCY_KEY"

    for _ in range(200):
        if await opened():
            break
        await asyncio.sleep(0.05)
    shown = ok(await invoke("get", second)).stdout
    assert "PENDING" in shown
    assert "for concurrency key 'deploy/prod' (1 at once)" in shown
    data = json.loads(ok(await invoke("get", second, "-o", "json")).stdout)
    assert (data["waitingReason"], data["priority"]) == ("CONCURRENCY_KEY", 2)
    for run_id in (second, first):
        await client.cancel(run_id)


async def test_plans_and_execute_by_plan_hash(invoke: Invoke, plans: dict[str, str]) -> None:
    ran = await invoke("execute", plans["quick"], "-o", "json")
    assert ran.exit_code == 0, ran.output
    plan_hash = json.loads(ran.output)["execution"]["planHash"]
    listed = await invoke("plans", "list", "-q")
    assert listed.output.split() == [plan_hash]
    table = await invoke("plans", "list")
    assert plan_hash in table.output and "test plan" in table.output
    body = await invoke("plans", "get", plan_hash, "-o", "json")
    assert json.loads(body.output)["flows"][0]["steps"][0]["stepId"] == "s0"
    again = await invoke("execute", "--plan-hash", plan_hash, "--wait", "-o", "json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["planHash"] == plan_hash
    unknown = await invoke("execute", "--plan-hash", "sha256:" + "0" * 64)
    assert unknown.exit_code == 1 and "PLAN_NOT_FOUND" in unknown.output
    both = await invoke("execute", plans["quick"], "--plan-hash", plan_hash)
    assert both.exit_code == 2


async def test_schedule_commands(invoke: Invoke, plans: dict[str, str]) -> None:
    made = await invoke(
        "schedule", "create", plans["quick"], "--id", "nightly", "--cron", "0 9 * * 1-5",
        "--timezone", "Europe/Paris", "--overlap", "buffer_one", "-l", "team=data", "-o", "json",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    schedule = json.loads(made.output)
    assert schedule["scheduleId"] == "nightly" and schedule["overlapPolicy"] == (
        "OVERLAP_POLICY_BUFFER_ONE"
    )
    assert len(schedule["nextFireTimes"]) == 5
    listed = await invoke("schedule", "list")
    assert "nightly" in listed.output and "cron 0 9 * * 1-5 Europe/Paris" in listed.output
    paused = await invoke("schedule", "pause", "nightly")
    assert paused.output.strip() == "schedule nightly paused"
    shown = await invoke("schedule", "get", "nightly")
    assert "paused" in shown.output
    run_id = (await invoke("schedule", "trigger", "nightly", "-q")).output.strip()
    runs = await invoke("list", "-q", "-l", "schedule_id=nightly")
    assert runs.output.split() == [run_id]
    shown = await invoke("schedule", "get", "nightly")
    assert "TRIGGERED" in shown.output and run_id in shown.output
    unpaused = await invoke("schedule", "unpause", "nightly", "-o", "json")
    assert not json.loads(unpaused.output).get("paused", False)
    bad = await invoke("schedule", "create", plans["quick"], "--cron", "99 * * * *")
    assert bad.exit_code == 1 and "schedule.cron" in bad.output
    short = await invoke("schedule", "create", plans["quick"], "--every", "0.5")
    assert short.exit_code == 1 and "schedule.interval" in short.output
    deleted = await invoke("schedule", "delete", "nightly")
    assert deleted.exit_code == 0
    gone = await invoke("schedule", "get", "nightly")
    assert gone.exit_code == 1 and "SCHEDULE_NOT_FOUND" in gone.output
