"""The reply cache: what it serves, what it never stores, and what the next model call sees."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any, Unpack

import httpx
import pytest
from agents import Agent, GuardrailFunctionOutput, function_tool, input_guardrail

import rtagent
from rtagent import TextDelta, TurnFinished
from rtagent._cli import main
from rtagent._result import CacheCounts, TurnMetrics, TurnResult
from rtagent._terminal import _Screen
from rtagent.cache._embedding import shared_embedder
from rtagent.cache._replies import MemoryStore, RedisStore, ReplyCache, model_label, replayable, same_slots
from rtagent.server import create_app
from rtagent.testing import ScriptedModel, call, reply, tool_calls

PAIRS = Path(__file__).parent / "data" / "paraphrases.jsonl"


@function_tool
def order_status(order: str) -> str:
    """Look an order up."""
    return f"order {order} shipped"


async def deltas_of(
    chat: rtagent.Chat, text: str, **options: Unpack[rtagent.TurnOptions]
) -> tuple[list[str], rtagent.TurnResult]:
    deltas: list[str] = []
    async with chat.send(text, **options) as turn:
        async for event in turn:
            if isinstance(event, TextDelta):
                deltas.append(event.text)
    return deltas, turn.result


async def test_a_stored_reply_streams_again_without_a_model_call() -> None:
    cache = ReplyCache()
    model = ScriptedModel([reply("Orders ship in two days.", chunks=3)])  # one reply only
    agent = Agent(name="shop", instructions="Be brief.", model=model)
    first, first_result = await deltas_of(rtagent.Chat(agent, reply_cache=cache), "When do orders ship?")
    again, result = await deltas_of(rtagent.Chat(agent, reply_cache=cache), "When do orders ship?")
    assert again == first == ["Orders s", "hip in t", "wo days."]
    assert first_result.cached is None
    stored = first_result.metrics.cache["reply"]
    assert (stored.hits, stored.misses) == (0, 1)
    assert stored.stored_bytes > 0
    assert result.cached == "exact"
    assert result.final_output == "Orders ship in two days."
    assert result.metrics.cache == {"reply": CacheCounts(hits=1)}
    assert result.metrics.time_to_first_token_s is not None
    assert result.metrics.time_to_first_token_s < 0.05
    assert len(model.streams) == 1
    assert (cache.stats.exact_hits, cache.stats.misses, cache.stats.stores) == (1, 1, 1)


async def test_a_change_of_instructions_tools_or_model_misses() -> None:
    cache = ReplyCache()
    model = ScriptedModel([reply(f"reply {n}") for n in range(5)])
    base = Agent(name="shop", instructions="Be brief.", model=model)
    variants = [
        base,
        base.clone(instructions="Be thorough."),
        base.clone(tools=[order_status]),
        base.clone(model=ScriptedModel([reply("other model")])),
    ]
    texts = [(await deltas_of(rtagent.Chat(agent, reply_cache=cache), "hello"))[1] for agent in variants]
    assert [result.cached for result in texts] == [None, None, None, None]
    assert [result.text for result in texts] == ["reply 0", "reply 1", "reply 2", "other model"]
    # And the unchanged agent still hits.
    assert (await deltas_of(rtagent.Chat(base, reply_cache=cache), "hello"))[1].cached


async def test_a_cached_reply_in_history_looks_like_any_reply_to_the_next_model_call() -> None:
    cache = ReplyCache()
    model = ScriptedModel([reply("Hi! How can I help?"), reply("It shipped."), reply("It shipped.")])
    agent = Agent(name="shop", instructions="Be brief.", model=model)
    plain, served = rtagent.Chat(agent, reply_cache=cache), rtagent.Chat(agent, reply_cache=cache)
    await deltas_of(plain, "hello")
    await deltas_of(plain, "where is order 7?", reply_cache=None)
    assert (await deltas_of(served, "hello"))[1].cached
    await deltas_of(served, "where is order 7?", reply_cache=None)
    assert len(model.calls) == 3
    assert without_ids(model.calls[2].input) == without_ids(model.calls[1].input)
    assert without_ids(await served.history()) == without_ids(await plain.history())


def without_ids(items: Any) -> Any:
    return [{k: v for k, v in dict(item).items() if k != "id"} for item in items]


async def test_a_turn_that_called_a_tool_is_stored_only_if_the_tool_is_replayable() -> None:
    for tool, stored in (
        (order_status, False),
        (replayable(function_tool(lambda order: "ok", name_override="look")), True),
    ):
        cache = ReplyCache()
        model = ScriptedModel([tool_calls(call(tool.name, {"order": "7"})), reply("Order 7 shipped.")])
        agent = Agent(name="shop", model=model, tools=[tool])
        await deltas_of(rtagent.Chat(agent, reply_cache=cache), "where is order 7?")
        assert cache.stats.stores == int(stored)
        if stored:
            chat = rtagent.Chat(agent, reply_cache=cache)
            _, result = await deltas_of(chat, "where is order 7?")
            assert result.cached
            assert result.text == "Order 7 shipped."
            kinds = [item.get("type", "message") for item in await chat.history()]
            assert kinds == ["message", "function_call", "function_call_output", "message"]


async def test_interrupted_and_failed_turns_are_never_stored() -> None:
    cache = ReplyCache()
    model = ScriptedModel([reply("a long reply " * 20, chunks=40, delay=0.01), reply("fresh")])
    agent = Agent(name="shop", model=model)
    chat = rtagent.Chat(agent, reply_cache=cache)
    async with chat.send("tell me everything") as turn:
        async for event in turn:
            if isinstance(event, TextDelta):
                turn.interrupt()
    assert turn.result.interrupted
    assert cache.stats.stores == 0
    failing = Agent(name="shop", model=ScriptedModel([]))  # no step: the model call fails
    await deltas_of(rtagent.Chat(failing, reply_cache=cache), "tell me everything")
    assert cache.stats.stores == 0
    _, result = await deltas_of(rtagent.Chat(agent, reply_cache=cache), "tell me everything")
    assert not result.cached
    assert result.text == "fresh"


async def test_entries_expire_the_store_keeps_to_its_size_and_clear_forgets_all() -> None:
    store = MemoryStore(max_bytes=600)
    cache = ReplyCache(ttl_s=0.05, store=store)
    model = ScriptedModel([reply(f"reply number {n}") for n in range(13)])
    agent = Agent(name="shop", model=model)
    await deltas_of(rtagent.Chat(agent, reply_cache=cache), "hi")
    await asyncio.sleep(0.1)
    assert not (await deltas_of(rtagent.Chat(agent, reply_cache=cache), "hi"))[1].cached
    cache.ttl_s = 60.0
    for n in range(10):
        await deltas_of(rtagent.Chat(agent, reply_cache=cache), f"message {n}")
    assert 0 < store.stored_bytes() <= 600
    assert (await deltas_of(rtagent.Chat(agent, reply_cache=cache), "message 9"))[1].cached
    assert await cache.clear() > 0
    assert store.stored_bytes() == 0
    assert not (await deltas_of(rtagent.Chat(agent, reply_cache=cache), "message 9"))[1].cached


async def test_semantic_hits_a_paraphrase_and_misses_a_negation() -> None:
    cache = ReplyCache("semantic")
    model = ScriptedModel([reply("You can cancel it under Orders."), reply("Fine, it stays."), reply("x")])
    agent = Agent(name="shop", instructions="Be brief.", model=model)
    await deltas_of(rtagent.Chat(agent, reply_cache=cache), "How do I cancel my subscription?")
    _, hit = await deltas_of(rtagent.Chat(agent, reply_cache=cache), "How can I cancel my subscription?")
    assert hit.cached == "semantic"
    assert hit.text == "You can cancel it under Orders."
    assert hit.metrics.cache["reply"].hits == 1
    _, miss = await deltas_of(rtagent.Chat(agent, reply_cache=cache), "How do I not cancel my subscription?")
    assert not miss.cached
    assert miss.text == "Fine, it stays."


def test_slots_tell_numbers_dates_and_negations_apart() -> None:
    assert same_slots("Where is order 55102?", "Where's order 55102?")
    assert same_slots("My package hasn't arrived yet", "My parcel has not arrived yet")
    assert not same_slots("Cancel my order", "Don't cancel my order")
    assert not same_slots("Where is order 12345?", "Where is order 12346?")
    assert not same_slots("I need 4 extra chargers", "I need one extra charger")
    assert not same_slots("Deliver it on Monday", "Deliver it on Tuesday")


def test_the_shipped_threshold_makes_no_wrong_hit_on_the_labelled_pairs() -> None:
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert len(pairs) >= 200
    embedder, threshold = shared_embedder(), ReplyCache("semantic").threshold

    def hits(pair: dict[str, Any]) -> bool:
        similarity = float(embedder.embed(pair["stored"]) @ embedder.embed(pair["incoming"]))
        return similarity >= threshold and same_slots(pair["stored"], pair["incoming"])

    wrong = [pair for pair in pairs if not pair["same"] and hits(pair)]
    assert wrong == []
    paraphrases = [pair for pair in pairs if pair["same"]]
    # What bench/paraphrases.py reports; a model or rule change that loses hits should be seen.
    assert sum(map(hits, paraphrases)) / len(paraphrases) >= 0.35


async def test_turn_finished_carries_the_cache_mark() -> None:
    cache = ReplyCache()
    agent = Agent(name="shop", model=ScriptedModel([reply("ok")]))
    await rtagent.run(agent, "hi", reply_cache=cache)
    async with rtagent.stream(agent, "hi", reply_cache=cache) as turn:
        events = [event async for event in turn]
    assert isinstance(events[-1], TurnFinished)
    assert events[-1].result.cached


# -- served ---------------------------------------------------------------------------------------


def finished_result(body: str) -> dict[str, Any]:
    events = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: ")]
    result: dict[str, Any] = next(e for e in events if e["type"] == "RUN_FINISHED")["result"]
    result["deltas"] = [e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
    return result


def ask(text: str, thread: str) -> dict[str, Any]:
    message = {"id": f"u-{thread}", "role": "user", "content": text}
    return {"threadId": thread, "runId": "r", "messages": [message], "state": {}, "tools": [], "context": []}


async def test_the_server_serves_a_stored_reply_to_another_thread_and_counts_it(tmp_path: Path) -> None:
    model = ScriptedModel([reply("We ship in two days.", chunks=2)])
    app = create_app(
        Agent(name="shop"), model=model, db_path=tmp_path / "threads.db", reply_cache=ReplyCache()
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            first = finished_result((await http.post("/agui", json=ask("When do you ship?", "a"))).text)
            second = finished_result((await http.post("/agui", json=ask("When do you ship?", "b"))).text)
            metrics = (await http.get("/metrics")).text
    assert first["cached"] is None
    assert second["cached"] == "exact"
    assert second["deltas"] == first["deltas"] == ["We ship in", " two days."]
    assert second["metrics"]["cache"]["reply"]["hits"] == 1
    for line in (
        'rtagent_cache_hits_total{cache="reply"} 1.0',
        'rtagent_cache_misses_total{cache="reply"} 1.0',
        'rtagent_cache_stored_bytes_total{cache="reply"}',
    ):
        assert line in metrics


async def test_replicas_share_exact_replies_over_redis_and_cache_clear_forgets_them(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = Agent(name="shop", instructions="Be brief.")
    one = ReplyCache(store=RedisStore(redis_url))
    model = ScriptedModel([reply("Shared reply."), reply("Fresh reply.")])
    await rtagent.run(agent, "hi", model=model, reply_cache=one)
    other = ReplyCache(store=RedisStore(redis_url))  # another replica: its own process, same Redis
    result = await rtagent.run(agent, "hi", model=model, reply_cache=other)
    assert result.cached
    assert result.text == "Shared reply."
    assert await asyncio.to_thread(main, ["cache", "clear", "--redis", redis_url]) == 0
    assert "and 1 stored replies" in capsys.readouterr().out
    result = await rtagent.run(agent, "hi", model=model, reply_cache=other)
    assert not result.cached
    assert result.text == "Fresh reply."


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_terminal_marks_a_cached_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("NO_COLOR", "1")
    out = Tty()
    screen = _Screen(out)
    screen.show(TextDelta("We ship in two days."))
    metrics = TurnMetrics(0.001, 1, None, (), 0.001, {"reply": CacheCounts(hits=1)})
    screen.show(TurnFinished(TurnResult("We ship in two days.", False, metrics, cached="exact")))
    assert out.getvalue() == "We ship in two days. [cached]\n\n"


def test_the_sdk_s_openai_models_are_named_by_their_model_not_their_address() -> None:
    from agents.models.openai_responses import OpenAIResponsesModel
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="k")
    one, other = (OpenAIResponsesModel(model="gpt-test", openai_client=client) for _ in range(2))
    assert model_label(one) == model_label(other) == "OpenAIResponsesModel:gpt-test"


class GatedStore(MemoryStore):
    """A store whose reads wait for the test to let them through."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.gate = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        self.reading.set()
        await self.gate.wait()
        return await super().get(key)


