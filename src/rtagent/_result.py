"""What a finished turn leaves behind: its text, its items and how fast it was."""

from __future__ import annotations

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
class CacheUse:
    """What one cache did for a turn."""

    cache: str
    """Which cache: ``"reply"``."""
    hit: bool
    match: Literal["exact", "semantic"] | None = None
    """How a hit matched."""
    similarity: float | None = None
    """A semantic hit's cosine similarity to the stored message."""
    bytes: int = 0
    """Bytes served (a hit) or stored (a miss whose turn was stored; 0 when it was not)."""
    stored_bytes: int = 0
    """The cache's size after the turn (in a shared store: what this process wrote)."""


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
    caches: tuple[CacheUse, ...] = ()
    """What each cache the turn asked did (empty when it asked none)."""


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
    cached: bool = False
    """The reply came from the reply cache: no model call (``metrics.caches`` says how it matched)."""
