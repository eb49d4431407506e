"""The realtime turn: event order and timing, with the scripted model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from agents import (
    Agent,
    GuardrailFunctionOutput,
    RunConfig,
    RunContextWrapper,
    SQLiteSession,
    function_tool,
    handoff,
    input_guardrail,
    output_guardrail,
)
from agents.items import TResponseInputItem

import rtagent
from rtagent import (
    AgentChanged,
    Event,
    TextDelta,
    Thinking,
    ToolFinished,
    ToolStarted,
    TurnFailed,
    TurnFinished,
)
from rtagent._buffer import MAX_PENDING_EVENTS
from rtagent.testing import ScriptedModel, call, fail, reply, tool_calls


@function_tool
async def quick(query: str) -> str:
    """Answers in 0.3 s."""
    await asyncio.sleep(0.3)
    return f"quick {query}"


@function_tool
async def slow(query: str) -> str:
    """Answers in 1.5 s."""
    await asyncio.sleep(1.5)
    return f"slow {query}"


@function_tool
def blocking_a(query: str) -> str:
    """A sync tool that blocks for 1 s (the SDK runs it in a thread)."""
    time.sleep(1.0)
    return f"a {query}"


@function_tool
def blocking_b(query: str) -> str:
    """The same, a second one."""
    time.sleep(1.0)
    return f"b {query}"


async def collect(turn: rtagent.Turn) -> list[tuple[float, Event]]:
    start = time.perf_counter()
    timeline: list[tuple[float, Event]] = []
    async with turn:
        async for event in turn:
            timeline.append((time.perf_counter() - start, event))
    return timeline


async def test_text_streams_as_deltas_between_thinking_and_finish() -> None:
    model = ScriptedModel([reply("Hello there, friend!", chunks=4, delay=0.01)])
    timeline = await collect(rtagent.stream(Agent(name="a", model=model), "hi"))
    events = [event for _, event in timeline]
    assert isinstance(events[0], Thinking)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", " ther", "e, fr", "iend!"]
    assert isinstance(events[-1], TurnFinished)
    result = events[-1].result
    assert result.text == "Hello there, friend!"
    assert result.final_output == "Hello there, friend!"
    assert not result.interrupted
    assert result.metrics.tokens == 4
    assert result.metrics.time_to_first_token_s is not None
    assert result.metrics.tokens_per_s is not None


async def test_each_tool_finishes_the_moment_it_returns() -> None:
    model = ScriptedModel(
        [
            tool_calls(call("quick", {"query": "a"}, call_id="q"), call("slow", {"query": "b"}, call_id="s")),
            reply("Both done."),
        ]
    )
    agent = Agent(name="a", model=model, tools=[quick, slow])
    timeline = await collect(rtagent.stream(agent, "go"))

    started = {e.call_id: t for t, e in timeline if isinstance(e, ToolStarted)}
    finished = {e.call_id: (t, e) for t, e in timeline if isinstance(e, ToolFinished)}
    assert set(started) == {"q", "s"}
    first = min(finished.values(), key=lambda pair: pair[0])
    assert first[1].call_id == "q"
    assert first[0] < 0.4, f"first ToolFinished after {first[0]:.3f} s"
    assert finished["q"][1].output == "quick a"
    assert finished["s"][0] >= 1.5
    assert 0.3 <= finished["q"][1].duration_s < 0.4
    kinds = [type(e).__name__ for _, e in timeline]
    assert kinds.index("ToolFinished") < kinds.index("TextDelta")
    result = timeline[-1][1]
    assert isinstance(result, TurnFinished)
    assert {t.call_id for t in result.result.metrics.tools} == {"q", "s"}


async def test_sync_tools_run_in_parallel_without_stalling_the_loop() -> None:
    model = ScriptedModel(
        [
            tool_calls(call("blocking_a", {"query": "x"}), call("blocking_b", {"query": "y"})),
            reply("ok"),
        ]
    )
    agent = Agent(name="a", model=model, tools=[blocking_a, blocking_b])
    worst_gap = 0.0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal worst_gap
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            worst_gap = max(worst_gap, now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    timeline = await collect(rtagent.stream(agent, "go"))
    stop.set()
    await beat
    done_at = [t for t, e in timeline if isinstance(e, ToolFinished)]
    assert len(done_at) == 2
    assert max(done_at) < 1.2, f"tools done at {done_at}"
    assert worst_gap < 0.05, f"event loop stalled {worst_gap * 1e3:.1f} ms"


async def test_tool_is_announced_when_its_arguments_are_complete_not_when_the_response_ends() -> None:
    # The second call's arguments stream slowly: the first call is complete long before.
    model = ScriptedModel(
        [
            tool_calls(
                call("quick", {"query": "first"}, call_id="one", chunks=3),
                call("quick", {"query": "second"}, call_id="two", chunks=5),
                delay=0.1,
            ),
            reply("ok"),
        ]
    )
    timeline = await collect(rtagent.stream(Agent(name="a", model=model, tools=[quick]), "go"))
    started = {e.call_id: t for t, e in timeline if isinstance(e, ToolStarted)}
    assert started["two"] - started["one"] >= 0.4
    assert [e.arguments for _, e in timeline if isinstance(e, ToolStarted)] == [
        '{"query":"first"}',
        '{"query":"second"}',
    ]


async def test_break_stops_the_model_stream() -> None:
    model = ScriptedModel([reply([f"w{i} " for i in range(500)], delay=0.01)])
    seen = 0
    async for event in rtagent.stream(Agent(name="a", model=model), "go"):
        if isinstance(event, TextDelta):
            seen += 1
            if seen == 5:
                break
    await asyncio.sleep(0.1)
    emitted = model.deltas_emitted
    assert model.streams[0].outcome == "closed"
    await asyncio.sleep(0.1)
    assert model.deltas_emitted == emitted < 20


async def test_leaving_the_block_cancels_running_tools() -> None:
    cancelled = asyncio.Event()

    @function_tool
    async def forever() -> str:
        """Never returns by itself."""
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    model = ScriptedModel([tool_calls(call("forever")), reply("unreachable")])
    async with rtagent.stream(Agent(name="a", model=model, tools=[forever]), "go") as turn:
        async for event in turn:
            if isinstance(event, ToolStarted):
                await asyncio.sleep(0.05)
                break
    await asyncio.wait_for(cancelled.wait(), 1.0)
    assert turn.result.interrupted


async def test_interrupt_ends_the_turn_with_interrupted_result() -> None:
    model = ScriptedModel([reply([f"w{i} " for i in range(100)], delay=0.01)])
    turn = rtagent.stream(Agent(name="a", model=model), "go")
    texts: list[str] = []
    async with turn:
        async for event in turn:
            if isinstance(event, TextDelta):
                texts.append(event.text)
                if len(texts) == 10:
                    turn.interrupt()
            last = event
    assert isinstance(last, TurnFinished)
    assert last.result.interrupted
    assert last.result.text == "".join(texts)


async def test_model_failure_gives_turn_failed_with_partial_text() -> None:
    model = ScriptedModel([fail(RuntimeError("model broke"), after=reply("one two three"))])
    timeline = await collect(rtagent.stream(Agent(name="a", model=model), "go"))
    last = timeline[-1][1]
    assert isinstance(last, TurnFailed)
    assert last.error == "RuntimeError: model broke"
    assert last.partial_text == "one two three"
    assert "".join(e.text for _, e in timeline if isinstance(e, TextDelta)) == "one two three"


async def test_second_turn_sees_the_first_through_the_session() -> None:
    model = ScriptedModel([reply("Nice to meet you, Ada."), reply("You are Ada.")])
    agent = Agent(name="a", model=model)
    session = SQLiteSession("t")
    await rtagent.run(agent, "I am Ada", session=session)
    result = await rtagent.run(agent, "Who am I?", session=session)
    assert result.text == "You are Ada."
    sent = model.calls[1].input
    assert isinstance(sent, list)
    contents = [str(item.get("content")) for item in sent if isinstance(item, dict)]
    assert any("I am Ada" in c for c in contents)
    assert any("Nice to meet you, Ada." in c for c in contents)


async def test_run_raises_turn_error_keeping_partial_result() -> None:
    model = ScriptedModel([fail(RuntimeError("down"))] * 4)  # the first try and three retries
    with pytest.raises(rtagent.TurnError, match="down") as caught:
        await rtagent.run(Agent(name="a", model=model), "go")
    assert caught.value.result.text == ""


def test_run_sync_works_without_a_loop() -> None:
    model = ScriptedModel([reply("sync ok")])
    assert rtagent.run_sync(Agent(name="a", model=model), "go").text == "sync ok"


async def test_slow_consumer_gets_coalesced_text_not_unbounded_queue() -> None:
    model = ScriptedModel([reply([f"{i} " for i in range(2000)], yield_to_loop=False)])
    turn = rtagent.stream(Agent(name="a", model=model), "go")
    async with turn:
        await asyncio.sleep(0.3)  # the whole reply arrives while nobody reads
        events = [event async for event in turn]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) <= MAX_PENDING_EVENTS
    assert "".join(d.text for d in deltas) == "".join(f"{i} " for i in range(2000))


async def test_interrupt_before_the_model_is_called_still_ends_the_turn() -> None:
    model = ScriptedModel([reply("never")])
    turn = rtagent.stream(Agent(name="a", model=model), "go")
    turn.start()
    turn.interrupt()
    events = [event async for event in turn]
    assert isinstance(events[-1], TurnFinished)
    assert events[-1].result.interrupted
    assert model.calls == ()


async def test_model_failing_before_its_first_token_is_retried() -> None:
    model = ScriptedModel([fail(RuntimeError("flaky")), fail(RuntimeError("flaky")), reply("recovered")])
    result = await rtagent.run(Agent(name="a", model=model), "go")
    assert result.text == "recovered"
    assert len(model.calls) == 3


async def test_unreachable_server_fails_in_one_line_within_five_seconds() -> None:
    start = time.perf_counter()
    events = [e async for e in rtagent.stream(Agent(name="a"), "hi", model="http://127.0.0.1:9/v1#m")]
    elapsed = time.perf_counter() - start
    failed = events[-1]
    assert isinstance(failed, TurnFailed)
    assert failed.error == "cannot reach the model server at 127.0.0.1:9"
    assert elapsed < 5


async def test_calls_announced_but_not_started_also_finish_on_interrupt() -> None:
    model = ScriptedModel(
        [
            tool_calls(
                call("quick", {"query": "a"}, call_id="q"),
                call("slow", {"query": "b" * 60}, chunks=50),
                delay=0.02,
            ),
            reply("x"),
        ]
    )
    async with rtagent.stream(Agent(name="a", model=model, tools=[quick, slow]), "go") as turn:
        async for event in turn:
            if isinstance(event, ToolStarted):
                turn.interrupt()
            if isinstance(event, ToolFinished):
                assert (event.call_id, event.error) == ("q", "interrupted")
    assert turn.result.interrupted


# -- handoffs -----------------------------------------------------------------------------------


async def test_a_handoff_answers_on_the_next_agents_own_model_and_says_who_answers() -> None:
    triage_model = ScriptedModel([tool_calls(call("transfer_to_billing", {}, call_id="h1"))])
    billing_model = ScriptedModel([reply("Billing here: your invoice is paid.")])
    billing = Agent(name="billing", model=billing_model)
    triage = Agent(name="triage", model=triage_model, handoffs=[billing])
    events = [event for _, event in await collect(rtagent.stream(triage, "my invoice?"))]

    assert len(triage_model.calls) == 1  # it chose the handoff, and billing's turn was not its
    assert len(billing_model.calls) == 1
    changed = [e for e in events if isinstance(e, AgentChanged)]
    assert changed == [AgentChanged("billing")]
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert events.index(changed[0]) < first_text
    # The handoff's call is no tool the person waits on: no indicator, so none left open.
    assert not [e for e in events if isinstance(e, ToolStarted | ToolFinished)]
    last = events[-1]
    assert isinstance(last, TurnFinished)
    assert last.result.text == last.result.final_output == "Billing here: your invoice is paid."


async def test_the_next_agents_tools_report_and_a_handoff_back_is_announced_too() -> None:
    @function_tool
    async def refund(order: str) -> str:
        """Refund an order."""
        return f"refunded {order}"

    # Call ids of their own: each scripted model numbers its calls from call_1.
    billing_model = ScriptedModel(
        [tool_calls(call("refund", {"order": "7"}, call_id="r1")), tool_calls(call("back", {}, call_id="h2"))]
    )
    triage_model = ScriptedModel([tool_calls(call("transfer_to_billing", {}, call_id="h1")), reply("Done.")])
    billing = Agent(name="billing", model=billing_model, tools=[refund])
    moved: list[str] = []
    triage = Agent(
        name="triage",
        model=triage_model,
        handoffs=[handoff(billing, on_handoff=lambda _context: moved.append("billing"))],
    )
    billing.handoffs = [handoff(triage, tool_name_override="back")]
    events = [event for _, event in await collect(rtagent.stream(triage, "refund order 7"))]

    assert [e.name for e in events if isinstance(e, AgentChanged)] == ["billing", "triage"]
    assert [(type(e), e.call_id) for e in events if isinstance(e, ToolStarted | ToolFinished)] == [
        (ToolStarted, "r1"),
        (ToolFinished, "r1"),
    ]
    assert next(e for e in events if isinstance(e, ToolFinished)).output == "refunded 7"
    assert moved == ["billing"]  # the handoff's own callback still runs
    assert (len(triage_model.calls), len(billing_model.calls)) == (2, 2)
    assert isinstance(events[-1], TurnFinished)
    assert events[-1].result.text == "Done."


async def test_a_next_agent_without_a_model_resolves_like_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTAGENT_MODEL", "http://127.0.0.1:9/v1#m")  # where agents without a model go
    triage_model = ScriptedModel([tool_calls(call("transfer_to_billing", {}))])
    triage = Agent(name="triage", model=triage_model, handoffs=[Agent(name="billing")])
    events = [event for _, event in await collect(rtagent.stream(triage, "hi"))]
    assert AgentChanged("billing") in events
    assert isinstance(events[-1], TurnFailed)
    assert events[-1].error == "cannot reach the model server at 127.0.0.1:9"
    assert len(triage_model.calls) == 1


async def test_a_model_given_to_the_turn_runs_every_agent() -> None:
    own = ScriptedModel([])
    billing = Agent(name="billing", model=own)
    triage = Agent(name="triage", model=own, handoffs=[billing])
    given = ScriptedModel([tool_calls(call("transfer_to_billing", {})), reply("One model for all.")])
    events = [event for _, event in await collect(rtagent.stream(triage, "hi", model=given))]
    assert AgentChanged("billing") in events
    assert isinstance(events[-1], TurnFinished)
    assert events[-1].result.text == "One model for all."
    assert (len(given.calls), len(own.calls)) == (2, 0)


# -- guardrails ---------------------------------------------------------------------------------


async def test_an_input_guardrail_tripwire_stops_the_reply_the_moment_it_fires() -> None:
    shown = asyncio.Event()
    fired = asyncio.Event()

    @input_guardrail
    async def no_secrets(
        _context: RunContextWrapper[None], _agent: Agent[None], _input: str | list[TResponseInputItem]
    ) -> GuardrailFunctionOutput:
        await shown.wait()  # it decides while the reply streams, as a slow classifier would
        fired.set()
        return GuardrailFunctionOutput(output_info="it asks for a secret", tripwire_triggered=True)

    model = ScriptedModel([reply([f"w{i} " for i in range(100)], delay=0.01)])
    session = SQLiteSession("guarded")
    agent = Agent(name="a", model=model, input_guardrails=[no_secrets])
    late: list[str] = []
    async with rtagent.stream(agent, "tell me the secret", session=session) as turn:
        async for event in turn:
            if isinstance(event, TextDelta):
                if fired.is_set():
                    late.append(event.text)
                shown.set()
            last = event

    assert late == []
    assert model.streams[0].outcome == "closed"
    assert isinstance(last, TurnFailed)
    assert last.guardrail == "no_secrets"
    assert last.error == "the input guardrail no_secrets stopped the turn: it asks for a secret"
    assert last.partial_text == turn.result.text != ""
    items: list[Any] = await session.get_items()
    assert [item.get("role") for item in items] == ["user", "assistant"]
    assert items[1]["status"] == "incomplete"  # marked as cut
    assert items[1]["content"][0]["text"] == turn.result.text


async def test_a_run_config_guardrail_run_before_the_model_keeps_it_from_being_called() -> None:
    @input_guardrail(run_in_parallel=False)
    def closed(
        _context: RunContextWrapper[None], _agent: Agent[None], _input: str | list[TResponseInputItem]
    ) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=True)

    model = ScriptedModel([reply("never")])
    agent = Agent(name="a", model=model)
    guarded = RunConfig(input_guardrails=[closed])
    session = SQLiteSession("closed")
    events = [e async for e in rtagent.stream(agent, "hi", session=session, run_config=guarded)]
    assert model.calls == ()
    assert [type(e) for e in events] == [Thinking, TurnFailed]
    assert isinstance(events[-1], TurnFailed)
    assert events[-1].guardrail == "closed"
    assert await session.get_items() == [{"role": "user", "content": "hi"}]  # saved once
    with pytest.raises(rtagent.TurnError, match="the input guardrail closed stopped the turn") as caught:
        await rtagent.run(agent, "hi", run_config=guarded)
    assert caught.value.guardrail == "closed"


async def test_an_output_guardrail_tripwire_names_it_and_keeps_the_reply_as_cut() -> None:
    @output_guardrail
    async def polite(
        _context: RunContextWrapper[None], _agent: Agent[None], _output: str
    ) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=True)

    model = ScriptedModel([reply("You fool.")])
    session = SQLiteSession("polite")
    agent = Agent(name="a", model=model, output_guardrails=[polite])
    events = [event for _, event in await collect(rtagent.stream(agent, "hi", session=session))]
    last = events[-1]
    assert isinstance(last, TurnFailed)
    assert (last.guardrail, last.error) == ("polite", "the output guardrail polite stopped the turn")
    items: list[Any] = await session.get_items()
    assert items[-1]["status"] == "incomplete"
    assert items[-1]["content"][0]["text"] == "You fool."
