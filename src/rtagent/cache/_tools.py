"""The tool-result cache: ``rtagent.cached(tool, ttl=60)``.

A call's key is the tool's name and its arguments as canonical JSON (or what the author's ``key``
function makes of them). A result stored less than ``ttl`` seconds ago is returned without running
the tool, and identical calls made while one runs share that one execution: in this process
(across sessions), and across replicas through Redis. Only results are stored: a call that raised
or was cancelled leaves nothing behind, so the next identical call runs the tool again.

Storage is cashews': an LRU of ``size`` entries in this process by default, or Redis
(``configure_cache(url)``, which ``rtagent serve --redis`` does), shared by every replica. Values
are stored as JSON, never pickled, so a shared Redis holds nothing that runs code when read. cashews'
own in-flight de-duplication (``thunder_protection``) is not used: there a cancelled first caller
cancels the execution the others wait for, while here it runs on as long as anyone waits for it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from agents import FunctionTool
from agents.tool_context import ToolContext
from cashews.backends.interface import Backend
from cashews.backends.memory import Memory
from cashews.backends.redis import Redis
from cashews.exceptions import CacheBackendInteractionError
from cashews.picklers import PicklerType
from cashews.serialize import get_serializer
from redis.exceptions import RedisError

from .._tools import _Background, _current, _Invoker

log = logging.getLogger("rtagent")

Outcome = Literal["hit", "shared", "miss"]
"""A stored result (``hit``), another call's execution (``shared``), or this call's own (``miss``)."""
KeyFunction = Callable[[ToolContext[Any], dict[str, Any]], str]
"""The author's key: from the call's context and parsed arguments, the text that identifies it."""

PREFIX = "rtagent:cache:tool:"
LOCKS = "rtagent:cache:lock:tool:"
DEFAULT_SIZE = 1000
LEASE_S = 10.0
"""How long a replica's claim on a running call outlives the replica (it is renewed while it runs)."""
POLL_S = 0.02
"""How often a replica looks for the result of a call that another replica runs."""
UNREACHABLE = (CacheBackendInteractionError, RedisError, OSError)


@dataclass(slots=True)
class _Flight:
    task: asyncio.Future[tuple[Any, Outcome, int]]
    waiting: int = 0