async def test_a_turn_stopped_while_the_cache_looks_up_saves_its_message_and_serves_nothing() -> None:
    store = GatedStore()
    store.gate.set()
    cache = ReplyCache(store=store)
    agent = Agent(name="shop", model=ScriptedModel([reply("Stored.")]))
    await rtagent.run(agent, "hi", reply_cache=cache)
    store.gate.clear()
    store.reading.clear()
    chat = rtagent.Chat(agent, reply_cache=cache)
    turn = chat.send("hi")
    await store.reading.wait()
    turn.interrupt()
    store.gate.set()
    result = await turn.wait()
    assert result.interrupted
    assert not result.cached
    assert result.text == ""
    assert [item.get("content") for item in await chat.history()] == ["hi"]


def test_serve_flags_build_the_cache_each_worker_uses(redis_url: str) -> None:
    from rtagent._cli import build_parser
    from rtagent.server._app import _reply_cache

    args = build_parser().parse_args(["serve", "--reply-cache", "semantic", "--reply-cache-ttl", "60"])
    assert (args.reply_cache, args.reply_cache_ttl) == ("semantic", 60.0)
    cache = _reply_cache({"reply_cache": "semantic", "reply_cache_ttl": 60.0, "redis": None})
    assert cache is not None
    assert (cache.match, cache.ttl_s, type(cache.store)) == ("semantic", 60.0, MemoryStore)
    shared = _reply_cache({"reply_cache": "exact", "reply_cache_ttl": None, "redis": redis_url})
    assert shared is not None
    assert isinstance(shared.store, RedisStore)
    assert _reply_cache({"reply_cache": None, "redis": redis_url}) is None


