"""The load generator of ``bench/load.py``: one process, many concurrent SSE sessions.

It reads one JSON command per line on stdin and answers each with one JSON line on stdout::

    {"host": "127.0.0.1", "port": 8000, "path": "/agui", "marker": "TEXT_MESSAGE_CONTENT",
     "end": "RUN_FINISHED", "sessions": [[thread_id, start_offset_s], ...], "start_at": MONOTONIC,
     "tokens": 60, "timeout_s": 30, "window": [MONOTONIC, MONOTONIC]}

Each session opens its own TCP connection at ``start_at + start_offset_s`` (``time.monotonic`` is
one clock for every process of the machine), POSTs a ``RunAgentInput`` with its thread id and reads
the SSE stream with a bare ``asyncio.Protocol`` (no HTTP client library: at thousands of streams a
library's own per-chunk cost would be what is measured). The arrival time of a text event is the
time of the ``data_received`` call that completed it. The answer holds every gap between consecutive
text events (ms), every time to first token (ms, from the connection attempt), the errors by kind,
and this process's own event-loop lag: a 5 ms sleep measured in a loop, so that a client too busy to
read its sockets on time shows up instead of passing for server latency. ``gaps_ms`` has only the
gaps that end inside ``window`` (the plateau, when every session is streaming and none starts or
ends); ``gaps_all_ms`` has them all. ``late`` counts the sessions whose first text event came after
the plateau began: a server that falls behind on starting streams has fewer than N streaming there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from collections import Counter
from typing import Any, cast

LAG_TICK_S = 0.005


class _Stream(asyncio.Protocol):
    """One session: sends the request, de-chunks the response, splits SSE events, times text events."""

    def __init__(self, request: bytes, marker: bytes, end: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.marker = marker
        self.end = end
        self.done = done
        self.started = time.monotonic()
        self.times: list[float] = []
        self.error: str | None = None
        self.transport: asyncio.Transport | None = None
        self._head = True
        self._raw = b""  # bytes not yet de-chunked
        self._chunk_left = -1  # bytes of the current chunk still to read (+2 for its CRLF); -1: a size line
        self._body = b""  # de-chunked bytes not yet split into events
        self._ended = False  # the end event (RUN_FINISHED, [DONE]) came

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        raw = self._raw + data
        if self._head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self._raw = raw
                return
            head = raw[:end]
            if not head.startswith(b"HTTP/1.1 200"):
                self._finish(f"status {head[9:12].decode(errors='replace')}")
                return
            if b"chunked" not in head.lower():
                self._finish("not chunked")
                return
            self._head = False
            raw = raw[end + 4 :]
        body = self._body
        while raw:
            if self._chunk_left < 0:
                line_end = raw.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(raw[:line_end], 16)
                raw = raw[line_end + 2 :]
                if size == 0:  # the last chunk: the response is complete
                    self._raw = b""
                    self._body = body
                    self._events(now)
                    self._finish(None if self.error is None and self._ended else self.error or "no end event")
                    return
                self._chunk_left = size + 2
            take = raw[: self._chunk_left]
            raw = raw[self._chunk_left :]
            self._chunk_left -= len(take)
            if self._chunk_left == 0:
                body += take[:-2]
                self._chunk_left = -1
            elif self._chunk_left == 1:  # only the final LF is missing
                body += take[:-1]
            else:
                body += take
        self._raw = raw
        self._body = body
        self._events(now)

    def _events(self, now: float) -> None:
        body = self._body
        start = 0
        while (stop := body.find(b"\n\n", start)) >= 0:
            event = body[start:stop]
            start = stop + 2
            if self.marker in event:
                self.times.append(now)
            elif self.end in event:
                self._ended = True
            elif b"RUN_ERROR" in event:
                self.error = "run error"
        self._body = body[start:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("connection lost" if exc is None else f"connection lost: {type(exc).__name__}")

    def _finish(self, error: str | None) -> None:
        if self.done.done():
            return
        self.error = error
        if self.transport is not None:
            self.transport.close()
        self.done.set_result(None)


class _LagMonitor:
    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            self.lags.append((time.monotonic() - before - LAG_TICK_S) * 1e3)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _request(host: str, port: int, path: str, thread_id: str, text: str) -> bytes:
    body = json.dumps(
        {
            "threadId": thread_id,
            "runId": f"run-{thread_id}",
            "state": None,
            "messages": [{"id": f"m-{thread_id}", "role": "user", "content": text}],
            "tools": [],
            "context": [],
            "forwardedProps": None,
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _session(
    command: dict[str, Any], thread_id: str, at: float, results: list[_Stream], errors: Counter[str]
) -> None:
    loop = asyncio.get_running_loop()
    delay = at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    host, port = command["host"], command["port"]
    done: asyncio.Future[None] = loop.create_future()
    marker, end = command["marker"].encode(), command["end"].encode()
    stream = _Stream(
        _request(host, port, command["path"], thread_id, f"tokens={command['tokens']}"), marker, end, done
    )
    try:
        await asyncio.wait_for(loop.create_connection(lambda: stream, host, port), command["timeout_s"])
        await asyncio.wait_for(done, command["timeout_s"])
    except TimeoutError:
        errors["timeout"] += 1
        if stream.transport is not None:
            stream.transport.abort()
        return
    except OSError as exc:
        errors[f"connect: {type(exc).__name__}"] += 1
        return
    if stream.error is not None:
        errors[stream.error] += 1
    elif len(stream.times) != command["tokens"]:
        errors[f"text events {len(stream.times)} != {command['tokens']}"] += 1
    else:
        results.append(stream)


async def _run(command: dict[str, Any]) -> dict[str, Any]:
    monitor = _LagMonitor()
    monitor.start()
    results: list[_Stream] = []
    errors: Counter[str] = Counter()
    start_at: float = command["start_at"]
    cpu_before = time.process_time()
    await asyncio.gather(
        *(
            _session(command, thread_id, start_at + offset, results, errors)
            for thread_id, offset in command["sessions"]
        )
    )
    await monitor.stop()
    low, high = command["window"]
    gaps: list[float] = []
    plateau: list[float] = []
    ttft: list[float] = []
    late = 0
    for stream in results:
        times = stream.times
        late += times[0] > low
        ttft.append(round((times[0] - stream.started) * 1e3, 3))
        for before, after in itertools.pairwise(times):
            gap = round((after - before) * 1e3, 3)
            gaps.append(gap)
            if low <= after <= high:
                plateau.append(gap)
    return {
        "ok": len(results),
        "errors": dict(errors),
        "gaps_ms": plateau,
        "gaps_all_ms": gaps,
        "ttft_ms": ttft,
        "late": late,
        "lag_ms": [round(lag, 3) for lag in monitor.lags],
        "cpu_s": round(time.process_time() - cpu_before, 3),
    }


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := await reader.readline():
        answer = await _run(json.loads(line))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(_serve())
    else:
        uvloop.run(_serve())


if __name__ == "__main__":
    main()
