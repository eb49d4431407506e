"""The interactive chat behind ``rtagent chat``.

The prompt is up before the SDK is even imported: the agent, the SDK and the model load in the
background while the user types, and the first message waits for them only if it has to. Nothing
here imports ``agents`` or ``openai`` at module level, which is what keeps the prompt instant.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app_or_none, run_in_terminal

from ._events import (
    AgentChanged,
    ApprovalRequested,
    Event,
    TextDelta,
    Thinking,
    ToolFinished,
    ToolProgress,
    ToolStarted,
    TurnFailed,
    TurnFinished,
)
from ._keys import LineEditor, reading

if TYPE_CHECKING:
    from agents import Agent
    from agents.models.interface import Model

    from ._chat import Chat
    from ._turn import Turn

_T = TypeVar("_T")

TICK_S = 0.1
QUIT_WORDS = frozenset({"exit", "quit"})


@dataclass(frozen=True, slots=True)
class _Loaded:
    chat: Chat
    banner: str


@dataclass(eq=False, slots=True)
class _Message:
    """A message to answer; those typed during a reply wait in line to be shown."""

    text: str
    turn: Turn | None = None  # None until sent: the model is still loading
    cut: bool = False  # cut before it was sent: by a message after it, or by Ctrl-C
    shown: bool = False  # already on screen, as the prompt's line


@dataclass(slots=True)
class _Tool:
    name: str
    started: float
    message: str = ""
    fraction: float | None = None


class _Screen:
    """Replies on the terminal: text as it streams, a live status line, a line per tool result.

    The status line is only ever drawn at the start of a line and always erased before anything
    else is written, so it never leaves fragments behind. It also shows the line the user is
    typing, which is therefore out of sight while a reply's text is mid-line.
    """

    def __init__(self, out: TextIO) -> None:
        self._out = out
        # Piped output gets the text and the result lines, not an animation.
        self._live = out.isatty()
        self._ansi = self._live and os.environ.get("TERM", "dumb") != "dumb"
        self._color = self._ansi and "NO_COLOR" not in os.environ
        self._mid_line = False
        self._status_width = 0
        self._waiting: tuple[str, float] | None = None
        self._tools: dict[str, _Tool] = {}
        self._typed = ""

    @property
    def ansi(self) -> bool:
        return self._ansi

    def wait(self, label: str) -> None:
        self._waiting = (label, time.monotonic())
        self.draw()

    def show(self, event: Event) -> None:
        match event:
            case Thinking():
                self.wait("thinking")
            case TextDelta(text=text) if text:
                self.erase()
                self._waiting = None
                self._write(text)
                self._mid_line = not text.endswith("\n")
            case AgentChanged(name=name):
                self.line(f"{name} is answering", self._paint("2", "→"))
                self.draw()
            case ApprovalRequested():
                self._waiting = None  # asked once the reply has ended
                self._end_line()
                self.draw()
            case ToolStarted(call_id=call_id, name=name):
                self._waiting = None
                self._tools[call_id] = _Tool(name, time.monotonic())
                self._end_line()
                self.draw()
            case ToolProgress(call_id=call_id, message=message, fraction=fraction):
                tool = self._tools.get(call_id)
                if tool is not None:
                    tool.message, tool.fraction = message, fraction
                    self.draw()
            case ToolFinished(
                call_id=call_id, name=name, output=output, error=error, duration_s=seconds, cached=cached
            ):
                self._tools.pop(call_id, None)
                if error is None:
                    # A cached result took no time of its own: saying how long it took would mislead.
                    took = "cached" if cached else f"{seconds:.1f}s"
                    self.line(f"{name} ({took}): {output}", self._paint("32", "✓"))
                else:
                    self.line(f"{name}: {error}", self._paint("31", "✗"))
                self.draw()
            case TurnFinished(result=result) if result.interrupted:
                self.interrupted()
            case TurnFailed(error=error, guardrail=guardrail) if guardrail is not None:
                self.end(self._paint("31", f"stopped: {error}"), same_line=True)
            case TurnFinished(result=result) if result.cached:
                self.end(self._paint("2", "[cached]"), same_line=True)
            case TurnFailed(error=error):
                self.end(self._paint("31", f"error: {error}"))
            case TurnFinished():
                self.end()

    def typing(self, text: str) -> None:
        self._typed = text
        self.draw()

    def said(self, text: str) -> None:
        """A message typed during the last reply, as the prompt would have left it."""
        self.erase()
        self._end_line()
        self._write(f"> {text}\n")

    def line(self, text: str, mark: str = "") -> None:
        """A line of its own, squeezed onto one terminal row, after a (one-column) ``mark``."""
        self.erase()
        self._end_line()
        text = _fit(" ".join(text.split()), _width() - 2 if mark else _width())
        self._write(f"{mark} {text}\n" if mark else f"{text}\n")

    def interrupted(self) -> None:
        self.end(self._paint("2", "[interrupted]"), same_line=True)

    def end(self, marker: str = "", *, same_line: bool = False) -> None:
        """Close the reply with an optional marker, leaving a blank line before the next prompt."""
        self._waiting = None
        self._tools.clear()
        self.erase()
        if marker:
            if self._mid_line and same_line:
                self._write(" ")
            else:
                self._end_line()
            self._write(marker)
            self._mid_line = True
        self._end_line()
        self._write("\n")

    def draw(self) -> None:
        if self._mid_line or not self._live:
            return
        status, typed = self._status() or "", self._typed
        if not status and not typed:
            self.erase()
            return
        width = _width()
        if typed:
            # The end of the line is where the user types, so a long line loses its start.
            room = max(width // 2, width - len(status) - 2) if status else width
            typed = "> " + _fit_end(typed, room - 2)
        gap = "  " if status and typed else ""
        status = _fit(status, width - len(typed) - len(gap))
        self.erase()
        self._write((self._paint("2", status) if status else "") + gap + typed)
        self._status_width = len(status) + len(gap) + len(typed)

    async def tick(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(TICK_S)

    def _status(self) -> str | None:
        now = time.monotonic()
        if self._tools:
            parts = []
            for tool in self._tools.values():
                done = f"{tool.fraction:.0%} " if tool.fraction is not None else ""
                said = f"{tool.message} " if tool.message else ""
                parts.append(f"{tool.name}... {done}{said}{now - tool.started:.1f}s")
            return "using " + " · ".join(parts)
        if self._waiting is not None:
            label, since = self._waiting
            return f"{label}... {now - since:.1f}s"
        return None

    def erase(self) -> None:
        if self._status_width:
            # Without ANSI (TERM=dumb) the old status is blanked with spaces instead.
            self._write("\r\x1b[K" if self._ansi else "\r" + " " * self._status_width + "\r")
            self._status_width = 0

    def _end_line(self) -> None:
        if self._mid_line:
            self._write("\n")
            self._mid_line = False

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def _paint(self, sgr: str, text: str) -> str:
        return f"\x1b[{sgr}m{text}\x1b[0m" if self._color else text


def call_text(request: ApprovalRequested) -> str:
    """A call as a person reads it: ``refund(order="42")``."""
    try:
        arguments = json.loads(request.arguments or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        return f"{request.name}({request.arguments})"
    shown = ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in arguments.items())
    return f"{request.name}({shown})"


def _width() -> int:
    # One column short of the edge: a line that fills the row makes some terminals wrap early.
    return max(shutil.get_terminal_size().columns - 1, 20)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _fit_end(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


class _Chat:
    def __init__(self, reference: str | None, spec: str | None) -> None:
        # None when stdin is not a terminal: lines are then read as they are, where the prompt
        # would draw itself around each of them and warn on stderr that its input is no terminal.
        self._prompt: PromptSession[str] | None = PromptSession() if sys.stdin.isatty() else None
        self._loading = asyncio.create_task(_load(reference, spec))
        self._loading.add_done_callback(self._on_loaded)
        self._banner_shown = False
        self._printing: Awaitable[None] | None = None
        # During a reply: the message being answered, the ones typed since, and what is typed now.
        self._current: _Message | None = None
        self._waiting: deque[_Message] = deque()
        self._stop: asyncio.Future[None] | None = None
        self._draft = ""
        self._quit: str | None = None
        self._dismissed: Turn | None = None  # the paused turn whose questions Ctrl-C put away

    async def run(self) -> int:
        while self._quit is None and self._failure() is None:
            self._show_banner(print)
            try:
                resumed = await self._ask_approvals()
            except EOFError:
                break
            if resumed is not None:
                await self._reply(_Message("", resumed, shown=True))
                continue
            draft, self._draft = self._draft, ""
            try:
                text = (await self._read(draft)).strip()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if text in QUIT_WORDS:
                break
            if text and self._failure() is None:
                # A line read from a pipe was never on the screen, as one typed at the prompt is.
                await self._reply(_Message(text, shown=self._prompt is not None))
        if self._prompt is None:
            # Input from a file or a program can end before the agent has loaded, and nobody saw
            # the prompt: the exit status is the only way the caller learns the agent is broken.
            await asyncio.wait([self._loading])
        if (error := self._failure()) is not None:
            print(f"rtagent: error: {_describe(error)}", file=sys.stderr)
            return 2
        return 0

    async def _ask_approvals(self) -> Turn | None:
        """Ask about each call the last reply paused for; the turn that continues it with the
        answers, or ``None`` if nothing waits (or Ctrl-C put the questions away: the next message
        then goes on without those calls)."""
        if not self._loading.done() or self._failure() is not None:
            return None
        chat = self._loading.result().chat
        if not chat.pending or chat.turn is self._dismissed:
            return None
        approved: list[str] = []
        rejected: list[str] = []
        try:
            for request in chat.pending:
                answer = await self._read("", f"approve {call_text(request)}? [y/N] ")
                (approved if answer.strip().lower() in ("y", "yes") else rejected).append(request.call_id)
        except KeyboardInterrupt:
            self._dismissed = chat.turn
            return None
        return chat.resume(approved, rejected)

    async def _read(self, draft: str, prompt: str = "> ") -> str:
        if self._prompt is not None:
            typed: str = await self._prompt.prompt_async(prompt, default=draft)
            return typed
        line: str = await _in_daemon_thread(sys.stdin.readline)
        if not line:
            raise EOFError
        return line

    def _on_loaded(self, loading: asyncio.Task[_Loaded]) -> None:
        # While the prompt is up, the banner (or the failure) must not wait for the next Enter.
        # A dumb terminal's prompt is an app of its own, and cannot print above itself.
        app = get_app_or_none()
        if app is not None and self._failure() is not None:
            app.exit(result="")
        elif self._prompt is not None and app is self._prompt.app:
            # The print may land after Enter was pressed: the reply waits for it (``_send``).
            self._printing = run_in_terminal(functools.partial(self._show_banner, print))

    def _failure(self) -> BaseException | None:
        loading = self._loading
        return loading.exception() if loading.done() and not loading.cancelled() else None

    def _show_banner(self, say: Callable[[str], object]) -> None:
        if self._banner_shown or not self._loading.done() or self._failure() is not None:
            return
        self._banner_shown = True
        say(self._loading.result().banner)

    async def _reply(self, first: _Message) -> None:
        """Answer ``first``, then each message typed and sent while a reply streams: every one cuts
        the reply before it short (``Chat``'s interrupt policy) and is answered right after it."""
        loop = asyncio.get_running_loop()
        screen = _Screen(sys.stdout)
        editor = LineEditor(on_change=screen.typing, on_enter=self._on_enter, on_interrupt=self._interrupt)
        self._waiting.append(first)
        # Ctrl-C is a key while keys are read; when stdin is not a terminal it is still a signal.
        previous = signal.getsignal(signal.SIGINT)
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        ticker = asyncio.create_task(screen.tick())
        try:
            with self._reading_keys(editor, screen):
                while self._waiting and self._failure() is None:
                    message = self._current = self._waiting.popleft()
                    if not message.shown:
                        screen.said(message.text)
                    await self._answer(message, screen)
                if self._quit is not None:
                    screen.said(self._quit)
        finally:
            for message in self._waiting:  # only left when something went wrong
                if message.turn is not None:
                    message.turn.interrupt()
            self._waiting.clear()
            self._current = self._stop = None
            self._draft = editor.text
            ticker.cancel()
            screen.erase()
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)

    def _reading_keys(self, editor: LineEditor, screen: _Screen) -> contextlib.AbstractContextManager[None]:
        if self._prompt is None:  # piped lines are the next messages, not interruptions
            return contextlib.nullcontext()
        return reading(self._prompt.input, editor, paste=sys.stdout if screen.ansi else None)

    async def _answer(self, message: _Message, screen: _Screen) -> None:
        if message.turn is None:
            await self._send(message, screen)
        if message.turn is not None:
            async with message.turn as turn:
                async for event in turn:
                    screen.show(event)

    async def _send(self, message: _Message, screen: _Screen) -> None:
        """Send a message typed before the model was ready: once it has loaded, unless cut first."""
        if self._printing is not None:
            await self._printing
        if not self._loading.done() and not message.cut:
            self._stop = asyncio.get_running_loop().create_future()
            screen.wait("loading model")
            either: set[asyncio.Future[Any]] = {self._loading, self._stop}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            self._stop = None
        if self._failure() is not None:
            screen.erase()
        elif message.cut or not self._loading.done():
            screen.interrupted()
        else:
            self._show_banner(screen.line)
            message.turn = self._loading.result().chat.send(message.text)

    def _on_enter(self, line: str) -> None:
        """A message typed during a reply: it cuts the reply short and is answered next."""
        if self._quit is not None:
            return
        if line in QUIT_WORDS:
            self._quit = line
            self._interrupt()
            return
        current = self._current
        if current is not None and current.turn is not None:
            # Sent at once: the chat interrupts the running turn, and starts this one as soon
            # as that one has ended and saved its history.
            self._waiting.append(_Message(line, self._loading.result().chat.send(line)))
        else:  # the model is still loading: this message replaces the one waiting for it
            self._interrupt()
            self._waiting.append(_Message(line))

    def _interrupt(self) -> None:
        """Ctrl-C: cut the reply short, and the messages waiting after it, sending nothing new."""
        for message in (self._current, *self._waiting):
            if message is not None:
                message.cut = True
                if message.turn is not None:
                    message.turn.interrupt()
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)


