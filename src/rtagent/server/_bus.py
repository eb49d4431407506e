"""Redis as the bus of the replicas serving one set of conversations (``serve --redis URL``).

Any request of a conversation may land on any replica (behind a load balancer, or on any of
``--workers``), while a conversation still runs one turn at a time and a stop must reach its
turn wherever it runs. So:

- **a lease per thread** (``rtagent:lease:THREAD``): the replica running a thread's turn holds it,
  renews it every third of ``lease_s`` and deletes it when the turn's history is saved. Its value
  is a fencing token, a number that grows with every acquisition (``rtagent:fence:THREAD``) and
  the replica's id: the run log's writes check it in the same Redis script, so a replica that
  paused past its lease (and lost it to another) cannot write after the new holder. The history
  store is another engine, so its writes (``FencedSession``) check just before that the token is
  still the thread's latest (``rtagent:taken:THREAD``, set with the lease): that leaves one round
  trip, not the rest of a paused turn, in which a stale write could land. A replica that dies
  stops renewing: its lease expires within ``lease_s`` and another may take over.
- **a channel per replica** (``rtagent:replica:ID``): "interrupt this thread's turn" (a new
  message came to another replica), "stop it" and "a follower of it went away" reach the
  holder, found from the lease's value.
- **the turn cap across replicas** (``rtagent:turns``): a sorted set of the running turns, scored
  by when they expire unless renewed, so a dead replica's turns stop counting too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from agents.items import TResponseInputItem
from agents.memory import Session, SessionABC
from redis.exceptions import RedisError

from .._errors import RTAgentError
from ._limits import InputError

log = logging.getLogger("rtagent.server")

PREFIX = "rtagent:"
# How a replica answers the others: (operation, thread id).
Handler = Callable[[str, str], Awaitable[None]]

RENEW = """
local lost = {}
for i = 1, #KEYS do
  if redis.call('get', KEYS[i]) == ARGV[i + 1] then
    redis.call('pexpire', KEYS[i], ARGV[1])
  else
    table.insert(lost, KEYS[i])
  end
end
return lost
"""
# The lease, and the token as the thread's latest, which outlives the lease: a tool that ends
# after its turn still writes its result, unless another turn of the thread has begun since.
TAKE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""
TAKEN_MS = 3_600_000
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
ENTER = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], ARGV[3], ARGV[4])
return 1
"""


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user + ':***' if user else '***'}@{host}"


def check_redis(url: str) -> None:
    """Reach Redis once, before serving: one clear line (``RTAgentError``) if it cannot be used."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        with client:
            client.ping()
    except (RedisError, OSError, ValueError) as exc:
        raise unusable(url, exc) from None


def unusable(url: str, exc: Exception) -> RTAgentError:
    return RTAgentError(f"cannot use Redis at {describe_url(url)}: {exc}")


def replica_of(holder: str) -> str:
    """The replica id in a lease's value (``FENCE:REPLICA``)."""
    return holder.partition(":")[2]