class ToolCache:
    """Where tool results are stored, and the executions in flight in this process."""

    def __init__(self, url: str | None = None, size: int = DEFAULT_SIZE) -> None:
        self.url = url
        serializer = get_serializer(pickle_type=PicklerType.JSON)
        # No sweeper task (``check_interval=0``): it would belong to one event loop; an expired entry
        # is dropped when it is read, and the size bound holds the rest.
        self._memory = None if url else Memory(size=size, check_interval=0, serializer=serializer)
        # A Redis connection belongs to the loop that opened it (``asyncio.run`` makes a new loop).
        self._redis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = weakref.WeakKeyDictionary()
        self._serializer = serializer
        self._flights: dict[str, _Flight] = {}

    async def backend(self) -> Backend:
        backend: Backend
        if self._memory is not None:
            backend = self._memory
        else:
            assert self.url is not None
            loop = asyncio.get_running_loop()
            if loop not in self._redis:
                self._redis[loop] = Redis(self.url, suppress=False, serializer=self._serializer)
            backend = self._redis[loop]
        if not backend.is_init:
            await backend.init()
        return backend

    async def call(
        self, key: str, ttl: float, run: Callable[[], Awaitable[Any]], report: Callable[[Outcome, int], None]
    ) -> Any:
        """The output of ``run``, or of the same call stored or in flight; ``report`` says which."""
        found, output = await self._get(key)
        if found:
            report("hit", 0)
            return output
        flight = self._flights.get(key)
        # One that has just ended (its removal is a callback still to run) is no execution to share:
        # it may have failed, or been cancelled with its callers.
        leader = flight is None or flight.task.done()
        if flight is None or flight.task.done():
            flight = self._start(key, ttl, run)
        else:
            report("shared", 0)
        flight.waiting += 1
        try:
            # Shielded: one caller cancelled (its turn interrupted) leaves the others their result.
            output, outcome, stored = await asyncio.shield(flight.task)
        except Exception:
            if leader:
                report("miss", 0)
            raise
        finally:
            flight.waiting -= 1
            if flight.waiting == 0 and not flight.task.done():
                # Nobody waits for it any more: cancelled, as an uncached call is, and at once no
                # execution for a new call to join (it would share the cancellation).
                self._forget(key, flight)
                flight.task.cancel()
        if leader:
            report(outcome, stored)
        return output

    def _start(self, key: str, ttl: float, run: Callable[[], Awaitable[Any]]) -> _Flight:
        flight = _Flight(asyncio.ensure_future(self._lead(key, ttl, run)))
        self._flights[key] = flight

        flight.task.add_done_callback(lambda _: self._forget(key, flight))
        return flight

    def _forget(self, key: str, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def clear(self, tool: str | None = None) -> None:
        """Forget the stored results of ``tool`` (by name), or of every tool."""
        backend = await self.backend()
        # Never ``backend.clear()``: on Redis that is FLUSHDB, and the server keeps its threads there.
        await backend.delete_match(f"{PREFIX}{tool}:*" if tool else f"{PREFIX}*")

    async def _lead(
        self, key: str, ttl: float, run: Callable[[], Awaitable[Any]]
    ) -> tuple[Any, Outcome, int]:
        claim: _Claim | None = None
        if self.url is not None:
            claim = await self._claim(key)
            if claim.output is not None:
                return claim.output[0], "shared", 0
        try:
            output = await run()
            return output, "miss", await self._put(key, output, ttl)
        finally:
            if claim is not None:
                await claim.release()

    async def _claim(self, key: str) -> _Claim:
        """Run the call here (a lock on Redis), or take the result of the replica that ran it."""
        backend = await self.backend()
        claim = _Claim(backend, LOCKS + key.removeprefix(PREFIX), uuid.uuid4().hex)
        while True:
            try:
                taken = await backend.set_lock(claim.lock, claim.token, expire=LEASE_S)
            except UNREACHABLE as exc:
                log.warning("the tool cache cannot reach Redis, running the tool: %s", exc)
                return claim
            # Stored since this call looked, by a replica that held the lock until then?
            found, output = await self._get(key)
            if found:
                claim.output = (output,)
                if taken:
                    await claim.release()
                return claim
            if taken:
                claim.hold()
                return claim
            await asyncio.sleep(POLL_S)

    async def _get(self, key: str) -> tuple[bool, Any]:
        try:
            stored = await (await self.backend()).get(key)
        except UNREACHABLE as exc:
            log.warning("the tool cache cannot reach Redis, running the tool: %s", exc)
            return False, None
        if not isinstance(stored, dict) or "output" not in stored:
            return False, None
        return True, stored["output"]

    async def _put(self, key: str, output: Any, ttl: float) -> int:
        """Store ``output``; the bytes it takes (0: not stored)."""
        value = {"output": output}
        try:
            size = len(json.dumps(value).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError):  # not JSON: it could not come back from Redis the same
            log.debug("not caching a %s result of %s", type(output).__name__, key)
            return 0
        try:
            await (await self.backend()).set(key, value, expire=ttl)
        except UNREACHABLE as exc:
            log.warning("the tool cache cannot reach Redis, the result is not stored: %s", exc)
            return 0
        return size


class _Claim:
    """This replica's lock on a call, renewed while the call runs, so a dead replica's lapses."""

    def __init__(self, backend: Backend, lock: str, token: str) -> None:
        self.backend = backend
        self.lock = lock
        self.token = token
        self.output: tuple[Any] | None = None
        self._renewing: asyncio.Task[None] | None = None

    def hold(self) -> None:
        self._renewing = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                await self.backend.expire(self.lock, LEASE_S)
            except UNREACHABLE as exc:
                log.warning("cannot renew a tool cache lock on Redis: %s", exc)

    async def release(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        try:
            await self.backend.unlock(self.lock, self.token)
        except UNREACHABLE as exc:  # it lapses by itself
            log.warning("cannot release a tool cache lock on Redis: %s", exc)


_cache = ToolCache()


def configure_cache(url: str | None = None, *, size: int = DEFAULT_SIZE) -> None:
    """Where this process keeps tool results: in memory (``size`` entries, the least recently used
    go first) when ``url`` is ``None``, else on the Redis at ``url``, shared by every process that
    uses it."""
    global _cache
    _cache = ToolCache(url, size)


async def clear_cache(tool: str | None = None) -> None:
    """Forget the stored results of one tool (by name), or of every tool."""
    await _cache.clear(tool)


@dataclass
class CachedTool(FunctionTool):
    """A function tool whose results are cached (``rtagent.cached``)."""

    async def aclear(self) -> None:
        """Forget this tool's stored results."""
        await clear_cache(self.name)

    def clear(self) -> None:
        """``aclear`` for code without an event loop."""
        asyncio.run(self.aclear())


class _Cached(_Invoker):
    def __init__(
        self,
        inner: Callable[[ToolContext[Any], str], Awaitable[Any]],
        name: str,
        ttl: float,
        key: KeyFunction | None,
    ) -> None:
        super().__init__(inner, name)
        self._ttl = ttl
        self._key = key

    async def __call__(self, context: ToolContext[Any], arguments: str) -> Any:
        key = self._key_of(context, arguments)
        if key is None:  # arguments that are no JSON object: the tool itself says what is wrong
            return await self._inner(context, arguments)
        call = _current.get()

        def report(outcome: Outcome, stored: int) -> None:
            if call is not None:
                call.sink._tool_cache(call.call_id, outcome, stored)

        return await _cache.call(key, self._ttl, lambda: self._inner(context, arguments), report)

    def _key_of(self, context: ToolContext[Any], arguments: str) -> str | None:
        try:
            parsed = json.loads(arguments or "{}")
        except ValueError:
            return None
        if not isinstance(parsed, dict):
            return None
        if self._key is not None:
            text = self._key(context, parsed)
        else:
            text = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{PREFIX}{self._name}:{digest}"


def cached(tool: FunctionTool, ttl: float = 60.0, key: KeyFunction | None = None) -> CachedTool:
    """The tool, with its results kept for ``ttl`` seconds and identical calls in flight shared.

    ``key``: what identifies a call, from its context and parsed arguments (by default, the
    arguments as canonical JSON); for instance, add the user when results differ per user. Only
    results that are JSON values (text, numbers, lists, objects) are stored. Composes with
    ``rtagent.background`` in either order.
    """
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, not {ttl!r}")
    invoker = tool.on_invoke_tool
    if isinstance(invoker, _Background):  # the cache goes inside, so a kept call still stores its result
        inner = cached(replace(tool, on_invoke_tool=invoker._inner), ttl, key)
        return replace(inner, on_invoke_tool=_Background(inner.on_invoke_tool, inner.name))
    handler = getattr(invoker, "_invoke_tool_impl", None)
    if handler is None:  # a hand-made tool: its invoker's errors reach the cache as they are
        wrapped: Any = _Cached(invoker, tool.name, ttl, key)
    else:
        # The SDK's invoker turns a raised error into text for the model, which would then be stored
        # as a result: the cache goes inside it, around the function itself (pinned SDK 0.24).
        wrapped = copy.copy(invoker)
        wrapped._invoke_tool_impl = _Cached(handler, tool.name, ttl, key)
    values = {f.name: getattr(tool, f.name) for f in fields(tool) if f.init}
    return CachedTool(**{**values, "on_invoke_tool": wrapped})
