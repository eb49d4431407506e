"""Tool use of the embedded model, with and without rtagent's tool adapter, in one run.

Both models are SmolLM2-135M on the same in-process llama.cpp server, at temperature 0:

- ``adapter``: the ``local`` model as rtagent serves it (``AdaptedModel``: tool prompt, grammar,
  first-token decision);
- ``plain``: the same server through the plain ``ServedModel`` path, tools sent in the request's
  ``tools`` field, which this model's chat template ignores.

Accuracy is scored on the labelled set in ``tests/evals`` (see its README): tool-or-not
decisions, tool names, arguments, calls valid for their tool's schema, replies stopped by the
token cap. Time to first token is for plain replies: the rows labelled "no tool" that the adapter
answers in text, each asked ``--reps`` times of both models back to back, after a warm-up request
per agent and model (steady state: the agent's prompt prefix is in the prompt cache, as in a
running chat), the stream closed at the first text delta. Prints JSON.

Run: ``.venv/bin/python bench/tool_eval.py [--split all|dev|test|holdout] [--reps 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

import httpx
from agents import ModelSettings
from agents.models.interface import Model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "evals"))
from eval_agents import AGENTS
from eval_runner import CAP, Reply, evaluate, load_rows, reply_to

from rtagent._local import CLIENT_HEADERS, LocalServer, default_model_path, shared_server
from rtagent._models import LOCAL_SETTINGS, parse_spec
from rtagent._served import ServedModel


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(1000 * statistics.median(ordered), 1),
        "p90_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
        "n": len(ordered),
    }


async def first_text(
    models: dict[str, Model], rows: list[dict[str, Any]], reps: int, server: LocalServer
) -> dict[str, Any]:
    """Time to the first text delta of the same plain messages, each asked of both models in turn.

    Paired: the two models answer each message one right after the other, which goes first
    alternating, so the machine's other load falls on both alike. Their prompts stay cached side
    by side: the embedded server keeps each prompt in a slot of its own (``rtagent._slots``).
    Each stream is closed at its first text delta, and the next message is sent once the server
    has stopped generating, as in a chat, where the next message follows the reply: sent at once,
    it would wait for the slot that the closed stream holds until the server notices, a token later.
    """
    seconds: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.address, headers=headers) as http:

        async def idle() -> None:
            for _ in range(5000):  # polled (the server's own state), for 10 s at most
                if not any(slot["is_processing"] for slot in (await http.get("/slots")).json()):
                    return
                await asyncio.sleep(0.002)

        pairs = 0
        for _ in range(reps):
            for key, agent in AGENTS.items():
                messages = [row["message"] for row in rows if row["agent"] == key]
                for model in models.values() if messages else ():
                    await reply_to(model, agent, "hello", first_text_only=True)
                for message in messages:
                    order = list(models.items())
                    pairs += 1
                    for name, model in order if pairs % 2 else order[::-1]:
                        await idle()
                        reply = await reply_to(model, agent, message, first_text_only=True)
                        if reply.first_text_s is not None:
                            seconds[name].setdefault(message, []).append(reply.first_text_s)
    result: dict[str, Any] = {
        name: _ms([value for values in per_message.values() for value in values])
        for name, per_message in seconds.items()
    }
    result["ratio_of_medians"] = round(result["adapter"]["median_ms"] / result["plain"]["median_ms"], 3)
    ratios = [
        statistics.median(seconds["adapter"][message]) / statistics.median(seconds["plain"][message])
        for message in seconds["adapter"].keys() & seconds["plain"].keys()
    ]
    result["median_of_per_message_ratios"] = round(statistics.median(ratios), 3)
    return result


async def main(split: str, reps: int) -> dict[str, Any]:
    path = default_model_path()
    server = shared_server(path)
    adapter = parse_spec("local")
    # The same headers the adapter sends: llama.cpp closes every streamed connection, so a
    # kept-alive one may fail on reuse (rtagent's turns retry that; a bench must not need to).
    settings = LOCAL_SETTINGS.resolve(ModelSettings(extra_headers=CLIENT_HEADERS))
    plain = ServedModel("local, no adapter", path.stem, settings=settings, server=server)
    started = time.perf_counter()
    await server.start()
    report: dict[str, Any] = {
        "model": path.name,
        "temperature": 0.0,
        "max_tokens": CAP,
        "server_threads": server.n_threads,
        "split": split,
    }
    rows = load_rows(split)
    replies: dict[str, list[Reply]] = {}
    for name, model in (("adapter", adapter), ("plain", plain)):
        report[name], replies[name] = await evaluate(model, rows)
    answered_in_text = [
        row
        for row, reply in zip(rows, replies["adapter"], strict=True)
        if row["tool"] is None and reply.call_name is None
    ]
    report["first_text"] = await first_text(
        {"adapter": adapter, "plain": plain}, answered_in_text, reps, server
    )
    report["first_text"]["plain_rows_measured"] = len(answered_in_text)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="all", choices=["all", "dev", "test", "holdout"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each plain message")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.split, args.reps)), indent=1))