class Bus:
    """This replica's side of the bus; see the module docstring."""

    def __init__(self, url: str, *, lease_s: float = 5.0, max_turns: int = 0) -> None:
        self.url = url
        try:
            # Any: redis-py types every reply bytes | str, whatever ``decode_responses`` says.
            self.redis: Any = aioredis.from_url(url, decode_responses=True, socket_timeout=5)
        except ValueError as exc:
            raise RTAgentError(f"bad Redis URL {describe_url(url)}: {exc}") from None
        self.lease_ms = max(int(lease_s * 1000), 300)
        self.max_turns = max_turns
        self.replica = uuid.uuid4().hex[:16]
        self.channel = f"{PREFIX}replica:{self.replica}"
        self.held: dict[str, str] = {}  # thread -> the token of its lease here
        self._turns: set[str] = set()  # this replica's members of the turn set
        self._tasks: list[asyncio.Task[None]] = []
        self._take = self.redis.register_script(TAKE)
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._enter = self.redis.register_script(ENTER)

    async def check(self) -> None:
        """Reach Redis once, at start-up: one clear line if it cannot be used."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise unusable(self.url, exc) from None

    async def start(self, handler: Handler, on_lost: Callable[[str], object]) -> None:
        """Answer the other replicas with ``handler``; ``on_lost(thread)``: a lease was lost."""
        await self.check()
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.channel)
        self._tasks = [
            asyncio.create_task(self._listen(pubsub, handler)),
            asyncio.create_task(self._keep(on_lost)),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        with contextlib.suppress(RedisError, OSError):
            for thread_id in list(self.held):
                await self.release(thread_id)
            if self._turns:
                await self.redis.zrem(f"{PREFIX}turns", *self._turns)
        await self.redis.aclose()

    # -- leases -----------------------------------------------------------------------------------

    async def acquire(self, thread_id: str, *, interrupt: bool, timeout_s: float = 30.0) -> str:
        """Take the thread's lease, asking its holder to interrupt its turn first (``interrupt``)
        or waiting for the turn to end; the fencing token."""
        keys = [f"{PREFIX}lease:{thread_id}", f"{PREFIX}taken:{thread_id}"]
        fence = await self.redis.incr(f"{PREFIX}fence:{thread_id}")
        token = f"{fence}:{self.replica}"
        asked: str | None = None
        deadline = time.monotonic() + timeout_s
        pause = 0.005
        while not await self._take(keys=keys, args=[token, self.lease_ms, TAKEN_MS]):
            holder = await self.redis.get(keys[0])
            if interrupt and holder is not None and holder != asked:
                await self.send(holder, "interrupt", thread_id)
                asked = holder
            if time.monotonic() > deadline:
                raise InputError("the thread's turn elsewhere did not end; try again shortly", 503, "busy")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        self.held[thread_id] = token
        return token

    async def release(self, thread_id: str) -> None:
        token = self.held.pop(thread_id, None)
        if token is not None:
            await self._release(keys=[f"{PREFIX}lease:{thread_id}"], args=[token])

    async def holder(self, thread_id: str) -> str | None:
        holder: str | None = await self.redis.get(f"{PREFIX}lease:{thread_id}")
        return holder

    async def _keep(self, on_lost: Callable[[str], object]) -> None:
        """Renew this replica's leases and turns, every third of the lease."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                held = dict(self.held)
                if held:
                    keys = [f"{PREFIX}lease:{t}" for t in held]
                    lost = await self._renew(keys=keys, args=[self.lease_ms, *held.values()])
                    for key in lost:
                        thread_id = key.removeprefix(f"{PREFIX}lease:")
                        if self.held.get(thread_id) == held.get(thread_id):
                            del self.held[thread_id]
                            log.warning("the lease of thread %s was lost; its turn stops", thread_id)
                            on_lost(thread_id)
                if self._turns:
                    expiry = self._expiry()
                    await self.redis.zadd(f"{PREFIX}turns", dict.fromkeys(self._turns, expiry), xx=True)
            except (RedisError, OSError) as exc:
                log.warning("cannot renew leases on Redis: %s", exc)

    # -- messages ---------------------------------------------------------------------------------

    async def send(self, holder: str, operation: str, thread_id: str) -> bool:
        """Tell the replica of lease value ``holder``; whether it listens."""
        message = json.dumps({"op": operation, "thread": thread_id})
        return bool(await self.redis.publish(f"{PREFIX}replica:{replica_of(holder)}", message))

    async def tell_holder(self, thread_id: str, operation: str) -> bool:
        """Send ``operation`` to whichever other replica holds the thread's lease; whether one does."""
        holder = await self.holder(thread_id)
        if holder is None or replica_of(holder) == self.replica:
            return False
        return await self.send(holder, operation, thread_id)

    async def _listen(self, pubsub: aioredis.client.PubSub, handler: Handler) -> None:
        while True:
            try:
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        request = json.loads(message["data"])
                        await handler(str(request["op"]), str(request["thread"]))
                    except (ValueError, KeyError, TypeError):
                        log.warning("a message on the bus was not understood: %.200s", message["data"])
            except (RedisError, OSError) as exc:
                log.warning("lost the bus on Redis (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.subscribe(self.channel)

    # -- the turn cap -----------------------------------------------------------------------------

    def _expiry(self) -> int:
        return int(time.time() * 1000) + self.lease_ms

    async def enter_turn(self) -> str | None:
        """Count a turn against the cap shared by every replica; its member, or ``None`` if full."""
        member = f"{self.replica}:{uuid.uuid4().hex[:12]}"
        now = int(time.time() * 1000)
        args: list[str | int] = [now, self.max_turns, self._expiry(), member]
        if not await self._enter(keys=[f"{PREFIX}turns"], args=args):
            return None
        self._turns.add(member)
        return member

    async def leave_turn(self, member: str) -> None:
        self._turns.discard(member)
        await self.redis.zrem(f"{PREFIX}turns", member)


class FencedSession(SessionABC):
    """A thread's history, written only while the token this replica last took the thread's lease
    with is still the thread's latest: a replica that paused past its lease drops its turn's items
    rather than append them after the new holder's."""

    def __init__(self, session: Session, bus: Bus, thread_id: str) -> None:
        self.inner = session
        self.session_id = session.session_id
        self.session_settings = session.session_settings
        self.token: str | None = None  # set by ``hold`` when this replica takes the lease
        self._bus = bus
        self._thread_id = thread_id

    def hold(self, token: str) -> None:
        self.token = token

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        try:
            latest = await self._bus.redis.get(f"{PREFIX}taken:{self._thread_id}")
        except (RedisError, OSError):
            latest = self.token  # while Redis is away nobody takes the lease either: keep the write
        if latest not in (None, self.token):
            log.warning(
                "thread %s is another replica's now: %d items of an earlier turn dropped",
                self._thread_id,
                len(items),
            )
            return
        await self.inner.add_items(items)

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        return await self.inner.get_items(limit)

    async def pop_item(self) -> TResponseInputItem | None:
        return await self.inner.pop_item()

    async def clear_session(self) -> None:
        await self.inner.clear_session()
