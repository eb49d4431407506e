"""The server's SQLite store: the SDK's tables and semantics, without a worker thread per operation."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from agents import Agent, SQLiteSession
from agents.extensions.memory.redis_session import RedisSession
from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession

from rtagent._errors import RTAgentError
from rtagent.server import _store, create_app
from rtagent.server._engines import REDIS_PREFIX, HistoryStore, PostgresStore, RedisStore, open_store
from rtagent.server._store import Store, default_path, store_path
from rtagent.testing import ScriptedModel, reply


def _message(text: str) -> Any:
    return {"role": "user", "content": text}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(str(tmp_path / "threads.db"))
    yield store
    store.close()


async def test_the_sdks_own_session_reads_what_the_store_wrote_and_back(store: Store) -> None:
    ours = store.session("t1")
    await ours.add_items([_message("one"), _message("two")])
    sdk = SQLiteSession("t1", store.path)
    try:
        assert [item["content"] for item in await sdk.get_items()] == ["one", "two"]  # type: ignore[typeddict-item]
        await sdk.add_items([_message("three")])
    finally:
        sdk.close()
    assert [item["content"] for item in await ours.get_items()] == ["one", "two", "three"]  # type: ignore[typeddict-item]


@pytest.mark.parametrize("limit", [None, 1, 2, 3, 10, 0, -1])
async def test_limits_and_undecodable_rows_are_read_as_the_sdk_reads_them(
    store: Store, limit: int | None
) -> None:
    ours = store.session("t1")
    await ours.add_items([_message(str(n)) for n in range(4)])
    with store.lock:  # a row no JSON decoder accepts, among the newest
        store.connection.execute(
            "INSERT INTO agent_messages (session_id, message_data) VALUES ('t1', '{not json')"
        )
        store.connection.commit()
    await ours.add_items([_message("4")])
    sdk = SQLiteSession("t1", store.path)
    try:
        assert await ours.get_items(limit=limit) == await sdk.get_items(limit=limit)
    finally:
        sdk.close()


async def test_reads_writes_and_clears_never_hand_off_to_a_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("a session operation went to a worker thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    session = store.session("t1")
    await session.add_items([_message("hello")])
    assert len(await session.get_items()) == 1
    await session.clear_session()
    assert await session.get_items() == []


async def test_the_background_thread_checkpoints_the_journal_into_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_store, "CHECKPOINT_S", 0.05)
    path = tmp_path / "threads.db"
    store = Store(str(path))
    try:
        before = path.stat().st_size
        # The store's own connection never checkpoints, so the file grows only through the thread.
        await store.session("t1").add_items([_message("x" * 1000) for _ in range(200)])
        for _ in range(200):  # 10 s at most
            if path.stat().st_size >= before + 150_000:
                break
            await asyncio.sleep(0.05)
        assert path.stat().st_size >= before + 150_000
    finally:
        store.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM agent_messages").fetchone() == (200,)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///threads.db", "threads.db"),
        ("sqlite:////var/lib/rt.db", "/var/lib/rt.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_a_store_url_names_its_sqlite_file(url: str, path: str) -> None:
    assert store_path(url) == path


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://u@h/db", "unknown store URL"),
        ("sqlite://", "unknown store URL"),
        ("threads.db", "unknown store URL"),
    ],
)
def test_a_store_url_that_cannot_be_served_is_one_line(url: str, words: str) -> None:
    with pytest.raises(RTAgentError) as caught:
        store_path(url)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_default_file_is_in_the_users_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert default_path() == tmp_path / "data" / "rtagent" / "threads.db"
    app = create_app(Agent(name="a", model=ScriptedModel([])))
    app.state.server.db.close()
    assert default_path().exists()
    assert list(tmp_path.glob("*.db")) == []  # nothing in the directory it was started in


# -- PostgreSQL and Redis (real servers on loopback, see conftest.py) ----------------------------

ENGINES = ["postgresql", "redis"]
FAST = str(Path(__file__).parent / "agents" / "fast.py")


def _texts(items: list[Any]) -> list[str]:
    return [item["content"] for item in items]


@pytest.fixture(params=ENGINES)
def engine_url(request: pytest.FixtureRequest) -> str:
    """The URL of each real engine in turn; Redis starts empty."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
        return url
    postgres: str = request.getfixturevalue("postgres_url")
    return postgres


@pytest.fixture
async def engine_store(engine_url: str) -> AsyncIterator[HistoryStore]:
    store = open_store(engine_url)
    await store.check()
    yield store
    await store.aclose()


def _thread() -> str:
    return f"t-{uuid.uuid4().hex}"  # the PostgreSQL database is shared by the session's tests


