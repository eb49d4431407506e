"""The model's own prompt cache: a stable ``prompt_cache_key`` for OpenAI, and requests to
OpenAI-compatible servers whose fixed prefix is byte-identical across turns and conversations."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from agents import Agent, ModelSettings, function_tool
from agents.models.interface import Model

import rtagent
from rtagent._served import ServedModel
from rtagent.testing import ScriptedModel, reply


@function_tool
def order_status(order: str) -> str:
    """Look an order up."""
    return "shipped"


@function_tool
def refund(order: str, reason: str) -> str:
    """Refund an order."""
    return "refunded"


def openai_model(monkeypatch: pytest.MonkeyPatch, inner: ScriptedModel) -> ServedModel:
    """An ``openai:`` model whose requests reach ``inner`` instead of OpenAI."""
    model = ServedModel("openai:gpt-test", "gpt-test", api="responses", api_key="k")

    async def target() -> Model:
        return inner

    monkeypatch.setattr(model, "_target", target)
    return model


async def test_openai_requests_carry_one_prompt_cache_key_per_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    inner = ScriptedModel([reply("a"), reply("b"), reply("c"), reply("d")])
    model = openai_model(monkeypatch, inner)
    agent = Agent(name="shop", instructions="Be brief.", tools=[order_status])
    for chat in (rtagent.Chat(agent, model=model), rtagent.Chat(agent, model=model)):
        await chat.send("hi").wait()
    await rtagent.run(agent.clone(instructions="Be thorough."), "hi", model=model)
    mine = agent.clone(model_settings=ModelSettings(extra_args={"prompt_cache_key": "mine"}))
    await rtagent.run(mine, "hi", model=model)
    keys = [call.model_settings.extra_args["prompt_cache_key"] for call in inner.calls]  # type: ignore[index]
    assert keys[0] == keys[1]
    assert keys[0].startswith("rtagent-")
    assert keys[2] != keys[0]
    assert keys[3] == "mine"


async def test_chat_completions_servers_get_no_prompt_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    inner = ScriptedModel([reply("a")])
    model = ServedModel("http://127.0.0.1:1/v1#m", "m", base_url="http://127.0.0.1:1/v1", api_key="none")

    async def target() -> Model:
        return inner

    monkeypatch.setattr(model, "_target", target)
    await rtagent.run(Agent(name="shop", instructions="Be brief."), "hi", model=model)
    assert "prompt_cache_key" not in (inner.calls[0].model_settings.extra_args or {})


# -- an OpenAI-compatible server that records what it is sent ------------------------------------


_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(content: str | None, finish: str | None) -> bytes:
    delta = {"role": "assistant", "content": content} if content is not None else {}
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "test",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    data = f"data: {json.dumps(body)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@asynccontextmanager
async def recording_server(bodies: list[bytes]) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                bodies.append(await reader.readexactly(length))
                writer.write(_HEAD)
                writer.write(_chunk(f"reply {len(bodies)}", None) + _chunk(None, "stop"))
                done = b"data: [DONE]\n\n"
                writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/v1"


async def test_the_fixed_prefix_is_byte_identical_across_turns_and_conversations() -> None:
    bodies: list[bytes] = []
    async with recording_server(bodies) as url:
        model = ServedModel(url, "test", base_url=url, api_key="none")
        agent = Agent(name="shop", instructions="You help with orders.", tools=[order_status, refund])
        for _ in range(2):  # two conversations, two turns each
            chat = rtagent.Chat(agent, model=model)
            for text in ("hello", "where is order 7?"):
                turn = chat.send(text)
                await turn.wait()
                assert turn.result.text.startswith("reply ")
    requests = [json.loads(body) for body in bodies]
    assert len(requests) == 4
    # What a prefix cache reuses: the system message, then the tool list the template renders.
    prefixes = {json.dumps([r["messages"][0], r["tools"]]) for r in requests}
    assert len(prefixes) == 1
    assert requests[0]["messages"][0] == {"role": "system", "content": "You help with orders."}
    # And each turn's request starts with the one before it, so the whole history is reused too.
    for first, second in ((requests[0], requests[1]), (requests[2], requests[3])):
        assert second["messages"][: len(first["messages"])] == first["messages"]