async def test_a_change_of_guardrails_misses_and_agents_with_handoffs_are_not_cached() -> None:
    @input_guardrail
    async def polite(context: Any, agent: Agent[Any], message: Any) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=False)

    cache = ReplyCache()
    model = ScriptedModel([reply(f"reply {n}") for n in range(4)])
    plain = Agent(name="shop", model=model)
    await rtagent.run(plain, "hi", reply_cache=cache)
    guarded = await rtagent.run(plain.clone(input_guardrails=[polite]), "hi", reply_cache=cache)
    assert not guarded.cached
    assert guarded.text == "reply 1"
    routed = plain.clone(handoffs=[Agent(name="billing", model=model)])
    for text in ("reply 2", "reply 3"):
        result = await rtagent.run(routed, "hi", reply_cache=cache)
        assert (result.cached, result.text, result.metrics.cache) == (None, text, {})


async def test_an_agent_with_input_guardrails_gets_exact_hits_only() -> None:
    judged: list[str] = []

    @input_guardrail
    async def screened(context: Any, agent: Agent[Any], message: Any) -> GuardrailFunctionOutput:
        judged.append(str(message))
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=False)

    cache = ReplyCache("semantic")
    model = ScriptedModel([reply("Under Orders."), reply("Still under Orders.")])
    agent = Agent(name="shop", model=model, input_guardrails=[screened])
    await deltas_of(rtagent.Chat(agent, reply_cache=cache), "How do I cancel my subscription?")
    _, same = await deltas_of(rtagent.Chat(agent, reply_cache=cache), "How do I cancel my subscription?")
    # Other words never passed the guardrail: they go to the model, and the guardrail runs.
    _, other = await deltas_of(rtagent.Chat(agent, reply_cache=cache), "How can I cancel my subscription?")
    assert (same.cached, other.cached) == ("exact", None)
    assert other.text == "Still under Orders."
    assert len(judged) == 2
