"""The tool adapter for the embedded model: its decisions, its requests, whole turns.

Most tests need no model: requests are answered by canned llama.cpp chunks, so every branch of
the decision is pinned down exactly. The tests marked ``model`` run the real SmolLM2, in
process and through ``rtagent chat`` in a pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest
from agents import Agent, ModelSettings, RunConfig, RunContextWrapper, function_tool
from agents.items import TResponseInputItem
from agents.models.interface import ModelTracing
from openai import omit
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
)

import rtagent
from rtagent import _adapter
from rtagent._adapter import AdaptedModel, Template
from rtagent._local import default_model_path, shared_server
from rtagent._models import LOCAL_SETTINGS
from rtagent._served import ServedModel
from rtagent._toolprompt import prefix, tool_specs
from rtagent.demo import agent as demo_agent

sys.path.insert(0, str(Path(__file__).parent / "evals"))
from eval_agents import AGENTS

SHOP = AGENTS["shop"]


# -- decisions, with canned chunks instead of a model ---------------------------------------------


def chunk(text: str, top: dict[str, float] | None = None) -> ChatCompletionChunk:
    """One streamed llama.cpp token, with the first token's alternatives when ``top`` is given."""
    logprobs = None
    if top is not None:
        alternatives = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top.items()]
        logprobs = {"content": [{"token": text, "logprob": 0.0, "bytes": None, "top_logprobs": alternatives}]}
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": logprobs}
    return ChatCompletionChunk.model_validate(
        {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
    )


def call_chunks(name: str, arguments: str) -> list[ChatCompletionChunk]:
    head = ['{"', "name", '": "', name, '", "', "arguments", '": ']
    return [chunk(piece) for piece in [*head, arguments[:5], arguments[5:], "}"]]


class CannedStream:
    """Stands in for the openai client's stream: canned chunks, and how many were taken."""

    def __init__(self, chunks: list[ChatCompletionChunk]) -> None:
        self.chunks = chunks
        self.taken = 0
        self.closed = False
        # Like openai's AsyncStream: one iterator, so a second ``async for`` goes on where the
        # first one stopped.
        self._iterator = self._iterate()

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._iterator

    async def _iterate(self) -> AsyncIterator[ChatCompletionChunk]:
        for item in self.chunks:
            self.taken += 1
            yield item

    async def close(self) -> None:
        self.closed = True


class Canned:
    """The requests an ``AdaptedModel`` makes, each answered by the next canned stream."""

    def __init__(self, *answers: list[ChatCompletionChunk]) -> None:
        self.streams = [CannedStream(answer) for answer in answers]
        self.requests: list[dict[str, Any]] = []

    async def open(
        self, client: Any, model: str, messages: Any, settings: ModelSettings, rules: str | None, **kw: Any
    ) -> Any:
        self.requests.append({"messages": messages, "rules": rules, "settings": settings, **kw})
        return self.streams[len(self.requests) - 1]

    def branches(self) -> list[str]:
        """Each request's grammar by its start rule; the deciding request has none ("free")."""
        return [
            "free" if request["rules"] is None else request["rules"].splitlines()[1].removeprefix("start: ")
            for request in self.requests
        ]


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Canned]:
    def install(*answers: list[ChatCompletionChunk]) -> Canned:
        fake = Canned(*answers)
        monkeypatch.setattr(_adapter, "_open", fake.open)
        return fake

    async def template(self: AdaptedModel) -> Template:
        return Template(native_tools=False, end_token=2)

    async def address(self: AdaptedModel) -> tuple[str, str]:
        return "http://127.0.0.1:9", "key"

    monkeypatch.setattr(AdaptedModel, "template", template)
    monkeypatch.setattr(AdaptedModel, "_address", address)
    return install


def model() -> AdaptedModel:
    return AdaptedModel("test", "m", settings=LOCAL_SETTINGS)


