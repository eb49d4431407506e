"""What rtagent adds around each tool call: progress reports, honest errors, background finishing,
and a watchdog that names an ``async def`` tool that blocks the event loop; and around each
guardrail: word of its tripwire the moment it fires.

A turn runs copies, made by ``instrument``, of the agent and of every agent it can hand off to,
whose function tools and guardrails are wrapped; the user's agents, tools and guardrails are never
modified.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import logging
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

from agents import Agent, FunctionTool, RunHooks
from agents.guardrail import GuardrailFunctionOutput, InputGuardrail, OutputGuardrail
from agents.handoffs import Handoff
from agents.lifecycle import RunHooksBase
from agents.model_settings import ModelSettings
from agents.models import get_default_model, get_default_model_settings
from agents.models.interface import Model
from agents.run_context import RunContextWrapper
from agents.tool import Tool
from agents.tool_context import ToolContext

from ._unicode import scrub

logger = logging.getLogger("rtagent")


GuardrailKind = Literal["input", "output"]


class ToolSink(Protocol):
    """What the agents of a run report to (the turn that runs them): its tools, guardrails and hooks."""

    def _tool_progress(self, call_id: str, message: str, fraction: float | None) -> None: ...
    def _tool_error(self, call_id: str, text: str) -> None: ...
    def _tool_kept(self, call_id: str, name: str, arguments: str, task: asyncio.Future[Any]) -> None: ...
    def _tool_cache(self, call_id: str, outcome: str, stored_bytes: int) -> None: ...
    def _on_tool_start(self, call_id: str, name: str, arguments: str) -> None: ...
    def _on_tool_end(self, call_id: str, name: str, output: object) -> None: ...
    def _agent_changed(self, name: str) -> None: ...
    def _guardrail_tripped(self, kind: GuardrailKind, name: str, output: GuardrailFunctionOutput) -> None: ...


@dataclass(frozen=True, slots=True)
class _Call:
    sink: ToolSink
    call_id: str
    loop: asyncio.AbstractEventLoop


_current: ContextVar[_Call | None] = ContextVar("rtagent_tool_call", default=None)


def progress(message: str, fraction: float | None = None) -> None:
    """Report what the running tool is doing; the turn emits ``ToolProgress`` at once.

    Works from ``async def`` tools and from plain ``def`` tools (which the SDK runs in a thread).
    Outside a tool call it does nothing, so tools stay callable on their own.
    """
    call = _current.get()
    if call is None:
        return
    if fraction is not None:
        fraction = min(max(fraction, 0.0), 1.0)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is call.loop:
        call.sink._tool_progress(call.call_id, message, fraction)
    else:
        call.loop.call_soon_threadsafe(call.sink._tool_progress, call.call_id, message, fraction)


class _Invoker:
    """A wrapper around a function tool's invoker that the SDK still treats as the invoker.

    The SDK rebinds a tool's invoker to every copy of the tool (so a copy's failure policy is its
    own) and reads markers from it; this forwards both, so wrapping changes nothing else.
    """

    def __init__(self, inner: Callable[[ToolContext[Any], str], Awaitable[Any]], name: str) -> None:
        self._inner = inner
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        if attribute in ("_inner", "_name"):
            raise AttributeError(attribute)
        return getattr(self._inner, attribute)

    def __agents_bind_function_tool__(self, tool: FunctionTool) -> _Invoker:
        bind = getattr(self._inner, "__agents_bind_function_tool__", None)
        clone = copy.copy(self)
        clone._inner = bind(tool) if callable(bind) else self._inner
        return clone


class _Background(_Invoker):
    async def __call__(self, context: ToolContext[Any], arguments: str) -> Any:
        task = asyncio.ensure_future(self._inner(context, arguments))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            call = _current.get()
            if call is not None and not task.done():
                call.sink._tool_kept(call.call_id, self._name, arguments, task)
            else:
                task.cancel()
            raise


class _Reporting(_Invoker):
    def __init__(
        self,
        inner: Callable[[ToolContext[Any], str], Awaitable[Any]],
        name: str,
        sink: ToolSink,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(inner, name)
        self._sink = sink
        self._loop = loop

    async def __call__(self, context: ToolContext[Any], arguments: str) -> Any:
        # The watchdog finds this frame on a blocked loop's stack and reads the tool's name from it.
        token = _current.set(_Call(self._sink, context.tool_call_id, self._loop))
        try:
            output = await self._inner(context, arguments)
        finally:
            _current.reset(token)
        # The output goes to the model, the history and the page, none of which takes these.
        return scrub(output) if isinstance(output, str) else output


def background(tool: FunctionTool) -> FunctionTool:
    """Mark a tool to finish in the background when its turn is interrupted.

    Its output is then recorded in the session when it arrives, instead of being cancelled.
    """
    return replace(tool, on_invoke_tool=_Background(tool.on_invoke_tool, tool.name))


def instrument(
    agent: Agent[Any], sink: ToolSink, model: Callable[[Agent[Any]], Model] | None = None
) -> Agent[Any]:
    """A copy of ``agent``, and of every agent it can hand off to, whose function tools and
    guardrails report to ``sink``; with ``model``, each copy runs on ``model(its original)``."""
    loop = asyncio.get_running_loop()
    _Watchdog.ensure(loop)
    return _Copies(sink, loop, model).of(agent)


class _Copies:
    """The instrumented copies of one run's agents: one per agent, however many handoffs lead to it."""

    def __init__(
        self, sink: ToolSink, loop: asyncio.AbstractEventLoop, model: Callable[[Agent[Any]], Model] | None
    ) -> None:
        self._sink = sink
        self._loop = loop
        self._model = model
        # By ``id``, as agents are unhashable; each original is held, so that its id stays its own.
        self._made: dict[int, tuple[Agent[Any], Agent[Any]]] = {}

    def of(self, agent: Agent[Any]) -> Agent[Any]:
        made = self._made.get(id(agent))
        if made is not None:
            return made[1]
        sink, loop = self._sink, self._loop
        copied = copy.copy(agent)  # ``clone`` would validate every field again: 0.1-0.2 ms a turn
        # Known before its handoffs are copied, so that an agent handing back gets this copy.
        self._made[id(agent)] = (agent, copied)
        copied.tools = [_instrument(t, sink, loop) if isinstance(t, FunctionTool) else t for t in agent.tools]
        copied.input_guardrails = [guarded(g, "input", sink) for g in agent.input_guardrails]
        copied.output_guardrails = [guarded(g, "output", sink) for g in agent.output_guardrails]
        copied.handoffs = [self.of(h) if isinstance(h, Agent) else self._handoff(h) for h in agent.handoffs]
        if self._model is not None:
            # The SDK gives an agent that sets nothing its model's default settings: here the
            # model is rtagent's, whose own defaults apply (as with a model the run config names).
            if agent.model_settings == _default_settings(agent.model):
                copied.model_settings = ModelSettings()
            copied.model = self._model(agent)
        return copied

    def _handoff(self, handoff: Handoff[Any, Any]) -> Handoff[Any, Any]:
        invoke = handoff.on_invoke_handoff

        async def on_invoke_handoff(context: RunContextWrapper[Any], arguments: str) -> Agent[Any]:
            return self.of(await invoke(context, arguments))

        copied = replace(handoff, on_invoke_handoff=on_invoke_handoff)
        target = handoff._agent_ref() if handoff._agent_ref is not None else None
        if isinstance(target, Agent):
            # Copied now rather than at the handoff, so that a bad model spec fails the turn at its
            # start, and a paused run finds the agent it paused in (``RunState`` walks these).
            copied._agent_ref = weakref.ref(self.of(target))
        return copied


