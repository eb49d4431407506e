"""An OpenAI-compatible chat-completions server for ``bench/chaos.py``: it streams text and tool calls
as each request's plan says, sometimes closes the connection in the middle of a reply, and checks
every request it gets the way OpenAI's API would.

A plan is JSON in the last user message, after ``PLAN_MARK`` (``plan_message`` writes one)::

    {"tag": "t3x1", "interval": 0.01,
     "rounds": [{"text": 2, "calls": [["slow", {"seconds": 0.3}], ["boom", {"reason": "x"}]]},
                {"text": 20}],
     "cut": {"round": 1, "chunk": 7, "how": "abort"}}

Each round is one model response: ``text`` words (``TAG.ROUND.I``, so every reply's text is unique),
then its tool calls, ids ``call-TAG-ROUND-J``. Which round a request is for is read from the calls
already in its messages, so a background tool's late output or a retry does not shift it. ``cut``
closes the connection before that chunk of that round (the HTTP head already sent), by a reset
(``abort``) or a plain close (``fin``); only the first request of that round is cut, so a cut the
client retries (one before any chunk) then succeeds. A request without a plan gets five words.

Every request's messages are checked with ``message_problems`` (a tool call answered by exactly one
tool message, right after its assistant message, and so on); one that fails gets a 400, as from
OpenAI, and is counted. ``GET /stats``: requests, connections and streams open now, cuts, streams
the client closed early, invalid requests (with examples). An idle keep-alive connection is closed
after ``--keepalive-s``, as real servers do.

Run: ``python bench/chaosmodel.py PORT [--keepalive-s S]``; prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

PLAN_MARK = "chaos-plan: "
MAX_EXAMPLES = 5


def plan_message(plan: dict[str, Any]) -> str:
    return PLAN_MARK + json.dumps(plan, separators=(",", ":"))


def words(tag: str, round_index: int, count: int) -> list[str]:
    return [f"{tag}.{round_index}.{i} " for i in range(count)]


def call_id(tag: str, round_index: int, index: int) -> str:
    return f"call-{tag}-{round_index}-{index}"


def message_problems(messages: Any) -> list[str]:
    """What OpenAI's chat-completions API would refuse in ``messages`` (empty: nothing).

    An assistant message's tool calls must be answered, each by one tool message, by the messages
    right after it; a tool message must answer a call of that assistant message.
    """
    if not isinstance(messages, list) or not messages:
        return ["messages must be a non-empty list"]
    problems: list[str] = []
    pending: set[str] = set()
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            problems.append(f"message {index} has role {role!r}")
            continue
        if pending and role != "tool":
            problems.append(f"message {index} ({role}) comes before the answers to {sorted(pending)}")
            pending = set()
        if role == "assistant":
            calls = message.get("tool_calls") or []
            if not calls and message.get("content") is None:
                problems.append(f"assistant message {index} has neither content nor tool calls")
            ids = [_call_problem(call, index, problems) for call in calls]
            if len(set(ids)) != len(ids):
                problems.append(f"assistant message {index} repeats a tool call id: {ids}")
            pending = set(ids)
        elif role == "tool":
            answered = message.get("tool_call_id")
            if answered not in pending:
                problems.append(
                    f"tool message {index} answers {answered!r}, not a call waiting for its answer"
                )
            pending.discard(str(answered))
        elif not isinstance(message.get("content"), str | list):
            problems.append(f"{role} message {index} has no content")
    if pending:
        problems.append(f"the calls {sorted(pending)} are never answered")
    return problems


def _call_problem(call: Any, index: int, problems: list[str]) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(function, dict)
        or not isinstance(call.get("id"), str)
        or not call["id"]
        or call.get("type") != "function"
        or not isinstance(function.get("name"), str)
        or not isinstance(function.get("arguments"), str)
    ):
        problems.append(f"assistant message {index} has a malformed tool call: {call!r}"[:300])
        return str(call.get("id") if isinstance(call, dict) else None)
    return str(call["id"])


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.max_connections = 0
        self.streams = 0
        self.max_streams = 0
        self.cuts = 0
        self.client_closed = 0
        self.idle_closed = 0
        self.invalid = 0
        self.invalid_examples: list[dict[str, Any]] = []
        self.cut_rounds: set[tuple[str, int]] = set()

    def json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "open_connections": self.connections,
            "max_open_connections": self.max_connections,
            "open_streams": self.streams,
            "max_open_streams": self.max_streams,
            "cuts": self.cuts,
            "streams_closed_by_client": self.client_closed,
            "idle_connections_closed": self.idle_closed,
            "invalid_requests": self.invalid,
            "invalid_examples": self.invalid_examples,
        }


class Cut(Exception):
    """The plan says: close the connection here."""


class ChaosModel:
    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self.stats = Stats()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = self.stats
        stats.connections += 1
        stats.max_connections = max(stats.max_connections, stats.connections)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.keepalive_s)
                except TimeoutError:
                    stats.idle_closed += 1
                    return
                method, path, length = _request_line(head)
                body = await reader.readexactly(length) if length else b""
                if method == "GET" and path.endswith("/stats"):
                    _respond(writer, 200, stats.json())
                elif method == "GET" and path.endswith("/models"):
                    _respond(writer, 200, {"object": "list", "data": [{"id": "chaos", "object": "model"}]})
                elif method == "POST" and path.endswith("/chat/completions"):
                    stats.requests += 1
                    if not await self._complete(json.loads(body), reader, writer):
                        return
                else:
                    _respond(writer, 404, {"error": {"message": f"no {method} {path}"}})
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            stats.connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _complete(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one chat completion; whether the connection may serve another request."""
        stats = self.stats
        messages = request.get("messages")
        problems = message_problems(messages)
        if problems:
            stats.invalid += 1
            if len(stats.invalid_examples) < MAX_EXAMPLES:
                stats.invalid_examples.append({"problems": problems[:3], "messages": messages})
            _respond(
                writer, 400, {"error": {"message": "; ".join(problems), "type": "invalid_request_error"}}
            )
            return True
        assert isinstance(messages, list)
        plan = _plan_of(messages)
        rounds = plan["rounds"]
        done = _rounds_done(messages, plan["tag"])
        round_index = min(done, len(rounds) - 1)
        cut = plan.get("cut")
        cut_at = None
        if cut and cut["round"] == round_index and (plan["tag"], round_index) not in stats.cut_rounds:
            stats.cut_rounds.add((plan["tag"], round_index))
            cut_at = int(cut["chunk"])
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
        )
        stats.streams += 1
        stats.max_streams = max(stats.max_streams, stats.streams)
        # A client that closes its response closes the connection: seen as the end of its input.
        gone = asyncio.ensure_future(reader.read(1))
        try:
            interval = float(plan.get("interval", 0.01))
            await asyncio.sleep(interval)
            for index, delta in enumerate(_deltas(plan["tag"], round_index, rounds[round_index])):
                if index == cut_at:
                    raise Cut
                if gone.done():
                    stats.client_closed += 1
                    return False
                _send(writer, _chunk(delta, None))
                await writer.drain()
                await asyncio.wait([gone], timeout=interval)
            if cut_at is not None:  # a cut at the very end: after the last delta, before the finish
                raise Cut
            finish = "tool_calls" if rounds[round_index].get("calls") else "stop"
            _send(writer, _chunk({}, finish))
            if (request.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                _send(writer, _chunk(None, None, usage))
            _send(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return not gone.done()
        except Cut:
            stats.cuts += 1
            assert cut is not None
            if cut["how"] == "abort":
                writer.transport.abort()
            return False
        finally:
            stats.streams -= 1
            gone.cancel()


def _deltas(tag: str, round_index: int, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for index, word in enumerate(words(tag, round_index, int(spec.get("text", 0)))):
        yield {"role": "assistant", "content": word} if index == 0 else {"content": word}
    for index, (name, arguments) in enumerate(spec.get("calls") or []):
        encoded = json.dumps(arguments)
        start = {"index": index, "id": call_id(tag, round_index, index), "type": "function"}
        yield {"tool_calls": [{**start, "function": {"name": name, "arguments": ""}}]}
        half = len(encoded) // 2
        for piece in (encoded[:half], encoded[half:]):
            yield {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


def _plan_of(messages: list[Any]) -> dict[str, Any]:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
            _, mark, plan = text.partition(PLAN_MARK)
            if mark:
                parsed: dict[str, Any] = json.loads(plan)
                return parsed
            break
    return {"tag": "plain", "rounds": [{"text": 5}]}


def _rounds_done(messages: list[Any], tag: str) -> int:
    prefix = f"call-{tag}-"
    rounds = {
        call["id"][len(prefix) :].split("-")[0]
        for message in messages
        if message.get("role") == "assistant"
        for call in message.get("tool_calls") or []
        if str(call.get("id", "")).startswith(prefix)
    }
    return len(rounds)


def _request_line(head: bytes) -> tuple[str, str, int]:
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].decode().split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return method, path, length


def _respond(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    )
    writer.write(head.encode() + data)


def _chunk(delta: dict[str, Any] | None, finish: str | None, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body: dict[str, Any] = {
        "id": "chatcmpl-chaos",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "chaos",
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


async def _serve(port: int, keepalive_s: float) -> None:
    model = ChaosModel(keepalive_s)
    server = await asyncio.start_server(model.handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--keepalive-s", type=float, default=2.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.keepalive_s))


if __name__ == "__main__":
    main()
