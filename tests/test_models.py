"""Model specs, and whole turns on the real embedded model."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import httpx
import pytest
from agents import Agent, ModelSettings, RunConfig, SQLiteSession
from agents.run_config import CallModelData, ModelInputData

import rtagent
from rtagent import ModelError, TextDelta, TurnFinished
from rtagent._local import DecodeWatch, LocalServer, default_model_path, shared_server
from rtagent._models import parse_spec, resolve_model
from rtagent._served import ServedModel, _prompt_of, pooled_client
from rtagent.testing import ScriptedModel


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpt-9", "unknown model spec 'gpt-9'"),
        ("local:/nowhere/model.gguf", "no GGUF model file at /nowhere/model.gguf"),
        ("openai:", "name the OpenAI model"),
    ],
)
def test_bad_specs_fail_with_one_line(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as caught:
        parse_spec(spec)
    assert "\n" not in str(caught.value)


def test_openai_spec_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelError, match="needs OPENAI_API_KEY"):
        parse_spec("openai:gpt-4.1-mini")


def test_agent_model_name_without_a_key_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelError, match=r"the agent.s model gpt-4\.1-mini needs OPENAI_API_KEY"):
        resolve_model(None, Agent(name="a", model="gpt-4.1-mini"))


def test_agent_model_name_goes_to_openai_through_the_pooled_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # A name of its own: resolved models are kept, and other tests expect openai:gpt-4.1-mini unkept.
    model = resolve_model(None, Agent(name="a", model="gpt-pooled"))
    assert isinstance(model, ServedModel)
    assert str(model) == "openai:gpt-pooled"
    assert resolve_model(None, Agent(name="b", model="gpt-pooled")) is model  # one model, one pool


def test_http_spec_names_the_model_after_the_hash() -> None:
    model = parse_spec("http://127.0.0.1:11434/v1#llama3.2")
    assert isinstance(model, ServedModel)
    assert str(model) == "http://127.0.0.1:11434/v1#llama3.2"


def test_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    own = ScriptedModel([])
    monkeypatch.setenv("RTAGENT_MODEL", "http://127.0.0.1:1/v1#env")
    assert resolve_model(None, Agent(name="a", model=own)) is own
    assert str(resolve_model(None, Agent(name="a"))) == "http://127.0.0.1:1/v1#env"
    assert (
        str(resolve_model("http://127.0.0.1:2/v1#x", Agent(name="a", model=own))) == "http://127.0.0.1:2/v1#x"
    )


async def test_one_pooled_client_per_server_per_loop() -> None:
    first = pooled_client("http://127.0.0.1:1/v1", "k")
    assert pooled_client("http://127.0.0.1:1/v1", "k") is first
    assert pooled_client("http://127.0.0.1:2/v1", "k") is not first


@pytest.mark.model
async def test_embedded_model_streams_and_remembers_the_conversation() -> None:
    agent = Agent(name="a", instructions="You are a helpful assistant. Be concise.")
    session = SQLiteSession("e2e")
    deltas = 0
    async with rtagent.stream(
        agent, "My name is Ada. Say hello to me.", session=session, model="local"
    ) as turn:
        async for event in turn:
            deltas += isinstance(event, TextDelta)
    assert isinstance(event, TurnFinished)
    assert deltas >= 3
    assert turn.result.text.strip()
    assert turn.result.metrics.tokens_per_s is not None

    seen: list[Any] = []

    def capture(data: CallModelData[Any]) -> ModelInputData:
        seen.extend(data.model_data.input)
        return data.model_data

    second = await rtagent.run(
        agent,
        "What is my name?",
        session=session,
        model="local",
        run_config=RunConfig(call_model_input_filter=capture),
    )
    assert second.text.strip()
    # An assistant item's content is a list of parts: its text, not its repr (which escapes
    # newlines and quotes in the reply), is what must hold the first reply.
    texts = [
        "".join(part["text"] for part in content) if isinstance(content, list) else str(content)
        for content in (item.get("content") for item in seen)
    ]
    assert "My name is Ada. Say hello to me." in texts[0]
    assert turn.result.text in texts[1]
    assert "What is my name?" in texts[2]


@pytest.mark.model
async def test_interrupt_stops_generation_on_the_embedded_model_server() -> None:
    model = parse_spec("local")
    assert isinstance(model, ServedModel)
    await model.warm()
    agent = Agent(
        name="a", instructions="You are a storyteller.", model_settings=ModelSettings(max_tokens=384)
    )
    session = SQLiteSession("cut")
    async with DecodeWatch(shared_server(default_model_path())) as watch:
        deltas: list[str] = []
        async with rtagent.stream(
            agent, "Tell me a very long story about a dragon.", model=model, session=session
        ) as turn:
            async for event in turn:
                if isinstance(event, TextDelta):
                    deltas.append(event.text)
                    if len(deltas) == 10:
                        interrupted_at = time.perf_counter()
                        turn.interrupt()
        await asyncio.sleep(0.5)  # had generation gone on, the counter would have moved meanwhile
        stopped_after = watch.last_change - interrupted_at
    assert turn.result.interrupted
    assert stopped_after < 0.1, f"the server decoded tokens {stopped_after * 1e3:.0f} ms after the interrupt"
    history = await session.get_items()
    assert history[-1]["content"][0]["text"] == "".join(deltas)  # type: ignore[typeddict-item, index]


def auth(server: LocalServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


@pytest.mark.model
async def test_warming_keeps_the_system_prompt_of_an_agent_without_tools() -> None:
    # Unique instructions: no slot holds this prompt from an earlier test.
    instructions = f"Bakery {secrets.token_hex(4)}. " + "You answer questions about bread, briefly. " * 12
    agent = Agent(name="baker", instructions=instructions)
    model = parse_spec("local")
    assert isinstance(model, ServedModel)
    await model.warm(agent)
    server = shared_server(default_model_path())
    slots, cached = [], []
    for question in ("Is rye bread healthy?", "How long does sourdough keep?"):
        item = {"role": "user", "content": question}
        # The two conversations' requests as the plain path names them (its key is per input item).
        async with server.slot_for(_prompt_of(instructions, [item])) as slot:  # type: ignore[list-item]
            body = {"messages": [{"role": "system", "content": instructions}, item], "max_tokens": 1}
            async with httpx.AsyncClient(base_url=server.address, headers=auth(server)) as http:
                answer = (await http.post("/v1/chat/completions", json={**body, "id_slot": slot})).json()
        slots.append(slot)
        cached.append(answer["timings"]["cache_n"])
    assert slots[0] != slots[1]  # the second conversation did not take the first one's slot
    assert min(cached) > 100  # and neither read the system prompt (about 130 tokens) again
