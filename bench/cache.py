"""What the caches save, side by side with the uncached path in the same run. Prints JSON.

Reply cache (``reply_section``), on the embedded model (SmolLM2 in llama.cpp, the default spec):

- ``uncached``: a first message in a new conversation, which the model answers;
- ``exact_hit``: the same message in another new conversation, served from the cache, once the
  model server is idle; ``exact_hit_after_a_model_reply``: the same, each right after a reply of
  the model (llama.cpp finishes its own work for some milliseconds after a stream, on the same two
  cores, which is what a hit then competes with);
- ``semantic_hit``: a paraphrase of a stored message (from the labelled pairs that the shipped
  threshold matches), served from a cache holding all 120 stored messages of the set, the
  message's embedding included.

Time to first token is from ``chat.send`` to the first ``TextDelta`` the caller reads. Targets: an
exact hit within 5 ms, a semantic hit within 25 ms, on this 2-core CPU.

Run: ``.venv/bin/python bench/cache.py [--rounds 20]`` (needs the ``cache`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from agents import Agent

import rtagent
from rtagent import TextDelta
from rtagent._embedding import shared_embedder
from rtagent._models import parse_spec
from rtagent._replycache import CachedReply, ReplyCache, fingerprint, model_label, same_slots
from rtagent._served import ServedModel

PAIRS = Path(__file__).parent.parent / "tests" / "data" / "paraphrases.jsonl"
INSTRUCTIONS = "You are the support assistant of an online shop. Answer in one or two sentences."


async def first_token_ms(chat: rtagent.Chat, text: str) -> tuple[float, rtagent.TurnResult]:
    """Milliseconds from sending ``text`` to its first text delta, and the turn's result."""
    started = time.perf_counter()
    first = None
    async with chat.send(text) as turn:
        async for event in turn:
            if isinstance(event, TextDelta) and first is None:
                first = time.perf_counter()
    assert first is not None, "the turn produced no text"
    return (first - started) * 1000, turn.result


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
        "max_ms": round(ordered[-1], 3),
    }


async def reply_section(rounds: int) -> dict[str, Any]:
    model = parse_spec("local")
    agent = Agent(name="shop", instructions=INSTRUCTIONS)
    if isinstance(model, ServedModel):
        await model.warm(agent)  # as rtagent serve does at start-up
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    paraphrases = [pair for pair in pairs if pair["same"]]

    exact = ReplyCache()

    async def sent(text: str) -> tuple[float, bool]:
        took, result = await first_token_ms(rtagent.Chat(agent, model=model, reply_cache=exact), text)
        return took, result.cached

    uncached, after_reply = [], []
    for pair in paraphrases[:rounds]:
        took, cached = await sent(pair["stored"])
        assert not cached
        uncached.append(took)
        took, cached = await sent(pair["stored"])
        assert cached
        after_reply.append(took)
    await asyncio.sleep(0.5)  # the model server's last reply is done with
    exact_hits = []
    for pair in paraphrases[:rounds]:
        took, cached = await sent(pair["stored"])
        assert cached
        exact_hits.append(took)

    semantic = ReplyCache("semantic")
    await semantic.warm()
    key = await fingerprint(agent, agent.tools, model_label(model), None)
    assert key is not None
    # Stored as the model would have answered them, without 120 model calls: the bench measures
    # the lookup, which neither the reply's words nor who wrote it change.
    for pair in paraphrases:
        lookup = await semantic.lookup(key, [], pair["stored"])
        reply = CachedReply((f"(the reply to: {pair['stored']})",), ())
        await semantic.put(lookup, reply)
    embedder = shared_embedder()  # the one the cache uses
    matching = [
        pair
        for pair in paraphrases
        if pair["stored"] != pair["incoming"]
        and float(embedder.embed(pair["stored"]) @ embedder.embed(pair["incoming"])) >= semantic.threshold
        and same_slots(pair["stored"], pair["incoming"])
    ]
    semantic_hits, similarities = [], []
    for pair in (matching * rounds)[:rounds]:
        took, result = await first_token_ms(
            rtagent.Chat(agent, model=model, reply_cache=semantic), pair["incoming"]
        )
        assert result.cached, pair
        semantic_hits.append(took)
        similarities.append(result.metrics.caches[0].similarity or 0.0)
    exact_ms, semantic_ms = summary(exact_hits), summary(semantic_hits)
    return {
        "model": str(model),
        "rounds": rounds,
        "uncached": summary(uncached),
        "exact_hit": exact_ms,
        "exact_hit_after_a_model_reply": summary(after_reply),
        "semantic_hit": {
            **semantic_ms,
            "stored_messages": len(paraphrases),
            "min_similarity": min(similarities),
        },
        "speedup_exact_median": round(summary(uncached)["median_ms"] / exact_ms["median_ms"], 1),
        "targets": {"exact_hit_ms_max": 5, "semantic_hit_ms_max": 25},
        "met": exact_ms["max_ms"] <= 5 and semantic_ms["max_ms"] <= 25,
    }


async def measure(rounds: int) -> dict[str, Any]:
    return {"reply_cache": await reply_section(rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.rounds)), indent=2))


if __name__ == "__main__":
    main()
