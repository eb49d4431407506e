"""One realtime turn: an SDK run whose events reach the caller the moment they happen.

The SDK's own stream is late in two places that matter to a person watching: it announces a tool
call only after the model's whole response, and it holds every tool output of a model turn until
the slowest tool ends. So rtagent listens at the two places where things really happen: the model's
raw event stream (a thin wrapper around the model, ``_tap.Tap``) and the SDK's tool hooks
(``_tools.ToolHooks``). The SDK's own event stream is still drained, because the run loop, the session
and the final result live behind it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, TypedDict, Unpack

from agents import Agent, FunctionTool, ItemHelpers, RunConfig, RunContextWrapper, RunHooks, Runner, RunState
from agents.guardrail import GuardrailFunctionOutput
from agents.handoffs import Handoff
from agents.items import ToolApprovalItem, TResponseInputItem, TResponseStreamEvent
from agents.memory import Session
from agents.models.interface import Model
from agents.result import RunResultStreaming
from agents.tool import Tool
from openai.types.responses import (
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
)

from ._buffer import MAX_PENDING_EVENTS, EventBuffer
from ._errors import GuardrailTripwire, describe
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
from ._history import INTERRUPTED, STILL_RUNNING, not_answered, record_cut, record_late, with_cut_marks
from ._models import ModelSpec, resolve_model
from ._result import CacheCounts, ToolTiming, TurnMetrics, TurnResult
from ._tap import Tap
from ._tools import GuardrailKind, ToolHooks, guarded, instrument
from ._unicode import scrub
from .cache._replies import CachedReply, Lookup, Match, ReplyCache, fingerprint, may_store, model_label

DEFAULT_MAX_TURNS = 10


class TurnOptions(TypedDict, total=False):
    """How a turn runs; every entry is optional. ``stream``, ``run``, ``run_sync`` and ``Chat`` take these."""

    session: Session | None
    """An SDK session: the turn reads history from it and saves the new items to it."""
    model: ModelSpec
    """A spec string (``"local"``, ``"openai:gpt-4.1-mini"``, ...) or a ready SDK ``Model`` that every
    agent of the turn runs on; ``None`` (the default): each agent runs on its own model."""
    context: Any
    max_turns: int
    run_config: RunConfig | None
    hooks: RunHooks[Any] | None
    """Your own SDK run hooks; rtagent forwards every callback to them."""
    tools: Sequence[Tool]
    """Tools this turn adds to the agent's own (an AG-UI client's, for instance)."""
    reply_cache: ReplyCache | None
    """Serve a stored reply when the agent, history and message match a stored turn's, and store
    this turn's for the next (see ``ReplyCache``)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """A paused run to continue (``TurnResult.state``), with the person's answers: calls not in
    ``approved`` or ``rejected`` stay pending, and the continued turn pauses again for them."""

    state: str
    approved: frozenset[str] = frozenset()
    rejected: Mapping[str, str | None] = field(default_factory=dict)
    """Each rejected call, with what the model is told of it (``None``: the SDK's own words)."""


Input = str | list[TResponseInputItem] | Resume


class Turn:
    """A running turn. Iterate it for events; ``result`` holds the outcome once it has ended.

    Use it as ``async with rtagent.stream(...) as turn``: leaving the block, or ``break``-ing out of
    the ``async for``, stops the model and cancels running tools. ``after`` makes the turn wait
    for another turn to end before it calls the model (a conversation runs one turn at a time).
    """

    def __init__(
        self,
        agent: Agent[Any],
        input: Input,
        *,
        after: Turn | None = None,
        **options: Unpack[TurnOptions],
    ) -> None:
        self.agent = agent
        self._input = input
        self._after = after
        self._options = options
        self._events = EventBuffer(MAX_PENDING_EVENTS)
        self._task: asyncio.Task[None] | None = None
        self._sdk: RunResultStreaming | None = None
        self._interrupted = False
        self._result: TurnResult | None = None
        self._ended = asyncio.Event()
        self._started_at = time.perf_counter()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._text: list[str] = []
        self._deltas = 0
        self._model_calls = 0
        # What the model response in progress has produced: the SDK saves a response only once
        # it and its tools are done, so this is what an interrupt must save instead.
        self._response_text: list[str] = []
        self._response_calls: list[tuple[str, str, str]] = []
        # Tool calls seen in the model stream, by output item id: (call_id, name, argument chunks).
        self._pending_calls: dict[str, tuple[str, str, list[str]]] = {}
        self._announced: set[str] = set()
        self._running: dict[str, tuple[str, float]] = {}
        self._outputs: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._kept: dict[str, tuple[str, str, asyncio.Future[Any]]] = {}
        self._tool_timings: list[ToolTiming] = []
        # The tool cache's part: calls whose output it gave, and its counts for the turn.
        self._cached: set[str] = set()
        self._cache_counts: CacheCounts | None = None
        # The model call in progress: its tools' ``needs_approval`` by name, and its handoffs' names.
        self._rules: dict[str, object] = {}
        self._handoffs: frozenset[str] = frozenset()
        self._answering = agent.name  # the agent the person was last told of
        self._tripped: GuardrailTripwire | None = None  # the tripwire that stopped the turn
        # The calls that asked for approval.
        self._approvals: dict[str, ApprovalRequested] = {}
        self._pending: tuple[ApprovalRequested, ...] = ()
        self._state: str | None = None
        self._reply_counts: CacheCounts | None = None  # what the reply cache did for this turn
        self._match: Match | None = None  # how a stored reply was served (it saves its own history)

    @classmethod
    def paused(
        cls,
        agent: Agent[Any],
        pending: tuple[ApprovalRequested, ...],
        state: str,
        **options: Unpack[TurnOptions],
    ) -> Turn:
        """A turn that ended, paused for ``pending``, in another process (see ``Chat.restore``)."""
        turn = cls(agent, "", **options)
        turn._pending, turn._state = pending, state
        turn._close(None)
        turn._events = EventBuffer(MAX_PENDING_EVENTS)  # nobody reads it: its events are long gone
        return turn

    # -- public surface -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the turn (idempotent). Entering ``async with`` or iterating calls it for you."""
        if self._task is not None or self._ended.is_set():
            return
        self._started_at = time.perf_counter()
        self._events.put(Thinking())
        self._task = asyncio.get_running_loop().create_task(self._drive(), name="rtagent-turn")
        self._task.add_done_callback(self._on_task_done)

    def interrupt(self) -> None:
        """Stop the model and running tools now; the turn ends with ``result.interrupted``.

        Text not yet handed to the consumer is dropped: the result and the session keep exactly
        what the user was shown.
        """
        if self._ended.is_set() or self._interrupted:
            return
        self._interrupted = True
        if self._task is None:  # never started: nothing ran, so it ends at once
            self._close(None)
            return
        if self._sdk is None and self._after is not None:
            # Still waiting for the turn before: that one stops too (a stop stops the conversation,
            # whatever the policy), and this one then saves its message after that one's reply.
            self._after.interrupt()
        self._stop()
        # Not cancelled before the run: cancelled before its first step, the task would never
        # run, and the message the user sent (and saw) would never be saved.

    def _stop(self) -> None:
        """Close the model stream and cancel the run's tasks; drop the text nobody has taken yet."""
        dropped = self._events.drop_text()
        if dropped:
            self._trim(dropped)
        if self._sdk is not None:
            self._sdk.cancel()

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
        """Run the turn to its end, consuming its events."""
        async for _ in self:
            pass
        return self.result

    async def join(self) -> None:
        """Wait until the turn has ended and its history is saved, leaving its events to its reader."""
        self.start()
        await asyncio.shield(self._ended.wait())

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
            # Let go of the turn before once it has ended: a turn that kept it would keep the
            # whole conversation, turn by turn, alive as long as its chat.
            if self._after is not None:
                await self._after._ended.wait()
                paused = self._after._result.pending if self._after._result is not None else ()
                if paused and not isinstance(self._input, Resume):
                    # A new message instead of an answer: the calls waiting for one are closed, so
                    # that the history stays valid for any model (every call has an output).
                    message = ItemHelpers.input_to_new_input_list(self._input)
                    self._input = not_answered([p.call_id for p in paused]) + message
                self._after = None
            if not self._interrupted:
                await self._run()
        except asyncio.CancelledError:
            if not self._interrupted:
                await self._end(None)
                raise
        except Exception as exc:
            error = exc
        await self._end(error)

    async def _run(self) -> None:
        options = self._options
        run_config = options.get("run_config") or RunConfig(tracing_disabled=True)
        spec = options.get("model")
        # The run config's model overrides every agent's: it is set only when the turn has one.
        named = None if spec is None else resolve_model(spec, self.agent)
        model = None if named is None else Tap(named, self)
        run_config = replace(
            run_config,
            model=model,
            input_guardrails=[guarded(g, "input", self) for g in run_config.input_guardrails or ()],
            output_guardrails=[guarded(g, "output", self) for g in run_config.output_guardrails or ()],
            call_model_input_filter=with_cut_marks(run_config.call_model_input_filter),
        )
        agent = self.agent
        if options.get("tools"):
            agent = copy.copy(agent)  # the author's agent stays as it is
            agent.tools = [*agent.tools, *options.get("tools", ())]
        cache = options.get("reply_cache")
        lookup = None
        if cache is not None and not isinstance(self._input, Resume):
            # The key names the model the first agent runs on: the turn's, else the agent's own.
            first_model = model_label(named or resolve_model(None, self.agent))
            lookup = await self._ask(cache, agent, first_model, self._input)
            if self._interrupted:
                return
            if lookup is not None and lookup.hit is not None:
                await self._replay(lookup, lookup.hit)
                return
        tools = {tool.name: tool for tool in agent.tools}  # the author's, before ``instrument`` wraps them
        agent = instrument(agent, self, self._own_model if model is None else None)
        run_input: str | list[TResponseInputItem] | RunState[Any]
        if isinstance(self._input, Resume):
            run_input = await _resumed(agent, self._input, options.get("context"))
            # It goes on with the agent it paused in, which a handoff may have made another one.
            for item in run_input.get_interruptions()[:1]:
                self._agent_changed(item.agent.name)
        else:
            run_input = self._input
        self._sdk = Runner.run_streamed(
            agent,
            run_input,
            context=options.get("context"),
            max_turns=options.get("max_turns", DEFAULT_MAX_TURNS),
            hooks=ToolHooks(self, options.get("hooks")),
            run_config=run_config,
            session=options.get("session"),
        )
        async for _ in self._sdk.stream_events():
            pass
        if self._sdk.interruptions and not self._interrupted:
            self._pause(self._sdk)
        elif cache is not None and lookup is not None:
            await self._store(cache, lookup, self._sdk, tools)

    async def _ask(
        self, cache: ReplyCache, agent: Agent[Any], model: str, message: str | list[TResponseInputItem]
    ) -> Lookup | None:
        """The reply cache's answer for this turn; ``None`` when the agent cannot be fingerprinted."""
        options = self._options
        run_config = options.get("run_config")
        guards = (
            [*(run_config.input_guardrails or ()), *(run_config.output_guardrails or ())]
            if run_config
            else []
        )
        key = await fingerprint(
            agent, agent.tools, model, options.get("context"), [g.get_name() for g in guards]
        )
        if key is None:
            return None
        session = options.get("session")
        history = await session.get_items() if session is not None else []
        # A hit skips the input guardrails, which judge words: the same words passed them before,
        # other words (a semantic hit) never did.
        judged = bool(agent.input_guardrails) or bool(run_config and run_config.input_guardrails)
        lookup = await cache.lookup(key, history, message, semantic=not judged)
        self._reply_counts = CacheCounts(hits=1) if lookup.hit is not None else CacheCounts(misses=1)
        return lookup

    async def _replay(self, lookup: Lookup, hit: CachedReply) -> None:
        """Serve a stored reply: its deltas at once, then the history as the stored turn left it."""
        self._match = lookup.match
        for delta in hit.deltas:
            self._on_text(delta)
        session = self._options.get("session")
        if session is not None:
            # Whole even if the person stops it now: it was delivered at once, and a cut here
            # would only record how fast the front end read it.
            assert not isinstance(self._input, Resume)  # a resumed run never asks the cache
            message = ItemHelpers.input_to_new_input_list(self._input)
            await session.add_items([*message, *hit.items])

    async def _store(
        self, cache: ReplyCache, lookup: Lookup, sdk: RunResultStreaming, tools: Mapping[str, Tool]
    ) -> None:
        called = {timing.name for timing in self._tool_timings}
        if self._interrupted or not self._text or not may_store(tools, called):
            return
        # Without the ids the server gave them: replayed into another conversation, they are new.
        items = tuple(
            {k: v for k, v in dict(item.to_input_item()).items() if k != "id"} for item in sdk.new_items
        )
        size = await cache.put(lookup, CachedReply(tuple(self._text), items))  # type: ignore[arg-type]
        self._reply_counts = CacheCounts(misses=1, stored_bytes=size)

    def _own_model(self, agent: Agent[Any]) -> Model:
        """What ``agent`` runs on when the turn names no model: its own, tapped like any other."""
        return Tap(resolve_model(None, agent), self)

    def _pause(self, sdk: RunResultStreaming) -> None:
        """The run paused for approvals: ask for the ones not asked yet, keep the run's state."""
        for item in sdk.interruptions:
            self._request_approval(_call_id(item), item.name or "", item.arguments or "")
        self._pending = tuple(self._approvals[_call_id(item)] for item in sdk.interruptions)
        # Without the context: the continuing turn passes its own (which may not serialise).
        self._state = sdk.to_state().to_string(context_serializer=lambda _context: {})

    async def _end(self, error: BaseException | None) -> None:
        # A tripped guardrail stopped the run, which then ended cancelled or raising its own
        # tripwire error: the turn failed because of the guardrail either way.
        error = self._tripped or error
        cut = error is not None or self._interrupted
        for call_id, (name, started) in list(self._running.items()):
            if call_id in self._kept:
                self._finish_tool(call_id, name, STILL_RUNNING, None, started)
            else:
                self._finish_tool(call_id, name, INTERRUPTED, "interrupted", started)
        # Calls announced but never started end too, so front ends can close every indicator.
        for call_id, name, _ in self._response_calls:
            if call_id in self._announced and call_id not in self._outputs:
                self._finish_tool(call_id, name, INTERRUPTED, "interrupted", time.perf_counter())
        session = self._options.get("session")
        if cut and session is not None and self._match is None:
            outputs = {**self._outputs, **dict.fromkeys(self._kept, STILL_RUNNING)}
            try:
                # The SDK saves the message only just before its first model call (and says so in
                # this field alone): a turn cut before then, waiting for the turn before it or
                # reading the history, would drop a message the user sent and saw.
                persisted = self._sdk is not None and self._sdk._stream_input_persisted
                if not persisted and not isinstance(self._input, Resume):
                    await session.add_items(ItemHelpers.input_to_new_input_list(self._input))
                if self._response_text or self._response_calls:
                    await record_cut(session, "".join(self._response_text), self._response_calls, outputs)
            except Exception as exc:  # a broken session must not hide the turn's own outcome
                error = error or exc
            for call_id, (name, arguments, task) in self._kept.items():
                task.add_done_callback(functools.partial(record_late, session, call_id, name, arguments))
        self._close(error)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never runs its body: still end the turn properly.
        if not self._ended.is_set():
            self._close(None)

    def _close(self, error: BaseException | None) -> None:
        self._result = self._make_result(clean=error is None and not self._interrupted)
        # The SDK's run state (responses, items, context) is in the result now; an idle chat keeps
        # its last turn, and a server keeps a thousand idle chats.
        self._sdk = None
        if error is None:
            self._events.put(TurnFinished(self._result))
        else:
            guardrail = error.guardrail if isinstance(error, GuardrailTripwire) else None
            self._events.put(TurnFailed(scrub(describe(error)), self.text, self._result, guardrail))
        self._ended.set()

    def _make_result(self, *, clean: bool) -> TurnResult:
        sdk = self._sdk if clean else None
        usage_tokens = sdk.context_wrapper.usage.output_tokens if sdk is not None else 0
        tokens = usage_tokens or self._deltas
        first, last = self._first_token_at, self._last_token_at
        streaming_s = last - first if first is not None and last is not None else 0.0
        cached = self._match
        metrics = TurnMetrics(
            time_to_first_token_s=None if first is None else first - self._started_at,
            tokens=tokens,
            tokens_per_s=tokens / streaming_s if streaming_s > 0 else None,
            tools=tuple(self._tool_timings),
            total_s=time.perf_counter() - self._started_at,
            cache={
                **({} if self._cache_counts is None else {"tool": self._cache_counts}),
                **({} if self._reply_counts is None else {"reply": self._reply_counts}),
            },
        )
        final_output = sdk.final_output if sdk is not None else None
        return TurnResult(
            text=self.text,
            interrupted=self._interrupted,
            metrics=metrics,
            new_items=list(sdk.new_items) if sdk is not None else [],
            final_output=self.text if cached and clean else final_output,
            pending=self._pending if clean else (),
            state=self._state if clean else None,
            cached=cached,
        )

    def _trim(self, chars: int) -> None:
        """Forget the last ``chars`` characters of text, which the consumer never received."""
        for parts in (self._text, self._response_text):
            text = "".join(parts)
            parts[:] = [text[: max(len(text) - chars, 0)]]

    # -- what the tap, the hooks and the tools report -------------------------------------------

    def _on_model_call(self, tools: list[Tool], handoffs: list[Handoff]) -> None:
        self._model_calls += 1
        self._response_text = []
        self._response_calls = []
        # Read from what this model is given: after a handoff, the agent and its tools are others.
        self._rules = {t.name: t.needs_approval for t in tools if isinstance(t, FunctionTool)}
        self._handoffs = frozenset(h.tool_name for h in handoffs)
        if self._model_calls > 1 or self._announced:
            # The turn's first Thinking went out at start; later model calls (after tools, which a
            # continued run may start with) get one too, so a front end can show that the agent is
            # working on the tools' results.
            self._events.put(Thinking())

    def _on_model_event(self, event: TResponseStreamEvent) -> None:
        if isinstance(event, ResponseTextDeltaEvent):
            # A model server's JSON may carry lone surrogates, which no front end can encode.
            self._on_text(scrub(event.delta))
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

    def _on_text(self, delta: str) -> None:
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
        self._last_token_at = now
        self._deltas += 1
        self._text.append(delta)
        self._response_text.append(delta)
        self._events.put(TextDelta(delta))

    def _announce(self, item_id: str) -> None:
        call_id, name, chunks = self._pending_calls.pop(item_id)
        rule = self._rules.get(name, False)
        if name in self._handoffs or rule not in (True, False):
            # A handoff runs no tool: the SDK switches agent, which ``AgentChanged`` tells when it
            # happens (a tool indicator would wait for an end no hook reports). The author's own
            # rule is the SDK's to ask: it then runs the call (``_on_tool_start``) or pauses.
            self._seen(call_id, name, "".join(chunks))
        elif rule:
            self._request_approval(call_id, name, "".join(chunks))
        else:
            self._tool_started(call_id, name, "".join(chunks))

    def _seen(self, call_id: str, name: str, arguments: str) -> str:
        """Note a call of the response in progress (what an interrupt saves); its arguments, scrubbed."""
        arguments = scrub(arguments)
        if all(call_id != seen for seen, _, _ in self._response_calls):
            self._response_calls.append((call_id, name, arguments))
        return arguments

    def _tool_started(self, call_id: str, name: str, arguments: str) -> None:
        if call_id in self._announced:
            return
        self._announced.add(call_id)
        self._events.put(ToolStarted(call_id, name, self._seen(call_id, name, arguments)))

    def _request_approval(self, call_id: str, name: str, arguments: str) -> None:
        if call_id in self._approvals:
            return
        request = ApprovalRequested(call_id, name, self._seen(call_id, name, arguments))
        self._approvals[call_id] = request
        self._events.put(request)

    def _on_tool_start(self, call_id: str, name: str, arguments: str) -> None:
        # Models that do not stream their calls are only seen here.
        self._tool_started(call_id, name, arguments)
        self._running[call_id] = (name, time.perf_counter())

    def _on_tool_end(self, call_id: str, name: str, output: object) -> None:
        running = self._running.pop(call_id, None)
        if running is not None:
            self._finish_tool(call_id, name, str(output), self._errors.pop(call_id, None), running[1])

    def _finish_tool(self, call_id: str, name: str, output: str, error: str | None, started: float) -> None:
        self._running.pop(call_id, None)
        output = scrub(output)  # an output that is no ``str`` was not scrubbed by the tool's wrapper
        self._outputs[call_id] = output
        duration = time.perf_counter() - started
        self._tool_timings.append(ToolTiming(call_id, name, duration))
        # A shared execution that failed is the tool's error, not a cached result.
        cached = call_id in self._cached and error is None
        self._events.put(ToolFinished(call_id, name, output, error, duration, cached))

    def _agent_changed(self, name: str) -> None:
        if name != self._answering:
            self._answering = name
            self._events.put(AgentChanged(name))

    def _guardrail_tripped(self, kind: GuardrailKind, name: str, output: GuardrailFunctionOutput) -> None:
        if self._ended.is_set() or self._interrupted or self._tripped is not None:
            return
        self._tripped = GuardrailTripwire(kind, name, output.output_info)
        self._stop()

    def _tool_progress(self, call_id: str, message: str, fraction: float | None) -> None:
        if call_id in self._running:
            self._events.put(ToolProgress(call_id, scrub(message), fraction))

    def _tool_error(self, call_id: str, text: str) -> None:
        self._errors[call_id] = text

    def _tool_kept(self, call_id: str, name: str, arguments: str, task: asyncio.Future[Any]) -> None:
        self._kept[call_id] = (name, arguments, task)

    def _tool_cache(self, call_id: str, outcome: str, stored_bytes: int) -> None:
        counts = self._cache_counts or CacheCounts()
        if outcome == "miss":
            counts = replace(
                counts, misses=counts.misses + 1, stored_bytes=counts.stored_bytes + stored_bytes
            )
        else:
            self._cached.add(call_id)
            if outcome == "hit":
                counts = replace(counts, hits=counts.hits + 1)
            else:
                counts = replace(counts, deduplicated=counts.deduplicated + 1)
        self._cache_counts = counts


async def _resumed(agent: Agent[Any], resume: Resume, context: Any) -> RunState[Any]:
    """The paused run, on this turn's copy of the agent (whose tools report to it), answered."""
    state: RunState[Any] = await RunState.from_string(
        agent, resume.state, context_override=RunContextWrapper(context=context)
    )
    for item in state.get_interruptions():
        call_id = _call_id(item)
        if call_id in resume.approved:
            state.approve(item)
        elif call_id in resume.rejected:
            state.reject(item, rejection_message=resume.rejected[call_id])
    return state


async def pending_of(agent: Agent[Any], state: str) -> tuple[ApprovalRequested, ...]:
    """The calls a paused run (``TurnResult.state``) waits on."""
    run_state: RunState[Any] = await RunState.from_string(
        agent, state, context_override=RunContextWrapper(None)
    )
    return tuple(
        ApprovalRequested(_call_id(item), item.name or "", item.arguments or "")
        for item in run_state.get_interruptions()
    )


def _call_id(item: ToolApprovalItem) -> str:
    return str(item.call_id or getattr(item.raw_item, "id", "") or "")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def stream(agent: Agent[Any], input: Input, **options: Unpack[TurnOptions]) -> Turn:
    """Start a realtime turn: ``async with rtagent.stream(agent, "hi") as turn: async for e in turn``."""
    return Turn(agent, input, **options)


async def run(
    agent: Agent[Any], input: str | list[TResponseInputItem], **options: Unpack[TurnOptions]
) -> TurnResult:
    """Run one turn to its end and return its result; raises ``TurnError`` if the turn failed."""
    async with Turn(agent, input, **options) as turn:
        async for event in turn:
            if isinstance(event, TurnFailed):
                raise TurnError(event.error, event.result, event.guardrail)
    return turn.result


def run_sync(
    agent: Agent[Any], input: str | list[TResponseInputItem], **options: Unpack[TurnOptions]
) -> TurnResult:
    """``run`` for code without an event loop."""
    return asyncio.run(run(agent, input, **options))


class TurnError(Exception):
    """A turn failed; ``result`` keeps what had been produced before the failure, ``guardrail``
    names the guardrail whose tripwire stopped it, if one did."""

    def __init__(self, message: str, result: TurnResult, guardrail: str | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.guardrail = guardrail
