"""The reply cache: a turn whose agent, history and message match a stored turn's gets the stored
reply at once, without a model call.

Opt-in (``Chat(agent, reply_cache=ReplyCache())``, the ``reply_cache`` turn option, or ``rtagent
serve --reply-cache exact|semantic``). The key is the agent's fingerprint (instructions, tools with
their schemas, guardrails, model and model settings, the run's context), the conversation so far and
the new message; ``semantic`` also matches a new message that says the same as a stored one in
the same conversation state (see ``SEMANTIC_THRESHOLD`` and ``same_slots``).

Only clean turns are stored: not interrupted, not failed, not paused for an approval, with text,
and having called no tool but those marked ``replayable`` (a reply that needed a tool's side effect,
or today's data, must not be served again).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from agents import Agent, FunctionTool, RunContextWrapper
from agents.items import TResponseInputItem
from agents.tool import Tool

from ._embedding import Embedder, shared_embedder

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from ._embedding import Vector

Match = Literal["exact", "semantic"]

SEMANTIC_THRESHOLD = 0.95
"""Cosine similarity from which a message counts as saying the same as a stored one (with equal
``same_slots``). Chosen by ``bench/paraphrases.py`` on ``tests/data/paraphrases.jsonl``: the lowest
threshold with no wrong hit on its near misses, plus a margin (see the README)."""

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_TTL_S = 24 * 3600.0
# Vectors kept for semantic matching, over all conversation states (1.5 kB each).
MAX_INDEXED = 50_000
# Nearest stored messages checked for equal slots before a semantic lookup gives up.
CANDIDATES = 4

_T = TypeVar("_T", bound=Tool)


def replayable(tool: _T) -> _T:
    """Mark a tool whose call a cached reply may stand for: it only reads, and what it reads does
    not change within the cache's TTL. Turns that called any other tool are never stored."""
    setattr(tool, _MARK, True)
    return tool


_MARK = "_rtagent_replayable"


def is_replayable(tool: Tool) -> bool:
    return bool(getattr(tool, _MARK, False))


# -- what a message says that embeddings blur ---------------------------------------------------

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "twenty thirty forty fifty hundred thousand million once twice thrice first second third fourth "
    "fifth sixth seventh eighth ninth tenth half double triple dozen"
)
_TIME_WORDS = (
    "monday tuesday wednesday thursday friday saturday sunday weekend january february march april "
    "may june july august september october november december today tonight tomorrow yesterday "
    "morning afternoon evening night noon midnight am pm next last day week month year"
)
_WORD = re.compile(r"[a-z]+")
_NUMBER = re.compile(r"[a-z0-9]*\d(?:[a-z0-9.,:/-]*[a-z0-9])?")
_NEGATION = re.compile(r"\b(?:not|no|never|none|nothing|nobody|nowhere|neither|nor|without|cannot)\b|n't\b")
_SLOT_WORDS = frozenset(_NUMBER_WORDS.split()) | frozenset(_TIME_WORDS.split())


def slots(text: str) -> tuple[tuple[str, ...], int]:
    """The numbers, number and date words of ``text`` (sorted), and whether it negates (parity)."""
    lowered = text.lower().replace("\u2019", "'")  # the typographic apostrophe phones type
    words = [
        word.removesuffix("s") if word.removesuffix("s") in _SLOT_WORDS else word
        for word in _WORD.findall(lowered)
    ]
    found = [*_NUMBER.findall(lowered), *(word for word in words if word in _SLOT_WORDS)]
    negated = len(_NEGATION.findall(lowered.replace("can't", "can not").replace("won't", "will not")))
    return tuple(sorted(found)), negated % 2


def same_slots(stored: str, incoming: str) -> bool:
    """Whether two messages agree on what a sentence embedding barely sees: numbers ("order 12345"
    against "order 12346" scores 0.96), dates and times, and negation ("cancel my order" against
    "don't cancel my order" scores 0.95, above most real paraphrases)."""
    return slots(stored) == slots(incoming)


# -- keys -------------------------------------------------------------------------------------


def _digest(*parts: str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode())
        hasher.update(b"\0")
    return hasher.hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _tool_entry(tool: Tool) -> dict[str, Any]:
    if isinstance(tool, FunctionTool):
        return {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.params_json_schema,
            "strict": tool.strict_json_schema,
        }
    return {"name": tool.name, "type": type(tool).__name__}


