"""How fast an interrupt takes effect, on the embedded model over HTTP.

Each round starts a long reply from the embedded model (llama.cpp in-process, reached over
loopback HTTP like any server), interrupts it at its 10th text delta, and measures:

- ``to_turn_end_ms``: from ``turn.interrupt()`` to the ``TurnFinished`` event;
- ``to_last_token_ms``: from ``turn.interrupt()`` to the server's last decoded token, seen by
  polling the server's Prometheus counter ``llamacpp:n_decode_total`` every millisecond or so
  (``rtagent._local.DecodeWatch``);
- ``stopped``: whether the counter then stayed still (generation really ended).

The same rounds run against the plain SDK's ``RunResultStreaming.cancel()`` as a reference.
Prints JSON. Run: ``.venv/bin/python bench/interrupt.py [--rounds 100]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

from agents import Agent, ModelSettings, RunConfig, Runner

import rtagent
from rtagent._local import DecodeWatch, default_model_path, shared_server
from rtagent._models import parse_spec

PROMPT = "Write a very long story about a dragon who learns to cook. Use many chapters."
SETTINGS = ModelSettings(max_tokens=384)
CUT_AT = 10
SETTLE_S = 0.3


Round = Callable[[], Awaitable[tuple[float, float]]]


def rounds(model: rtagent.ServedModel) -> dict[str, Round]:
    agent = Agent(name="bench", instructions="You are a storyteller.", model_settings=SETTINGS)

    async def realtime() -> tuple[float, float]:
        deltas = 0
        interrupted_at = 0.0
        async with rtagent.stream(agent, PROMPT, model=model) as turn:
            async for event in turn:
                if isinstance(event, rtagent.TextDelta):
                    deltas += 1
                    if deltas == CUT_AT:
                        interrupted_at = time.perf_counter()
                        turn.interrupt()
        if not interrupted_at:
            raise RuntimeError("the reply ended before the interrupt")
        return interrupted_at, time.perf_counter()

    async def sdk() -> tuple[float, float]:
        deltas = 0
        interrupted_at = 0.0
        result = Runner.run_streamed(
            agent.clone(model=model), PROMPT, run_config=RunConfig(tracing_disabled=True)
        )
        async for event in result.stream_events():
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
                deltas += 1
                if deltas == CUT_AT:
                    interrupted_at = time.perf_counter()
                    result.cancel()
        if not interrupted_at:
            raise RuntimeError("the reply ended before the interrupt")
        return interrupted_at, time.perf_counter()

    return {"rtagent": realtime, "sdk_cancel": sdk}


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median": round(statistics.median(values) * 1e3, 2), "p99": round(p99 * 1e3, 2)}


async def measure(count: int) -> dict[str, object]:
    model = parse_spec("local")
    assert isinstance(model, rtagent.ServedModel)
    await model.warm()
    server = shared_server(default_model_path())
    to_end: dict[str, list[float]] = {}
    to_last: dict[str, list[float]] = {}
    not_stopped: dict[str, int] = {}
    async with DecodeWatch(server) as watch:
        for index in range(count + 2):
            for name, one_round in rounds(model).items():
                interrupted_at, ended_at = await one_round()
                await asyncio.sleep(SETTLE_S)
                last_token = watch.last_change
                if time.perf_counter() - last_token < SETTLE_S / 2:
                    not_stopped[name] = not_stopped.get(name, 0) + 1
                if index < 2:  # warm-up rounds
                    continue
                to_end.setdefault(name, []).append(ended_at - interrupted_at)
                to_last.setdefault(name, []).append(max(last_token - interrupted_at, 0.0))
    return {
        "rounds": count,
        "model": str(model),
        "interrupt_at_delta": CUT_AT,
        "to_turn_end_ms": {name: summary(v) for name, v in to_end.items()},
        "to_last_token_ms": {name: summary(v) for name, v in to_last.items()},
        "still_generating_after_settle": {name: not_stopped.get(name, 0) for name in to_end},
        "targets": {"to_turn_end_ms_max": 10, "to_last_token_ms_max": 50},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.rounds)), indent=2))


if __name__ == "__main__":
    main()