async def _load(reference: str | None, spec: str | None) -> _Loaded:
    agent, model = await _in_daemon_thread(functools.partial(_resolve, reference, spec))
    from agents import SQLiteSession

    from ._chat import Chat
    from ._served import ServedModel

    if isinstance(model, ServedModel):
        await model.warm(agent)
        label = model.label
    else:
        label = agent.model if isinstance(agent.model, str) and agent.model else type(model).__name__
    banner = f"rtagent · {agent.name} · model {label} · exit or Ctrl-D to quit"
    return _Loaded(Chat(agent, session=SQLiteSession("terminal"), model=spec), banner)


async def _in_daemon_thread(work: Callable[[], _T]) -> _T:
    """``asyncio.to_thread`` on a daemon thread: leaving the chat must not wait for an import."""
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work())
        except Exception as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="rtagent-load", daemon=True).start()
    return await asyncio.wrap_future(future)


def _resolve(reference: str | None, spec: str | None) -> tuple[Agent[Any], Model]:
    """Import the SDK and the user's agent, and pick the model: run in a thread, as it is slow."""
    from . import _chat  # noqa: F401  (for ``_load``, which would otherwise import it on the loop)
    from ._loading import load_agent
    from ._models import resolve_model

    agent = load_agent(reference)
    return agent, resolve_model(spec, agent)


def _describe(error: BaseException) -> str:
    try:
        from ._errors import describe
    except ImportError:  # the SDK itself failed to import
        return f"{type(error).__name__}: {error}"
    return describe(error)


def chat(reference: str | None = None, spec: str | None = None) -> int:
    """Chat with the agent at ``reference`` on model ``spec`` until exit; returns the exit status."""

    async def main() -> int:
        return await _Chat(reference, spec).run()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
