"""A minimal OpenAI-compatible chat-completions server that streams a fixed number of tokens.

It does no work per token, so what a benchmark measures through it is the client side. Each
request streams ``max_tokens`` chunks (default 200), each ``interval`` seconds apart (a field of
the request body; 0 means as fast as the socket takes them).

Run: ``python bench/streamserver.py PORT``; benchmarks start it as a subprocess on loopback.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

_CHUNK = "data: {}\n\n"


def _chunk(index: int, content: str | None, finish: str | None) -> bytes:
    delta: dict[str, object] = {} if content is None else {"content": content}
    if index == 0:
        delta["role"] = "assistant"
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return _CHUNK.format(json.dumps(body, separators=(",", ":"))).encode()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length)) if length else {}
            tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 200)
            interval = float(body.get("interval", 0.0))
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
            )
            for index in range(tokens):
                _send(writer, _chunk(index, f"t{index} ", None))
                await writer.drain()
                if interval:
                    await asyncio.sleep(interval)
            _send(writer, _chunk(tokens, None, "stop"))
            _send(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


async def _serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