async def fingerprint(
    agent: Agent[Any], tools: Sequence[Tool], model: str, context: Any, guardrails: Sequence[str] = ()
) -> str | None:
    """What decides an agent's reply besides the conversation, as a digest; ``None`` when it cannot
    be told (instructions that fail without a run, a context that is no JSON, structured output).

    ``guardrails`` names the run's own; the agent's count too, since a reply served again skips
    them. Agents with handoffs are not cached: the reply may come from an agent the key never saw.
    """
    if agent.output_type not in (None, str) or agent.prompt is not None or agent.handoffs:
        return None
    try:
        instructions = await agent.get_system_prompt(RunContextWrapper(context))
        context_json = json.dumps(context, sort_keys=True)
    except Exception:  # dynamic instructions that need more than this, or a context that is no JSON
        return None
    return _digest(
        "rtagent-reply-v1",
        instructions or "",
        _canonical([_tool_entry(tool) for tool in tools]),
        _canonical(
            [
                *guardrails,
                *(guardrail.get_name() for guardrail in agent.input_guardrails),
                *(guardrail.get_name() for guardrail in agent.output_guardrails),
            ]
        ),
        model,
        _canonical(agent.model_settings.to_json_dict()),
        context_json,
    )


def model_label(model: object) -> str:
    """The model as the key names it: a spec for rtagent's models (their ``str``), the name for
    the SDK's OpenAI models (whose ``str`` holds an address, which would differ per process)."""
    name = getattr(model, "model", None)
    return f"{type(model).__qualname__}:{name}" if isinstance(name, str) else str(model)


def history_digest(items: Sequence[TResponseInputItem]) -> str:
    """The conversation so far, without the ids servers give items (the same words, said in another
    session, are the same history)."""
    return _digest(_canonical([{k: v for k, v in dict(item).items() if k != "id"} for item in items]))


