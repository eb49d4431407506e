"""Resuming a dropped stream: reconnects with ``Last-Event-ID`` against a real ``rtagent serve``.

``rtagent serve`` runs as a subprocess on a free loopback port with a scripted agent (written to a
temporary file) whose model answers every turn with the same long reply, one word every
``--delay-ms``. ``--threads`` clients, each on its own thread, run turns one after another: a turn
is ``POST /agui``, read for a random number of frames, then the connection is dropped and at once
``GET /threads/ID/stream`` with ``Last-Event-ID`` of the last frame read; that stream may be
dropped again at a random point and resumed again, and so on until RUN_FINISHED. Every resume is
one reconnect, ``--reconnects`` of them in all (a seeded generator, ``--seed``, draws every drop).

Measured per reconnect, ``first_missed_event_ms``: from sending the GET to receiving the first
event the client had not read (the frame after the one it resumed from). A resume usually comes
before the model's next word does, so this includes waiting for it (up to ``--delay-ms``); with
``--delay-ms 1`` it is mostly the server's own time. Checked per run:

- ``duplicates``: ids seen more than once over the run's connections;
- ``gaps``: runs whose ids are not the run's every SEQ from 1 in order (an event missed, or ids
  out of order), or whose concatenated TEXT_MESSAGE_CONTENT deltas are not the scripted reply;
- ``interrupted``: RUN_FINISHED with ``result.interrupted`` true (a drop must not cut a turn);
- ``unfinished``: runs that did not end with RUN_FINISHED, and ``errors``: a resume answered
  with anything but a 200 event stream.

Two setups, one after the other in one run, the same reconnects (same seed) in each:

- ``one``: one ``rtagent serve`` process, its run log in memory;
- ``replicas``: two ``rtagent serve`` processes on one real redis-server (started here) and one
  SQLite file, and every connection goes to the other replica than the one before: a run is
  POSTed to one, its first resume goes to the other, its next back, so every missed event comes
  through the Redis run log (as behind a load balancer that never sends a client back).

Prints one JSON object; exits 1 unless, in every setup, p99 <= 50 ms and every count is 0. Run:
``.venv/bin/python bench/resume.py [--reconnects 200] [--threads 8] [--seed 1] [--setups one,replicas]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from ports import free_port, healthy, start_redis

TARGET = {"p99_ms": 50, "gaps": 0, "duplicates": 0}
COUNTS = ("duplicates", "gaps", "interrupted", "unfinished", "errors")
AGENT = '''"""The agent bench/resume.py serves: every turn is the same long reply, streamed slowly."""

from typing import Any

from agents import Agent

from rtagent.testing import ScriptedModel, reply

WORDS = [f"w{{i}} " for i in range({words})]


class Endless(ScriptedModel):
    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        self._calls.clear()  # the test double records every call; a bench makes many
        self._streams.clear()
        self.enqueue(reply(WORDS, delay={delay}))  # one step per call: every concurrent call pops one
        return super().stream_response(*args, **kwargs)


agent = Agent(name="resume", model=Endless())
'''

Frame = tuple[str, dict[str, Any]]


def expected_text(words: int) -> str:
    return "".join(f"w{i} " for i in range(words))


def key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


@dataclass
class Budget:
    """Reconnects left to make, shared by every client."""

    left: int

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


@dataclass
class Run:
    thread: str
    frames: list[Frame] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def read_frames(
    response: httpx.Response, run: Run, stop_after: int | None, after: str | None, started: float
) -> float | None:
    """Read the response's frames into ``run`` until its end, or until ``stop_after`` were read.

    Returns the milliseconds from ``started`` to the first frame (for a resume).
    """
    buffer = ""
    read = 0
    first_ms: float | None = None
    async for chunk in response.aiter_text():
        buffer += chunk.replace("\r\n", "\n")
        *blocks, buffer = buffer.split("\n\n")
        for block in blocks:
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            if "data" not in fields:
                continue
            if first_ms is None:
                first_ms = (time.perf_counter() - started) * 1000
                event_id = fields.get("id", "")
                if after is not None and (not event_id or key(event_id) <= key(after)):
                    run.errors.append(f"resumed after {after}, got {event_id or 'no id'} first")
            run.frames.append((fields.get("id", ""), json.loads(fields["data"])))
            read += 1
            if run.frames[-1][1]["type"] == "RUN_FINISHED" or (stop_after is not None and read >= stop_after):
                return first_ms
    return first_ms


async def one_run(
    https: list[httpx.AsyncClient],
    thread: str,
    number: int,
    rng: random.Random,
    budget: Budget,
    frames_per_run: int,
    drop_again: float,
    latencies: list[float],
) -> Run:
    run = Run(thread)
    body = {
        "threadId": thread,
        "runId": f"r{number}",
        "messages": [{"id": f"u{number}", "role": "user", "content": "Tell me a long story."}],
        "state": {},
        "tools": [],
        "context": [],
    }
    cut = rng.randint(1, frames_per_run - 2) if budget.take() else None
    # Each connection goes to the next server (the other replica, when there are two).
    servers = itertools.islice(itertools.cycle(https), number % len(https), None)
    async with next(servers).stream("POST", "/agui", json=body) as response:
        if response.status_code != 200:
            run.errors.append(f"POST /agui: {response.status_code}")
            return run
        await read_frames(response, run, cut, None, time.perf_counter())
    while run.frames and run.frames[-1][1]["type"] != "RUN_FINISHED":
        last = run.frames[-1][0]
        left = frames_per_run - len(run.frames)
        again = left > 2 and rng.random() < drop_again and budget.take()
        cut = rng.randint(1, left - 2) if again else None
        started = time.perf_counter()
        headers = {"Last-Event-ID": last}
        async with next(servers).stream("GET", f"/threads/{thread}/stream", headers=headers) as response:
            if response.status_code != 200:
                run.errors.append(f"GET /threads/{thread}/stream after {last}: {response.status_code}")
                return run
            first_ms = await read_frames(response, run, cut, last, started)
        if first_ms is None:
            run.errors.append(f"the resume after {last} streamed nothing")
            return run
        latencies.append(first_ms)
    return run


def check(run: Run, words: int) -> dict[str, int]:
    ids = [event_id for event_id, _ in run.frames]
    events = [event for _, event in run.frames]
    duplicates = len(ids) - len(set(ids))
    keys = [key(i) if i else (0, 0) for i in ids]
    in_order = keys == [(keys[0][0], seq) for seq in range(1, len(keys) + 1)] if keys else False
    text = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
    finished = bool(events) and events[-1]["type"] == "RUN_FINISHED"
    interrupted = finished and bool((events[-1].get("result") or {}).get("interrupted"))
    return {
        "duplicates": duplicates,
        "gaps": int(not in_order or text != expected_text(words)) if finished else 0,
        "interrupted": int(interrupted),
        "unfinished": int(not finished),
        "errors": len(run.errors),
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)], 2)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": rank(1.0)}


Started = tuple[subprocess.Popen[bytes], int, Path]  # the server, its port, its log


def start_server(workdir: Path, name: str, redis_url: str | None) -> Started:
    """``workdir``'s agent (``AGENT``), served on a free port, logging to ``NAME.log``."""
    agent = workdir / "resume_agent.py"
    port, log = free_port(), workdir / f"{name}.log"
    command = [
        sys.executable,
        "-m",
        "rtagent",
        "serve",
        f"{agent}:agent",
        "--port",
        str(port),
        "--db",
        str(workdir / "threads.db"),
        "--rate-limit",
        "0",  # a few clients make every request here
        *(["--redis", redis_url] if redis_url else []),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    env.pop("RTAGENT_MODEL", None)
    with log.open("wb") as stderr:
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    if healthy(server, port):
        return server, port, log
    stop_server(server)
    raise RuntimeError(f"rtagent serve did not start within 60 s:\n{log.read_text()[-2000:]}")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def bench(args: argparse.Namespace, ports: list[int]) -> dict[str, Any]:
    rng = random.Random(args.seed)
    budget = Budget(args.reconnects)
    latencies: list[float] = []
    runs: list[Run] = []
    frames_per_run = 0
    limits = httpx.Limits(max_connections=args.threads * 2, max_keepalive_connections=args.threads * 2)
    async with contextlib.AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits)
            )
            for port in ports
        ]
        # One whole run first: how many frames a run has, for drawing drop points within it.
        warm = Budget(0)
        whole = await one_run(https, "warmup", 0, rng, warm, 3, 0.0, [])
        frames_per_run = len(whole.frames)
        if any(check(whole, args.words).values()):
            raise RuntimeError(
                f"an uninterrupted run is not as scripted: {whole.errors or whole.frames[-1:]}"
            )

        async def client(index: int) -> None:
            number = 0
            while budget.left > 0:
                number += 1
                thread = f"resume-{index}"
                run_rng = random.Random(rng.random())
                drop = args.drop_again
                runs.append(
                    await one_run(https, thread, number, run_rng, budget, frames_per_run, drop, latencies)
                )

        await asyncio.gather(*(client(i) for i in range(args.threads)))
    totals = dict.fromkeys(COUNTS, 0)
    examples: list[str] = []
    for run in runs:
        for name, count in check(run, args.words).items():
            totals[name] += count
        examples += run.errors[: max(0, 5 - len(examples))]
    met = (
        bool(latencies)
        and len(latencies) == args.reconnects
        and (percentiles(latencies)["p99"] or math.inf) <= TARGET["p99_ms"]
        and all(count == 0 for count in totals.values())
    )
    return {
        "reconnects": len(latencies),
        "first_missed_event_ms": percentiles(latencies),
        "gaps": totals["gaps"],
        "duplicates": totals["duplicates"],
        "runs": len(runs),
        "interrupted": totals["interrupted"],
        "unfinished": totals["unfinished"],
        "errors": totals["errors"],
        "error_examples": examples,
        "frames_per_run": frames_per_run,
        "met": met,
    }


