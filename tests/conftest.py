from __future__ import annotations

import asyncio
import os

import pytest

# Tests must never post traces to OpenAI, whatever the developer's environment says.
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _warm_sdk() -> None:
    """Run one throwaway turn so timing tests measure turns, not the SDK's first-use imports."""
    from agents import Agent

    import rtagent
    from rtagent.testing import ScriptedModel, reply

    asyncio.run(rtagent.run(Agent(name="warm", model=ScriptedModel([reply("ok")])), "hi"))