def _default_settings(model: str | Model | None) -> ModelSettings:
    """The settings the SDK gives an agent of ``model`` that sets none (only compared, never used)."""
    if isinstance(model, Model):
        return _NO_SETTINGS
    # The SDK's default model is read from the environment on every call.
    return _defaults_of(model or get_default_model())


@functools.lru_cache(maxsize=64)
def _defaults_of(name: str) -> ModelSettings:
    return get_default_model_settings(name)  # 30 us, once per model name instead of once a turn


_NO_SETTINGS = ModelSettings()


Guardrail = TypeVar("Guardrail", InputGuardrail[Any], OutputGuardrail[Any])


def guarded(guardrail: Guardrail, kind: GuardrailKind, sink: ToolSink) -> Guardrail:
    """A copy of ``guardrail`` that tells ``sink`` the moment its tripwire fires.

    The SDK only looks at a tripwire between its own steps (a streaming model's text keeps
    flowing until the response ends); the turn stops the run at once instead.
    """
    check = guardrail.guardrail_function
    name = guardrail.get_name()  # the copy's function is this wrapper: the name is given explicitly

    async def checked(
        context: RunContextWrapper[Any], agent: Agent[Any], value: Any
    ) -> GuardrailFunctionOutput:
        output = check(context, agent, value)
        if inspect.isawaitable(output):
            output = await output
        if output.tripwire_triggered:
            sink._guardrail_tripped(kind, name, output)
        return output

    return replace(guardrail, guardrail_function=checked, name=name)


ErrorFunction = Callable[[RunContextWrapper[Any], Exception], str | Awaitable[str]]


