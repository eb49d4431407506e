"""Conversations: interrupting keeps exactly what the user saw, and the next turn's input is valid."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
from agents import Agent, SQLiteSession, function_tool

import rtagent
from rtagent import TextDelta, ToolFinished, ToolStarted, TurnFailed, TurnFinished
from rtagent._history import CUT_MARK, INTERRUPTED, NOT_ANSWERED, STILL_RUNNING
from rtagent.testing import ScriptedModel, call, fail, reply, tool_calls

WORDS = [f"w{i} " for i in range(500)]


def assert_valid_input(items: list[Any]) -> None:
    """Every function call has exactly one output, after it: what every OpenAI-compatible API needs."""
    calls = [i["call_id"] for i in items if isinstance(i, dict) and i.get("type") == "function_call"]
    outputs = [i["call_id"] for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
    assert sorted(calls) == sorted(outputs)
    assert len(set(calls)) == len(calls)
    for call_id in calls:
        kinds = [i.get("type") for i in items if isinstance(i, dict) and i.get("call_id") == call_id]
        assert kinds == ["function_call", "function_call_output"]


async def test_interrupt_at_the_50th_delta_keeps_exactly_the_delivered_text() -> None:
    model = ScriptedModel([reply(WORDS, delay=0.002), reply("Sure, go on.")])
    chat = rtagent.Chat(Agent(name="a", model=model))
    delivered: list[str] = []
    async with chat.send("tell me everything") as turn:
        async for event in turn:
            if isinstance(event, TextDelta):
                delivered.append(event.text)
                if len(delivered) == 50:
                    turn.interrupt()
    assert len(delivered) == 50
    assert turn.result.interrupted
    assert turn.result.text == "".join(delivered)

    history = await chat.history()
    assert history[0] == {"content": "tell me everything", "role": "user"}
    cut = history[1]
    assert cut["role"] == "assistant"  # type: ignore[typeddict-item]
    assert cut["status"] == "incomplete"  # type: ignore[typeddict-item]
    assert cut["content"][0]["text"] == "".join(delivered)  # type: ignore[typeddict-item, index]
    assert len(history) == 2

    await chat.send("and then?").wait()
    sent = model.calls[1].input
    assert sent == [
        {"content": "tell me everything", "role": "user"},
        {"type": "message", "role": "assistant", "content": "".join(delivered).rstrip() + " " + CUT_MARK},
        {"content": "and then?", "role": "user"},
    ]


async def test_interrupt_while_tools_run_gives_each_unfinished_call_an_output() -> None:
    @function_tool
    async def fast() -> str:
        """Returns at once."""
        return "fast result"

    @function_tool
    async def stuck() -> str:
        """Never returns by itself."""
        await asyncio.sleep(60)
        return "never"

    model = ScriptedModel(
        [tool_calls(call("fast", call_id="f"), call("stuck", call_id="s"), text="Checking. "), reply("ok")]
    )
    chat = rtagent.Chat(Agent(name="a", model=model, tools=[fast, stuck]))
    finished: dict[str, ToolFinished] = {}
    async with chat.send("go") as turn:
        async for event in turn:
            if isinstance(event, ToolFinished):
                finished[event.call_id] = event
                if event.call_id == "f":
                    turn.interrupt()
    assert finished["f"].error is None
    assert finished["s"].error == "interrupted"

    history = await chat.history()
    assert_valid_input(history)
    outputs = {i["call_id"]: i["output"] for i in history if i.get("type") == "function_call_output"}  # type: ignore[typeddict-item]
    assert outputs == {"f": "fast result", "s": INTERRUPTED}
    assert history[1]["content"][0]["text"] == "Checking. "  # type: ignore[typeddict-item, index]

    await chat.send("next").wait()
    assert_valid_input(model.calls[1].input)


async def test_background_tool_finishes_and_its_output_is_recorded() -> None:
    @rtagent.background
    @function_tool
    async def report(topic: str) -> str:
        """Takes a while and must not be lost."""
        await asyncio.sleep(0.3)
        return f"report on {topic}"

    model = ScriptedModel([tool_calls(call("report", {"topic": "sales"}, call_id="r")), reply("ok")])
    session = SQLiteSession("bg")
    async with rtagent.stream(Agent(name="a", model=model, tools=[report]), "go", session=session) as turn:
        async for event in turn:
            if isinstance(event, ToolStarted):
                await asyncio.sleep(0.05)
                turn.interrupt()
            if isinstance(event, ToolFinished):
                assert event.output == STILL_RUNNING
    assert turn.result.interrupted
    await asyncio.sleep(0.5)
    history = await session.get_items()
    assert_valid_input(history)
    outputs = [i["output"] for i in history if i.get("type") == "function_call_output"]  # type: ignore[typeddict-item]
    assert outputs == [STILL_RUNNING, "report on sales"]


async def test_error_after_20_deltas_delivers_all_20_first_and_keeps_them() -> None:
    # One burst with no yield to the loop: the SDK's own stream would drop the queued deltas.
    burst = reply([f"d{i} " for i in range(20)], yield_to_loop=False)
    model = ScriptedModel([fail(RuntimeError("connection reset"), after=burst)])
    chat = rtagent.Chat(Agent(name="a", model=model))
    events = [event async for event in chat.send("go")]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == [f"d{i} " for i in range(20)]
    failed = events[-1]
    assert isinstance(failed, TurnFailed)
    assert failed.error == "RuntimeError: connection reset"
    assert failed.partial_text == "".join(deltas)
    history = await chat.history()
    assert history[-1]["content"][0]["text"] == "".join(deltas)  # type: ignore[typeddict-item, index]
    assert history[-1]["status"] == "incomplete"  # type: ignore[typeddict-item]


async def test_new_message_interrupts_the_running_reply_by_default() -> None:
    model = ScriptedModel([reply(WORDS, delay=0.005), reply("Second answer.")])
    chat = rtagent.Chat(Agent(name="a", model=model))
    first = chat.send("first")
    seen = 0
    async with first:
        async for event in first:
            if isinstance(event, TextDelta):
                seen += 1
                if seen == 10:
                    second = chat.send("second")
    assert isinstance(event, TurnFinished)
    assert first.result.interrupted
    assert seen < 20
    result = await second.wait()
    assert result.text == "Second answer."
    assert model.calls[1].input[-1] == {"content": "second", "role": "user"}


async def test_queue_policy_waits_for_the_running_reply() -> None:
    model = ScriptedModel([reply("First answer.", delay=0.01), reply("Second answer.")])
    chat = rtagent.Chat(Agent(name="a", model=model), policy="queue")
    first = chat.send("first")
    first.start()
    second = chat.send("second")
    assert (await second.wait()).text == "Second answer."
    assert (await first.wait()).text == "First answer."
    assert not first.result.interrupted


async def test_max_turns_exceeded_gives_a_clear_message_and_intact_history() -> None:
    @function_tool
    def again() -> str:
        """Always asks to be called again."""
        return "call me again"

    model = ScriptedModel([tool_calls(call("again")) for _ in range(3)])
    chat = rtagent.Chat(Agent(name="a", model=model, tools=[again]), max_turns=2)
    events = [event async for event in chat.send("loop")]
    failed = events[-1]
    assert isinstance(failed, TurnFailed)
    assert "turn limit" in failed.error
    assert "\n" not in failed.error
    assert_valid_input(await chat.history())


async def test_chat_stays_usable_after_a_failed_turn() -> None:
    model = ScriptedModel([*[fail(RuntimeError("down"))] * 4, reply("back")])
    chat = rtagent.Chat(Agent(name="a", model=model))
    assert isinstance([e async for e in chat.send("one")][-1], TurnFailed)
    last = [e async for e in chat.send("two")][-1]
    assert isinstance(last, TurnFinished)
    assert last.result.text == "back"


async def test_a_long_conversation_keeps_only_its_latest_turn_alive() -> None:
    # Each turn waits for the one before it; once it has, holding on to it would keep every turn of
    # the conversation (text, items, results) in memory for as long as the chat lives.
    model = ScriptedModel([reply(f"answer {i}") for i in range(3)])
    chat = rtagent.Chat(Agent(name="a", model=model))
    turn = chat.send("one")
    await turn.wait()
    first = weakref.ref(turn)
    del turn
    await chat.send("two").wait()
    await chat.send("three").wait()
    gc.collect()
    assert first() is None
    texts = [item.get("content") for item in await chat.history()]
    assert texts[::2] == ["one", "two", "three"]


async def test_a_message_interrupted_before_the_model_is_called_stays_in_the_history() -> None:
    # The second message interrupts the first before its turn has taken a step: the SDK saves a
    # message only just before its model call, so without rtagent "one" was never saved.
    model = ScriptedModel([reply("Both read.")])
    chat = rtagent.Chat(Agent(name="a", model=model))
    first = chat.send("one")
    second = chat.send("two")
    assert (await second.wait()).text == "Both read."
    assert first.result.interrupted
    assert len(model.calls) == 1
    both = [{"content": "one", "role": "user"}, {"content": "two", "role": "user"}]
    assert model.calls[0].input == both
    history = await chat.history()
    assert history[:2] == both
    assert len(history) == 3


async def test_a_message_interrupted_while_the_history_is_read_is_saved_once() -> None:
    # Interrupted inside the SDK run, before its model call: whether the SDK had saved the
    # message decides whether rtagent does, so it is there exactly once either way.
    class SlowReads(SQLiteSession):
        async def get_items(self, limit: int | None = None) -> list[Any]:
            await asyncio.sleep(0.05)
            return await super().get_items(limit)

    model = ScriptedModel([reply("never sent")])
    chat = rtagent.Chat(Agent(name="a", model=model), session=SlowReads("slow"))
    turn = chat.send("hello")
    await asyncio.sleep(0.01)
    turn.interrupt()
    await turn.wait()
    assert turn.result.interrupted
    assert len(model.calls) == 0
    assert await chat.history() == [{"content": "hello", "role": "user"}]


async def test_stopping_a_queued_message_stops_the_reply_it_waits_for_and_keeps_both() -> None:
    model = ScriptedModel([reply(WORDS, delay=0.005), reply("unused")])
    chat = rtagent.Chat(Agent(name="a", model=model), policy="queue")
    first = chat.send("first")
    seen = 0
    async for event in first:
        if isinstance(event, TextDelta):
            seen += 1
            if seen == 3:
                queued = chat.send("second")
                queued.interrupt()
    assert seen < 20
    await asyncio.wait_for(queued.wait(), 5)
    assert first.result.interrupted
    assert queued.result.interrupted
    assert len(model.calls) == 1
    history = await chat.history()
    assert [item.get("role") for item in history] == ["user", "assistant", "user"]
    assert history[0]["content"] == "first"  # type: ignore[typeddict-item]
    assert history[1]["status"] == "incomplete"  # type: ignore[typeddict-item]
    assert history[2]["content"] == "second"  # type: ignore[typeddict-item]


# -- tool approvals (``needs_approval``) -----------------------------------------------------------

refunds: list[str] = []


@function_tool(needs_approval=True)
async def refund(order: str) -> str:
    """Refund an order."""
    refunds.append(order)
    await asyncio.sleep(0.05)
    return f"refunded order {order}"


async def big_ones(_context: Any, params: dict[str, Any], _call_id: str) -> bool:
    return int(params.get("amount", 0)) > 100


@function_tool(needs_approval=big_ones)
async def pay(amount: int) -> str:
    """Pay an amount."""
    return f"paid {amount}"


def approval_chat(*steps: Any, session: SQLiteSession | None = None) -> tuple[rtagent.Chat, ScriptedModel]:
    refunds.clear()
    model = ScriptedModel(list(steps))
    agent = Agent(name="support", model=model, tools=[refund, pay])
    return rtagent.Chat(agent, session=session or SQLiteSession("approvals")), model


async def events_of(turn: rtagent.Turn) -> list[Any]:
    return [event async for event in turn]


async def test_a_call_that_needs_approval_pauses_the_turn_and_approving_runs_it_once() -> None:
    chat, _ = approval_chat(
        tool_calls(call("refund", {"order": "42"}), text="Let me check. "), reply("Done.")
    )
    first = await events_of(chat.send("refund order 42"))
    kinds = [e.type for e in first]
    assert "tool_started" not in kinds
    assert "tool_finished" not in kinds
    asked = [e for e in first if isinstance(e, rtagent.ApprovalRequested)]
    assert [(a.call_id, a.name, a.arguments) for a in asked] == [("call_1", "refund", '{"order":"42"}')]
    assert first[-1].result.pending == tuple(asked)
    assert chat.pending == tuple(asked)
    assert refunds == []

    second = await events_of(chat.approve("call_1"))
    assert [e.type for e in second if e.type.startswith("tool")] == ["tool_started", "tool_finished"]
    assert "".join(e.text for e in second if isinstance(e, TextDelta)) == "Done."
    assert isinstance(second[-1], TurnFinished)
    assert second[-1].result.pending == ()
    assert refunds == ["42"]
    assert chat.pending == ()
    assert_valid_input(await chat.history())


async def test_rejecting_never_runs_the_tool_and_tells_the_model() -> None:
    chat, model = approval_chat(tool_calls(call("refund", {"order": "42"})), reply("Understood."))
    await chat.send("refund order 42").wait()
    await chat.reject("call_1", message="The customer's manager said no.").wait()
    assert refunds == []
    told = model.calls[-1].input
    assert {
        "call_id": "call_1",
        "output": "The customer's manager said no.",
        "type": "function_call_output",
    } in told
    assert_valid_input(await chat.history())


async def test_a_paused_run_continues_in_another_chat_on_the_same_history() -> None:
    session = SQLiteSession("restart")
    chat, _ = approval_chat(tool_calls(call("refund", {"order": "7"})), session=session)
    result = await chat.send("refund order 7").wait()
    assert result.state is not None
    # As after a restart: a new agent, model and chat; only the history and the state string remain.
    restarted, _ = approval_chat(reply("Refunded."), session=session)
    await restarted.restore(result.state)
    assert [p.call_id for p in restarted.pending] == ["call_1"]
    resumed = await restarted.approve("call_1").wait()
    assert resumed.text == "Refunded."
    assert refunds == ["7"]
    assert_valid_input(await restarted.history())


async def test_two_waiting_calls_are_answered_one_at_a_time_in_either_order() -> None:
    two = tool_calls(call("refund", {"order": "1"}), call("refund", {"order": "2"}))
    chat, model = approval_chat(two, reply("One refunded, one not."))
    await chat.send("refund 1 and 2").wait()
    after_one = await chat.approve("call_2").wait()
    assert refunds == ["2"]
    assert [p.call_id for p in after_one.pending] == ["call_1"]  # paused again, no model call
    assert len(model.calls) == 1
    await chat.reject("call_1").wait()
    assert refunds == ["2"]
    assert len(model.calls) == 2
    assert_valid_input(await chat.history())


async def test_a_new_message_instead_of_an_answer_closes_the_waiting_call() -> None:
    chat, _ = approval_chat(tool_calls(call("refund", {"order": "42"})), reply("Sure, what else?"))
    await chat.send("refund order 42").wait()
    turn = await chat.send("actually, never mind").wait()
    assert turn.text == "Sure, what else?"
    assert refunds == []
    history = await chat.history()
    assert_valid_input(history)
    assert {"type": "function_call_output", "call_id": "call_1", "output": NOT_ANSWERED} in history
    assert history[-2] == {"role": "user", "content": "actually, never mind"}
    with pytest.raises(rtagent.ApprovalError, match="no tool call is waiting"):
        chat.approve("call_1")


async def test_a_run_paused_after_a_handoff_goes_on_with_that_agent_and_says_so() -> None:
    billing_model = ScriptedModel(
        [tool_calls(call("refund", {"order": "7"}, call_id="r1")), reply("Refunded.")]
    )
    triage_model = ScriptedModel([tool_calls(call("transfer_to_billing", {}, call_id="h1"))])
    billing = Agent(name="billing", model=billing_model, tools=[refund])
    chat = rtagent.Chat(Agent(name="triage", model=triage_model, handoffs=[billing]))
    refunds.clear()
    first = await events_of(chat.send("refund order 7"))
    assert [e.name for e in first if isinstance(e, rtagent.AgentChanged)] == ["billing"]
    assert [p.call_id for p in chat.pending] == ["r1"]

    second = await events_of(chat.approve("r1"))
    # A new turn of the chat, which starts with its own agent: it says at once who goes on.
    assert second[0].type == "thinking"
    assert second[1] == rtagent.AgentChanged("billing")
    assert [e.type for e in second].count("agent_changed") == 1
    assert refunds == ["7"]
    assert second[-1].result.text == "Refunded."
    assert len(triage_model.calls) == 1


async def test_an_answer_for_a_call_nothing_waits_for_is_an_approval_error() -> None:
    chat, _ = approval_chat(tool_calls(call("refund", {"order": "42"})), reply("Done."))
    await chat.send("refund order 42").wait()
    with pytest.raises(rtagent.ApprovalError, match="'call_9'"):
        chat.approve("call_9")
    with pytest.raises(rtagent.ApprovalError, match="both"):
        chat.resume(approved=["call_1"], rejected=["call_1"])
    await chat.approve("call_1").wait()
    with pytest.raises(rtagent.ApprovalError):
        chat.approve("call_1")  # answered already


async def test_interrupting_the_approved_tool_leaves_a_valid_history() -> None:
    chat, _ = approval_chat(tool_calls(call("refund", {"order": "42"})), reply("never sent"))
    await chat.send("refund order 42").wait()
    async with chat.approve("call_1") as turn:
        async for event in turn:
            if isinstance(event, ToolStarted):
                turn.interrupt()
    assert turn.result.interrupted
    assert_valid_input(await chat.history())


async def test_a_rule_of_the_authors_asks_only_for_the_calls_it_picks() -> None:
    calls = tool_calls(call("pay", {"amount": 5}), call("pay", {"amount": 500}))
    chat, _ = approval_chat(calls, reply("Paid."))
    events = await events_of(chat.send("pay 5 and 500"))
    started = [e.call_id for e in events if isinstance(e, ToolStarted)]
    asked = [e.call_id for e in events if isinstance(e, rtagent.ApprovalRequested)]
    assert (started, asked) == (["call_1"], ["call_2"])
    assert [e.call_id for e in events if isinstance(e, ToolFinished)] == ["call_1"]
    assert (await chat.approve("call_2").wait()).text == "Paid."
