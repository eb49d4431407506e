"""What a finished turn leaves behind: its text, its items and how fast it was."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from agents.items import RunItem

if TYPE_CHECKING:
    from ._events import ApprovalRequested


@dataclass(frozen=True, slots=True)
class ToolTiming:
    call_id: str
    name: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class CacheCounts:
    """What one cache did during a turn."""

    hits: int = 0
    """Calls answered from a stored result."""
    misses: int = 0
    """Calls that ran (and stored their result, where it was one)."""
    deduplicated: int = 0
    """Calls that shared an identical call's execution, here or on another replica."""
    stored_bytes: int = 0
    """The size of the results this turn stored."""


@dataclass(frozen=True, slots=True)
class TurnMetrics:
    """Latency figures of one turn, all measured from the moment the turn started."""

    time_to_first_token_s: float | None
    """Until the first text delta (``None`` if the model produced no text)."""
    tokens: int
    """Output tokens: the model's reported usage where it has one, else the count of text deltas."""
    tokens_per_s: float | None
    """Output tokens over the time from the first to the last text delta."""
    tools: tuple[ToolTiming, ...]
    total_s: float
    cache: Mapping[str, CacheCounts] = field(default_factory=dict)
    """By cache (``"tool"``: ``rtagent.cached``), for the caches this turn used."""


@dataclass(frozen=True, slots=True)
class TurnResult:
    text: str
    """All assistant text the user saw during this turn."""
    interrupted: bool
    metrics: TurnMetrics
    new_items: list[RunItem] = field(default_factory=list)
    """The SDK's run items of this turn (empty when the turn was interrupted or failed early)."""
    final_output: Any = None
    """The SDK's ``final_output`` (``None`` when the turn did not finish normally)."""
    pending: tuple[ApprovalRequested, ...] = ()
    """Tool calls waiting for a person's approval: the turn paused before them."""
    state: str | None = None
    """The paused run, as the SDK's ``RunState.to_string()`` (without the run's context, which
    the turn that continues it supplies): what continues it in another process or after a
    restart (``Chat.restore``). ``None`` unless ``pending``."""
    cached: Literal["exact", "semantic"] | None = None
    """How the reply cache matched when it served this reply (no model call ran); ``None``: the
    model answered."""