async def respond(
    agent: Agent[Any], input: str | list[TResponseInputItem], settings: ModelSettings | None = None
) -> list[Any]:
    stream = model().stream_response(
        str(agent.instructions),
        input,
        settings or ModelSettings(),
        list(agent.tools),
        None,
        [],
        ModelTracing.DISABLED,
        previous_response_id=None,
        conversation_id=None,
        prompt=None,
    )
    return [event async for event in stream]


def calls(events: list[Any]) -> list[ResponseFunctionToolCall]:
    done = [e.item for e in events if isinstance(e, ResponseOutputItemDoneEvent)]
    return [item for item in done if isinstance(item, ResponseFunctionToolCall)]


def text(events: list[Any]) -> str:
    return "".join(event.delta for event in events if isinstance(event, ResponseTextDeltaEvent))


async def test_a_plain_reply_is_the_deciding_stream_itself(canned: Callable[..., Canned]) -> None:
    fake = canned([chunk("Hi", {"Hi": 0.7, '{"': 0.2, "{": 0.05}), chunk(" there"), chunk("!")])
    stream = model().stream_response(
        "Be brief.", "hello", ModelSettings(), list(SHOP.tools), None, [], ModelTracing.DISABLED,
        previous_response_id=None, conversation_id=None, prompt=None,
    )  # fmt: skip
    events = []
    async for event in stream:
        events.append(event)
        if isinstance(event, ResponseTextDeltaEvent) and event.delta == "Hi":
            assert fake.streams[0].taken == 1  # out as soon as the first token is in
    assert text(events) == "Hi there!"
    assert fake.branches() == ["free"]
    assert fake.requests[0]["decide"] is True
    assert fake.streams[0].closed
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 3


async def test_a_reply_starting_with_white_space_is_asked_for_again_as_text(
    canned: Callable[..., Canned],
) -> None:
    # Without a grammar the deciding stream may open with a line break, which could lead into a
    # call that the first token's alternatives do not show.
    fake = canned([chunk("\n", {"\n": 0.7, "Hi": 0.2}), chunk('{"')], [chunk("Hi"), chunk("!")])
    events = await respond(SHOP, "hello")
    assert fake.branches() == ["free", "text"]
    assert fake.streams[0].closed
    assert text(events) == "Hi!"


