"""The `orchestrator` command: `serve` the service, or talk to one as a client."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from google.protobuf.message import Message
from rich.console import Group, RenderableType
from rich.live import Live

from orchestrator.client import render
from orchestrator.client.connection import DEFAULT_ADDRESS
from orchestrator.client.errors import OrchestratorError
from orchestrator.client.messages import (
    TERMINAL,
    PlanError,
    load_plan,
    overlap_names,
    schedule_message,
    status_name,
    status_names,
    to_status,
)
from orchestrator.client.sync import SyncOrchestratorClient
from orchestrator.v1 import orchestrator_pb2 as pb

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Orchestrator: run ExecutablePlans and watch them.",
)

# Exit code of `watch` and `execute --wait/--watch` by the run's final status.
EXIT_CODES = {
    pb.EXECUTION_STATUS_COMPLETED: 0,
    pb.EXECUTION_STATUS_FAILED: 1,
    pb.EXECUTION_STATUS_CANCELLED: 2,
}


class Output(StrEnum):
    """How read commands print: rich tables, or proto3 JSON."""

    table = "table"
    json = "json"


OutputOption = Annotated[
    Output, typer.Option("--output", "-o", help="table, or json (proto3 JSON).")
]
RunArgument = Annotated[str, typer.Argument(help="The run's id.", show_default=False)]
LabelOption = Annotated[
    list[str] | None,
    typer.Option("--label", "-l", help="k=v run label (repeatable).", show_default=False),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print run ids only, one a line (for scripts).")
]
ReasonOption = Annotated[str, typer.Option(help="Why (recorded in the run's event).")]
PlanArgument = Annotated[
    Path | None,
    typer.Argument(
        help="The ExecutablePlan, a proto3 JSON file (or name a stored one: --plan-hash).",
        show_default=False,
    ),
]
PlanHashOption = Annotated[
    str, typer.Option(help="Run the tenant's stored plan of this hash (see `plans list`).")
]
ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="k=v run parameter (v is JSON when it parses)."),
]
VarOption = Annotated[
    list[str] | None,
    typer.Option("--var", help="k=v run variable (v is JSON when it parses)."),
]
TimeoutOption = Annotated[
    float | None, typer.Option(help="Run timeout in seconds.", show_default=False)
]


@dataclass(frozen=True)
class Target:
    """The server and tenant the client commands talk to (global options)."""

    address: str
    tenant: str | None
    api_key: str | None
    correlation_id: str | None
    tls: bool
    root_cert: Path | None
    client_cert: Path | None
    client_key: Path | None

    def client(self) -> SyncOrchestratorClient:
        if not self.tenant:
            raise typer.BadParameter(
                "name the tenant (a UUID) with --tenant or ORCHESTRATOR_TENANT",
                param_hint="--tenant",
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise typer.BadParameter(
                "--client-cert and --client-key go together", param_hint="--client-cert"
            )
        return SyncOrchestratorClient(
            self.address,
            self.tenant,
            correlation_id=self.correlation_id,
            api_key=self.api_key,
            tls=self.tls,
            root_certificates=self.root_cert,
            certificate_chain=self.client_cert,
            private_key=self.client_key,
        )


@app.callback()
def _root(
    ctx: typer.Context,
    address: Annotated[
        str,
        typer.Option(envvar="ORCHESTRATOR_ADDRESS", help="host:port of the server."),
    ] = DEFAULT_ADDRESS,
    tenant: Annotated[
        str | None,
        typer.Option(envvar="ORCHESTRATOR_TENANT", help="Tenant id (a UUID).", show_default=False),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="ORCHESTRATOR_API_KEY",
            help="Sent as `authorization: Bearer <key>`.",
            show_default=False,
        ),
    ] = None,
    correlation_id: Annotated[
        str | None,
        typer.Option(
            envvar="ORCHESTRATOR_CORRELATION_ID",
            help="x-correlation-id of every call.",
            show_default=False,
        ),
    ] = None,
    tls: Annotated[
        bool,
        typer.Option("--tls/--plaintext", envvar="ORCHESTRATOR_TLS", help="Connect with TLS."),
    ] = False,
    root_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="ORCHESTRATOR_ROOT_CERT",
            help="PEM roots to verify the server with (implies --tls).",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    client_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="ORCHESTRATOR_CLIENT_CERT",
            help="PEM client certificate chain for mTLS (implies --tls).",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    client_key: Annotated[
        Path | None,
        typer.Option(
            envvar="ORCHESTRATOR_CLIENT_KEY",
            help="PEM private key of --client-cert.",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Orchestrator: run ExecutablePlans and watch them."""
    ctx.obj = Target(
        address=address,
        tenant=tenant,
        api_key=api_key,
        correlation_id=correlation_id,
        tls=tls,
        root_cert=root_cert,
        client_cert=client_cert,
        client_key=client_key,
    )