def run_setup(args: argparse.Namespace, workdir: Path, setup: str) -> dict[str, Any]:
    extra: list[subprocess.Popen[bytes]] = []
    servers: list[Started] = []
    try:
        redis_url = None
        if setup == "replicas":
            redis, redis_port = start_redis(str(workdir))
            extra.append(redis)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        for index in range(2 if setup == "replicas" else 1):
            servers.append(start_server(workdir, f"{setup}{index}", redis_url))
        result = asyncio.run(bench(args, [port for _, port, _ in servers]))
    finally:
        for server, _, _ in servers:
            stop_server(server)
        for process in extra:  # after the servers: they would log that Redis went away
            stop_server(process)
    tracebacks = sum(log.read_text(errors="replace").count("Traceback") for _, _, log in servers)
    result["server_tracebacks"] = tracebacks
    result["met"] = result["met"] and tracebacks == 0
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reconnects", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8, help="concurrent clients, one thread each")
    parser.add_argument("--words", type=int, default=150, help="the scripted reply's words")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="between the reply's words")
    parser.add_argument("--drop-again", type=float, default=0.6, help="chance of dropping a resume too")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--setups", default="one,replicas", help="of: one, replicas")
    args = parser.parse_args()
    setups = args.setups.split(",")
    if not setups or not set(setups) <= {"one", "replicas"}:
        parser.error(f"--setups: expected a comma-separated list of one, replicas; got {args.setups!r}")
    results: dict[str, Any] = {}
    for setup in setups:
        # Each setup on a file and a Redis of its own.
        with tempfile.TemporaryDirectory(prefix=f"rtagent-resume-{setup}-") as tmp:
            (Path(tmp) / "resume_agent.py").write_text(
                AGENT.format(words=args.words, delay=args.delay_ms / 1000)
            )
            results[setup] = run_setup(args, Path(tmp), setup)
    result = {
        "setups": results,
        "threads": args.threads,
        "reply": {"words": args.words, "delay_ms": args.delay_ms},
        "target": TARGET,
        "met": all(r["met"] for r in results.values()),
    }
    print(json.dumps(result, indent=2))
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
