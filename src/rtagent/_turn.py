"""One realtime turn: an SDK run whose events reach the caller the moment they happen.

The SDK's own stream is late in two places that matter to a person watching: it announces a tool
call only after the model's whole response, and it holds every tool output of a model turn until
the slowest tool ends. So rtagent listens at the two places where things really happen: the model's
raw event stream (a thin wrapper around the model, ``_Tap``) and the SDK's tool hooks
(``_ToolHooks``). The SDK's own event stream is still drained, because the run loop, the session
and the final result live behind it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from types import TracebackType
from typing import Any, TypedDict, Unpack

from agents import Agent, RunConfig, RunHooks, Runner
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
from agents.lifecycle import RunHooksBase
from agents.memory import Session
from agents.model_settings import ModelSettings
from agents.models.interface import Model, ModelTracing
from agents.result import RunResultStreaming
from agents.retry import ModelRetryAdvice, ModelRetryAdviceRequest
from agents.run_context import RunContextWrapper
from agents.tool import Tool
from agents.tool_context import ToolContext
from openai.types.responses import (
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam

from ._errors import describe
from ._events import (
    Event,
    TextDelta,
    Thinking,
    ToolFinished,
    ToolProgress,
    ToolStarted,
    TurnFailed,
    TurnFinished,
)
from ._models import ModelSpec, resolve_model
from ._result import ToolTiming, TurnMetrics, TurnResult

DEFAULT_MAX_TURNS = 10

# A consumer that falls this far behind gets consecutive text deltas merged instead of queued, so a
# slow front end costs latency, never unbounded memory.
MAX_PENDING_EVENTS = 256


class _EventBuffer:
    """A single-consumer queue that coalesces when the consumer falls behind.

    Cheaper than ``asyncio.Queue`` on the per-delta hot path: one deque append and at most one
    future wake-up per event.
    """

    __slots__ = ("_items", "_limit", "_waiter")

    def __init__(self, limit: int) -> None:
        self._items: deque[Event] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: Event) -> None:
        items = self._items
        if len(items) >= self._limit and items:
            merged = _coalesce(items[-1], event)
            if merged is not None:
                items[-1] = merged
                return
        items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Event:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def _coalesce(last: Event, new: Event) -> Event | None:
    if isinstance(last, TextDelta) and isinstance(new, TextDelta):
        return TextDelta(last.text + new.text)
    if isinstance(last, ToolProgress) and isinstance(new, ToolProgress) and last.call_id == new.call_id:
        return new
    return None


class TurnOptions(TypedDict, total=False):
    """How a turn runs; every entry is optional. ``stream``, ``run``, ``run_sync`` and ``Chat`` take these."""

    session: Session | None
    """An SDK session: the turn reads history from it and saves the new items to it."""
    model: ModelSpec
    """A spec string (``"local"``, ``"openai:gpt-4.1-mini"``, ...), a ready SDK ``Model``, or ``None``."""
    context: Any
    max_turns: int
    run_config: RunConfig | None
    hooks: RunHooks[Any] | None
    """Your own SDK run hooks; rtagent forwards every callback to them."""


class Turn:
    """A running turn. Iterate it for events; ``result`` holds the outcome once it has ended.

    Use it as ``async with rtagent.stream(...) as turn``: leaving the block, or ``break``-ing out of
    the ``async for``, stops the model and cancels running tools.
    """

    def __init__(
        self, agent: Agent[Any], input: str | list[TResponseInputItem], **options: Unpack[TurnOptions]
    ) -> None:
        self.agent = agent
        self._input = input
        self._options = options
        self._events = _EventBuffer(MAX_PENDING_EVENTS)
        self._task: asyncio.Task[None] | None = None
        self._sdk: RunResultStreaming | None = None
        self._interrupted = False
        self._result: TurnResult | None = None
        self._ended = asyncio.Event()
        self._started_at = 0.0
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._text: list[str] = []
        self._deltas = 0
        self._model_calls = 0
        # Tool calls seen in the model stream, by output item id: (call_id, name, argument chunks).
        self._pending_calls: dict[str, tuple[str, str, list[str]]] = {}
        self._announced: set[str] = set()
        self._tool_started_at: dict[str, float] = {}
        self._tool_timings: list[ToolTiming] = []

    # -- public surface -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the turn (idempotent). Entering ``async with`` or iterating calls it for you."""
        if self._task is not None:
            return
        self._started_at = time.perf_counter()
        self._events.put(Thinking())
        self._task = asyncio.get_running_loop().create_task(self._drive(), name="rtagent-turn")

    def interrupt(self) -> None:
        """Stop the model and running tools now; the turn ends with ``result.interrupted``."""
        if self._task is None or self._task.done() or self._interrupted:
            return
        self._interrupted = True
        if self._sdk is not None:
            self._sdk.cancel()
        else:
            self._task.cancel()

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    @property
    def result(self) -> TurnResult:
        """The outcome; raises ``RuntimeError`` while the turn is still running."""
        if self._result is None:
            raise RuntimeError("the turn has not ended yet")
        return self._result

    @property
    def text(self) -> str:
        """The assistant text produced so far."""
        return "".join(self._text)

    async def wait(self) -> TurnResult:
        """Run the turn to its end without looking at its events."""
        self.start()
        await self._ended.wait()
        return self.result

    async def aclose(self) -> None:
        """Interrupt the turn if it is still running and wait until it has ended."""
        self.interrupt()
        if self._task is not None:
            await asyncio.shield(self._ended.wait())

    async def __aenter__(self) -> Turn:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Event]:
        self.start()
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self._events.get()
                yield event
                if isinstance(event, TurnFinished | TurnFailed):
                    return
        finally:
            # Reached on ``break`` too (the generator is closed as soon as it is dropped): stopping
            # here is what keeps an abandoned turn from generating on in the background.
            self.interrupt()

    # -- the run --------------------------------------------------------------------------------

    async def _drive(self) -> None:
        error: BaseException | None = None
        try:
            options = self._options
            model = _Tap(resolve_model(options.get("model"), self.agent), self)
            run_config = replace(options.get("run_config") or RunConfig(tracing_disabled=True), model=model)
            self._sdk = Runner.run_streamed(
                self.agent,
                self._input,
                context=options.get("context"),
                max_turns=options.get("max_turns", DEFAULT_MAX_TURNS),
                hooks=_ToolHooks(self, options.get("hooks")),
                run_config=run_config,
                session=options.get("session"),
            )
            async for _ in self._sdk.stream_events():
                pass
        except asyncio.CancelledError:
            if not self._interrupted:
                self._finish(None)
                raise
        except Exception as exc:
            error = exc
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        now = time.perf_counter()
        sdk = self._sdk
        clean = error is None and not self._interrupted and sdk is not None
        usage_tokens = sdk.context_wrapper.usage.output_tokens if clean and sdk is not None else 0
        tokens = usage_tokens or self._deltas
        streaming_s = (
            self._last_token_at - self._first_token_at
            if self._first_token_at is not None and self._last_token_at is not None
            else 0.0
        )
        metrics = TurnMetrics(
            time_to_first_token_s=(
                None if self._first_token_at is None else self._first_token_at - self._started_at
            ),
            tokens=tokens,
            tokens_per_s=tokens / streaming_s if streaming_s > 0 else None,
            tools=tuple(self._tool_timings),
            total_s=now - self._started_at,
        )
        self._result = TurnResult(
            text=self.text,
            interrupted=self._interrupted,
            metrics=metrics,
            new_items=list(sdk.new_items) if clean and sdk is not None else [],
            final_output=sdk.final_output if clean and sdk is not None else None,
        )
        if error is None:
            self._events.put(TurnFinished(self._result))
        else:
            self._events.put(TurnFailed(describe(error), self.text, self._result))
        self._ended.set()

    # -- what the tap and the hooks report --------------------------------------------------------

    def _on_model_call(self) -> None:
        self._model_calls += 1
        if self._model_calls > 1:
            # The turn's first Thinking went out at start; later model calls (after tools) get one
            # too, so a front end can show that the agent is working on the tools' results.
            self._events.put(Thinking())

    def _on_model_event(self, event: TResponseStreamEvent) -> None:
        if isinstance(event, ResponseTextDeltaEvent):
            now = time.perf_counter()
            if self._first_token_at is None:
                self._first_token_at = now
            self._last_token_at = now
            self._deltas += 1
            self._text.append(event.delta)
            self._events.put(TextDelta(event.delta))
        elif isinstance(event, ResponseOutputItemAddedEvent):
            item = event.item
            if isinstance(item, ResponseFunctionToolCall):
                # A new call starting means the ones before it are complete.
                for item_id in list(self._pending_calls):
                    self._announce(item_id)
                self._pending_calls[item.id or item.call_id] = (item.call_id, item.name, [item.arguments])
        elif isinstance(event, ResponseFunctionCallArgumentsDeltaEvent):
            pending = self._pending_calls.get(event.item_id)
            if pending is not None:
                pending[2].append(event.delta)
                # Complete JSON means complete arguments: announce now, not when the response ends.
                if event.delta.rstrip().endswith("}") and _is_json("".join(pending[2])):
                    self._announce(event.item_id)
        elif isinstance(event, ResponseOutputItemDoneEvent):
            item = event.item
            if isinstance(item, ResponseFunctionToolCall):
                item_id = item.id or item.call_id
                self._pending_calls[item_id] = (item.call_id, item.name, [item.arguments])
                self._announce(item_id)

    def _announce(self, item_id: str) -> None:
        call_id, name, chunks = self._pending_calls.pop(item_id)
        self._tool_started(call_id, name, "".join(chunks))

    def _tool_started(self, call_id: str, name: str, arguments: str) -> None:
        if call_id in self._announced:
            return
        self._announced.add(call_id)
        self._events.put(ToolStarted(call_id, name, arguments))

    def _on_tool_start(self, call_id: str, name: str, arguments: str) -> None:
        # Models that do not stream their calls are only seen here.
        self._tool_started(call_id, name, arguments)
        self._tool_started_at[call_id] = time.perf_counter()

    def _on_tool_end(self, call_id: str, name: str, output: object) -> None:
        started = self._tool_started_at.pop(call_id, None)
        duration = 0.0 if started is None else time.perf_counter() - started
        self._tool_timings.append(ToolTiming(call_id, name, duration))
        self._events.put(ToolFinished(call_id, name, str(output), None, duration))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class _Tap(Model):
    """Passes a model through, showing the turn each raw event before the SDK sees it."""

    def __init__(self, inner: Model, turn: Turn) -> None:
        self._inner = inner
        self._turn = turn

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        return await self._inner.get_response(
            system_instructions,
            input,
            model_settings,
            tools,
            output_schema,
            handoffs,
            tracing,
            previous_response_id=previous_response_id,
            conversation_id=conversation_id,
            prompt=prompt,
        )

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        turn = self._turn
        turn._on_model_call()
        stream = self._inner.stream_response(
            system_instructions,
            input,
            model_settings,
            tools,
            output_schema,
            handoffs,
            tracing,
            previous_response_id=previous_response_id,
            conversation_id=conversation_id,
            prompt=prompt,
        )
        try:
            async for event in stream:
                turn._on_model_event(event)
                yield event
        finally:
            # Closing the inner stream closes its HTTP response, which is what makes a model
            # server stop generating when the turn is interrupted.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def get_retry_advice(self, request: ModelRetryAdviceRequest) -> ModelRetryAdvice | None:
        return self._inner.get_retry_advice(request)

    async def close(self) -> None:
        await self._inner.close()