# ---------------------------------------------------------------- serve


@app.command(
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def serve(ctx: typer.Context) -> None:
    """Run the gRPC server (needs orchestrator-rpc-server); `serve --help` lists its flags."""
    try:
        from orchestrator.server.serve import main as serve_main
    except ImportError:
        fail("`orchestrator serve` needs the server: pip install orchestrator-rpc-server", 2)
    serve_main(ctx.args)


# ---------------------------------------------------------------- client commands


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def connected(ctx: typer.Context) -> Iterator[SyncOrchestratorClient]:
    """A client for the global options; a failed call prints `error: CODE REASON: message`
    and its field violations, and exits 1."""
    target: Target = ctx.obj
    try:
        with target.client() as client:
            yield client
    except OrchestratorError as err:
        lines = [f"error: {err}"]
        lines += [f"  - {v.field}: {v.description}" for v in err.violations]
        typer.echo("\n".join(lines), err=True)
        raise typer.Exit(1) from None
    except TimeoutError as err:
        fail(f"DEADLINE_EXCEEDED: {err}")
    except OSError as err:
        fail(f"{err.strerror or err}: {err.filename or ''}".rstrip(": "))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def show(output: Output, message: Message, view: RenderableType) -> None:
    """Print `message` as proto3 JSON, or `view` for people."""
    if output is Output.json:
        typer.echo(render.json_text(message))
    else:
        render.console().print(view)


def json_value(text: str) -> Any:
    """`text` as JSON when it parses, else as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def pairs(items: list[str], option: str) -> dict[str, Any]:
    """`k=v` options as a dict, each value JSON when it parses."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint=option)
        out[key] = json_value(value)
    return out


def labels_of(items: list[str], option: str) -> dict[str, str]:
    """`k=v` labels as a dict (values stay strings)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint=option)
        out[key] = value
    return out


def follow(
    client: SyncOrchestratorClient,
    run_id: str,
    output: Output,
    start: pb.Execution | None = None,
) -> pb.ExecutionStatus.ValueType:
    """Print a run's events until it ends: a live view on a terminal, one line per event
    otherwise (one JSON object per line with --output json). Returns the final status.
    With `start` (the run as Execute returned it), the first line is that snapshot and every
    later event follows, however far the run got before the watch began."""
    out = render.console()
    view = render.RunView()

    def events() -> Iterator[pb.ExecutionEvent]:
        if start is None:
            yield from client.watch(run_id)
            return
        snapshot = pb.ExecutionEvent(
            run_id=run_id,
            sequence=start.last_sequence,
            type=pb.EVENT_TYPE_SNAPSHOT,
            message="snapshot",
            execution=start,
        )
        snapshot.timestamp.CopyFrom(start.created_at)
        yield snapshot
        if start.status not in TERMINAL:
            yield from client.watch(run_id, after_sequence=start.last_sequence)

    if output is Output.table and out.is_terminal:
        with Live(view, console=out, refresh_per_second=8, transient=False):
            for event in events():
                view.apply(event)
    else:
        for event in events():
            view.apply(event)
            if output is Output.json:
                typer.echo(render.json_text(event, compact=True))
            else:
                typer.echo(render.event_line(event))
    if output is Output.table:
        view.execution.run_id = view.execution.run_id or run_id
        out.print(render.status_line(view.execution))
    return view.execution.status


def finish(status: pb.ExecutionStatus.ValueType) -> NoReturn:
    raise typer.Exit(EXIT_CODES.get(status, 1))


@app.command()
def execute(
    ctx: typer.Context,
    plan: PlanArgument = None,
    plan_hash: PlanHashOption = "",
    param: ParamOption = None,
    var: VarOption = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and order; call no tool.")] = False,
    idempotency_key: Annotated[
        str, typer.Option(help="The same key and request return the first run.")
    ] = "",
    triggered_by: Annotated[str, typer.Option(help="Who submits the run.")] = "",
    timeout: TimeoutOption = None,
    validate_capabilities: Annotated[
        bool,
        typer.Option(
            "--validate-capabilities/--no-validate-capabilities",
            help="Check tools and capabilities against the plan's security context.",
        ),
    ] = True,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait for the end; exit 0/1/2 as completed/failed/cancelled."),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Show the run live until it ends (exit codes as --wait)."),
    ] = False,
    label: LabelOption = None,
    concurrency_key: Annotated[
        str,
        typer.Option(help="Runs of the tenant with this key run at most --max-concurrent at once."),
    ] = "",
    max_concurrent: Annotated[
        int, typer.Option(help="With --concurrency-key: runs at once (0: 1, a mutex).", min=0)
    ] = 0,
    priority: Annotated[
        int, typer.Option(help="1 (first) to 5 (last) among the tenant's waiting work; 0: 3.")
    ] = 0,
    quiet: QuietOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Submit a plan (or a stored plan, by hash) as a new run."""
    if wait and watch:
        raise typer.BadParameter("choose one of --wait and --watch", param_hint="--watch")
    executable = plan_argument(plan, plan_hash)
    parameters = pairs(param or [], "--param")
    variables = pairs(var or [], "--var")
    labels = labels_of(label or [], "--label")
    with connected(ctx) as client:
        response = client.execute(
            executable,
            parameters=parameters,
            variables=variables,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            timeout=timeout,
            triggered_by=triggered_by,
            validate_capabilities=None if validate_capabilities else False,
            labels=labels,
            concurrency_key=concurrency_key,
            max_concurrent=max_concurrent,
            priority=priority,
            plan_hash=plan_hash,
        )
        if quiet:
            # The id alone, at once, whatever else was asked: `RUN=$(orchestrator execute -q …)`.
            typer.echo(response.run_id)
            if wait or watch:
                finish(client.wait(response.run_id).status)
            return
        if watch:
            if output is Output.table:
                # First, so that another terminal can pause or cancel the run meanwhile.
                render.console().print(f"run {response.run_id}")
            finish(follow(client, response.run_id, output, start=response.execution))
        if wait:
            final = client.wait(response.run_id)
            show(output, final, Group(render.execution_view(final), render.status_line(final)))
            finish(final.status)
        show(output, response, render.execution_view(response.execution))


@app.command()
def get(ctx: typer.Context, run: RunArgument, output: OutputOption = Output.table) -> None:
    """Show one run."""
    with connected(ctx) as client:
        execution = client.get(run)
    show(output, execution, render.execution_view(execution))


@app.command("list")
def list_runs(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status", "-s", help=f"Only runs in this status ({', '.join(status_names())})."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs; 0 for all.", min=0)] = 50,
    triggered_by: Annotated[str, typer.Option(help="Only runs submitted by this caller.")] = "",
    plan_hash: Annotated[str, typer.Option(help="Only runs of this plan hash.")] = "",
    plan_id: Annotated[str, typer.Option(help="Only runs of this plan id.")] = "",
    label: LabelOption = None,
    page_size: Annotated[int, typer.Option(help="Runs fetched per call.", min=1, max=500)] = 100,
    quiet: QuietOption = False,
    output: OutputOption = Output.table,
) -> None:
    """List the tenant's runs, newest first."""
    try:
        statuses = [to_status(s) for s in status or []]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--status") from None
    with connected(ctx) as client:
        executions = list(
            client.list(
                statuses=statuses,
                plan_hash=plan_hash,
                triggered_by=triggered_by,
                labels=labels_of(label or [], "--label"),
                plan_id=plan_id,
                page_size=page_size,
                limit=limit or None,
            )
        )
    if quiet:
        for execution in executions:
            typer.echo(execution.run_id)
    elif output is Output.json:
        typer.echo(render.json_text(executions))
    else:
        render.console().print(render.executions_table(executions))


