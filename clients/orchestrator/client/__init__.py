"""The Orchestrator client library and CLI."""