class _ToolHooks(RunHooks[Any]):
    """Reports tool starts and ends at their true times, and forwards to the caller's own hooks."""

    def __init__(self, turn: Turn, inner: RunHooksBase[Any, Any] | None) -> None:
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

    async def on_handoff(self, *args: Any, **kwargs: Any) -> None:
        await self._inner.on_handoff(*args, **kwargs)


def stream(agent: Agent[Any], input: str | list[TResponseInputItem], **options: Unpack[TurnOptions]) -> Turn:
    """Start a realtime turn: ``async with rtagent.stream(agent, "hi") as turn: async for e in turn``."""
    return Turn(agent, input, **options)


async def run(
    agent: Agent[Any], input: str | list[TResponseInputItem], **options: Unpack[TurnOptions]
) -> TurnResult:
    """Run one turn to its end and return its result; raises ``TurnError`` if the turn failed."""
    async with Turn(agent, input, **options) as turn:
        async for event in turn:
            if isinstance(event, TurnFailed):
                raise TurnError(event.error, event.result)
    return turn.result


def run_sync(
    agent: Agent[Any], input: str | list[TResponseInputItem], **options: Unpack[TurnOptions]
) -> TurnResult:
    """``run`` for code without an event loop."""
    return asyncio.run(run(agent, input, **options))


class TurnError(Exception):
    """A turn failed; ``result`` keeps what had been produced before the failure."""

    def __init__(self, message: str, result: TurnResult) -> None:
        super().__init__(message)
        self.result = result
