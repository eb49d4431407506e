"""Around each tool call: progress, honest failures, timeouts and the blocking-tool watchdog."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from agents import Agent, RunContextWrapper, Tool, function_tool, handoff
from agents.handoffs import Handoff
from agents.models.interface import Model

import rtagent
from rtagent import ToolFinished, ToolProgress, TurnFinished
from rtagent._tools import instrument, warned
from rtagent.testing import ScriptedModel, call, reply, tool_calls


def tool_outputs(model: ScriptedModel, index: int = 1) -> dict[str, str]:
    items: Any = model.calls[index].input
    return {i["call_id"]: i["output"] for i in items if i.get("type") == "function_call_output"}


async def run_events(agent: Agent[Any]) -> list[Any]:
    async with rtagent.stream(agent, "go") as turn:
        return [event async for event in turn]


async def test_progress_from_async_and_sync_tools() -> None:
    @function_tool
    async def search(query: str) -> str:
        """Searches in steps."""
        for step in range(3):
            rtagent.progress(f"page {step + 1}", fraction=(step + 1) / 3)
            await asyncio.sleep(0.01)
        return "found"

    @function_tool
    def crunch() -> str:
        """A plain function, run by the SDK in a thread."""
        rtagent.progress("crunching", fraction=0.5)
        time.sleep(0.05)
        return "crunched"

    model = ScriptedModel(
        [tool_calls(call("search", {"query": "x"}, call_id="s"), call("crunch", call_id="c")), reply("ok")]
    )
    events = await run_events(Agent(name="a", model=model, tools=[search, crunch]))
    progress = [(e.call_id, e.message, e.fraction) for e in events if isinstance(e, ToolProgress)]
    assert [p for p in progress if p[0] == "s"] == [
        ("s", "page 1", 1 / 3),
        ("s", "page 2", 2 / 3),
        ("s", "page 3", 1.0),
    ]
    assert ("c", "crunching", 0.5) in progress
    kinds = [(type(e).__name__, getattr(e, "call_id", None)) for e in events]
    assert kinds.index(("ToolProgress", "s")) < kinds.index(("ToolFinished", "s"))


def test_progress_outside_a_tool_does_nothing() -> None:
    rtagent.progress("nobody is listening")


async def test_failing_tool_reports_its_error_and_the_model_is_told_why() -> None:
    @function_tool
    async def lookup(order_id: str) -> str:
        """Raises for unknown orders."""
        raise KeyError(f"no order {order_id}")

    model = ScriptedModel([tool_calls(call("lookup", {"order_id": "42"}, call_id="l")), reply("Sorry.")])
    events = await run_events(Agent(name="a", model=model, tools=[lookup]))
    finished = next(e for e in events if isinstance(e, ToolFinished))
    assert finished.error == "KeyError: 'no order 42'"
    assert tool_outputs(model) == {"l": "The tool failed: KeyError: 'no order 42'"}
    assert isinstance(events[-1], TurnFinished)
    assert events[-1].result.text == "Sorry."


async def test_a_tool_can_hide_its_error_details_from_the_model() -> None:
    def discreet(_ctx: RunContextWrapper[Any], _error: Exception) -> str:
        return "the payment service is unavailable"

    @function_tool(failure_error_function=discreet)
    async def pay(amount: int) -> str:
        """Fails with a secret in the message."""
        raise RuntimeError(f"token sk-secret rejected for {amount}")

    model = ScriptedModel([tool_calls(call("pay", {"amount": 5}, call_id="p")), reply("Sorry.")])
    events = await run_events(Agent(name="a", model=model, tools=[pay]))
    finished = next(e for e in events if isinstance(e, ToolFinished))
    assert finished.error == "the payment service is unavailable"
    assert "sk-secret" not in str(model.calls[1].input)
    assert tool_outputs(model) == {"p": "The tool failed: the payment service is unavailable"}


async def test_tool_timeout_is_reported_and_the_turn_goes_on() -> None:
    @function_tool(timeout=0.2)
    async def sluggish() -> str:
        """Too slow."""
        await asyncio.sleep(5)
        return "late"

    model = ScriptedModel([tool_calls(call("sluggish", call_id="t")), reply("It timed out.")])
    start = time.perf_counter()
    events = await run_events(Agent(name="a", model=model, tools=[sluggish]))
    finished = next(e for e in events if isinstance(e, ToolFinished))
    assert finished.error == "timed out after 0.2 s"
    assert 0.2 <= finished.duration_s < 0.5
    assert time.perf_counter() - start < 1.0
    assert tool_outputs(model) == {"t": "The tool failed: timed out after 0.2 s"}


async def test_blocking_async_tool_is_named_once_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    @function_tool
    async def frozen() -> str:
        """Blocks the event loop (a bug the watchdog should point at)."""
        time.sleep(0.6)  # noqa: ASYNC251 - the bug under test
        return "thawed"

    warned.discard("frozen")
    model = ScriptedModel([tool_calls(call("frozen")), tool_calls(call("frozen")), reply("ok")])
    with caplog.at_level(logging.WARNING, logger="rtagent"):
        await run_events(Agent(name="a", model=model, tools=[frozen]))
    messages = [r.getMessage() for r in caplog.records if r.name == "rtagent"]
    assert len(messages) == 1
    assert "'frozen' is blocking the event loop" in messages[0]


async def test_sync_tool_in_a_thread_is_not_blamed(caplog: pytest.LogCaptureFixture) -> None:
    @function_tool
    def threaded() -> str:
        """Blocks only its own thread."""
        time.sleep(0.6)
        return "done"

    model = ScriptedModel([tool_calls(call("threaded")), reply("ok")])
    with caplog.at_level(logging.WARNING, logger="rtagent"):
        await run_events(Agent(name="a", model=model, tools=[threaded]))
    assert [r for r in caplog.records if r.name == "rtagent"] == []


async def test_a_turn_instruments_a_copy_and_leaves_the_agent_as_it_was() -> None:
    @function_tool
    def lookup() -> str:
        """Looks something up."""
        return "found"

    model = ScriptedModel([tool_calls(call("lookup", {}, call_id="c1")), reply(["done"])])
    tools: list[Tool] = [lookup]
    agent = Agent(name="a", model=model, tools=tools)
    invoke = lookup.on_invoke_tool
    events = await run_events(agent)
    assert [e.output for e in events if isinstance(e, ToolFinished)] == ["found"]
    assert agent.tools is tools
    assert tools == [lookup]
    assert lookup.on_invoke_tool is invoke


async def test_the_agents_handed_off_to_are_copied_once_each_and_left_as_they_were() -> None:
    @function_tool
    def lookup() -> str:
        """Looks something up."""
        return "found"

    billing = Agent(name="billing", tools=[lookup])
    triage = Agent(name="triage", handoffs=[billing, handoff(billing, tool_name_override="to_billing")])
    billing.handoffs = [triage]  # a cycle: billing hands back
    given: list[str] = []

    def model(agent: Agent[Any]) -> Model:
        given.append(agent.name)
        return ScriptedModel([])

    copied = instrument(triage, rtagent.Turn(triage, "hi"), model)
    via_agent, via_handoff = copied.handoffs
    assert isinstance(via_agent, Agent)
    assert isinstance(via_handoff, Handoff)
    assert via_handoff._agent_ref is not None
    assert via_handoff._agent_ref() is via_agent  # one copy of billing, however it is reached
    assert via_agent.handoffs[0] is copied
    assert sorted(given) == ["billing", "triage"]  # each agent's model, once
    assert isinstance(copied.model, ScriptedModel)
    assert via_agent.tools[0] is not lookup  # billing's tools report to the turn too
    assert billing.tools[0] is lookup  # the user's agents are as they were
    assert billing.handoffs[0] is triage
    assert triage.model is None
