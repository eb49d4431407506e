"""What an AG-UI client brings to a run: its own tools, and the state it shares with the agent.

**Frontend tools** (``RunAgentInput.tools``): each becomes a tool the model may call for this run.
The client runs it, not the server: a call ends the run (TOOL_CALL_START/ARGS/END, then
RUN_FINISHED whose success outcome names the call in ``pendingToolCallIds``), and the client's
next run carries the result as a tool message. Under the hood the call is a paused run, as for a
tool that needs approval (``Chat``): the tool is marked ``needs_approval``, the result message
approves it, and the tool's body returns the client's result.

**Shared state** (``RunAgentInput.state``): the run's context is the state itself, a JSON object
(``dict``) a tool reads and changes in place (``ctx.context["cart"] = [...]``). The run starts
with a STATE_SNAPSHOT when there is any state, and each change a tool makes is streamed once the
tool ends, as a STATE_DELTA (a JSON Patch, RFC 6902, made by ``jsonpatch``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonpatch
from ag_ui.core import BaseEvent, RunAgentInput, StateDeltaEvent, StateSnapshotEvent, ToolMessage
from ag_ui.core import Tool as ClientTool
from agents import Agent, FunctionTool
from agents.tool_context import ToolContext

from ._limits import InputError

NO_RESULT = "The client sent no result for this call."


@dataclass(frozen=True, slots=True)
class Frontend:
    """A run's client tools and shared state (``RunAgentInput.tools`` and ``state``)."""

    tools: Sequence[ClientTool] = ()
    state: SharedState | None = None

    @classmethod
    def of(cls, run: RunAgentInput) -> Frontend:
        return cls(run.tools or (), SharedState(run.state) if isinstance(run.state, dict) else None)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool.name for tool in self.tools)


NO_FRONTEND = Frontend()


def frontend_tools(
    agent: Agent[Any], tools: Sequence[ClientTool], results: Mapping[str, str]
) -> list[FunctionTool]:
    """The client's tools as SDK tools, answering with ``results`` (call id -> the client's result)."""
    own = {tool.name for tool in agent.tools}
    out: list[FunctionTool] = []
    for tool in tools:
        if tool.name in own:
            raise InputError(f"tool {tool.name[:80]!r} is the agent's own; a client tool needs another name")

        async def answer(context: ToolContext[Any], _arguments: str) -> str:
            return results.get(context.tool_call_id, NO_RESULT)

        schema = tool.parameters if isinstance(tool.parameters, dict) else {}
        out.append(
            FunctionTool(
                name=tool.name,
                description=tool.description,
                params_json_schema={"type": "object", "properties": {}, **schema},
                on_invoke_tool=answer,
                strict_json_schema=False,
                needs_approval=True,  # the run pauses at the call: the client runs it
            )
        )
    return out


def tool_results(run: RunAgentInput) -> dict[str, str]:
    """The results a client sends back: the tool messages at the end of its messages."""
    results: dict[str, str] = {}
    for message in reversed(run.messages):
        if not isinstance(message, ToolMessage):
            break
        content = message.content
        text = content if isinstance(content, str) else "\n".join(getattr(p, "text", "") for p in content)
        results[message.tool_call_id] = text
    return results


class SharedState:
    """The state of one run, and what the client last saw of it."""

    def __init__(self, state: Any) -> None:
        self.value: dict[str, Any] = state if isinstance(state, dict) else {}
        self._seen = copy.deepcopy(self.value)

    def snapshot(self) -> list[BaseEvent]:
        return [StateSnapshotEvent(snapshot=self.value)] if self.value else []

    def changes(self) -> list[BaseEvent]:
        """A STATE_DELTA for what changed since the client last saw the state, if anything."""
        patch = jsonpatch.make_patch(self._seen, self.value).patch
        if not patch:
            return []
        self._seen = copy.deepcopy(self.value)
        return [StateDeltaEvent.model_validate({"type": "STATE_DELTA", "delta": patch})]
