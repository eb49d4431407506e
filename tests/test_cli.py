"""The ``rtagent`` command line: parsing, the model spec it chooses, and its wiring."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rtagent
from rtagent import _cli, _terminal


def test_chat_defaults() -> None:
    args = _cli.build_parser().parse_args(["chat"])
    assert args.agent is None
    assert args.model is None


def test_chat_with_agent_and_model() -> None:
    args = _cli.build_parser().parse_args(["chat", "my_agents.py:bot", "--model", "openai:gpt-4.1-mini"])
    assert args.agent == "my_agents.py:bot"
    assert args.model == "openai:gpt-4.1-mini"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        _cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"rtagent {rtagent.__version__}"


def test_chat_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        _cli.main(["chat", "--help"])
    assert exit.value.code == 0
    help = capsys.readouterr().out
    assert "usage: rtagent chat [-h] [--model SPEC] [AGENT]" in help
    assert "$RTAGENT_MODEL" in help


@pytest.mark.parametrize("argv", [[], ["talk"], ["chat", "a.py", "b.py"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        _cli.main(argv)
    assert exit.value.code == 2
    assert "usage: rtagent" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("openai:gpt-4.1", "local", "openai:gpt-4.1"),
        (None, "local", "local"),
        (None, "", None),
        (None, None, None),
    ],
)
def test_model_spec_flag_then_environment_then_the_agents_own(
    monkeypatch: pytest.MonkeyPatch, flag: str | None, env: str | None, expected: str | None
) -> None:
    if env is None:
        monkeypatch.delenv("RTAGENT_MODEL", raising=False)
    else:
        monkeypatch.setenv("RTAGENT_MODEL", env)
    assert _cli.model_spec(flag) == expected


def test_chat_runs_the_terminal_with_the_chosen_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str | None, str | None]] = []

    def fake_chat(reference: str | None = None, spec: str | None = None) -> int:
        calls.append((reference, spec))
        return 7

    monkeypatch.setattr(_terminal, "chat", fake_chat)
    monkeypatch.setenv("RTAGENT_MODEL", "local")
    assert _cli.main(["chat", "bot.py"]) == 7
    assert _cli.main(["chat", "--model", "http://127.0.0.1:8080/v1"]) == 7
    assert calls == [("bot.py", "local"), (None, "http://127.0.0.1:8080/v1")]


def test_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "rtagent", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.strip() == f"rtagent {rtagent.__version__}"