# -- what is stored -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedReply:
    """A stored turn: the text deltas the person saw, and the items the turn added to the history
    after the message (the assistant message, and any replayable tool's call and output)."""

    deltas: tuple[str, ...]
    items: tuple[TResponseInputItem, ...]

    def encode(self) -> bytes:
        return json.dumps({"deltas": self.deltas, "items": self.items}, ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> CachedReply:
        value = json.loads(data)
        return cls(tuple(value["deltas"]), tuple(value["items"]))


class Store(Protocol):
    """Where entries live: ``MemoryStore`` by default, ``RedisStore`` to share them."""

    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def clear(self) -> int: ...
    def stored_bytes(self) -> int: ...


class MemoryStore:
    """Entries in this process, least recently used first out past ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (value, time.monotonic() + ttl_s)
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return count

    def stored_bytes(self) -> int:
        return self._bytes

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= len(value)


class RedisStore:
    """Entries in Redis, shared by every replica; Redis expires them (``SET ... PX``)."""

    PREFIX = "rtagent:reply:"

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(url)
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(self.PREFIX + key)
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(self.PREFIX + key, value, px=max(int(ttl_s * 1000), 1))
        self._bytes += len(value)

    async def clear(self) -> int:
        count = 0
        async for key in self._redis.scan_iter(match=self.PREFIX + "*", count=500):
            count += int(await self._redis.delete(key))
        return count

    def stored_bytes(self) -> int:
        """What this process has written (Redis may have expired some of it since)."""
        return self._bytes

    async def aclose(self) -> None:
        await self._redis.aclose()


@dataclass(slots=True)
class _Bucket:
    """The messages stored for one conversation state, for semantic matching."""

    messages: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    vectors: list[Vector] = field(default_factory=list)
    matrix: NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True)
class Lookup:
    """One turn's question to the cache, and its answer (``hit``: ``None`` on a miss)."""

    key: str
    bucket: str
    message: str | None
    vector: Vector | None
    hit: CachedReply | None = None
    match: Match | None = None
    similarity: float | None = None


@dataclass(slots=True)
class CacheStats:
    """Counts since the cache was made (the server's ``/metrics`` counts per turn instead)."""

    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    stores: int = 0
    bytes_served: int = 0


class ReplyCache:
    """Stored replies, matched ``exact`` (same agent, history and message, byte for byte) or also
    ``semantic`` (a message that means the same, in the same agent and history; needs ``pip
    install 'rtagent[cache]'``). In memory up to ``max_bytes`` unless given a ``store``; each entry
    lives ``ttl_s`` seconds. One cache may serve many agents and conversations: the key tells them
    apart."""

    def __init__(
        self,
        match: Match = "exact",
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        store: Store | None = None,
        threshold: float = SEMANTIC_THRESHOLD,
        embedder: Embedder | None = None,
    ) -> None:
        if match not in ("exact", "semantic"):
            raise ValueError(f"match must be 'exact' or 'semantic', not {match!r}")
        self.match: Match = match
        self.ttl_s = ttl_s
        self.threshold = threshold
        self.store: Store = store if store is not None else MemoryStore(max_bytes)
        self.stats = CacheStats()
        self._embedder = (embedder or shared_embedder()) if match == "semantic" else None
        # Per process even with a shared store: nearest-neighbour search over Redis would need a
        # module (RediSearch) plain Redis lacks, and an index rebuilt from a replica's own turns
        # costs a miss per replica at most.
        self._index: OrderedDict[str, _Bucket] = OrderedDict()
        self._indexed = 0

    async def warm(self) -> None:
        """Load the embedding model now, not on the first message (a no-op for ``exact``)."""
        if self._embedder is not None:
            await asyncio.to_thread(self._embedder.warm)

    async def lookup(
        self,
        fingerprint: str,
        history: Sequence[TResponseInputItem],
        message: str | list[TResponseInputItem],
        *,
        semantic: bool = True,
    ) -> Lookup:
        """The stored reply for ``message``; ``semantic=False``: only one for these very words."""
        bucket = _digest(fingerprint, history_digest(history))
        text = message if isinstance(message, str) else None
        key = _digest(bucket, _canonical(message))
        found = await self.store.get(key)
        if found is not None:
            self.stats.exact_hits += 1
            self.stats.bytes_served += len(found)
            return Lookup(key, bucket, text, None, CachedReply.decode(found), "exact", 1.0)
        vector = None
        if self._embedder is not None and text is not None and semantic:
            vector = await asyncio.to_thread(self._embedder.embed, text)
            hit = await self._nearest(bucket, text, vector)
            if hit is not None:
                similarity, data = hit
                self.stats.semantic_hits += 1
                self.stats.bytes_served += len(data)
                return Lookup(key, bucket, text, vector, CachedReply.decode(data), "semantic", similarity)
        self.stats.misses += 1
        return Lookup(key, bucket, text, vector)

    async def _nearest(self, bucket_key: str, text: str, vector: Vector) -> tuple[float, bytes] | None:
        import numpy as np

        bucket = self._index.get(bucket_key)
        if bucket is None:
            return None
        self._index.move_to_end(bucket_key)
        if bucket.matrix is None:
            bucket.matrix = np.stack(bucket.vectors)
        scores = bucket.matrix @ vector
        for index in np.argsort(-scores)[:CANDIDATES]:
            score = float(scores[index])
            if score < self.threshold:
                break
            if same_slots(bucket.messages[index], text):
                data = await self.store.get(bucket.keys[index])
                if data is not None:  # else expired or evicted: the next candidate may still be there
                    return score, data
        return None

    async def put(self, lookup: Lookup, reply: CachedReply) -> int:
        """Store ``reply`` as the answer to ``lookup``'s turn; returns the bytes stored."""
        data = reply.encode()
        await self.store.put(lookup.key, data, self.ttl_s)
        self.stats.stores += 1
        if lookup.vector is not None and lookup.message is not None:
            self._add(lookup.bucket, lookup.message, lookup.key, lookup.vector)
        return len(data)

    def _add(self, bucket_key: str, message: str, key: str, vector: Vector) -> None:
        bucket = self._index.setdefault(bucket_key, _Bucket())
        self._index.move_to_end(bucket_key)
        bucket.messages.append(message)
        bucket.keys.append(key)
        bucket.vectors.append(vector)
        bucket.matrix = None
        self._indexed += 1
        while self._indexed > MAX_INDEXED:
            _, oldest = self._index.popitem(last=False)
            self._indexed -= len(oldest.keys)

    async def clear(self) -> int:
        """Forget every entry (in a shared store: every replica's); returns how many went."""
        self._index.clear()
        self._indexed = 0
        return await self.store.clear()


def may_store(tools: Mapping[str, Tool], called: set[str]) -> bool:
    """Whether a turn that called ``called`` (tool names) may be served again from the cache."""
    return all(name in tools and is_replayable(tools[name]) for name in called)
