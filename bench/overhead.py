"""What rtagent adds to latency, against the plain SDK and the raw openai client.

All three read the same local streaming server (bench/streamserver.py, a subprocess on loopback)
in one run, interleaved, so machine noise hits them alike:

- ``openai``: ``AsyncOpenAI.chat.completions.create(stream=True)``, reading chunks;
- ``sdk``: ``Runner.run_streamed`` with ``OpenAIChatCompletionsModel``, reading raw text deltas;
- ``rtagent``: ``rtagent.stream`` with the model spec ``http://127.0.0.1:PORT/v1#bench``, reading
  ``TextDelta`` events.

Time to first token is from the call to the first text; time per delta is the time between the
first and the last text divided by the deltas between them (the server sends as fast as it can,
so this is the client's own cost per delta). Prints JSON.

Run: ``.venv/bin/python bench/overhead.py [--rounds 30] [--tokens 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agents import Agent, ModelSettings, RunConfig, Runner, set_tracing_disabled
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from openai import AsyncOpenAI
from ports import free_port

import rtagent

Probe = Callable[[], Awaitable[tuple[float, float, int]]]


def _probes(base_url: str, tokens: int) -> dict[str, Probe]:
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    settings = ModelSettings(max_tokens=tokens)
    sdk_agent = Agent(
        name="bench",
        model=OpenAIChatCompletionsModel(model="bench", openai_client=client),
        model_settings=settings,
    )
    rt_agent = Agent(name="bench", model_settings=settings)
    rt_model = f"{base_url}#bench"
    run_config = RunConfig(tracing_disabled=True)

    async def raw_openai() -> tuple[float, float, int]:
        start = time.perf_counter()
        first = last = 0.0
        count = 0
        stream = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": "go"}], max_tokens=tokens, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                count += 1
        return first - start, last - first, count

    async def sdk() -> tuple[float, float, int]:
        start = time.perf_counter()
        first = last = 0.0
        count = 0
        result = Runner.run_streamed(sdk_agent, "go", run_config=run_config)
        async for event in result.stream_events():
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
                last = time.perf_counter()
                first = first or last
                count += 1
        return first - start, last - first, count

    async def realtime() -> tuple[float, float, int]:
        start = time.perf_counter()
        first = last = 0.0
        count = 0
        async with rtagent.stream(rt_agent, "go", model=rt_model) as turn:
            async for event in turn:
                if isinstance(event, rtagent.TextDelta):
                    last = time.perf_counter()
                    first = first or last
                    count += 1
        return first - start, last - first, count

    return {"openai": raw_openai, "sdk": sdk, "rtagent": realtime}


async def _measure(base_url: str, rounds: int, tokens: int) -> dict[str, object]:
    probes = _probes(base_url, tokens)
    ttft: dict[str, list[float]] = {name: [] for name in probes}
    per_delta: dict[str, list[float]] = {name: [] for name in probes}
    for round_index in range(rounds + 3):
        for name, probe in probes.items():
            first, span, count = await probe()
            if count != tokens:
                raise RuntimeError(f"{name} saw {count} deltas, expected {tokens}")
            if round_index >= 3:  # the first rounds warm up imports and connections
                ttft[name].append(first)
                per_delta[name].append(span / (count - 1))
    med = {name: statistics.median(values) for name, values in ttft.items()}
    p99 = {name: statistics.quantiles(values, n=100)[98] for name, values in ttft.items()}
    delta = {name: statistics.median(values) for name, values in per_delta.items()}
    return {
        "rounds": rounds,
        "tokens_per_reply": tokens,
        "time_to_first_token_ms": {name: round(value * 1e3, 3) for name, value in med.items()},
        "time_to_first_token_p99_ms": {name: round(value * 1e3, 3) for name, value in p99.items()},
        "per_delta_us": {name: round(value * 1e6, 2) for name, value in delta.items()},
        "rtagent_added": {
            "first_token_ms_vs_sdk": round((med["rtagent"] - med["sdk"]) * 1e3, 3),
            "per_delta_us_vs_sdk": round((delta["rtagent"] - delta["sdk"]) * 1e6, 2),
            "first_token_ms_vs_openai": round((med["rtagent"] - med["openai"]) * 1e3, 3),
            "per_delta_us_vs_openai": round((delta["rtagent"] - delta["openai"]) * 1e6, 2),
        },
        "ratios_vs_sdk": {
            "first_token": round(med["rtagent"] / med["sdk"], 3),
            "per_delta": round(delta["rtagent"] / delta["sdk"], 3),
        },
        "targets": {"first_token_added_ms_max": 0.3, "per_delta_added_us_max": 50},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    set_tracing_disabled(True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("streamserver.py")), str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "ready"
        report = asyncio.run(_measure(f"http://127.0.0.1:{port}/v1", args.rounds, args.tokens))
    finally:
        server.terminate()
        server.wait()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