async def test_an_engine_reads_back_what_it_was_given(engine_store: HistoryStore) -> None:
    session = engine_store.session(_thread())
    assert await session.get_items() == []
    await session.add_items([_message("one"), _message("two")])
    await session.add_items([_message("three")])
    assert _texts(await session.get_items()) == ["one", "two", "three"]
    assert _texts(await session.get_items(limit=2)) == ["two", "three"]


async def test_an_engine_keeps_threads_apart_and_clears_one(engine_store: HistoryStore) -> None:
    first, second = engine_store.session(_thread()), engine_store.session(_thread())
    await first.add_items([_message("mine")])
    await second.add_items([_message("yours")])
    assert _texts(await first.get_items()) == ["mine"]
    assert _texts(await second.get_items()) == ["yours"]
    await first.clear_session()
    assert await first.get_items() == []
    assert _texts(await second.get_items()) == ["yours"]


async def test_an_engine_stores_no_lone_surrogate_and_repairs_old_rows(engine_store: HistoryStore) -> None:
    thread = _thread()
    session = engine_store.session(thread)
    await session.add_items([_message("bad \ud800 text")])
    # A row as the SDK's own session writes it (before the scrubbing): the escape, as it was.
    if isinstance(engine_store, PostgresStore):
        sdk: Any = SQLAlchemySession(thread, engine=engine_store.engine)
    else:
        assert isinstance(engine_store, RedisStore)
        sdk = RedisSession(thread, redis_client=engine_store.client, key_prefix=REDIS_PREFIX)
    await sdk.add_items([_message("old \udfff row")])
    assert _texts(await session.get_items()) == ["bad \ufffd text", "old \ufffd row"]


async def test_an_engine_keeps_the_history_for_the_next_store(engine_url: str) -> None:
    thread = _thread()
    first = open_store(engine_url)
    await first.check()
    await first.session(thread).add_items([_message("remember me")])
    await first.aclose()
    second = open_store(engine_url)
    try:
        await second.check()
        assert _texts(await second.session(thread).get_items()) == ["remember me"]
    finally:
        await second.aclose()


async def test_the_app_keeps_a_turn_in_the_engine(engine_url: str) -> None:
    thread = _thread()
    agent = Agent(name="helper")
    app = create_app(agent, model=ScriptedModel([reply("Stored far away.")]), store=engine_url)
    message = {"id": "u1", "role": "user", "content": "Where do you keep this?"}
    body = {"threadId": thread, "runId": "r1", "messages": [message], "state": {}, "tools": [], "context": []}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            assert (await http.post("/agui", json=body)).status_code == 200
            history = (await http.get(f"/threads/{thread}/messages")).json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "Where do you keep this?"),
        ("assistant", "Stored far away."),
    ]
    again = open_store(engine_url)  # and in the engine, not only in the app's memory
    try:
        await again.check()
        assert len(await again.session(thread).get_items()) == 2
    finally:
        await again.aclose()


@pytest.mark.parametrize(
    ("login", "why"),
    [("secret:wrong@", 'password authentication failed for user "secret"'), ("", 'database "nowhere"')],
)
async def test_a_postgresql_store_it_cannot_log_into_is_one_line(
    postgres_url: str, login: str, why: str
) -> None:
    port = urlsplit(postgres_url).port
    database = "rtagent" if login else "nowhere"
    store = open_store(f"postgresql://{login or 'postgres@'}127.0.0.1:{port}/{database}")
    try:
        with pytest.raises(RTAgentError) as caught:
            await store.check()
    finally:
        await store.aclose()
    assert str(caught.value).startswith("cannot reach the store postgresql://")
    assert why in str(caught.value)
    assert "wrong" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unknown_engine_is_one_line() -> None:
    with pytest.raises(RTAgentError) as caught:
        open_store("mysql://user:pw@h/db")
    assert "unknown store URL" in str(caught.value)
    assert "pw" not in str(caught.value)
    assert "\n" not in str(caught.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("case", ["postgres_down", "postgres_password", "redis_down", "mysql"])
def test_serve_ends_in_one_line_on_a_store_it_cannot_use(case: str, request: pytest.FixtureRequest) -> None:
    words = "cannot reach the store"
    if case == "postgres_down":
        url, why = "postgresql://127.0.0.1:1/x", "connection refused"
    elif case == "postgres_password":
        port = urlsplit(request.getfixturevalue("postgres_url")).port
        url, why = f"postgresql://secret:wrong@127.0.0.1:{port}/rtagent", "password"
    elif case == "redis_down":
        url, why = "redis://127.0.0.1:1/0", "connection refused"
    else:
        url, words, why = "mysql://x", "unknown store URL", "postgresql://"
    command = [sys.executable, "-m", "rtagent", "serve", FAST, "--store", url, "--port", str(_free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert words in line
    assert why in line
    assert "wrong" not in line  # the password is masked
    assert "Traceback" not in done.stderr