async def test_a_call_is_redone_without_the_penalty_and_announced_when_its_arguments_close(
    canned: Callable[..., Canned],
) -> None:
    call = call_chunks("get_order_status", '{"order_id": "A1234"}')
    fake = canned([chunk('{"', {'{"': 0.8, "Hi": 0.2}), chunk("name")], call)
    events = await respond(SHOP, "where is my order A1234?")
    assert fake.branches() == ["free", "call"]
    assert [request["penalty"] for request in fake.requests] == [True, False]
    assert fake.streams[0].closed
    assert fake.streams[0].taken == 1
    assert fake.streams[1].taken == len(call) - 1  # the closing brace was not waited for
    added = [e for e in events if isinstance(e, ResponseOutputItemAddedEvent)]
    assert [e.item.type for e in added] == ["function_call"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas == ['{"ord', 'er_id": "A1234"}']
    [done] = calls(events)
    assert (done.name, done.arguments) == ("get_order_status", '{"order_id": "A1234"}')
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert events[-1].response.output == [done]


@pytest.mark.parametrize(
    ("top", "first", "redo"),
    [
        ({"Sure": 0.4, '{"': 0.6}, "Sure", "call"),  # sampled text, but a call is likelier
        ({"Sure": 0.6, '{"': 0.4}, '{"', "text"),  # sampled a call it did not mean
    ],
)
async def test_the_threshold_overrides_the_sampled_first_token(
    canned: Callable[..., Canned], top: dict[str, float], first: str, redo: str
) -> None:
    answer = call_chunks("get_order_status", '{"order_id": "A1234"}') if redo == "call" else [chunk("OK.")]
    fake = canned([chunk(first, top), chunk("more")], answer)
    events = await respond(SHOP, "where is A1234?")
    assert fake.branches() == ["free", redo]
    assert bool(calls(events)) == (redo == "call")
    assert "more" not in text(events)


async def test_a_call_copying_the_example_falls_back_to_other_tools_then_text(
    canned: Callable[..., Canned],
) -> None:
    fake = canned(
        [chunk('{"', {'{"': 0.6})],
        call_chunks("get_order_status", '{"order_id": "X-7731"}'),
        call_chunks("cancel_order", '{"order_id": "X-7731", "reason": "it arrived broken"}'),
        [chunk("We open at 9.")],
    )
    events = await respond(SHOP, "what are your opening hours?")
    assert fake.branches() == ["free", "call", "call", "text"]
    second_try = json.loads(fake.requests[2]["rules"].splitlines()[2].removeprefix("call: %json "))
    assert second_try["properties"]["name"] == {"const": "cancel_order"}
    assert calls(events) == []
    assert text(events) == "We open at 9."


async def test_a_copying_call_is_dropped_as_soon_as_its_copied_value_closes(
    canned: Callable[..., Canned],
) -> None:
    head = call_chunks("cancel_order", "{}")[:-3]  # '{"name": "cancel_order", "arguments": '
    rest = ['{"order_id": "X-7731"', ', "reason', '": "it arrived broken"}', "}"]
    copy = [*head, *(chunk(piece) for piece in rest)]
    fake = canned([chunk('{"', {'{"': 0.6})], copy, [], [chunk("We open at 9.")])
    fake.streams[2].chunks = call_chunks("get_order_status", '{"order_id": "X-7731"}')
    events = await respond(SHOP, "what are your opening hours?")
    assert fake.streams[1].taken == len(head) + 2  # the reason was never waited for
    assert fake.streams[1].closed
    assert fake.branches() == ["free", "call", "call", "text"]
    assert calls(events) == []
    assert text(events) == "We open at 9."


PARALLEL = ModelSettings(parallel_tool_calls=True)
DECIDE_CALL = [chunk('{"', {'{"': 0.9})]


def calls_in_a_row(*calls: tuple[str, str]) -> list[list[ChatCompletionChunk]]:
    """The chunks of each call as parallel calls are written: all but the first open with the separator."""
    streams = [call_chunks(name, arguments) for name, arguments in calls]
    return [streams[0], *([chunk("\n"), *later] for later in streams[1:])]


@pytest.mark.parametrize(
    ("parallel", "calls_rule"),
    [(None, None), (False, None), (True, 'calls: call ("\\n" call){0,3}')],
)
async def test_only_parallel_tool_calls_true_lets_a_reply_make_several_calls(
    canned: Callable[..., Canned], parallel: bool | None, calls_rule: str | None
) -> None:
    fake = canned(DECIDE_CALL, call_chunks("get_order_status", '{"order_id": "A1234"}'))
    events = await respond(SHOP, "where is A1234?", ModelSettings(parallel_tool_calls=parallel))
    lines = fake.requests[1]["rules"].splitlines()
    assert lines[1] == ("start: calls" if calls_rule else "start: call")
    assert [line for line in lines if line.startswith("calls:")] == ([calls_rule] if calls_rule else [])
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert events[-1].response.parallel_tool_calls is bool(parallel)


async def test_parallel_calls_go_out_each_as_it_closes_and_complete_when_the_model_ends(
    canned: Callable[..., Canned],
) -> None:
    first, second = calls_in_a_row(
        ("get_order_status", '{"order_id": "A1234"}'),
        ("cancel_order", '{"order_id": "B5678", "reason": "late"}'),
    )
    fake = canned(DECIDE_CALL, first + second)
    stream = model().stream_response(
        None, "where is A1234? and cancel B5678, it is late", PARALLEL, list(SHOP.tools), None, [],
        ModelTracing.DISABLED, previous_response_id=None, conversation_id=None, prompt=None,
    )  # fmt: skip
    events, taken_at_done = [], []
    async for event in stream:
        events.append(event)
        if isinstance(event, ResponseOutputItemDoneEvent):
            taken_at_done.append(fake.streams[1].taken)
    assert fake.branches() == ["free", "calls"]
    # Each call went out as its arguments closed, before anything of the next one was read.
    assert taken_at_done == [len(first) - 1, len(first) + len(second) - 1]
    assert fake.streams[1].taken == len(first) + len(second)  # then the model's end was awaited
    assert fake.streams[1].closed
    done = calls(events)
    assert [(call.name, call.arguments) for call in done] == [
        ("get_order_status", '{"order_id": "A1234"}'),
        ("cancel_order", '{"order_id": "B5678", "reason": "late"}'),
    ]
    added = [e for e in events if isinstance(e, ResponseOutputItemAddedEvent)]
    assert [e.output_index for e in added] == [0, 1]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.output == done
    assert completed.response.parallel_tool_calls is True


@pytest.mark.parametrize(
    "second",
    [
        '{"order_id": "X-7731"}',  # the worked example's id, which the user never gave
        '{"order_id": "A1234"}',  # the first call again
    ],
)
async def test_a_later_call_copying_the_example_or_repeating_ends_the_reply_without_it(
    canned: Callable[..., Canned], second: str
) -> None:
    written = calls_in_a_row(
        ("get_order_status", '{"order_id": "A1234"}'),
        ("get_order_status", second),
        ("get_order_status", '{"order_id": "B5678"}'),
    )
    fake = canned(DECIDE_CALL, [item for call in written for item in call])
    events = await respond(SHOP, "where are my orders A1234 and B5678?", PARALLEL)
    assert fake.branches() == ["free", "calls"]  # no fallback: the first call stood
    assert fake.streams[1].taken == len(written[0]) + len(written[1]) - 1  # nothing after it read
    assert fake.streams[1].closed
    [done] = calls(events)
    assert (done.name, done.arguments) == ("get_order_status", '{"order_id": "A1234"}')
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert events[-1].response.output == [done]


async def test_a_later_call_cut_by_the_cap_leaves_the_calls_before_it(canned: Callable[..., Canned]) -> None:
    first, second = calls_in_a_row(
        ("get_order_status", '{"order_id": "A1234"}'), ("get_order_status", '{"order_id": "B5678"}')
    )
    canned(DECIDE_CALL, first + second[:-3])
    events = await respond(SHOP, "where are my orders A1234 and B5678?", PARALLEL)
    assert [call.arguments for call in calls(events)] == ['{"order_id": "A1234"}']
    assert isinstance(events[-1], ResponseCompletedEvent)


async def test_the_first_of_parallel_calls_copying_the_example_still_falls_back(
    canned: Callable[..., Canned],
) -> None:
    copied, other = calls_in_a_row(
        ("get_order_status", '{"order_id": "X-7731"}'), ("get_order_status", '{"order_id": "A1"}')
    )
    fake = canned(
        DECIDE_CALL, copied + other, call_chunks("cancel_order", '{"order_id": "A1", "reason": "no"}')
    )
    events = await respond(SHOP, "cancel A1, no", PARALLEL)
    assert fake.branches() == ["free", "calls", "calls"]
    assert fake.streams[1].taken == len(copied) - 1
    assert fake.streams[1].closed
    assert [call.name for call in calls(events)] == ["cancel_order"]


async def test_after_a_tool_result_the_reply_is_text_only(canned: Callable[..., Canned]) -> None:
    fake = canned([chunk("It shipped.")])
    events = await respond(
        SHOP,
        [
            {"role": "user", "content": "where is order A1?"},
            {"type": "function_call", "call_id": "c1", "name": "get_order_status", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "Shipped yesterday."},
        ],
    )
    assert fake.branches() == ["text"]
    assert fake.requests[0]["decide"] is False
    assert fake.requests[0]["messages"][-1] == {
        "role": "tool",
        "content": "get_order_status returned: Shipped yesterday.",
    }
    assert text(events) == "It shipped."


async def test_a_looping_reply_is_cut_before_the_repeat(canned: Callable[..., Canned]) -> None:
    sentence = ["It", " is", " a", " sunny", " day", "."]
    fake = canned([chunk("It", {"It": 0.9}), *[chunk(piece) for piece in sentence[1:] + sentence * 50]])
    events = await respond(SHOP, "hi")
    assert text(events) == "It is a sunny day.It is a sunny day"
    assert fake.streams[0].closed
    assert fake.streams[0].taken < 20


async def test_only_the_deciding_request_goes_without_a_grammar_and_calls_without_the_penalty() -> None:
    sent: list[dict[str, Any]] = []

    class Completions:
        async def create(self, **kwargs: Any) -> Any:
            sent.append(kwargs)

    client: Any = type("Client", (), {"chat": type("Chat", (), {"completions": Completions()})()})()
    settings = LOCAL_SETTINGS.resolve(ModelSettings(temperature=0.0, frequency_penalty=0.5))
    await _adapter._open(client, "m", [], settings, None, decide=True, penalty=True)
    await _adapter._open(client, "m", [], settings, "G2", decide=False, penalty=False)
    deciding, calling = sent
    assert deciding["extra_body"] == {"repeat_penalty": 1.15, "repeat_last_n": 128}  # no grammar
    assert (deciding["logprobs"], deciding["top_logprobs"], deciding["frequency_penalty"]) == (True, 10, 0.5)
    assert calling["extra_body"] == {"repeat_penalty": 1.0, "repeat_last_n": 128, "grammar": "G2"}
    assert calling["frequency_penalty"] is omit
    assert calling["logprobs"] is omit
    assert (calling["max_tokens"], calling["temperature"], calling["stream"]) == (384, 0.0, True)
    assert calling["extra_headers"] == {"Connection": "close"}


async def test_without_tools_the_plain_path_serves_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel: Any = object()
    monkeypatch.setattr(ServedModel, "stream_response", lambda *args, **kwargs: sentinel)
    stream = model().stream_response(
        None, "hi", ModelSettings(), [], None, [], ModelTracing.DISABLED,
        previous_response_id=None, conversation_id=None, prompt=None,
    )  # fmt: skip
    assert stream is sentinel


async def test_an_unstreamed_response_is_the_streamed_one_collected(canned: Callable[..., Canned]) -> None:
    canned([chunk('{"', {'{"': 0.9})], call_chunks("get_order_status", '{"order_id": "A1"}'))
    response = await model().get_response(
        None, "where is A1?", ModelSettings(), list(SHOP.tools), None, [], ModelTracing.DISABLED,
        previous_response_id=None, conversation_id=None, prompt=None,
    )  # fmt: skip
    [call] = response.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.arguments) == ("get_order_status", '{"order_id": "A1"}')
    assert response.usage.output_tokens == len(call_chunks("x", '{"order_id": "A1"}')) - 1