def _instrument(tool: FunctionTool, sink: ToolSink, loop: asyncio.AbstractEventLoop) -> FunctionTool:
    changes: dict[str, Any] = {"on_invoke_tool": _Reporting(tool.on_invoke_tool, tool.name, sink, loop)}
    if tool._use_default_failure_error_function:
        changes["_failure_error_function"] = _reporting(sink, _describe_failure)
        changes["_use_default_failure_error_function"] = False
    elif tool._failure_error_function is not None:
        # The author's own formatter decides what the model sees (for example, to hide details).
        changes["_failure_error_function"] = _reporting(sink, tool._failure_error_function)
    if tool.timeout_seconds is not None:
        seconds = tool.timeout_seconds
        changes["timeout_error_function"] = _reporting(
            sink, tool.timeout_error_function or (lambda _ctx, _err: f"timed out after {seconds:g} s")
        )
    # The SDK rebinds the invoker to this copy, so the copy's error formatters are the ones used.
    return replace(tool, **changes)


def _describe_failure(_context: RunContextWrapper[Any], error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _reporting(sink: ToolSink, formatter: ErrorFunction) -> ErrorFunction:
    """An error formatter that also tells the turn which call failed, and how."""

    async def report(context: RunContextWrapper[Any], error: Exception) -> str:
        text = formatter(context, error)
        if inspect.isawaitable(text):
            text = await text
        text = scrub(text)
        if isinstance(context, ToolContext) and not isinstance(error, asyncio.CancelledError):
            sink._tool_error(context.tool_call_id, text)
        return f"The tool failed: {text}"

    return report


class _Watchdog:
    """Warns, once per tool, when an ``async def`` tool blocks the event loop.

    A heartbeat task on the loop stamps the time; a thread notices when the stamps stop and reads
    the loop thread's stack to name the tool that holds it, which a check run on the loop itself
    could only do after the fact.
    """

    INTERVAL_S = 0.05
    STALL_S = 0.25

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._task = loop.create_task(self._heartbeat(), name="rtagent-watchdog")
        self._task.add_done_callback(lambda _: self._stop.set())
        threading.Thread(target=self._watch, name="rtagent-watchdog", daemon=True).start()

    @classmethod
    def ensure(cls, loop: asyncio.AbstractEventLoop) -> None:
        for old in [old for old in _watchdogs if old.is_closed()]:
            del _watchdogs[old]
        if loop not in _watchdogs:
            _watchdogs[loop] = cls(loop)

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(self.INTERVAL_S)

    def _watch(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            if time.monotonic() - self._beat > self.STALL_S:
                name = self._blocking_tool()
                if name is not None and name not in warned:
                    warned.add(name)
                    logger.warning(
                        "tool %r is blocking the event loop (the chat freezes while it runs): "
                        "make it a plain 'def' (the SDK runs those in a thread) or await instead of blocking",
                        name,
                    )

    def _blocking_tool(self) -> str | None:
        frame = sys._current_frames().get(self._loop_thread)
        while frame is not None:
            if frame.f_code is _REPORTING_CODE:
                invoker = frame.f_locals.get("self")
                return invoker._name if isinstance(invoker, _Reporting) else None
            frame = frame.f_back
        return None


class ToolHooks(RunHooks[Any]):
    """Reports tool starts and ends at their true times, and forwards to the caller's own hooks."""

    def __init__(self, turn: ToolSink, inner: RunHooksBase[Any, Any] | None) -> None:
        self._turn = turn
        self._inner = inner or RunHooks()

    async def on_tool_start(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool) -> None:
        if isinstance(context, ToolContext):
            self._turn._on_tool_start(context.tool_call_id, tool.name, context.tool_arguments)
        await self._inner.on_tool_start(context, agent, tool)

    async def on_tool_end(
        self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool, result: object
    ) -> None:
        if isinstance(context, ToolContext):
            self._turn._on_tool_end(context.tool_call_id, tool.name, result)
        await self._inner.on_tool_end(context, agent, tool, result)

    async def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        await self._inner.on_llm_start(*args, **kwargs)

    async def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        await self._inner.on_llm_end(*args, **kwargs)

    async def on_agent_start(self, *args: Any, **kwargs: Any) -> None:
        await self._inner.on_agent_start(*args, **kwargs)

    async def on_agent_end(self, *args: Any, **kwargs: Any) -> None:
        await self._inner.on_agent_end(*args, **kwargs)

    async def on_handoff(
        self, context: RunContextWrapper[Any], from_agent: Agent[Any], to_agent: Agent[Any]
    ) -> None:
        self._turn._agent_changed(to_agent.name)
        await self._inner.on_handoff(context, from_agent, to_agent)


_REPORTING_CODE = _Reporting.__call__.__code__
_watchdogs: dict[asyncio.AbstractEventLoop, _Watchdog] = {}
warned: set[str] = set()
"""Tools already named in a warning (once per process is enough to explain a freeze)."""
