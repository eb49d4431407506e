"""The server's SQLite store: the SDK's tables and semantics, without a worker thread per operation."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, SQLiteSession

from rtagent._errors import RTAgentError
from rtagent.server import _store, create_app
from rtagent.server._store import Store, default_path, store_path
from rtagent.testing import ScriptedModel


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
        ("redis://localhost:6379", "not available yet"),
        ("postgresql://u@h/db", "not available yet"),
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
