"""The terminal chat, used the way a person uses it: in a real pseudo-terminal, through pexpect.

The agent is ``tests/agents/scripted.py``, whose scripted model picks its answer by a keyword in
each message, so every test runs offline in a few seconds.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pexpect
import pytest
from prompt_toolkit.input import create_input

from rtagent import TextDelta, Thinking, ToolFinished, ToolProgress, ToolStarted, TurnFinished
from rtagent._keys import LineEditor, reading
from rtagent._result import TurnMetrics, TurnResult
from rtagent._terminal import _Screen

ROOT = Path(__file__).resolve().parent.parent
RTAGENT = Path(sys.executable).with_name("rtagent")
AGENT = "tests/agents/scripted.py:agent"
BANNER = "rtagent · Scripted · model ByKeyword · exit or Ctrl-D to quit"
# Loading imports the SDK (2-3 s on a busy machine); everything after that is quick.
STARTUP_S = 20
# prompt_toolkit draws "> " as ">" and a cursor move; a dumb terminal gets it as typed.
PROMPT = r">(\x08| )"


def spawn(*args: str, term: str = "xterm") -> pexpect.spawn[str]:
    env = {
        **os.environ,
        "TERM": term,
        "NO_COLOR": "1",
        "LANG": "C.UTF-8",
        # pexpect never answers prompt_toolkit's cursor-position request; a terminal would.
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    env.pop("RTAGENT_MODEL", None)
    return pexpect.spawn(
        str(RTAGENT),
        ["chat", *args],
        cwd=ROOT,
        env=env,
        encoding="utf-8",
        timeout=5,
        dimensions=(40, 120),
    )


@pytest.fixture
def chat() -> Iterator[pexpect.spawn[str]]:
    child = spawn(AGENT)
    child.expect_exact(BANNER, timeout=STARTUP_S)
    yield child
    child.close(force=True)


def say(child: pexpect.spawn[str], text: str) -> None:
    child.expect(PROMPT)
    child.sendline(text)


def leaves_with(child: pexpect.spawn[str], status: int) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status


def test_reply_streams_and_history_is_kept(chat: pexpect.spawn[str]) -> None:
    say(chat, "hello")
    chat.expect_exact("You said: hello (message 1)")
    say(chat, "hello again")
    chat.expect_exact("You said: hello again (message 2)")


def test_thinking_indicator_is_erased_when_text_starts(chat: pexpect.spawn[str]) -> None:
    say(chat, "think first")
    chat.expect(r"thinking\.\.\. 0\.\ds")
    chat.expect_exact("Thought about it.")
    assert str(chat.before).endswith("\r\x1b[K")


def test_tool_indicator_then_result_line(chat: pexpect.spawn[str]) -> None:
    say(chat, "do a lookup")
    chat.expect(r"using delayed_lookup\.\.\. 0\.\ds")
    chat.expect(r"✓ delayed_lookup \(1\.\ds\): Data for 'x' retrieved successfully after a delay\. Second")
    chat.expect_exact("The lookup says: done.")


def test_parallel_tools_and_progress_share_the_indicator(chat: pexpect.spawn[str]) -> None:
    say(chat, "both")
    chat.expect(r"using delayed_lookup\.\.\. 0\.\ds · search\.\.\. 40% searching the catalogue 0\.\ds")
    chat.expect(r"✓ delayed_lookup \(1\.\ds\)")
    chat.expect(r"using search\.\.\. 80% ranking \d\.\ds")
    chat.expect(r"✓ search \(1\.\ds\): 3 books about dogs")
    chat.expect_exact("Both done.")


def test_tool_error_line(chat: pexpect.spawn[str]) -> None:
    say(chat, "broken")
    chat.expect_exact("✗ broken: ValueError: the catalogue is offline")
    chat.expect_exact("The tool failed, sorry.")


def test_failed_turn_prints_one_line_and_the_chat_goes_on(chat: pexpect.spawn[str]) -> None:
    say(chat, "fail")
    chat.expect_exact("Partial answer")
    chat.expect_exact("error: RuntimeError: the model fell over")
    say(chat, "still there?")
    chat.expect_exact("You said: still there?")


def test_ctrl_c_interrupts_a_reply_and_the_prompt_comes_back(chat: pexpect.spawn[str]) -> None:
    say(chat, "a long answer please")
    chat.expect_exact("word5 ")
    chat.sendintr()
    chat.expect_exact("[interrupted]")
    assert "word150" not in str(chat.before)
    say(chat, "next")
    chat.expect_exact("You said: next (message 2)")


def test_a_message_sent_during_a_reply_cuts_it_and_is_answered_next(chat: pexpect.spawn[str]) -> None:
    say(chat, "a long answer please")
    chat.expect_exact("word5 ")
    chat.send("and then?\r")  # typed during the reply: nothing shows until Enter
    chat.expect_exact("[interrupted]")
    reply = str(chat.before).rpartition("word0 ")[2]
    assert "word199" not in reply
    assert "and then" not in reply
    last = reply.split()[-1]
    chat.expect_exact("\r\n> and then?\r\n")
    # The echo is message 2, and the history it was given holds the first reply up to its cut.
    chat.expect_exact(f"You said: and then? (message 2) My last reply was cut off after '{last}'.")
    say(chat, "hello")
    chat.expect_exact("You said: hello (message 3)")


def test_messages_sent_one_after_another_each_cut_the_one_before(chat: pexpect.spawn[str]) -> None:
    say(chat, "a long answer please")
    chat.expect_exact("word3 ")
    chat.send("another long one\r")
    chat.expect_exact("[interrupted]")
    chat.expect_exact("> another long one")
    chat.expect_exact("word3 ")
    chat.send("third\r")
    chat.expect_exact("[interrupted]")
    chat.expect_exact("> third")
    chat.expect_exact("You said: third (message 3) My last reply was cut off after 'word")


def test_the_line_typed_during_a_reply_shows_on_the_status_line(chat: pexpect.spawn[str]) -> None:
    say(chat, "think first")
    chat.expect(r"thinking\.\.\. 0\.\ds")
    chat.send("helpp\x7f\x7flo")  # Backspace twice
    chat.expect(r"thinking\.\.\. \d\.\ds  > hello")
    chat.expect_exact("Thought about it.")
    # Not sent without Enter: it waits at the next prompt.
    chat.expect(PROMPT)
    chat.expect_exact("hello")
    chat.send("\r")
    chat.expect_exact("You said: hello (message 2)\r\n")


def test_ctrl_c_during_a_reply_keeps_the_line_being_typed(chat: pexpect.spawn[str]) -> None:
    say(chat, "a long answer please")
    chat.expect_exact("word5 ")
    chat.send("more")
    chat.sendintr()
    chat.expect_exact("[interrupted]")
    assert "more" not in str(chat.before)
    chat.expect(PROMPT)
    chat.expect_exact("more")
    chat.send("\r")
    chat.expect_exact("You said: more (message 2) My last reply was cut off after 'word")


def test_exit_typed_during_a_reply_leaves(chat: pexpect.spawn[str]) -> None:
    say(chat, "a long answer please")
    chat.expect_exact("word5 ")
    chat.send("exit\r")
    chat.expect_exact("[interrupted]")
    chat.expect_exact("> exit")
    leaves_with(chat, 0)


def test_ctrl_c_interrupts_a_running_tool(chat: pexpect.spawn[str]) -> None:
    say(chat, "lookup")
    # Announced calls start running a moment later; by 0.3 s this one surely has.
    chat.expect(r"using delayed_lookup\.\.\. 0\.[3-9]s")
    chat.sendintr()
    chat.expect_exact("✗ delayed_lookup: interrupted")
    chat.expect_exact("[interrupted]")
    say(chat, "ok")
    chat.expect_exact("You said: ok")


APPROVE = 'approve refund(order="42")? [y/N]'


def test_a_call_that_needs_approval_is_asked_inline_and_runs_once_approved(chat: pexpect.spawn[str]) -> None:
    say(chat, "refund my order")
    chat.expect_exact(APPROVE)
    chat.sendline("y")
    chat.expect(r"✓ refund \(0\.\ds\): Order 42 refunded\.")
    chat.expect_exact("That is settled.")
    say(chat, "thanks")
    chat.expect_exact("You said: thanks (message 2)")


def test_a_rejected_call_never_runs_and_the_reply_goes_on(chat: pexpect.spawn[str]) -> None:
    say(chat, "refund my order")
    chat.expect_exact(APPROVE)
    chat.sendline("")  # the default: no
    chat.expect_exact("That is settled.")
    assert "refunded" not in str(chat.before)


def test_two_waiting_calls_are_asked_one_after_the_other(chat: pexpect.spawn[str]) -> None:
    say(chat, "two refunds please")
    chat.expect_exact('approve refund(order="1")? [y/N]')
    chat.sendline("n")
    chat.expect_exact('approve refund(order="2")? [y/N]')
    chat.sendline("yes")
    chat.expect(r"✓ refund \(0\.\ds\): Order 2 refunded\.")
    chat.expect_exact("That is settled.")
    assert "Order 1 refunded" not in str(chat.before)


def test_ctrl_c_at_an_approval_puts_it_away_and_the_next_message_goes_on(chat: pexpect.spawn[str]) -> None:
    say(chat, "refund my order")
    chat.expect_exact(APPROVE)
    chat.sendintr()
    say(chat, "never mind")
    chat.expect_exact("You said: never mind (message 2)")
    assert "refunded" not in str(chat.before)


def test_approvals_answered_by_piped_lines() -> None:
    piped = subprocess.run(
        [str(RTAGENT), "chat", AGENT],
        input="refund it\ny\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert piped.returncode == 0, piped.stderr
    assert "✓ refund" in piped.stdout
    assert "That is settled." in piped.stdout


def test_a_handoff_says_who_answers_now(chat: pexpect.spawn[str]) -> None:
    say(chat, "a billing question")
    chat.expect_exact("→ billing is answering")
    chat.expect_exact("Billing here: your last invoice is paid.")


def test_a_guardrail_stops_the_reply_at_once_and_says_so(chat: pexpect.spawn[str]) -> None:
    say(chat, "my secret is 42")
    chat.expect_exact("stopped: the input guardrail no_secrets stopped the turn: it holds a secret")
    assert "word" not in str(chat.before)
    say(chat, "hello")
    chat.expect_exact("You said: hello")


def test_ctrl_c_at_the_prompt_does_not_leave(chat: pexpect.spawn[str]) -> None:
    chat.expect(PROMPT)
    chat.sendintr()
    say(chat, "hi")
    chat.expect_exact("You said: hi (message 1)")


@pytest.mark.parametrize("word", ["exit", "quit"])
def test_exit_and_quit_leave_with_status_0(chat: pexpect.spawn[str], word: str) -> None:
    say(chat, word)
    leaves_with(chat, 0)


def test_ctrl_d_leaves_with_status_0(chat: pexpect.spawn[str]) -> None:
    chat.expect(PROMPT)
    chat.sendeof()
    leaves_with(chat, 0)


def test_first_message_waits_for_the_model_to_load() -> None:
    child = spawn(AGENT)
    say(child, "early bird")
    child.expect(r"loading model\.\.\. \d\.\ds", timeout=STARTUP_S)
    child.expect_exact(BANNER, timeout=STARTUP_S)
    child.expect_exact("You said: early bird (message 1)")
    child.close(force=True)


def test_a_message_sent_while_the_model_loads_replaces_the_first() -> None:
    child = spawn(AGENT)
    say(child, "early bird")
    child.expect(r"loading model\.\.\. \d\.\ds", timeout=STARTUP_S)
    child.send("second thoughts\r")
    child.expect_exact("[interrupted]")
    child.expect_exact("> second thoughts")
    child.expect_exact(BANNER, timeout=STARTUP_S)
    child.expect_exact("You said: second thoughts (message 1)")
    child.close(force=True)


STARTUP_FAILURES = [
    (("tests/agents/missing.py",), "rtagent: error: no such file: tests/agents/missing.py"),
    (("tests/agents/scripted.py:not_an_agent",), "is a int, not an agents.Agent"),
    ((AGENT, "--model", "bogus"), "rtagent: error: unknown model spec 'bogus'"),
]


@pytest.mark.parametrize(("args", "message"), STARTUP_FAILURES)
def test_startup_failure_is_one_line_and_status_2(args: tuple[str, ...], message: str) -> None:
    child = spawn(*args)
    child.expect_exact(message, timeout=STARTUP_S)
    leaves_with(child, 2)
    assert "Traceback" not in (child.before or "")


def run_piped(*args: str, stdin: str | None) -> subprocess.CompletedProcess[str]:
    """``rtagent chat`` with ``stdin`` as its input, or /dev/null."""
    env = {key: value for key, value in os.environ.items() if key != "RTAGENT_MODEL"}
    return subprocess.run(
        [str(RTAGENT), "chat", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL if stdin is None else None,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
    )


@pytest.mark.parametrize("stdin", [None, "exit\n", "hello\n"], ids=["devnull", "exit", "message"])
@pytest.mark.parametrize(("args", "message"), STARTUP_FAILURES)
def test_startup_failure_is_one_line_and_status_2_without_a_terminal(
    args: tuple[str, ...], message: str, stdin: str | None
) -> None:
    # Input that ends before the agent has loaded must not hide that it failed to.
    done = run_piped(*args, stdin=stdin)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert message in line


def test_piped_lines_are_the_messages() -> None:
    done = run_piped(AGENT, stdin="hello\nhello again\n")
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        "> hello",
        BANNER,
        "You said: hello (message 1)",
        "",
        "> hello again",
        "You said: hello again (message 2)",
        "",
    ]


def test_dumb_terminal() -> None:
    child = spawn(AGENT, term="dumb")
    # A dumb terminal's prompt cannot print above itself: the banner comes with the first reply.
    say(child, "lookup")
    child.expect_exact(BANNER, timeout=STARTUP_S)
    child.expect(r"using delayed_lookup\.\.\. \d\.\ds")
    child.expect_exact("✓ delayed_lookup")
    assert "\x1b" not in str(child.before).rpartition("using")[2]
    child.expect_exact("The lookup says: done.")
    say(child, "exit")
    leaves_with(child, 0)


def test_the_sdk_is_not_imported_before_the_prompt() -> None:
    heavy = "{'agents', 'openai', 'xllamacpp'}"
    code = f"import sys, rtagent._cli, rtagent._terminal; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the screen on its own ----------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def finished(*, interrupted: bool = False) -> TurnFinished:
    metrics = TurnMetrics(None, 0, None, (), 0.0)
    return TurnFinished(TurnResult(text="", interrupted=interrupted, metrics=metrics))


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> tuple[_Screen, Tty]:
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "40")
    out = Tty()
    return _Screen(out), out


def test_screen_erases_the_status_before_text(screen: tuple[_Screen, Tty]) -> None:
    view, out = screen
    view.show(Thinking())
    view.show(TextDelta("Hi"))
    view.show(TextDelta(" there"))
    view.show(finished())
    assert out.getvalue() == "thinking... 0.0s\r\x1b[KHi there\n\n"


def test_screen_fits_status_and_tool_lines_to_the_width(screen: tuple[_Screen, Tty]) -> None:
    view, out = screen
    view.show(ToolStarted("c1", "a_tool_with_a_long_name", "{}"))
    view.show(ToolProgress("c1", "reading every page of the very long book", 0.25))
    view.show(ToolFinished("c1", "a_tool_with_a_long_name", "line one\nline two " + "x" * 50, None, 1.25))
    lines = out.getvalue().replace("\r\x1b[K", "\n").splitlines()
    assert lines[1].startswith("using a_tool_with_a_long_name... 25% r")
    assert lines[-1].startswith("✓ a_tool_with_a_long_name (1.2s): line")
    assert [len(line) for line in lines[1:]] == [39, 39]
    assert lines[1].endswith("…")
    assert lines[-1].endswith("…")


def test_screen_says_a_cached_result_is_cached_instead_of_its_time(screen: tuple[_Screen, Tty]) -> None:
    view, out = screen
    view.show(ToolStarted("c1", "lookup", "{}"))
    view.show(ToolFinished("c1", "lookup", "facts", None, 0.001, cached=True))
    assert out.getvalue().replace("\r\x1b[K", "\n").splitlines()[-1] == "✓ lookup (cached): facts"


def test_screen_marks_an_interrupted_reply_on_its_last_line(screen: tuple[_Screen, Tty]) -> None:
    view, out = screen
    view.show(TextDelta("Once upon"))
    view.show(finished(interrupted=True))
    assert out.getvalue() == "Once upon [interrupted]\n\n"


def test_screen_colours_only_the_marks(screen: tuple[_Screen, Tty], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR")
    view, out = _Screen(screen[1]), screen[1]
    view.show(ToolStarted("c1", "lookup", "{}"))
    view.show(ToolFinished("c1", "lookup", "", "boom", 0.5))
    assert out.getvalue().endswith("\r\x1b[K\x1b[31m✗\x1b[0m lookup: boom\n")
    assert out.getvalue().startswith("\x1b[2musing lookup... 0.0s\x1b[0m")


def test_screen_shows_the_typed_line_after_the_status_but_never_mid_text(screen: tuple[_Screen, Tty]) -> None:
    view, out = screen
    view.show(Thinking())
    view.typing("hi")
    view.show(TextDelta("Once"))
    view.typing("hi there")
    view.show(finished())
    view.typing("hi there, and a line too long for the rest of the status line")
    view.said("hi there")
    lines = out.getvalue().split("\r\x1b[K")
    assert lines[:2] == ["thinking... 0.0s", "thinking... 0.0s  > hi"]
    assert lines[2] == "Once\n\n> …long for the rest of the status line"
    assert len(lines[2]) == len("Once\n\n") + 39
    assert lines[3] == "> hi there\n"


# -- keys typed during a reply ------------------------------------------------------------------


async def test_keys_are_edited_into_lines_and_the_terminal_mode_is_restored() -> None:
    master, slave = os.openpty()
    typed: list[str] = []
    sent: list[str] = []
    interrupts: list[None] = []
    both_sent = asyncio.Event()

    def enter(line: str) -> None:
        sent.append(line)
        if len(sent) == 2:
            both_sent.set()

    editor = LineEditor(on_change=typed.append, on_enter=enter, on_interrupt=lambda: interrupts.append(None))
    keys = b"one\x7fe\r\x1b[A two  words\x17\x03\x15 \r\x1b[200~pasted\r\nlines\x1b[201~\n"

    async def type_keys_during_a_failing_reply(tty: TextIO) -> None:
        with reading(create_input(tty), editor):
            assert not termios.tcgetattr(slave)[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
            os.write(master, keys)
            await asyncio.wait_for(both_sent.wait(), 5)
            raise RuntimeError("the reply failed")

    with os.fdopen(slave, "r", encoding="utf-8") as tty:
        before = termios.tcgetattr(slave)
        with pytest.raises(RuntimeError, match="the reply failed"):
            await type_keys_during_a_failing_reply(tty)
        assert termios.tcgetattr(slave) == before
    os.close(master)
    assert sent == ["one", "pasted lines"]
    assert interrupts == [None]
    assert typed[:6] == ["o", "on", "one", "on", "one", ""]
    assert " two  " in typed  # Ctrl-W took "words", then Ctrl-U the rest
    assert editor.text == ""
