"""rtagent -> AG-UI: the events a turn becomes, and the history as the messages a page reloads.

AG-UI (https://docs.ag-ui.com) is the open protocol CopilotKit and others use to stream an agent to a
UI. Everything on the wire is built from the ``ag-ui-protocol`` package's own models and serialised by
them, so the JSON is exactly what the official clients parse.

How one turn maps (``RunMapper``):

=================  ====================================================================================
rtagent event      AG-UI events
=================  ====================================================================================
(run start)        RUN_STARTED
Thinking           STEP_STARTED "thinking" (closed by the first text or tool call: STEP_FINISHED, whose
                   ``metadata.rtagent.durationS`` is how long the model thought)
TextDelta          TEXT_MESSAGE_START (first delta of a message), TEXT_MESSAGE_CONTENT
ToolStarted        TEXT_MESSAGE_END (if text was open), TOOL_CALL_START/ARGS/END; the calls of one model
                   response share one ``parentMessageId``, so a client groups them in one message
ApprovalRequested  the same TOOL_CALL_START/ARGS/END (the model made the call), no result
ToolProgress       ACTIVITY_SNAPSHOT ``tool_progress`` {toolCallId, toolName, message, fraction, elapsedS}
ToolFinished       TOOL_CALL_RESULT, ``metadata.rtagent`` = {durationS, error, cached}; a final
                   ACTIVITY_SNAPSHOT (done) if the tool had reported progress
AgentChanged       STEP_FINISHED for the agent that answered before, if it had a step; STEP_STARTED named
                   after the agent now answering, ``metadata.rtagent.agent`` its name (closed by the next
                   AgentChanged or the run's end); the steps "thinking" and text close first
TurnFinished       RUN_FINISHED, ``result`` = {text, interrupted, metrics}; an interrupted turn also has
                   ``outcome: {"type": "cancelled"}``, a paused one ``{"type": "interrupt", "interrupts":
                   [...]}``: one ``tool_approval`` interrupt per waiting call, its id the call's id
TurnFailed         RUN_ERROR ``code: "agent_error"`` with the one-line reason; ``"guardrail_tripwire"`` when a
                   guardrail stopped the turn (the reason names it)
=================  ====================================================================================

Every step open when the run ends (the thinking step, an agent's step) closes before RUN_FINISHED or
RUN_ERROR.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ag_ui.core import (
    PROTOCOL_VERSION,
    ActivitySnapshotEvent,
    AssistantMessage,
    BaseEvent,
    DeveloperMessage,
    FunctionCall,
    Interrupt,
    Message,
    MessagesSnapshotEvent,
    ReasoningMessage,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunFinishedInterruptOutcome,
    RunFinishedSuccessOutcome,
    RunStartedEvent,
    StepFinishedEvent,
    StepStartedEvent,
    SystemMessage,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCall,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
    ToolMessage,
    UserMessage,
)
from agents.items import TResponseInputItem
from pydantic import Field, SerializerFunctionWrapHandler

from .._chat import Chat
from .._errors import describe
from .._events import (
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
from .._history import content_text, is_cut
from .._result import TurnResult
from .._turn import Turn
from ._frontend import SharedState

METADATA_KEY = "rtagent"
"""Our key in AG-UI ``metadata`` objects (the ``ag-ui`` key is reserved for the protocol)."""

log = logging.getLogger("rtagent.server")


class TextContent(TextMessageContentEvent):
    """TEXT_MESSAGE_CONTENT as a turn streams it: a message id and a delta, no optional field set.

    The package's models drop each optional field left unset in a Python serializer of their own,
    run for every event: 10 us of the 60 or so that a streamed token costs a server. Here those
    fields are excluded from the schema instead, which gives the same bytes (``tests/test_agui.py``
    compares them with the package's own class) in 4 us.
    """

    timestamp: int | None = Field(default=None, exclude=True)
    raw_event: Any | None = Field(default=None, exclude=True)
    metadata: dict[str, Any] | None = Field(default=None, exclude=True)
    subagent_run_id: str | None = Field(default=None, exclude=True)

    def _omit_fields_without_value(self, handler: SerializerFunctionWrapHandler) -> Any:
        return handler(self)


class RunMapper:
    """Turns one rtagent turn into AG-UI events, keeping the open/close pairing the protocol requires."""

    __slots__ = (
        "_agent",
        "_calls",
        "_client_tools",
        "_counter",
        "_parent",
        "_progressed",
        "_run_id",
        "_text",
        "_thinking_since",
        "_thread_id",
    )

    def __init__(self, thread_id: str, run_id: str, client_tools: frozenset[str] = frozenset()) -> None:
        self._thread_id = thread_id
        self._run_id = run_id
        self._client_tools = client_tools  # their calls are the client's to run and show
        self._counter = 0
        self._text: str | None = None  # the open text message
        self._parent: str | None = None  # the message the current model response's tool calls belong to
        self._thinking_since: float | None = None
        self._calls: dict[str, tuple[str, float]] = {}  # call id -> (tool name, announced at)
        self._progressed: set[str] = set()
        self._agent: str | None = None  # the step of the agent answering now, once one has taken over

    def started(self) -> RunStartedEvent:
        return RunStartedEvent(
            thread_id=self._thread_id, run_id=self._run_id, protocol_version=PROTOCOL_VERSION
        )

    def map(self, event: Event) -> list[BaseEvent]:
        out: list[BaseEvent] = []
        if isinstance(event, ToolStarted | ToolFinished) and event.name in self._client_tools:
            return out  # the client ran this call itself, and sent its result
        if isinstance(event, TextDelta):
            if not event.text:
                return out
            self._end_thinking(out)
            if self._text is None:
                self._text = self._parent = self._new_id()
                out.append(TextMessageStartEvent(message_id=self._text, role="assistant"))
            out.append(TextContent(message_id=self._text, delta=event.text))
        elif isinstance(event, Thinking):
            # A new model response: its text and tool calls form a new assistant message.
            self._end_text(out)
            self._parent = None
            if self._thinking_since is None:
                self._thinking_since = time.monotonic()
                out.append(StepStartedEvent(step_name="thinking"))
        elif isinstance(event, ToolStarted | ApprovalRequested):
            self._end_thinking(out)
            self._end_text(out)
            if self._parent is None:
                self._parent = self._new_id()
            self._calls[event.call_id] = (event.name, time.monotonic())
            out.append(
                ToolCallStartEvent(
                    tool_call_id=event.call_id, tool_call_name=event.name, parent_message_id=self._parent
                )
            )
            if event.arguments:
                out.append(ToolCallArgsEvent(tool_call_id=event.call_id, delta=event.arguments))
            out.append(ToolCallEndEvent(tool_call_id=event.call_id))
        elif isinstance(event, ToolProgress):
            self._progressed.add(event.call_id)
            update: dict[str, Any] = {"message": event.message}
            if event.fraction is not None:
                update["fraction"] = event.fraction
            out.append(self._progress(event.call_id, update))
        elif isinstance(event, ToolFinished):
            if event.call_id in self._progressed:
                out.append(self._progress(event.call_id, {"done": True, "fraction": 1.0}))
            meta: dict[str, Any] = {"durationS": round(event.duration_s, 4)}
            if event.error is not None:
                meta["error"] = event.error
            if event.cached:
                meta["cached"] = True
            out.append(
                ToolCallResultEvent(
                    message_id=f"{self._run_id}-{event.call_id}-result",
                    tool_call_id=event.call_id,
                    content=event.output,
                    role="tool",
                    metadata={METADATA_KEY: meta},
                )
            )
        elif isinstance(event, AgentChanged):
            # The last agent's thinking and text were its own: they close with its step.
            self._end_thinking(out)
            self._end_text(out)
            self._end_agent(out)
            self._agent = event.name
            out.append(StepStartedEvent(step_name=event.name, metadata={METADATA_KEY: {"agent": event.name}}))
        else:
            self._end_thinking(out)
            self._end_text(out)
            self._end_agent(out)
            if isinstance(event, TurnFinished):
                outcome = _outcome(event.result, self._client_tools)
                out.append(
                    RunFinishedEvent(
                        thread_id=self._thread_id,
                        run_id=self._run_id,
                        result=result_json(event.result),
                        outcome=outcome,
                    )
                )
            else:
                code = "agent_error" if event.guardrail is None else "guardrail_tripwire"
                out.append(RunErrorEvent(message=event.error, code=code))
        return out

    def _new_id(self) -> str:
        self._counter += 1
        return f"{self._run_id}-{self._counter}"

    def _end_text(self, out: list[BaseEvent]) -> None:
        if self._text is not None:
            out.append(TextMessageEndEvent(message_id=self._text))
            self._text = None

    def _end_thinking(self, out: list[BaseEvent]) -> None:
        if self._thinking_since is not None:
            took = round(time.monotonic() - self._thinking_since, 4)
            out.append(StepFinishedEvent(step_name="thinking", metadata={METADATA_KEY: {"durationS": took}}))
            self._thinking_since = None

    def _end_agent(self, out: list[BaseEvent]) -> None:
        if self._agent is not None:
            out.append(StepFinishedEvent(step_name=self._agent))
            self._agent = None

    def _progress(self, call_id: str, content: dict[str, Any]) -> ActivitySnapshotEvent:
        name, since = self._calls.get(call_id, ("", time.monotonic()))
        content = {"toolCallId": call_id, "toolName": name, **content}
        content["elapsedS"] = round(time.monotonic() - since, 3)
        return ActivitySnapshotEvent(
            message_id=f"{self._run_id}-{call_id}-progress", activity_type="tool_progress", content=content
        )


class AguiRun:
    """One AG-UI run: a turn of a chat as AG-UI events. Every transport consumes ``events()``.

    Without a new user message (``turn`` is ``None``) the run answers with the conversation instead
    (MESSAGES_SNAPSHOT), which is how an AG-UI client can reload a thread. ``observe`` sees every
    rtagent event but text deltas. ``client_tools`` and ``state``: see ``_frontend``.
    """

    def __init__(
        self,
        thread_id: str,
        run_id: str,
        chat: Chat,
        turn: Turn | None,
        *,
        observe: Callable[[Event], None],
        client_tools: frozenset[str] = frozenset(),
        state: SharedState | None = None,
    ) -> None:
        self.thread_id = thread_id
        self.run_id = run_id
        self.chat = chat
        self.turn = turn
        self._observe = observe
        self._client_tools = client_tools
        self._state = state

    async def events(self) -> AsyncIterator[BaseEvent]:
        mapper = RunMapper(self.thread_id, self.run_id, self._client_tools)
        turn = self.turn
        yield mapper.started()
        if turn is None:
            snapshot = await self._snapshot()
            yield snapshot
            if isinstance(snapshot, MessagesSnapshotEvent):
                yield RunFinishedEvent(thread_id=self.thread_id, run_id=self.run_id)
            return
        observe, state = self._observe, self._state
        if state is not None:
            for out in state.snapshot():
                yield out
        async for event in turn:
            mapped = mapper.map(event)
            if state is not None and isinstance(event, ToolFinished | TurnFinished | TurnFailed):
                # After a tool's result; before the run's end, which nothing may follow.
                at = len(mapped) if isinstance(event, ToolFinished) else len(mapped) - 1
                mapped[at:at] = state.changes()
            for out in mapped:
                yield out
            if type(event) is not TextDelta:
                observe(event)

    async def _snapshot(self) -> BaseEvent:
        try:
            return MessagesSnapshotEvent(messages=history_messages(await self.chat.history()))
        except Exception as exc:  # a broken database must still end the run the protocol's way
            log.exception("reading the history of thread %s failed", self.thread_id)
            return RunErrorEvent(message=describe(exc), code="server_error")

    def interrupt(self) -> None:
        if self.turn is not None:
            self.turn.interrupt()

    async def aclose(self) -> None:
        """Interrupt the turn if it still runs and wait for it to end (its history is then saved)."""
        if self.turn is not None:
            await self.turn.aclose()


# What a client sends back for a ``tool_approval`` interrupt (in ``ResumeEntry.payload``).
APPROVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "message": {"type": "string"}},
    "required": ["approved"],
    "additionalProperties": False,
}


Outcome = RunFinishedCancelledOutcome | RunFinishedInterruptOutcome | RunFinishedSuccessOutcome


def _outcome(result: TurnResult, client_tools: frozenset[str]) -> Outcome | None:
    if result.interrupted:
        return RunFinishedCancelledOutcome()
    approvals = [request for request in result.pending if request.name not in client_tools]
    if not approvals:
        calls = [request.call_id for request in result.pending if request.name in client_tools]
        return RunFinishedSuccessOutcome(pending_tool_call_ids=calls) if calls else None
    return RunFinishedInterruptOutcome(interrupts=interrupts(approvals))


def interrupts(pending: Sequence[ApprovalRequested]) -> list[Interrupt]:
    """One ``tool_approval`` interrupt per waiting call, its id the call's id."""
    return [
        Interrupt(
            id=request.call_id,
            reason="tool_approval",
            message=f"Approve {request.name}({request.arguments})?",
            tool_call_id=request.call_id,
            response_schema=APPROVAL_SCHEMA,
        )
        for request in pending
    ]


def result_json(result: TurnResult) -> dict[str, Any]:
    metrics = result.metrics
    return {
        "text": result.text,
        "interrupted": result.interrupted,
        "cached": result.cached,
        "metrics": {
            "timeToFirstTokenS": metrics.time_to_first_token_s,
            "tokens": metrics.tokens,
            "tokensPerS": metrics.tokens_per_s,
            "totalS": metrics.total_s,
            "tools": [
                {"toolCallId": t.call_id, "name": t.name, "durationS": t.duration_s} for t in metrics.tools
            ],
            "cache": {name: dataclasses.asdict(counts) for name, counts in metrics.cache.items()},
        },
    }


def history_messages(items: Sequence[TResponseInputItem]) -> list[Message]:
    """The session's items as AG-UI messages, the way a page shows a conversation.

    A reply the user interrupted (``status: "incomplete"``) carries ``metadata.rtagent.interrupted``.
    Function calls join the assistant message just before them, as they came from one response.
    Ids are positions (``h0``, ``h1``...): items have no stable ids of their own.
    """
    messages: list[Message] = []
    for index, raw in enumerate(items):
        item: dict[str, Any] = raw  # type: ignore[assignment]  # the SDK's TypedDict union, read as data
        if not isinstance(item, dict):
            continue
        kind, role, id_ = item.get("type", "message"), item.get("role"), f"h{index}"
        if kind == "message" and role == "user":
            messages.append(UserMessage(id=id_, content=content_text(item.get("content"))))
        elif kind == "message" and role == "assistant":
            meta = {METADATA_KEY: {"interrupted": True}} if is_cut(item) else None
            text = content_text(item.get("content"))
            messages.append(AssistantMessage(id=id_, content=text, metadata=meta))
        elif kind == "message" and role in ("system", "developer"):
            cls = SystemMessage if role == "system" else DeveloperMessage
            messages.append(cls(id=id_, content=content_text(item.get("content"))))
        elif kind == "function_call":
            call = ToolCall(
                id=str(item.get("call_id")),
                function=FunctionCall(name=str(item.get("name")), arguments=str(item.get("arguments") or "")),
            )
            last = messages[-1] if messages else None
            if isinstance(last, AssistantMessage):
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(AssistantMessage(id=id_, tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else content_text(output)
            messages.append(ToolMessage(id=id_, tool_call_id=str(item.get("call_id")), content=content))
        elif kind == "reasoning":
            summary = content_text(item.get("summary"))
            if summary:
                messages.append(ReasoningMessage(id=id_, content=summary))
    return messages


def dump(model: Message | Interrupt) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)
