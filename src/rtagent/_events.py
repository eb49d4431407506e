"""The event vocabulary: what a turn reports, the moment it happens.

Every front end (terminal, web page, AG-UI API, benchmarks) consumes these and nothing else.
Each event is a small frozen dataclass whose ``type`` field names it, so a ``match`` on the class
or a lookup on ``event.type`` both work, and ``dataclasses.asdict`` gives a JSON-ready dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    from ._result import TurnResult


@dataclass(frozen=True, slots=True)
class Thinking:
    """The turn has started; the model has not produced its first token yet."""

    type: Literal["thinking"] = field(default="thinking", init=False)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A chunk of the assistant's reply, in the order the model produced it."""

    text: str
    type: Literal["text_delta"] = field(default="text_delta", init=False)


@dataclass(frozen=True, slots=True)
class ToolStarted:
    """A tool call whose arguments are complete in the model stream.

    Sent as soon as the arguments are known, before the model's response ends and before the SDK
    runs the tool, so a front end can show what is about to happen.
    """

    call_id: str
    name: str
    arguments: str
    type: Literal["tool_started"] = field(default="tool_started", init=False)


@dataclass(frozen=True, slots=True)
class ApprovalRequested:
    """A tool call that waits for a person to approve or reject it (``needs_approval``).

    Sent the moment the call's arguments are complete when the tool always needs approval, else
    when the SDK has decided that this call does. No ``ToolStarted`` precedes it: the tool has not
    run. The turn ends with the call in ``result.pending``; ``Chat.approve`` / ``Chat.reject``
    continue it.
    """

    call_id: str
    name: str
    arguments: str
    type: Literal["approval_requested"] = field(default="approval_requested", init=False)


@dataclass(frozen=True, slots=True)
class ToolProgress:
    """A running tool's own report of what it is doing (see ``rtagent.progress``)."""

    call_id: str
    message: str
    fraction: float | None = None
    type: Literal["tool_progress"] = field(default="tool_progress", init=False)


@dataclass(frozen=True, slots=True)
class ToolFinished:
    """One tool call returned (or failed); sent the moment it does, not when its siblings do.

    ``cached``: the output did not come from running the tool for this call, but from the tool cache
    (``rtagent.cached``): a stored result, or an identical call's execution that this one shared.
    """

    call_id: str
    name: str
    output: str
    error: str | None = None
    duration_s: float = 0.0
    cached: bool = False
    type: Literal["tool_finished"] = field(default="tool_finished", init=False)


@dataclass(frozen=True, slots=True)
class AgentChanged:
    """Another agent answers from now on: the SDK has just handed the conversation to ``name``.

    A turn starts with its own agent answering; this comes the moment a handoff switches agent (and
    at the start of a continued turn whose paused run was with another agent), before anything of
    the new agent's. The handoff's ``transfer_to_...`` call is no tool call: no ``ToolStarted``.
    """

    name: str
    type: Literal["agent_changed"] = field(default="agent_changed", init=False)


@dataclass(frozen=True, slots=True)
class TurnFinished:
    """The turn ended normally or was interrupted (``result.interrupted``)."""

    result: TurnResult
    type: Literal["turn_finished"] = field(default="turn_finished", init=False)


@dataclass(frozen=True, slots=True)
class TurnFailed:
    """The turn ended with an error. ``partial_text`` is what the user had already seen.

    A guardrail's tripwire ends the turn the moment it fires, with ``guardrail`` naming it: no text
    comes after it, and what was shown is saved as a reply cut short.
    """

    error: str
    partial_text: str
    result: TurnResult
    guardrail: str | None = None
    type: Literal["turn_failed"] = field(default="turn_failed", init=False)


Event: TypeAlias = (
    Thinking
    | TextDelta
    | ToolStarted
    | ApprovalRequested
    | ToolProgress
    | ToolFinished
    | AgentChanged
    | TurnFinished
    | TurnFailed
)
