"""Tool-use accuracy of a model on the labelled set, ``evalset.json``.

Each row is one message to one of the agents of ``eval_agents``, labelled with the tool its reply
should call and the key words each argument must contain, or ``"tool": null`` for a plain reply.
Splits: ``dev`` and ``test`` are the research prototype's 69 rows (alternating); ``holdout`` are
30 rows written before this implementation was first measured and never used to choose anything
(see README.md).

The model is driven through the SDK's ``Model.stream_response``, exactly as a run drives it, at
temperature 0, so the numbers are those of the real path, events included.

Run: ``.venv/bin/python tests/evals/eval_runner.py [--split dev|test|holdout|all] [--plain] [-v]``
(``--plain``: the local model without the adapter).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

import jsonschema  # type: ignore[import-untyped]  # no stubs installed
from agents import Agent, FunctionTool, ModelSettings, RunContextWrapper
from agents.models.interface import Model, ModelTracing
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
)

sys.path.insert(0, str(Path(__file__).parent))
from eval_agents import AGENTS  # found through the path set just above

EVALSET = Path(__file__).with_name("evalset.json")
SETTINGS = ModelSettings(temperature=0.0)
CAP = 384  # rtagent's local max_tokens: a reply this long was stopped by the cap


def load_rows(split: str = "all") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(EVALSET.read_text())
    return [row for row in rows if split in ("all", row["split"])]


@dataclass
class Reply:
    """What a model did with one message."""

    text: str = ""
    call_name: str | None = None
    call_arguments: str | None = None
    output_tokens: int = 0
    first_text_s: float | None = None  # from the request to the first text delta
    call_done_s: float | None = None  # from the request to the call's arguments being complete


async def reply_to(model: Model, agent: Agent[Any], message: str, *, first_text_only: bool = False) -> Reply:
    """Stream one reply; with ``first_text_only`` stop at the first text delta (for timing)."""
    instructions = await agent.get_system_prompt(RunContextWrapper(None))
    reply = Reply()
    start = time.perf_counter()
    stream = model.stream_response(
        instructions,
        [{"role": "user", "content": message}],
        SETTINGS,
        list(agent.tools),
        None,
        [],
        ModelTracing.DISABLED,
        previous_response_id=None,
        conversation_id=None,
        prompt=None,
    )
    try:
        async for event in stream:
            if isinstance(event, ResponseTextDeltaEvent):
                if reply.first_text_s is None:
                    reply.first_text_s = time.perf_counter() - start
                    if first_text_only:
                        break
                reply.text += event.delta
            elif isinstance(event, ResponseOutputItemDoneEvent):
                item = event.item
                if isinstance(item, ResponseFunctionToolCall) and reply.call_name is None:
                    reply.call_name, reply.call_arguments = item.name, item.arguments
                    reply.call_done_s = time.perf_counter() - start
            elif isinstance(event, ResponseCompletedEvent) and event.response.usage is not None:
                reply.output_tokens = event.response.usage.output_tokens
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # every rtagent model stream has it
    return reply


def _norm(value: object) -> str:
    return re.sub(r"\s+", "", str(value)).lower()


def score(row: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """Decision, name, arguments and schema validity of one reply against its label."""
    tools = {tool.name: tool for tool in AGENTS[row["agent"]].tools if isinstance(tool, FunctionTool)}
    called = reply.call_name is not None
    result: dict[str, Any] = {"decision": called == (row["tool"] is not None), "called": called}
    if not called:
        return result
    arguments: Any = None
    try:
        arguments = json.loads(reply.call_arguments or "")
        jsonschema.validate(arguments, tools[reply.call_name or ""].params_json_schema)
        result["valid"] = True
    except (ValueError, KeyError, jsonschema.ValidationError):
        result["valid"] = False
    if row["tool"] is not None:
        result["name_ok"] = reply.call_name == row["tool"]
        result["args_ok"] = result["name_ok"] and all(
            isinstance(arguments, dict)
            and arg in arguments
            and all(_norm(word) in _norm(arguments[arg]) for word in words)
            for arg, words in row["args"].items()
        )
    return result


def _share(hits: int, of: int) -> dict[str, Any]:
    return {"n": hits, "of": of, "pct": round(100 * hits / of, 1) if of else None}


def summarize(rows: Sequence[dict[str, Any]], replies: Sequence[Reply]) -> dict[str, Any]:
    scores = [score(row, reply) for row, reply in zip(rows, replies, strict=True)]
    tool_rows = [s for s, row in zip(scores, rows, strict=True) if row["tool"] is not None]
    plain_rows = [s for s, row in zip(scores, rows, strict=True) if row["tool"] is None]
    called_tool_rows = [s for s in tool_rows if s["called"]]
    calls = [s for s in scores if s["called"]]
    splits = sorted({row["split"] for row in rows})
    call_times = sorted(r.call_done_s for r in replies if r.call_done_s is not None)
    return {
        "rows": len(rows),
        "decision": _share(sum(s["decision"] for s in scores), len(scores)),
        "decision_by_split": {
            split: _share(
                sum(s["decision"] for s, row in zip(scores, rows, strict=True) if row["split"] == split),
                sum(row["split"] == split for row in rows),
            )
            for split in splits
        },
        "tool_rows_called": _share(sum(s["called"] for s in tool_rows), len(tool_rows)),
        "plain_rows_plain": _share(sum(not s["called"] for s in plain_rows), len(plain_rows)),
        "tool_name": _share(sum(s["name_ok"] for s in called_tool_rows), len(called_tool_rows)),
        "arguments": _share(sum(s["args_ok"] for s in called_tool_rows), len(called_tool_rows)),
        "end_to_end_tool_rows": _share(sum(s.get("args_ok", False) for s in tool_rows), len(tool_rows)),
        "schema_valid_calls": _share(sum(s["valid"] for s in calls), len(calls)),
        "replies_at_cap": sum(reply.output_tokens >= CAP for reply in replies),
        "call_done_median_s": round(call_times[len(call_times) // 2], 3) if call_times else None,
    }


async def evaluate(
    model: Model, rows: Sequence[dict[str, Any]], *, verbose: bool = False
) -> tuple[dict[str, Any], list[Reply]]:
    replies = []
    for row in rows:
        reply = await reply_to(model, AGENTS[row["agent"]], row["message"])
        replies.append(reply)
        if verbose:
            s = score(row, reply)
            mark = "ok " if s["decision"] and s.get("args_ok", True) else "BAD"
            said = f"{reply.call_name}({reply.call_arguments})" if reply.call_name else repr(reply.text[:60])
            print(f"{mark} {row['id']:10} {row['message'][:44]:44} -> {said}", file=sys.stderr, flush=True)
    return summarize(rows, replies), replies


async def _main(split: str, plain: bool, verbose: bool) -> dict[str, Any]:
    from rtagent._local import CLIENT_HEADERS, default_model_path, shared_server
    from rtagent._models import LOCAL_SETTINGS, parse_spec
    from rtagent._served import ServedModel

    path = default_model_path()
    # Without the adapter: the plain path, with the headers rtagent's local server asks for.
    settings = LOCAL_SETTINGS.resolve(ModelSettings(extra_headers=CLIENT_HEADERS))
    server = shared_server(path)
    model = (
        ServedModel("local, no adapter", path.stem, settings=settings, server=server)
        if plain
        else parse_spec("local")
    )
    summary, _ = await evaluate(model, load_rows(split), verbose=verbose)
    return {"model": str(model), "split": split, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="all", choices=["all", "dev", "test", "holdout"])
    parser.add_argument("--plain", action="store_true", help="the local model without the adapter")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per row on stderr")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_main(args.split, args.plain, args.verbose)), indent=1))


if __name__ == "__main__":
    main()