async def test_a_template_with_native_tools_keeps_the_plain_path(
    canned: Callable[..., Canned], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = canned()

    async def native(self: AdaptedModel) -> Template:
        return Template(native_tools=True, end_token=2)

    async def plain(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        yield "from llama.cpp's own tool parsing"

    monkeypatch.setattr(AdaptedModel, "template", native)
    monkeypatch.setattr(ServedModel, "stream_response", plain)
    assert await respond(SHOP, "where is A1234?") == ["from llama.cpp's own tool parsing"]
    assert fake.requests == []


@function_tool
async def fast_lookup(query: str) -> str:
    """Look something up."""
    return f"facts about {query}"


async def test_a_whole_turn_runs_the_tool_and_answers(canned: Callable[..., Canned]) -> None:
    canned(
        [chunk('{"', {'{"': 0.9})],
        call_chunks("fast_lookup", '{"query": "Paris"}'),
        [chunk("Paris"), chunk(" facts.")],
    )
    agent = Agent(name="a", instructions="Be brief.", tools=[fast_lookup])
    seen: list[rtagent.Event] = []
    async with rtagent.stream(agent, "look up Paris", model=model()) as turn:
        seen = [event async for event in turn]
    kinds = [type(event).__name__ for event in seen]
    assert kinds == [
        "Thinking",
        "ToolStarted",
        "ToolFinished",
        "Thinking",
        "TextDelta",
        "TextDelta",
        "TurnFinished",
    ]
    started = seen[1]
    assert isinstance(started, rtagent.ToolStarted)
    assert (started.name, started.arguments) == ("fast_lookup", '{"query": "Paris"}')
    assert turn.result.text == "Paris facts."


@function_tool
async def fast_clock(city: str) -> str:
    """Tell the time in a city."""
    return f"noon in {city}"


class HeldStream(CannedStream):
    """A canned stream that holds its chunks back from ``at`` on until ``go`` is set."""

    def __init__(self, chunks: list[ChatCompletionChunk], at: int) -> None:
        super().__init__(chunks)
        self.at = at
        self.go = asyncio.Event()

    async def _iterate(self) -> AsyncIterator[ChatCompletionChunk]:
        for i, item in enumerate(self.chunks):
            if i == self.at:
                await self.go.wait()
            self.taken += 1
            yield item


async def test_a_whole_turn_runs_parallel_tools_each_announced_as_its_arguments_close(
    canned: Callable[..., Canned],
) -> None:
    first, second = calls_in_a_row(("fast_lookup", '{"query": "Paris"}'), ("fast_clock", '{"city": "Rome"}'))
    fake = canned(DECIDE_CALL, [], [chunk("Paris"), chunk(" at noon.")])
    # The rest of the reply is held back until the first call has been shown to the consumer.
    held = fake.streams[1] = HeldStream(first + second, at=len(first) - 1)
    agent = Agent(
        name="a", instructions="Be brief.", tools=[fast_lookup, fast_clock], model_settings=PARALLEL
    )
    seen: list[rtagent.Event] = []
    async with (
        asyncio.timeout(10),
        rtagent.stream(agent, "look up Paris, time in Rome", model=model()) as turn,
    ):
        async for event in turn:
            seen.append(event)
            if isinstance(event, rtagent.ToolStarted) and not held.go.is_set():
                assert held.taken == len(first) - 1
                held.go.set()
    kinds = [type(event).__name__ for event in seen]
    assert kinds == [
        "Thinking",
        "ToolStarted",
        "ToolStarted",
        "ToolFinished",
        "ToolFinished",
        "Thinking",
        "TextDelta",
        "TextDelta",
        "TurnFinished",
    ]
    started = [(e.name, e.arguments) for e in seen if isinstance(e, rtagent.ToolStarted)]
    assert started == [("fast_lookup", '{"query": "Paris"}'), ("fast_clock", '{"city": "Rome"}')]
    finished = {e.name: e.output for e in seen if isinstance(e, rtagent.ToolFinished)}
    assert finished == {"fast_lookup": "facts about Paris", "fast_clock": "noon in Rome"}
    # The answer is asked for with both calls, as the model writes them, and both results.
    assert fake.requests[2]["messages"][-3:] == [
        {
            "role": "assistant",
            "content": '{"name": "fast_lookup", "arguments": {"query": "Paris"}}\n'
            '{"name": "fast_clock", "arguments": {"city": "Rome"}}',
        },
        {"role": "tool", "content": "fast_lookup returned: facts about Paris"},
        {"role": "tool", "content": "fast_clock returned: noon in Rome"},
    ]
    assert turn.result.text == "Paris at noon."


# -- the real model -------------------------------------------------------------------------------

DEMO_CALL = "please do a delayed lookup for the weather in Paris"
DEMO_PLAIN = "what is 2 + 2?"


@pytest.mark.model
async def test_the_embedded_model_reports_no_native_tools() -> None:
    local = rtagent._models.parse_spec("local")
    assert isinstance(local, AdaptedModel)
    assert await local.template() == Template(native_tools=False, end_token=2)


@pytest.mark.model
async def test_the_demo_agent_looks_up_paris_then_answers_and_adds_without_a_tool() -> None:
    deterministic = RunConfig(model_settings=ModelSettings(temperature=0.0), tracing_disabled=True)
    first = [
        event
        async for event in rtagent.stream(demo_agent, DEMO_CALL, model="local", run_config=deterministic)
    ]
    started = [event for event in first if isinstance(event, rtagent.ToolStarted)]
    assert [event.name for event in started] == ["delayed_lookup"]
    assert "paris" in json.loads(started[0].arguments)["query"].lower()
    finished_at = next(i for i, event in enumerate(first) if isinstance(event, rtagent.ToolFinished))
    assert any(isinstance(event, rtagent.TextDelta) for event in first[finished_at:])
    assert isinstance(first[-1], rtagent.TurnFinished)

    second = [
        event
        async for event in rtagent.stream(demo_agent, DEMO_PLAIN, model="local", run_config=deterministic)
    ]
    assert not any(isinstance(event, rtagent.ToolStarted) for event in second)
    assert "".join(event.text for event in second if isinstance(event, rtagent.TextDelta)).strip()
    assert isinstance(second[-1], rtagent.TurnFinished)


@pytest.fixture
def demo_chat() -> Iterator[pexpect.spawn[str]]:
    env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1", "LANG": "C.UTF-8", "PROMPT_TOOLKIT_NO_CPR": "1"}
    env.pop("RTAGENT_MODEL", None)
    rtagent_command = str(Path(sys.executable).with_name("rtagent"))
    child = pexpect.spawn(
        rtagent_command, ["chat"], env=env, encoding="utf-8", timeout=60, dimensions=(40, 200)
    )
    child.expect_exact("rtagent · RealtimeChatAgent · model local (SmolLM2-135M-Instruct.Q4_1)", timeout=60)
    yield child
    child.close(force=True)


# A reply ends with a blank line, then the prompt comes back: terminal modes, then "> " drawn as
# ">" and a cursor move.
NEXT_PROMPT = r"\r\n\r\n(\x1b\[[0-9;?]*[A-Za-z])*>(\x08| )"


@pytest.mark.model
def test_the_terminal_chat_shows_the_tool_for_paris_and_answers_two_plus_two(
    demo_chat: pexpect.spawn[str],
) -> None:
    demo_chat.expect(r">(\x08| )")
    demo_chat.sendline(DEMO_CALL)
    demo_chat.expect(r"using delayed_lookup\.\.\. \d+\.\ds")
    demo_chat.expect(r"✓ delayed_lookup \(3\.\ds\): Data for '[^']*Paris[^']*' retrieved successfully")
    demo_chat.expect(NEXT_PROMPT)
    demo_chat.sendline(DEMO_PLAIN)
    demo_chat.expect_exact(DEMO_PLAIN)
    demo_chat.expect(NEXT_PROMPT)
    shown = str(demo_chat.before)
    assert "using delayed_lookup" not in shown
    assert "✓ delayed_lookup" not in shown
    answer = shown.rpartition("\x1b[K")[2]  # what is left once the status line is erased
    assert re.search(r"\w", answer)


@pytest.mark.model
async def test_warming_reads_the_agents_tool_prompt_into_the_cache() -> None:
    @function_tool
    def find_book(title: str) -> str:
        """Find a book in the library."""
        return "shelf 3"

    # Unique instructions: no slot holds this prompt from an earlier test.
    agent = Agent(name="librarian", instructions=f"Library {secrets.token_hex(4)}.", tools=[find_book])
    local = rtagent._models.parse_spec("local")
    assert isinstance(local, AdaptedModel)
    await local.warm(agent)
    server = shared_server(default_model_path())
    instructions = await agent.get_system_prompt(RunContextWrapper(None))
    messages = [*prefix(instructions, tool_specs(agent.tools, [])), {"role": "user", "content": "Dune?"}]
    async with server.slot_for(f"{m['role']}: {m['content']}" for m in messages) as slot:
        auth = {"Authorization": f"Bearer {server.api_key}"}
        async with httpx.AsyncClient(base_url=server.address, headers=auth) as http:
            body = {"messages": messages, "max_tokens": 1, "id_slot": slot}
            answer = (await http.post("/v1/chat/completions", json=body)).raise_for_status().json()
    timings = answer["timings"]
    assert timings["cache_n"] > 100  # the tool prompt and examples were already read
    assert timings["prompt_n"] < 20  # only the new message was
