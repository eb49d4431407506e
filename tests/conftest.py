from __future__ import annotations

import asyncio
import os

import pytest
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

# Tests must never post traces to OpenAI, whatever the developer's environment says.
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _warm_sdk() -> None:
    """Run one throwaway turn so timing tests measure turns, not the SDK's first-use imports."""
    from agents import Agent

    import rtagent
    from rtagent.testing import ScriptedModel, reply

    asyncio.run(rtagent.run(Agent(name="warm", model=ScriptedModel([reply("ok")])), "hi"))


# A real redis-server on a free loopback port, for the session (pytest-redis starts and stops it).
redis_proc = factories.redis_proc(port=None)  # type: ignore[arg-type]  # None: a free port, as documented


@pytest.fixture(scope="session")
def redis_url(redis_proc: RedisExecutor) -> str:
    return f"redis://{redis_proc.host}:{redis_proc.port}/0"
