"""The caches of issue #21, each next to the uncached path in the same run.

Every section is a function in ``SECTIONS`` that returns a JSON-ready dict and whether its targets
held; ``--sections`` picks which run, in order. So far:

``tool`` (``rtagent.cached``): a tool that sleeps ``--seconds`` and counts its executions.

- ``concurrent``: ``--calls`` identical calls at once, first of the plain tool, then of it cached:
  executions and wall time of each. Two ways: ``calls``, the tool's invoker called as the SDK calls
  it (the cache's own cost), and ``turns``, a whole turn per call, each in a session of its own, whose
  scripted model asks for the call (with the turns' own cost, the same on both sides; also how many
  results the turns saw as cached). Targets: the cached side runs the tool once, its calls take under
  1.1 x ``--seconds`` and its turns no longer than the uncached ones (+ 0.1 s).
- ``replicas``: two processes (replica A and B, this script with ``--replica``) on one real
  redis-server started here, each with the cache on it as ``rtagent serve --redis`` sets it up.
  ``computed_on_a``: one turn on A runs the tool; then one turn on B with the same call: its time,
  whether it ran the tool, whether its result was cached. ``concurrent``: ``--calls`` / 2 turns on
  each replica at once, with other arguments: executions over both. Targets: B does not run the
  tool, and the concurrent calls run it once over both replicas.

``reply`` (``ReplyCache``), on the embedded model (SmolLM2 in llama.cpp, the default spec), ``--rounds``
messages each: ``uncached``, a first message in a new conversation, which the model answers;
``exact_hit``, the same message in another new conversation, served from the cache once the model
server is idle, and ``exact_hit_after_a_model_reply``, each right after a reply of the model
(llama.cpp finishes its own work for some milliseconds after a stream, on the same two cores);
``semantic_hit``, a paraphrase of a stored message (from the labelled pairs the shipped threshold
matches), served from a cache holding all 120 stored messages of the set, the embedding included.
Time to first token is from ``chat.send`` to the first ``TextDelta`` read. Targets: an exact hit
within 5 ms, a semantic hit within 25 ms.

Prints one JSON object; exits 1 unless every target holds. Run:
``.venv/bin/python bench/cache.py [--calls 50] [--seconds 1] [--rounds 20] [--sections tool,reply]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents import Agent, FunctionTool, function_tool
from agents.tool_context import ToolContext
from ports import start_redis

import rtagent
from rtagent import TextDelta
from rtagent._models import parse_spec
from rtagent._served import ServedModel
from rtagent.cache._embedding import shared_embedder
from rtagent.cache._replies import CachedReply, ReplyCache, fingerprint, model_label, same_slots
from rtagent.testing import ScriptedModel, call, reply, tool_calls

Section = Callable[[argparse.Namespace], tuple[dict[str, Any], bool]]


def slow_tool(seconds: float) -> tuple[FunctionTool, list[str]]:
    """A ``lookup`` that takes ``seconds`` and records each execution."""
    runs: list[str] = []

    @function_tool
    async def lookup(query: str) -> str:
        """Looks something up, slowly."""
        runs.append(query)
        await asyncio.sleep(seconds)
        return f"facts about {query}"

    return lookup, runs


async def turns(tool: FunctionTool, calls: int, query: str) -> dict[str, Any]:
    """``calls`` turns at once, each calling ``tool(query)``: wall time and cached results."""
    agent = Agent(name="bench", tools=[tool])

    async def one() -> bool:
        model = ScriptedModel([tool_calls(call("lookup", {"query": query})), reply("ok")])
        async with rtagent.stream(agent, "go", model=model) as turn:
            finished = [e async for e in turn if isinstance(e, rtagent.ToolFinished)]
        assert finished[0].output == f"facts about {query}", finished
        return finished[0].cached

    started = time.perf_counter()
    cached = await asyncio.gather(*(one() for _ in range(calls)))
    return {"wall_s": round(time.perf_counter() - started, 3), "cached_results": sum(cached)}


async def invocations(tool: FunctionTool, calls: int, query: str) -> dict[str, Any]:
    """``calls`` calls of ``tool(query)`` at once, as the SDK makes them, without the turns around."""
    arguments = json.dumps({"query": query})

    async def one(index: int) -> None:
        context: ToolContext[None] = ToolContext(
            context=None, tool_name=tool.name, tool_call_id=f"c{index}", tool_arguments=arguments
        )
        assert await tool.on_invoke_tool(context, arguments) == f"facts about {query}"

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(calls)))
    return {"wall_s": round(time.perf_counter() - started, 3)}


async def concurrent(calls: int, seconds: float) -> dict[str, Any]:
    """Both ways (the tool's calls alone, and whole turns), each uncached, then cached."""
    measured: dict[str, Any] = {}
    for way, measure in (("calls", invocations), ("turns", turns)):
        for side in ("uncached", "cached"):
            rtagent.configure_cache()  # nothing stored from the way before
            tool, runs = slow_tool(seconds)
            took = await measure(rtagent.cached(tool) if side == "cached" else tool, calls, "Paris")
            measured.setdefault(way, {})[side] = {"executions": len(runs), **took}
    return measured


def warmed() -> None:
    """One turn for the SDK's first-use imports, then, as ``rtagent serve`` does at start-up, the
    long-lived objects out of every garbage collection (a full one pauses every turn)."""
    asyncio.run(turns(slow_tool(0)[0], 1, "warm-up"))
    gc.collect()
    gc.freeze()


def tool_section(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    warmed()
    local = asyncio.run(concurrent(args.calls, args.seconds))
    with tempfile.TemporaryDirectory(prefix="rtagent-bench-cache-") as workdir:
        server, port = start_redis(workdir)
        try:
            replicas = on_replicas(f"redis://127.0.0.1:{port}/0", args)
        finally:
            server.terminate()
            server.wait()
    calls, whole = local["calls"], local["turns"]
    ok = (
        calls["cached"]["executions"] == whole["cached"]["executions"] == 1
        and calls["cached"]["wall_s"] < 1.1 * args.seconds
        and whole["cached"]["wall_s"] <= whole["uncached"]["wall_s"] + 0.1
        and not replicas["computed_on_a"]["b"]["ran"]
        and replicas["concurrent"]["executions"] == 1
    )
    return {"calls": args.calls, "tool_seconds": args.seconds, "concurrent": local, "replicas": replicas}, ok


def on_replicas(url: str, args: argparse.Namespace) -> dict[str, Any]:
    a, b = replica(url, args), replica(url, args)
    try:
        on_a = ask(a, 1, "Paris")
        on_b = ask(b, 1, "Paris")
        # Both at once, each answering its half: a "go" line to each, then both answers.
        half = args.calls // 2
        for process in (a, b):
            send(process, half, "Rome")
        both = [answer(a), answer(b)]
    finally:
        for process in (a, b):
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=30)
    return {
        "computed_on_a": {"a": on_a, "b": on_b},
        "concurrent": {
            "calls_per_replica": half,
            "executions": sum(side["executions"] for side in both),
            "wall_s": max(side["wall_s"] for side in both),
            "cached_results": sum(side["cached_results"] for side in both),
        },
    }


def replica(url: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    command = [sys.executable, str(Path(__file__)), "--replica", url, "--seconds", str(args.seconds)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":  # the SDK imported: the timing is the calls'
        raise RuntimeError("a replica did not start")
    return process


def send(process: subprocess.Popen[str], calls: int, query: str) -> None:
    assert process.stdin is not None
    process.stdin.write(json.dumps({"calls": calls, "query": query}) + "\n")
    process.stdin.flush()


def answer(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    result: dict[str, Any] = json.loads(process.stdout.readline())
    return result


def ask(process: subprocess.Popen[str], calls: int, query: str) -> dict[str, Any]:
    send(process, calls, query)
    return answer(process)


def serve_replica(url: str, seconds: float) -> int:
    """One replica: for each request line, run its turns and answer with what they did."""
    rtagent.configure_cache(url)
    tool, runs = slow_tool(seconds)
    lookup = rtagent.cached(tool)
    loop = asyncio.new_event_loop()  # one loop for the process: its Redis connections stay open
    warmed()
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        before = len(runs)
        measured = loop.run_until_complete(turns(lookup, request["calls"], request["query"]))
        executions = len(runs) - before
        print(json.dumps({"executions": executions, "ran": executions > 0, **measured}), flush=True)
    loop.close()
    return 0


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


async def replies(rounds: int) -> dict[str, Any]:
    model = parse_spec("local")
    agent = Agent(name="shop", instructions=INSTRUCTIONS)
    if isinstance(model, ServedModel):
        await model.warm(agent)  # as rtagent serve does at start-up
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    paraphrases = [pair for pair in pairs if pair["same"]]

    exact = ReplyCache()

    async def sent(text: str) -> tuple[float, bool]:
        took, result = await first_token_ms(rtagent.Chat(agent, model=model, reply_cache=exact), text)
        return took, result.cached is not None

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
        stored = CachedReply((f"(the reply to: {pair['stored']})",), ())
        await semantic.put(lookup, stored)
    embedder = shared_embedder()  # the one the cache uses
    matching = [
        pair
        for pair in paraphrases
        if pair["stored"] != pair["incoming"]
        and float(embedder.embed(pair["stored"]) @ embedder.embed(pair["incoming"])) >= semantic.threshold
        and same_slots(pair["stored"], pair["incoming"])
    ]
    semantic_hits = []
    for pair in (matching * rounds)[:rounds]:
        took, result = await first_token_ms(
            rtagent.Chat(agent, model=model, reply_cache=semantic), pair["incoming"]
        )
        assert result.cached, pair
        semantic_hits.append(took)
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
        },
        "speedup_exact_median": round(summary(uncached)["median_ms"] / exact_ms["median_ms"], 1),
        "targets": {"exact_hit_ms_max": 5, "semantic_hit_ms_max": 25},
    }


def reply_section(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    result = asyncio.run(replies(args.rounds))
    return result, result["exact_hit"]["max_ms"] <= 5 and result["semantic_hit"]["max_ms"] <= 25


SECTIONS: dict[str, Section] = {"tool": tool_section, "reply": reply_section}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=50, help="concurrent identical calls (default: 50)")
    parser.add_argument("--seconds", type=float, default=1.0, help="how long the tool takes (default: 1)")
    parser.add_argument("--rounds", type=int, default=20, help="messages per reply-cache case (default: 20)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which, in order (default: all)")
    parser.add_argument("--replica", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica:
        return serve_replica(args.replica, args.seconds)
    result: dict[str, Any] = {}
    ok = True
    for name in args.sections.split(","):
        result[name], held = SECTIONS[name](args)
        ok = ok and held
    result["targets_met"] = ok
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
