"""Settings (pydantic-settings): flags over ORCHESTRATOR_* variables over defaults; a bad
value is one line naming where it came from, the value and what is allowed, exit 2."""

from __future__ import annotations

import os
import subprocess

import pytest

from orchestrator.server.settings import ENV_PREFIX, Settings, SettingsError, parse_args, parser
from tests.process import ORCHESTRATOR


@pytest.mark.subprocess
def test_a_bad_variable_is_one_line_and_exit_2() -> None:
    env = {**os.environ, "ORCHESTRATOR_PORT": "abc"}
    done = subprocess.run(
        [ORCHESTRATOR, "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: ORCHESTRATOR_PORT='abc': input should be a valid integer, "
        "unable to parse string as an integer"
    ]


@pytest.mark.subprocess
def test_a_bad_flag_is_named_with_what_is_allowed() -> None:
    done = subprocess.run(
        [ORCHESTRATOR, "serve", "--log-format", "xml", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert sorted(done.stderr.splitlines()) == [
        "error: --log-format='xml': input should be 'json' or 'console'",
        "error: --port='70000': input should be less than or equal to 65535",
    ]


def test_flags_win_over_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_LEASE_SECONDS", "7")
    monkeypatch.setenv("ORCHESTRATOR_PORT", "6000")
    monkeypatch.setenv("ORCHESTRATOR_EXECUTE", "false")
    settings = parse_args(["--port", "6001", "--log-level", "DEBUG"])
    assert (settings.port, settings.lease_seconds, settings.log_level) == (6001, 7.0, "debug")
    assert settings.execute is False
    assert parse_args(["--execute"]).execute is True


def test_variable_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_MAX_STEPS_IN_FLIGHT", "0")
    monkeypatch.setenv("ORCHESTRATOR_EXECUTE", "perhaps")
    with pytest.raises(SettingsError) as info:
        parse_args([])
    assert sorted(str(info.value).splitlines()) == [
        "ORCHESTRATOR_EXECUTE='perhaps': input should be a valid boolean, "
        "unable to interpret input",
        "ORCHESTRATOR_MAX_STEPS_IN_FLIGHT='0': input should be greater than or equal to 1",
    ]


def test_rules_across_settings_are_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        parse_args(["--tls-cert", "server.pem"])
    assert str(info.value) == "settings: --tls-cert and --tls-key go together"


def test_every_setting_is_a_flag_with_its_variable() -> None:
    """Said once: each field is a flag, and its help names the variable."""
    help_text = " ".join(parser().format_help().split())
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert f"[env {ENV_PREFIX}{name.upper()}" in help_text, name
        assert field.description, name
