"""The ``rtagent`` command line.

Only argparse runs at start-up: each command imports what it needs when it runs, so ``--help``,
``--version`` and the chat prompt appear without waiting for the SDK.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from . import __version__

MODEL_HELP = (
    "model spec: local, local:PATH.gguf, openai:MODEL or http(s)://HOST:PORT/v1[#MODEL] "
    "(default: $RTAGENT_MODEL, else the agent's own model, else local)"
)
AGENT_HELP = "the agent: path/to/file.py[:name] or package.module[:name] (default: the demo agent)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtagent", description="Realtime chat agents on the OpenAI Agents SDK."
    )
    parser.add_argument("--version", action="version", version=f"rtagent {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    chat = commands.add_parser(
        "chat",
        help="chat with an agent in the terminal",
        description="Chat with an agent in the terminal: replies stream as they are written and "
        "tools show live while they run. Ctrl-C interrupts a reply; exit, quit or Ctrl-D leaves.",
    )
    chat.add_argument("agent", nargs="?", metavar="AGENT", help=AGENT_HELP)
    chat.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    chat.set_defaults(run=_chat)

    serve = commands.add_parser(
        "serve",
        help="serve an agent to web pages and AG-UI clients",
        description="Serve an agent: a browser chat page at /, the AG-UI protocol over SSE (POST /agui) "
        "and WebSocket (/ws/THREAD), Prometheus metrics at /metrics.",
    )
    serve.add_argument("agent", nargs="?", metavar="AGENT", help=AGENT_HELP)
    serve.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--token", help="bearer token every API request must carry (default: $RTAGENT_TOKEN)")
    db = "SQLite file for conversations (default: threads.db in the user's data directory)"
    serve.add_argument("--db", metavar="PATH", help=db)
    store = "conversations at sqlite:///PATH, postgresql://... or redis://... (default: $RTAGENT_STORE)"
    serve.add_argument("--store", metavar="URL", help=store)
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow a browser origin")
    serve.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a name the server is reached by, besides localhost (*.example.com: every subdomain); "
        "needed off loopback",
    )
    serve.add_argument("--max-turns", type=int, metavar="N", help="concurrent turns before 503")
    serve.add_argument("--rate-limit", type=float, metavar="PER_S", help="requests per second per client")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes on the port (default: 1; more need --redis)",
    )
    serve.add_argument(
        "--redis",
        metavar="URL",
        help="the Redis that replicas share ($RTAGENT_REDIS)",
    )
    serve.add_argument(
        "--lease",
        type=float,
        metavar="S",
        help="seconds until a dead replica's threads are free (default: 5)",
    )
    serve.add_argument(
        "--disconnect-grace",
        type=float,
        metavar="S",
        help="seconds a turn keeps running for a client that went away to reconnect (default: 15; 0: none)",
    )
    serve.add_argument(
        "--reply-cache",
        choices=["exact", "semantic"],
        help="serve a stored reply when agent, history and message match a stored turn "
        "(semantic: or a message saying the same; needs rtagent[cache]); shared over --redis",
    )
    serve.add_argument(
        "--reply-cache-ttl", type=float, metavar="S", help="seconds a reply stays (default: 86400)"
    )
    serve.set_defaults(run=_serve)

    cache = commands.add_parser(
        "cache",
        help="manage the caches replicas share",
        description="Manage the cached tool results (rtagent.cached) and replies (--reply-cache) that "
        "replicas share on Redis.",
    )
    actions = cache.add_subparsers(metavar="ACTION", required=True)
    clear = actions.add_parser(
        "clear",
        help="forget stored tool results and replies",
        description="Forget the tool results and replies stored on the Redis that replicas share. A "
        "server without --redis keeps them in its own memory, which a restart forgets.",
    )
    clear.add_argument("--redis", metavar="URL", help="the Redis that replicas share ($RTAGENT_REDIS)")
    clear.add_argument(
        "--tool", metavar="NAME", help="only this tool's results (default: every tool's, and every reply)"
    )
    clear.set_defaults(run=_cache_clear)
    return parser


def model_spec(flag: str | None) -> str | None:
    """The spec chosen by the user, or ``None`` to let the agent's own model decide."""
    return flag or os.environ.get("RTAGENT_MODEL") or None


def _chat(args: argparse.Namespace) -> int:
    from ._terminal import chat

    return chat(args.agent, model_spec(args.model))


def _serve(args: argparse.Namespace) -> int:
    from .server import serve_main

    args.model = model_spec(args.model)
    return serve_main(args)


def _cache_clear(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from ._errors import RTAgentError
    from .cache import clear_cache, configure_cache
    from .server._bus import check_redis

    url: str | None = args.redis or os.environ.get("RTAGENT_REDIS") or None
    if url is None:
        needs = "needs --redis URL (or RTAGENT_REDIS): without Redis each server keeps its own results"
        print(f"rtagent cache clear: {needs}", file=sys.stderr)
        return 2
    try:
        check_redis(url)
    except RTAgentError as exc:
        print(f"rtagent cache clear: {exc}", file=sys.stderr)
        return 2
    configure_cache(url)
    asyncio.run(clear_cache(args.tool))
    if args.tool is not None:
        print(f"cleared the cached results of tool {args.tool}")
        return 0
    replies = asyncio.run(_clear_replies(url))
    print(f"cleared the cached results of every tool, and {replies} stored replies")
    return 0


async def _clear_replies(url: str) -> int:
    from .cache._replies import RedisStore

    store = RedisStore(url)
    try:
        return await store.clear()
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
