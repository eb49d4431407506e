"""rtagent: realtime chat agents on the OpenAI Agents SDK.

Replies stream token by token, tools run concurrently and report as they go, and a turn can be
interrupted without losing what the user saw::

    async with rtagent.stream(agent, "hello", session=session) as turn:
        async for event in turn:
            ...
    turn.result

The SDK takes a second or two to import, so names are loaded on first use: ``import rtagent`` stays
instant and a terminal prompt can appear before the SDK is ready.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._chat import Chat
    from ._errors import AgentLoadError, ApprovalError, ModelError, RTAgentError
    from ._events import (
        AgentChanged,
        ApprovalRequested,
        Event,
        TextDelta,
        Thinking,
        ToolFinished,
        ToolProgress,
        ToolStarted,
        TurnFailed,
        TurnFinished,
    )
    from ._loading import load_agent
    from ._models import ModelSpec, parse_spec
    from ._result import CacheCounts, ToolTiming, TurnMetrics, TurnResult
    from ._served import ServedModel
    from ._tools import background, progress
    from ._turn import Turn, TurnError, TurnOptions, run, run_sync, stream
    from .cache import CachedTool, ReplyCache, cached, clear_cache, configure_cache, replayable
    from .server import create_app

__version__ = "0.1.0"

_EXPORTS = {
    "Chat": "_chat",
    "background": "_tools",
    "CachedTool": "cache",
    "cached": "cache",
    "clear_cache": "cache",
    "configure_cache": "cache",
    "create_app": "server",
    "progress": "_tools",
    "RTAgentError": "_errors",
    "AgentLoadError": "_errors",
    "ModelError": "_errors",
    "ApprovalError": "_errors",
    "AgentChanged": "_events",
    "ApprovalRequested": "_events",
    "Event": "_events",
    "Thinking": "_events",
    "TextDelta": "_events",
    "ToolStarted": "_events",
    "ToolProgress": "_events",
    "ToolFinished": "_events",
    "TurnFinished": "_events",
    "TurnFailed": "_events",
    "load_agent": "_loading",
    "ModelSpec": "_models",
    "ServedModel": "_served",
    "parse_spec": "_models",
    "ReplyCache": "cache",
    "replayable": "cache",
    "CacheCounts": "_result",
    "ToolTiming": "_result",
    "TurnMetrics": "_result",
    "TurnResult": "_result",
    "Turn": "_turn",
    "TurnError": "_turn",
    "TurnOptions": "_turn",
    "run": "_turn",
    "run_sync": "_turn",
    "stream": "_turn",
}

__all__ = [
    "AgentChanged",
    "AgentLoadError",
    "ApprovalError",
    "ApprovalRequested",
    "CacheCounts",
    "CachedTool",
    "Chat",
    "Event",
    "ModelError",
    "ModelSpec",
    "RTAgentError",
    "ReplyCache",
    "ServedModel",
    "TextDelta",
    "Thinking",
    "ToolFinished",
    "ToolProgress",
    "ToolStarted",
    "ToolTiming",
    "Turn",
    "TurnError",
    "TurnFailed",
    "TurnFinished",
    "TurnMetrics",
    "TurnOptions",
    "TurnResult",
    "background",
    "cached",
    "clear_cache",
    "configure_cache",
    "create_app",
    "load_agent",
    "parse_spec",
    "progress",
    "replayable",
    "run",
    "run_sync",
    "stream",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rtagent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