@app.command()
def watch(ctx: typer.Context, run: RunArgument, output: OutputOption = Output.table) -> None:
    """Follow a run until it ends; exit 0 completed, 1 failed, 2 cancelled."""
    with connected(ctx) as client:
        status = follow(client, run, output)
    finish(status)


@app.command()
def events(
    ctx: typer.Context,
    run: RunArgument,
    follow_run: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing until the run ends."),
    ] = False,
) -> None:
    """A run's whole history, one JSON object (proto3 JSON) per line, for export: every
    event from the first up to now, or with --follow until the run ends."""
    with connected(ctx) as client:
        last = client.get(run).last_sequence
        for event in client.watch(run, from_start=True):
            typer.echo(render.json_text(event, compact=True))
            if not follow_run and event.sequence >= last:
                break


def _transition(
    message: pb.PauseResponse | pb.ResumeResponse | pb.CancelResponse, output: Output
) -> None:
    if output is Output.json:
        typer.echo(render.json_text(message))
        return
    run_id: str = message.run_id
    status = render.styled(status_name(message.status))
    text: str = message.message
    render.console().print(f"run {run_id} {status}" + (f": {text}" if text else ""))


@app.command()
def pause(
    ctx: typer.Context,
    run: RunArgument,
    reason: ReasonOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Pause a run: no new step starts until resumed."""
    with connected(ctx) as client:
        _transition(client.pause(run, reason), output)


@app.command()
def resume(
    ctx: typer.Context,
    run: RunArgument,
    reason: ReasonOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Resume a paused run."""
    with connected(ctx) as client:
        _transition(client.resume(run, reason), output)


@app.command()
def cancel(
    ctx: typer.Context,
    run: RunArgument,
    reason: ReasonOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Cancel a run."""
    with connected(ctx) as client:
        _transition(client.cancel(run, reason), output)


@app.command()
def retry(
    ctx: typer.Context,
    run: RunArgument,
    step: Annotated[
        list[str] | None,
        typer.Option(
            "--step",
            help="A completed step to run again, with everything that depends on it "
            "(repeatable; needed to retry a completed run).",
        ),
    ] = None,
    reason: ReasonOption = "",
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Show the run live until it ends (exit codes as --wait)."),
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Retry a failed or cancelled run in place: completed steps are kept, the rest run again."""
    with connected(ctx) as client:
        execution = client.retry(run, step or (), reason)
        if watch:
            finish(follow(client, run, output, start=execution))
    show(output, execution, render.execution_view(execution))


@app.command()
def respond(
    ctx: typer.Context,
    run: RunArgument,
    clarification: Annotated[
        str,
        typer.Argument(
            help="The clarification's id, or the id of the step that asks (waits for it to ask).",
            show_default=False,
        ),
    ],
    value: Annotated[
        str,
        typer.Argument(help="The answer: JSON when it parses, else a string.", show_default=False),
    ],
    responded_by: Annotated[str, typer.Option(help="Who answers.")] = "",
    output: OutputOption = Output.table,
) -> None:
    """Answer a pending clarification (an approval is one: answer true or false)."""
    with connected(ctx) as client:
        clarification_id = asked(client, run, clarification)
        execution = client.respond(run, clarification_id, json_value(value), responded_by)
    show(output, execution, render.execution_view(execution))


ASK_TIMEOUT = 30.0


def asked(client: SyncOrchestratorClient, run_id: str, key: str) -> str:
    """The id of the clarification `key` names: a clarification id (a UUID) as it is, else
    the one the step `key` asks, waiting (watching the run) until the step asks."""
    try:
        uuid.UUID(key)
        return key
    except ValueError:
        pass

    def pending(execution: pb.Execution) -> str | None:
        for item in execution.pending_clarifications:
            if key in (item.clarification_id, item.step_id):
                return str(item.clarification_id)
        return None

    for event in client.watch(run_id, timeout=ASK_TIMEOUT):
        if event.type == pb.EVENT_TYPE_SNAPSHOT:
            found = pending(event.execution)
        elif event.type == pb.EVENT_TYPE_CLARIFICATION_REQUESTED and event.step_id == key:
            found = pending(client.get(run_id))
        else:
            continue
        if found is not None:
            return found
    # The run ended without asking: let the server say why the answer does not apply.
    return key


def plan_argument(plan: Path | None, plan_hash: str) -> pb.ExecutablePlan | None:
    """The plan file given, or None for a stored plan named by --plan-hash (one of them)."""
    if (plan is None) == (not plan_hash):
        raise typer.BadParameter("give a PLAN file or --plan-hash (one of them)", param_hint="PLAN")
    if plan is None:
        return None
    try:
        return load_plan(plan)
    except PlanError as err:
        raise typer.BadParameter(str(err), param_hint="PLAN") from None


# ---------------------------------------------------------------- schedules and plans

schedule_app = typer.Typer(no_args_is_help=True, help="Schedules: plans that run themselves.")
plans_app = typer.Typer(no_args_is_help=True, help="The tenant's stored plans (by hash).")
app.add_typer(schedule_app, name="schedule")
app.add_typer(plans_app, name="plans")
ScheduleArgument = Annotated[str, typer.Argument(help="The schedule's id.", show_default=False)]


@schedule_app.command("create")
def schedule_create(
    ctx: typer.Context,
    plan: PlanArgument = None,
    plan_hash: PlanHashOption = "",
    schedule_id: Annotated[
        str, typer.Option("--id", help="The schedule's id (default: a new UUID).")
    ] = "",
    cron: Annotated[
        str, typer.Option(help="Five-field cron: minute hour day-of-month month weekday.")
    ] = "",
    every: Annotated[
        float | None,
        typer.Option(help="Fire every this many seconds (at least 1).", show_default=False),
    ] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of --cron (default UTC).")] = "",
    overlap: Annotated[
        str,
        typer.Option(help=f"While the last run is going: {', '.join(overlap_names())}."),
    ] = "skip",
    catchup: Annotated[
        float | None,
        typer.Option(
            help="Run missed fire times at most this many seconds old (default 60).",
            show_default=False,
        ),
    ] = None,
    paused: Annotated[bool, typer.Option(help="Create it paused.")] = False,
    param: ParamOption = None,
    var: VarOption = None,
    timeout: TimeoutOption = None,
    label: LabelOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Create a schedule: a plan that runs itself on a cron or every interval."""
    executable = plan_argument(plan, plan_hash)
    try:
        schedule = schedule_message(
            schedule_id,
            plan=executable,
            plan_hash=plan_hash,
            cron=cron,
            interval=every,
            timezone=timezone,
            overlap=overlap,
            catchup_window=catchup,
            paused=paused,
            parameters=pairs(param or [], "--param"),
            variables=pairs(var or [], "--var"),
            labels=labels_of(label or [], "--label"),
            timeout=timeout,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--overlap") from None
    with connected(ctx) as client:
        made = client.create_schedule(schedule)
    show(output, made, render.schedule_view(made))


@schedule_app.command("list")
def schedule_list(
    ctx: typer.Context, quiet: QuietOption = False, output: OutputOption = Output.table
) -> None:
    """List the tenant's schedules."""
    with connected(ctx) as client:
        schedules = list(client.list_schedules())
    if quiet:
        for schedule in schedules:
            typer.echo(schedule.schedule_id)
    elif output is Output.json:
        typer.echo(render.json_text(schedules))
    else:
        render.console().print(render.schedules_table(schedules))


@schedule_app.command("get")
def schedule_get(
    ctx: typer.Context, schedule_id: ScheduleArgument, output: OutputOption = Output.table
) -> None:
    """Show a schedule: its timing, counters, next fire times and recent actions."""
    with connected(ctx) as client:
        schedule = client.get_schedule(schedule_id)
    show(output, schedule, render.schedule_view(schedule))


@schedule_app.command("pause")
def schedule_pause(
    ctx: typer.Context, schedule_id: ScheduleArgument, output: OutputOption = Output.table
) -> None:
    """Stop a schedule from firing."""
    with connected(ctx) as client:
        schedule = client.pause_schedule(schedule_id)
    show(output, schedule, f"schedule {schedule_id} paused")


@schedule_app.command("unpause")
def schedule_unpause(
    ctx: typer.Context, schedule_id: ScheduleArgument, output: OutputOption = Output.table
) -> None:
    """Let a paused schedule fire again."""
    with connected(ctx) as client:
        schedule = client.unpause_schedule(schedule_id)
    show(output, schedule, render.schedule_view(schedule))


@schedule_app.command("trigger")
def schedule_trigger(
    ctx: typer.Context,
    schedule_id: ScheduleArgument,
    quiet: QuietOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Start one run of the schedule now (paused or not)."""
    with connected(ctx) as client:
        execution = client.trigger_schedule(schedule_id)
    if quiet:
        typer.echo(execution.run_id)
        return
    show(output, execution, render.execution_view(execution))


@schedule_app.command("delete")
def schedule_delete(ctx: typer.Context, schedule_id: ScheduleArgument) -> None:
    """Delete a schedule (its runs stay)."""
    with connected(ctx) as client:
        client.delete_schedule(schedule_id)
    typer.echo(f"schedule {schedule_id} deleted")


@plans_app.command("list")
def plans_list(
    ctx: typer.Context, quiet: QuietOption = False, output: OutputOption = Output.table
) -> None:
    """List the tenant's stored plans, most recently stored first."""
    with connected(ctx) as client:
        stored = list(client.list_plans())
    if quiet:
        for plan in stored:
            typer.echo(plan.plan_hash)
    elif output is Output.json:
        typer.echo(render.json_text(stored))
    else:
        render.console().print(render.plans_table(stored))


@plans_app.command("get")
def plans_get(
    ctx: typer.Context,
    plan_hash: Annotated[str, typer.Argument(help="The plan's hash.", show_default=False)],
    output: OutputOption = Output.table,
) -> None:
    """Show a stored plan (-o json: with its body, ready for `orchestrator execute`)."""
    with connected(ctx) as client:
        stored = client.get_plan(plan_hash)
    if output is Output.json:
        typer.echo(render.json_text(stored.executable_plan))
    else:
        render.console().print(render.plans_table([stored]))


@app.command()
def signal(
    ctx: typer.Context,
    run: RunArgument,
    name: Annotated[str, typer.Argument(help="The signal's name.", show_default=False)],
    payload: Annotated[
        str | None,
        typer.Argument(help="The payload: JSON when it parses, else a string.", show_default=False),
    ] = None,
    request_id: Annotated[
        str, typer.Option(help="Your key for this signal: sent again, it is delivered once.")
    ] = "",
    output: OutputOption = Output.table,
) -> None:
    """Send a signal to a run (a core.wait_for_signal step takes it)."""
    with connected(ctx) as client:
        response = client.signal(
            run, name, json_value(payload) if payload is not None else None, request_id
        )
    if response.duplicate and output is Output.table:
        typer.echo(f"signal {request_id!r} was delivered before; nothing new sent", err=True)
    show(output, response.execution, render.execution_view(response.execution))


webhook_app = typer.Typer(no_args_is_help=True, help="Subscribe URLs to the tenant's run events.")
app.add_typer(webhook_app, name="webhook")
WebhookArgument = Annotated[str, typer.Argument(help="The webhook's id.", show_default=False)]


@webhook_app.command("create")
def webhook_create(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="Where deliveries are POSTed.", show_default=False)],
    event: Annotated[
        list[str] | None,
        typer.Option(help="An event type to deliver (repeatable; none: all).", show_default=False),
    ] = None,
    label: LabelOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Create a webhook; prints its signing secret, the only time it is shown."""
    labels = labels_of(label or [], "--label")
    with connected(ctx) as client:
        webhook = client.create_webhook(url, event or (), labels)
    if output is Output.table:
        typer.echo(f"webhook {webhook.webhook_id}\nsecret  {webhook.secret}")
    else:
        typer.echo(render.json_text(webhook))


@webhook_app.command("list")
def webhook_list(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """List the tenant's webhooks."""
    with connected(ctx) as client:
        webhooks = client.list_webhooks()
    if output is Output.json:
        typer.echo(render.json_text(webhooks))
    else:
        render.console().print(render.webhooks_table(webhooks))


@webhook_app.command("delete")
def webhook_delete(ctx: typer.Context, webhook: WebhookArgument) -> None:
    """Delete a webhook and its queued deliveries."""
    with connected(ctx) as client:
        client.delete_webhook(webhook)
    typer.echo(f"webhook {webhook} deleted")


@webhook_app.command("deliveries")
def webhook_deliveries(
    ctx: typer.Context,
    webhook: WebhookArgument,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1, max=500)] = 50,
    output: OutputOption = Output.table,
) -> None:
    """A webhook's recent deliveries, newest first."""
    with connected(ctx) as client:
        deliveries = client.webhook_deliveries(webhook, limit)
    if output is Output.json:
        typer.echo(render.json_text(deliveries))
    else:
        render.console().print(render.deliveries_table(deliveries))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    app(args=argv)
