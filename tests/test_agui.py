"""The rtagent <-> AG-UI mapping: events of a turn, the request body, and the history as messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ag_ui.core import BaseEvent, Event, TextMessageContentEvent, UserMessage
from ag_ui.encoder import EventEncoder
from ag_ui_validate import ValidatorOptions
from ag_ui_validate.transport import TransportOptions, validate_endpoint
from agents import Agent, RunContextWrapper, SQLiteSession, function_tool
from pydantic import TypeAdapter
from test_server import serving

import rtagent
from rtagent import create_app
from rtagent._events import (
    AgentChanged,
    TextDelta,
    Thinking,
    ToolFinished,
    ToolProgress,
    ToolStarted,
    TurnFailed,
    TurnFinished,
)
from rtagent._history import call_pair, cut_reply
from rtagent._result import TurnMetrics, TurnResult
from rtagent.server._agui import RunMapper, TextContent, dump, history_messages
from rtagent.server._limits import InputError, Limits, parse_run_input
from rtagent.testing import ScriptedModel, call, reply, tool_calls

EVENTS = TypeAdapter(list[Event])


def result(text: str = "", interrupted: bool = False) -> TurnResult:
    return TurnResult(text, interrupted, TurnMetrics(0.1, 3, 30.0, (), 0.2))


def wire(events: list[BaseEvent]) -> list[dict[str, Any]]:
    """What a client receives: the encoder's JSON, checked against the protocol's own models."""
    encoded = [EventEncoder().encode(e).removeprefix("data: ").rstrip("\n") for e in events]
    EVENTS.validate_json("[" + ",".join(encoded) + "]")
    return [json.loads(line) for line in encoded]


def mapped(*events: Any) -> list[dict[str, Any]]:
    mapper = RunMapper("t", "r")
    out: list[BaseEvent] = [mapper.started()]
    for event in events:
        out += mapper.map(event)
    return wire(out)


def test_text_and_tool_calls_of_one_response_share_a_message() -> None:
    events = mapped(
        Thinking(),
        TextDelta("Checking"),
        TextDelta(""),  # empty deltas carry nothing and are not sent
        ToolStarted("c1", "lookup", '{"q":1}'),
        ToolStarted("c2", "weather", ""),
        ToolFinished("c2", "weather", "sunny", duration_s=0.5),
        ToolFinished("c1", "lookup", "", error="ValueError: no", duration_s=1.0),
        Thinking(),
        TextDelta("Done."),
        TurnFinished(result("Checking Done.")),
    )
    assert [e["type"] for e in events] == [
        "RUN_STARTED",
        "STEP_STARTED",
        "STEP_FINISHED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_START",
        "TOOL_CALL_END",  # no arguments: no ARGS event
        "TOOL_CALL_RESULT",
        "TOOL_CALL_RESULT",
        "STEP_STARTED",
        "STEP_FINISHED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    first_text, second_text = (e["messageId"] for e in events if e["type"] == "TEXT_MESSAGE_START")
    assert first_text != second_text
    assert {e["parentMessageId"] for e in events if e["type"] == "TOOL_CALL_START"} == {first_text}
    results = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
    assert results[0]["metadata"] == {"rtagent": {"durationS": 0.5}}
    assert results[1]["metadata"] == {"rtagent": {"durationS": 1.0, "error": "ValueError: no"}}
    assert events[-1]["result"]["metrics"]["tokensPerS"] == 30.0


def test_a_cached_tool_result_says_so_in_its_metadata() -> None:
    events = mapped(
        ToolStarted("c1", "lookup", "{}"),
        ToolFinished("c1", "lookup", "facts", duration_s=0.001, cached=True),
        TurnFinished(result("")),
    )
    (result_event,) = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
    assert result_event["metadata"] == {"rtagent": {"durationS": 0.001, "cached": True}}


DELTAS = [" tok1", 'say "hi"\n', "caf\u00e9 \U0001f600", "</script><img src=x>", "\\"]


@pytest.mark.parametrize("delta", DELTAS)
def test_streamed_text_is_the_packages_own_bytes(delta: str) -> None:
    # The fast class must stay byte-for-byte what ag-ui-protocol sends, through any upgrade of it.
    encoder = EventEncoder()
    ours = encoder.encode(TextContent(message_id="r-1", delta=delta))
    assert ours == encoder.encode(TextMessageContentEvent(message_id="r-1", delta=delta))
    assert isinstance(TextContent(message_id="r-1", delta=delta), TextMessageContentEvent)
    assert wire([TextContent(message_id="r-1", delta=delta)])[0]["delta"] == delta


def test_a_tool_only_response_still_gets_a_parent_message() -> None:
    events = mapped(Thinking(), ToolStarted("c1", "lookup", "{}"), ToolStarted("c2", "lookup", "{}"))
    parents = [e["parentMessageId"] for e in events if e["type"] == "TOOL_CALL_START"]
    assert parents[0] == parents[1] == "r-1"


def test_progress_is_an_activity_closed_when_the_tool_ends() -> None:
    events = mapped(
        ToolStarted("c1", "search", "{}"),
        ToolProgress("c1", "ranking", 0.8),
        ToolProgress("c1", "almost"),
        ToolFinished("c1", "search", "3 books", duration_s=0.2),
    )
    activities = [e for e in events if e["type"] == "ACTIVITY_SNAPSHOT"]
    assert {e["messageId"] for e in activities} == {"r-c1-progress"}
    assert {e["activityType"] for e in activities} == {"tool_progress"}
    first, second, done = (e["content"] for e in activities)
    assert first["message"] == "ranking"
    assert first["fraction"] == 0.8
    assert "fraction" not in second
    assert done["done"] is True
    assert done["toolName"] == "search"
    assert done["elapsedS"] >= first["elapsedS"] >= 0


def test_an_interrupted_turn_closes_what_is_open_and_says_cancelled() -> None:
    events = mapped(Thinking(), TextDelta("Half"), TurnFinished(result("Half", interrupted=True)))
    assert [e["type"] for e in events][-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert events[-1]["outcome"] == {"type": "cancelled"}
    assert events[-1]["result"]["interrupted"] is True


def test_a_failed_turn_is_a_run_error() -> None:
    events = mapped(Thinking(), TurnFailed("cannot reach the model server at x:1", "", result()))
    assert [e["type"] for e in events] == ["RUN_STARTED", "STEP_STARTED", "STEP_FINISHED", "RUN_ERROR"]
    assert events[-1] == {
        "type": "RUN_ERROR",
        "message": "cannot reach the model server at x:1",
        "code": "agent_error",
    }


def test_each_agent_that_takes_over_answers_in_a_step_of_its_own() -> None:
    events = mapped(
        Thinking(),  # triage thinks, and hands off without a word: its thinking closes with it
        AgentChanged("billing"),
        Thinking(),
        TextDelta("Billing here."),
        AgentChanged("triage"),
        Thinking(),
        TextDelta("Back."),
        TurnFinished(result("Billing here. Back.")),
    )
    steps = [(e["type"], e["stepName"]) for e in events if e["type"].startswith("STEP")]
    assert steps == [
        ("STEP_STARTED", "thinking"),
        ("STEP_FINISHED", "thinking"),
        ("STEP_STARTED", "billing"),
        ("STEP_STARTED", "thinking"),
        ("STEP_FINISHED", "thinking"),
        ("STEP_FINISHED", "billing"),
        ("STEP_STARTED", "triage"),
        ("STEP_STARTED", "thinking"),
        ("STEP_FINISHED", "thinking"),
        ("STEP_FINISHED", "triage"),
    ]
    kinds = [e["type"] for e in events]
    # Billing's text is its own message, ended before its step is.
    assert kinds.index("TEXT_MESSAGE_END") < kinds.index("STEP_FINISHED", kinds.index("TEXT_MESSAGE_START"))
    assert kinds[-3:] == ["TEXT_MESSAGE_END", "STEP_FINISHED", "RUN_FINISHED"]
    started = next(e for e in events if e.get("stepName") == "billing")
    assert started["metadata"] == {"rtagent": {"agent": "billing"}}


def test_a_guardrail_tripwire_is_a_run_error_of_its_own_and_closes_the_agents_step() -> None:
    error = "the input guardrail no_secrets stopped the turn"
    events = mapped(
        AgentChanged("billing"),
        TextDelta("Your pass"),
        TurnFailed(error, "Your pass", result(), "no_secrets"),
    )
    assert [e["type"] for e in events][-3:] == ["TEXT_MESSAGE_END", "STEP_FINISHED", "RUN_ERROR"]
    assert events[-1] == {"type": "RUN_ERROR", "message": error, "code": "guardrail_tripwire"}


def body(messages: list[dict[str, Any]], **fields: Any) -> bytes:
    return json.dumps({"threadId": "t-1", "runId": "r_1", "messages": messages, **fields}).encode()


def test_only_a_last_user_message_is_new_input() -> None:
    user = {"id": "1", "role": "user", "content": "first"}
    assistant = {"id": "2", "role": "assistant", "content": "answer"}
    parts = {
        "id": "3",
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert parse_run_input(body([user]), Limits(max_message_chars=100))[1] == "first"
    assert parse_run_input(body([user, assistant]), Limits(max_message_chars=100))[1] is None
    assert parse_run_input(body([]), Limits(max_message_chars=100))[1] is None
    assert parse_run_input(body([user, assistant, parts]), Limits(max_message_chars=100))[1] == "a\nb"


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"{", 400, "malformed JSON"),
        (b'"text"', 422, "a string"),
        (body([], threadId=None), 422, "threadId: Input should be a valid string"),
        (body([{"id": "1", "role": "user"}]), 422, "messages.0.user.content: Field required"),
        (body([], runId="x" * 129), 422, "runId"),
        (body([{"id": "1", "role": "user", "content": "x" * 11}]), 413, "11 characters"),
        (body([], state=[[[[[["deep"]]]]]]), 400, "more than 5 levels deep"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "more than 5 levels deep"),
        (body([{"id": "1", "role": "user", "content": "hi \ud800"}]), 400, "lone UTF-16 surrogate"),
        (body([], state={"\udfff": 1}), 400, "lone UTF-16 surrogate"),
    ],
)
def test_bad_bodies_are_one_line_errors(raw: bytes, status: int, words: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_run_input(raw, Limits(max_message_chars=10, max_json_depth=5))
    assert caught.value.status == status
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_brackets_in_strings_do_not_count_as_nesting() -> None:
    user = {"id": "1", "role": "user", "content": "[[[[[[[[{{{{{{"}
    raw = body([user], state={"note": '[[[[[[[[ \\" ]]]] [[[['})
    assert parse_run_input(raw, Limits(max_json_depth=5))[1] == "[[[[[[[[{{{{{{"


def test_history_becomes_ag_ui_messages_with_cut_replies_marked() -> None:
    items: list[Any] = [
        {"role": "user", "content": "look it up"},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        },
        *call_pair("c1", "lookup", '{"q":"x"}', "found")[:1],
        *call_pair("c2", "lookup", '{"q":"y"}', "found")[:1],
        call_pair("c1", "lookup", "", "result 1")[1],
        call_pair("c2", "lookup", "", "result 2")[1],
        cut_reply("It is"),
        {"role": "user", "content": [{"type": "input_text", "text": "go on"}]},
        *call_pair("c3-done", "report", "{}", "late result"),
        {"type": "reasoning", "id": "rs_1", "summary": []},
    ]
    messages = [dump(m) for m in history_messages(items)]
    assert [(m["role"], m.get("content")) for m in messages] == [
        ("user", "look it up"),
        ("assistant", "Checking."),
        ("tool", "result 1"),
        ("tool", "result 2"),
        ("assistant", "It is"),
        ("user", "go on"),
        ("assistant", None),
        ("tool", "late result"),
    ]
    assert [c["id"] for c in messages[1]["toolCalls"]] == ["c1", "c2"]
    assert messages[1]["toolCalls"][0]["function"] == {"name": "lookup", "arguments": '{"q":"x"}'}
    assert messages[4]["metadata"] == {"rtagent": {"interrupted": True}}
    assert "metadata" not in messages[1]
    assert len({m["id"] for m in messages}) == len(messages)


async def test_a_real_turns_history_round_trips() -> None:
    model = ScriptedModel([tool_calls(call("lookup", {"q": "x"})), reply("Found it.")])

    @function_tool
    async def lookup(q: str) -> str:
        """Look up."""
        return f"data on {q}"

    session = SQLiteSession("t")
    await rtagent.run(Agent(name="a", model=model, tools=[lookup]), "find x", session=session)
    messages = history_messages(await session.get_items())
    assert isinstance(messages[0], UserMessage)
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[2].content == "data on x"


# -- conformance: ag-ui-validate against a live server ---------------------------------------------


@function_tool
async def progressing_lookup(query: str) -> str:
    """Look something up, saying how far along it is."""
    rtagent.progress("searching", 0.5)
    return f"{query}: found"


@function_tool(needs_approval=True)
async def refund(order: str) -> str:
    """Refund an order."""
    return f"order {order} refunded"


@function_tool
async def add_to_cart(ctx: RunContextWrapper[dict[str, Any]], item: str) -> str:
    """Put an item in the shared cart."""
    ctx.context.setdefault("cart", []).append(item)
    return f"{item} added"


CONFIRM = {"name": "confirm", "description": "Ask the person.", "parameters": {"type": "object"}}


async def test_ag_ui_validate_finds_no_error_or_warning_in_any_feature_exercised(tmp_path: Path) -> None:
    model = ScriptedModel(
        [
            tool_calls(call("progressing_lookup", {"query": "Paris"}), text="Checking. "),
            reply("Paris: found."),
            tool_calls(call("refund", {"order": "42"}, call_id="refund-1")),
            reply("Refunded."),
            tool_calls(call("add_to_cart", {"item": "tea"})),
            reply("Tea is in your cart."),
            tool_calls(call("confirm", {}, call_id="confirm-1")),
            reply("Confirmed, thanks."),
        ]
    )
    agent = Agent(name="validated", tools=[progressing_lookup, refund, add_to_cart], model=model)
    app = create_app(agent, db_path=tmp_path / "threads.db")

    def body(run: str, text: str | None, **extra: Any) -> dict[str, Any]:
        messages = [{"id": f"u-{run}", "role": "user", "content": text}] if text else []
        return {"threadId": f"t-{run}", "runId": run, "messages": messages, **extra}

    approved = [{"interruptId": "refund-1", "status": "resolved", "payload": {"approved": True}}]
    result = {"id": "tool-1", "role": "tool", "toolCallId": "confirm-1", "content": "yes"}
    runs = [
        (body("chat", "How big is Paris?"), ["agentic-chat", "backend-tool-rendering"]),
        (body("hitl", "Refund order 42"), ["human-in-the-loop"]),
        ({**body("hitl", None), "runId": "hitl-2", "resume": approved}, ["human-in-the-loop"]),
        (body("state", "Add tea", state={"cart": ["milk"]}), ["shared-state"]),
        (body("client", "Ask me", tools=[CONFIRM]), ["agentic-chat"]),
        ({**body("client", None), "runId": "client-2", "messages": [result], "tools": [CONFIRM]}, []),
    ]
    exercised: set[str] = set()
    async with serving(app) as base:
        for run_body, features in runs:
            options = TransportOptions(input=run_body, validator=ValidatorOptions(features=features))
            checked = await validate_endpoint(f"http://{base}/agui", options)
            found = [(d.rule, d.message) for d in checked.report.diagnostics if d.severity != "info"]
            assert found == [], (run_body["runId"], found)
            assert checked.report.internal_errors == []
            exercised |= {f for f, status in checked.report.features.items() if status == "exercised"}
    assert exercised == {"agentic-chat", "backend-tool-rendering", "human-in-the-loop", "shared-state"}
