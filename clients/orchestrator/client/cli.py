"""The `orchestrator` command."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Orchestrator: run ExecutablePlans and watch them.",
)


@app.callback()
def _root() -> None:
    """Orchestrator: run ExecutablePlans and watch them."""


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind [env ORCHESTRATOR_HOST].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind [env ORCHESTRATOR_PORT].")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the store [env ORCHESTRATOR_DATABASE_URL]."),
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(help="json or console [env ORCHESTRATOR_LOG_FORMAT].")
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(
            help="Seconds SIGTERM waits for in-flight work [env ORCHESTRATOR_SHUTDOWN_GRACE]."
        ),
    ] = None,
    execute: Annotated[
        bool | None,
        typer.Option(
            "--execute/--no-execute",
            help="Execute runs, or serve the API only [env ORCHESTRATOR_EXECUTE].",
        ),
    ] = None,
) -> None:
    """Run the gRPC server until SIGTERM."""
    from orchestrator.server.serve import run
    from orchestrator.server.settings import Settings

    settings = Settings()
    if host is not None:
        settings.host = host
    if port is not None:
        settings.port = port
    if database_url is not None:
        settings.database_url = database_url
    if log_format is not None:
        if log_format not in ("json", "console"):
            raise typer.BadParameter("must be json or console", param_hint="--log-format")
        settings.log_format = log_format
    if shutdown_grace is not None:
        settings.shutdown_grace = shutdown_grace
    if execute is not None:
        settings.execute = execute
    run(settings)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    app(args=argv)
