"""The scripted test model, driven through the real SDK runner."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from agents import Agent, Runner, SQLiteSession, function_tool, set_tracing_disabled
from agents.result import RunResultStreaming
from agents.stream_events import RawResponsesStreamEvent

from rtagent.testing import ScriptedModel, call, fail, reply, tool_calls

set_tracing_disabled(True)

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


TOOL_LOG: list[str] = []


@function_tool
async def delayed_lookup(query: str) -> str:
    """Look something up, slowly."""
    TOOL_LOG.append("lookup started")
    await asyncio.sleep(0.05)
    TOOL_LOG.append("lookup finished")
    return f"found {query}"


@function_tool
async def other(n: int) -> str:
    """Another slow tool."""
    TOOL_LOG.append("other started")
    await asyncio.sleep(0.05)
    TOOL_LOG.append("other finished")
    return f"n={n}"


def run(model: ScriptedModel, **kwargs: Any) -> RunResultStreaming:
    return Runner.run_streamed(Agent(name="a", model=model, tools=[delayed_lookup, other]), "hi", **kwargs)


async def raw_events(
    result: RunResultStreaming, into: list[tuple[float, Any]] | None = None
) -> list[tuple[float, Any]]:
    """The raw model events with the time each reached the consumer, from the start of the call.

    ``into`` keeps what arrived before the stream raised.
    """
    events = [] if into is None else into
    start = time.perf_counter()
    async for event in result.stream_events():
        if isinstance(event, RawResponsesStreamEvent):
            events.append((time.perf_counter() - start, event.data))
    return events


def deltas(events: list[tuple[float, Any]]) -> list[str]:
    return [e.delta for _, e in events if e.type == "response.output_text.delta"]


async def test_reply_streams_exact_chunks_in_responses_api_order() -> None:
    model = ScriptedModel([reply(["Hel", "lo"])])
    result = run(model)
    events = await raw_events(result)

    assert [e.type for _, e in events] == TEXT_EVENTS
    assert [e.sequence_number for _, e in events] == list(range(len(TEXT_EVENTS)))
    assert deltas(events) == ["Hel", "lo"]
    completed = events[-1][1].response
    assert completed.output[0].content[0].text == "Hello"
    assert completed.usage.output_tokens == 2
    assert result.final_output == "Hello"
    assert result.context_wrapper.usage.output_tokens == 2
    assert model.calls[0].input == [{"content": "hi", "role": "user"}]
    assert model.streams[0].outcome == "completed"


def test_text_splitting() -> None:
    assert reply("Hello there!", chunks=5).text == ("Hel", "lo ", "th", "er", "e!")
    assert reply("Hello there!  Bye").text == ("Hello", " there!", "  Bye")
    assert reply("x" * 500, chunks=500).text == ("x",) * 500
    with pytest.raises(ValueError, match="into 20 non-empty chunks"):
        reply("partial text", chunks=20)
    with pytest.raises(TypeError, match="one string"):
        reply(["a", "b"], chunks=2)
    assert call("f", {"q": "abcd"}, chunks=3).argument_chunks == ('{"q"', ':"ab', 'cd"}')


async def test_delays_are_real_time() -> None:
    model = ScriptedModel([reply("abcd", chunks=4, first_delay=0.1, delay=0.03)])
    events = await raw_events(run(model))

    times = [t for t, e in events if e.type == "response.output_text.delta"]
    assert times[0] >= 0.1
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.03 <= gap < 0.3 for gap in gaps), gaps
    assert deltas(events) == ["a", "b", "c", "d"]


async def test_parallel_tool_calls_then_reply() -> None:
    model = ScriptedModel(
        [
            tool_calls(
                call("delayed_lookup", {"query": "x"}, chunks=3),
                call("other", {"n": 2}),
                text="Let me check.",
            ),
            reply("Done."),
        ]
    )
    TOOL_LOG.clear()
    result = run(model)
    events = await raw_events(result)

    first = [e for _, e in events[: [e.type for _, e in events].index("response.completed") + 1]]
    call_events = [
        (e.type, getattr(e, "delta", None)) for e in first if e.type.startswith("response.function_call")
    ]
    assert call_events == [
        ("response.function_call_arguments.delta", '{"que'),
        ("response.function_call_arguments.delta", 'ry":'),
        ("response.function_call_arguments.delta", '"x"}'),
        ("response.function_call_arguments.done", None),
        ("response.function_call_arguments.delta", '{"n":2}'),
        ("response.function_call_arguments.done", None),
    ]
    added = [e.item for e in first if e.type == "response.output_item.added"]
    assert [(i.type, getattr(i, "arguments", None)) for i in added] == [
        ("message", None),
        ("function_call", ""),
        ("function_call", ""),
    ]
    done = [e for e in first if e.type == "response.function_call_arguments.done"]
    assert [(d.name, d.arguments) for d in done] == [
        ("delayed_lookup", '{"query":"x"}'),
        ("other", '{"n":2}'),
    ]
    finished = [e.item for e in first if e.type == "response.output_item.done"][1:]
    assert [(i.call_id, i.name, i.arguments, i.status) for i in finished] == [
        ("call_1", "delayed_lookup", '{"query":"x"}', "completed"),
        ("call_2", "other", '{"n":2}', "completed"),
    ]
    assert first[-1].response.usage.output_tokens == 3 + 3 + 1  # text, then argument deltas

    assert sorted(TOOL_LOG[:2]) == ["lookup started", "other started"]  # they ran at once
    assert result.final_output == "Done."
    second_input = model.calls[1].input
    assert [item.get("type") for item in second_input] == [
        None,
        "message",
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
    ]
    assert [(o["call_id"], o["output"]) for o in second_input[-2:]] == [
        ("call_1", "found x"),
        ("call_2", "n=2"),
    ]


async def test_session_history_holds_the_items() -> None:
    session = SQLiteSession("scripted")
    model = ScriptedModel(
        [
            tool_calls(call("other", {"n": 1}, call_id="mine")),
            reply("One."),
            reply("Two."),
        ]
    )
    await raw_events(run(model, session=session))
    first_turn = await session.get_items()
    assert [(i.get("type"), i.get("call_id")) for i in first_turn] == [
        (None, None),
        ("function_call", "mine"),
        ("function_call_output", "mine"),
        ("message", None),
    ]

    result = run(model, session=session)
    await raw_events(result)
    assert result.final_output == "Two."
    assert model.calls[2].input[: len(first_turn)] == first_turn
    assert model.calls[2].input[-1] == {"content": "hi", "role": "user"}
    model.assert_complete()


async def test_fail_after_deltas() -> None:
    model = ScriptedModel([fail(RuntimeError("boom"), after=reply("x" * 20, chunks=20, delay=0.001))])
    result = run(model)
    events: list[tuple[float, Any]] = []
    with pytest.raises(RuntimeError, match="boom"):
        await raw_events(result, events)
    seen = [e.type for _, e in events]
    assert seen.count("response.output_text.delta") == 20
    assert "response.completed" not in seen
    assert model.streams[0].outcome == "failed"
    assert model.deltas_emitted == 20


async def test_fail_before_first_token() -> None:
    model = ScriptedModel([fail(RuntimeError("down"), delay=0.05)])
    result = run(model)
    events: list[tuple[float, Any]] = []
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="down"):
        await raw_events(result, events)
    assert time.perf_counter() - start >= 0.05
    assert events == []
    assert model.streams[0].deltas == 0
    assert model.streams[0].outcome == "failed"


@pytest.mark.parametrize("yield_to_loop", [True, False])
async def test_many_quick_deltas(yield_to_loop: bool) -> None:
    model = ScriptedModel([reply("x" * 500, chunks=500, yield_to_loop=yield_to_loop)])
    result = run(model)
    lag: list[int] = []
    received = 0
    start = time.perf_counter()
    async for event in result.stream_events():
        if isinstance(event, RawResponsesStreamEvent) and event.data.type == "response.output_text.delta":
            received += 1
            lag.append(model.deltas_emitted - received)
    assert time.perf_counter() - start < 2
    assert received == 500
    assert result.final_output == "x" * 500
    if yield_to_loop:
        assert max(lag) <= 1  # the consumer sees each delta before the next is produced
    else:
        assert max(lag) > 400  # produced as one burst


async def test_cancel_closes_the_stream_promptly() -> None:
    model = ScriptedModel([reply("x" * 500, chunks=500, delay=0.01)])
    result = run(model)
    received = 0
    async for event in result.stream_events():
        if isinstance(event, RawResponsesStreamEvent) and event.data.type == "response.output_text.delta":
            received += 1
            if received == 5:
                result.cancel()
    await asyncio.sleep(0.05)
    assert model.streams_closed == 1
    assert model.streams[0].outcome == "closed"
    assert model.deltas_emitted <= 6


async def test_unstreamed_run_and_sdk_steps() -> None:
    model = ScriptedModel([tool_calls(call("other", {"n": 3})), reply("Three.", delay=0.01)])
    result = await Runner.run(Agent(name="a", model=model, tools=[other]), "hi")
    assert result.final_output == "Three."
    assert model.calls[1].input[-1]["output"] == "n=3"
    assert result.context_wrapper.usage.output_tokens == 1 + 1

    model.enqueue(ValueError("sdk step"))  # the SDK's own step kinds still work
    model.extend([fail(RuntimeError("down"))])
    with pytest.raises(ValueError, match="sdk step"):
        await Runner.run(Agent(name="a", model=model), "hi")
    with pytest.raises(RuntimeError, match="down"):
        await Runner.run(Agent(name="a", model=model), "hi")
