"""`python -m orchestrator.server` is `orchestrator serve`."""

from orchestrator.client.cli import main

main(["serve"])
