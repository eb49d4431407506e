"""The server's conversations by URL: SQLite (``_store``), PostgreSQL or Redis, behind one entry point.

``open_store(url)`` returns a store with ``session(thread_id)`` (no I/O), ``check()`` (connects once,
at start-up, so a bad URL fails in one line rather than at the first turn) and ``aclose()``:

- no URL or ``sqlite:///PATH``: ``_store.Store``, the SQLite file (the default);
- ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (or ``postgres://``): the SDK's ``SQLAlchemySession``
  tables on one asyncpg engine shared by every conversation; ``check()`` creates the tables;
- ``redis://HOST:PORT/DB`` (or ``rediss://`` for TLS): the SDK's ``RedisSession`` keys under
  ``rtagent:history`` on one shared client.

Whatever the engine, an item is scrubbed of lone surrogates before it is written (no encoder takes
them, and a thread holding one could not be sent to the model again) and rows written before that
are repaired when read, as ``_store`` does for SQLite.
"""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from agents.extensions.memory.redis_session import RedisSession
from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
from agents.items import TResponseInputItem
from agents.memory import Session
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .._errors import RTAgentError
from .._unicode import may_hold_surrogates, scrub_json
from ._store import Store, default_path, store_path

# How long ``check()`` waits for an engine to answer.
CONNECT_TIMEOUT_S = 10.0
POSTGRES_SCHEMES = ("postgresql", "postgres")
REDIS_SCHEMES = ("redis", "rediss")
REDIS_PREFIX = "rtagent:history"


class HistoryStore(Protocol):
    """What the server needs of a store, whichever the engine."""

    def session(self, session_id: str) -> Session: ...

    async def check(self) -> None: ...

    async def aclose(self) -> None: ...


def open_store(url: str | None, db_path: str | Path | None = None) -> HistoryStore:
    """The store ``url`` names (``db_path``: the SQLite file when there is no URL; neither: the
    default file). Nothing is connected yet but a SQLite file: ``check()`` does that. A URL of no
    known engine, or both arguments: ``RTAgentError``, in one line."""
    if url is not None and db_path is not None:
        raise RTAgentError("give a SQLite file or a store URL, not both")
    scheme = url.partition("://")[0].lower() if url is not None else "sqlite"
    if scheme in POSTGRES_SCHEMES:
        return PostgresStore(url or "")
    if scheme in REDIS_SCHEMES:
        return RedisStore(url or "")
    if url is not None and scheme != "sqlite":
        known = "use sqlite:///PATH, postgresql://... or redis://..."
        raise RTAgentError(f"unknown store URL {mask(url)[:80]!r}: {known}")
    path = Path(store_path(url) if url is not None else db_path or default_path())
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    return Store(str(path))


async def check_store(url: str | None) -> None:
    """Fail, in one line, if the store ``url`` names cannot be used (``serve`` calls it before it
    starts listening). A SQLite URL is only parsed: its file is opened by the server."""
    if url is None or url.partition("://")[0].lower() == "sqlite":
        if url is not None:
            store_path(url)
        return
    store = open_store(url)
    try:
        await store.check()
    finally:
        await store.aclose()


def mask(url: str) -> str:
    """``url`` with its password, if any, shown as ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return url.partition("://")[0] + "://***"


def _unreachable(url: str, exc: BaseException) -> RTAgentError:
    return RTAgentError(f"cannot reach the store {mask(url)}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words: the innermost error that says something."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or current in seen:
            continue
        seen.append(current)
        if isinstance(current, ConnectionRefusedError) or (
            isinstance(current, OSError) and current.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        if isinstance(current, TimeoutError):
            return "timed out"
        todo += [getattr(current, "orig", None), current.__cause__, current.__context__]
    for current in reversed(seen):  # asyncpg's and redis's own words are the innermost
        words = " ".join(str(current).split())
        if words:
            if "connection refused" in words.lower():
                return "connection refused"
            return words[:200]
    return type(exc).__name__


def _encoded(item: TResponseInputItem) -> str:
    return json.dumps(scrub_json(item), separators=(",", ":"))


def _decoded(data: str) -> TResponseInputItem:
    item = json.loads(data)
    return scrub_json(item) if may_hold_surrogates(data) else item  # type: ignore[no-any-return]


# -- PostgreSQL ---------------------------------------------------------------------------------


class PostgresStore:
    """The conversations in PostgreSQL: the SDK's ``SQLAlchemySession`` tables, one engine."""

    def __init__(self, url: str) -> None:
        self.url = url
        driver = "postgresql+asyncpg://" + url.partition("://")[2]
        # pool_pre_ping: a connection the server dropped (a restart, an idle timeout) is replaced,
        # not handed to a turn. The timeout bounds each connect, ``check()``'s included.
        self.engine: AsyncEngine = create_async_engine(
            driver, pool_pre_ping=True, connect_args={"timeout": CONNECT_TIMEOUT_S}
        )

    def session(self, session_id: str) -> PostgresSession:
        return PostgresSession(session_id, engine=self.engine, create_tables=False)

    async def check(self) -> None:
        """Connect once and create the SDK's tables if they are not there."""
        metadata = self.session("")._metadata
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S), self.engine.begin() as connection:
                await connection.run_sync(metadata.create_all)
        except Exception as exc:
            raise _unreachable(self.url, exc) from None

    async def aclose(self) -> None:
        await self.engine.dispose()


class PostgresSession(SQLAlchemySession):
    """The SDK's ``SQLAlchemySession``, writing scrubbed items and repairing old rows it reads."""

    async def _serialize_item(self, item: TResponseInputItem) -> str:
        return _encoded(item)

    async def _deserialize_item(self, item: str) -> TResponseInputItem:
        return _decoded(item)


# -- Redis --------------------------------------------------------------------------------------


class RedisStore:
    """The conversations in Redis: the SDK's ``RedisSession`` keys, one client."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Any = redis.asyncio.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, retry_on_timeout=False
        )

    def session(self, session_id: str) -> RedisSession:
        return RedisStoreSession(session_id, redis_client=self.client, key_prefix=REDIS_PREFIX)

    async def check(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self.client.ping()
        except Exception as exc:
            raise _unreachable(self.url, exc) from None

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisStoreSession(RedisSession):
    """The SDK's ``RedisSession``, writing scrubbed items and repairing old ones it reads."""

    async def _serialize_item(self, item: TResponseInputItem) -> str:
        return _encoded(item)

    async def _deserialize_item(self, item: str) -> TResponseInputItem:
        return _decoded(item)
