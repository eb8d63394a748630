"""The chat session stores, embedded (the gallery's SQLite file) and shared (a real PostgreSQL), held to one behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from imagine.assistant.postgres_sessions import PostgresSessions
from imagine.assistant.sessions import SessionStore, StoredMessage
from imagine.assistant.sqlite_sessions import SqliteSessions
from imagine.storage.gallery import INDEX_FILE, GalleryStore
from imagine.storage.records import ImageMetadata, ListQuery
from tests.postgres import postgres  # noqa: F401 - the test run's PostgreSQL, a fixture


@pytest.fixture(params=["sqlite", "postgres"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], SessionStore]:
    """Makes a store over the same database each time it is called: a restart."""
    if request.param == "sqlite":
        return lambda: SqliteSessions(tmp_path / INDEX_FILE)
    url = request.getfixturevalue("postgres").new_database()
    return lambda: PostgresSessions(url)


def exchange(text: str, at: float, image_id: str | None = None) -> list[StoredMessage]:
    return [StoredMessage("user", text, at), StoredMessage("assistant", f"re: {text}", at, image_id)]


async def test_sessions_are_private_bounded_and_survive_a_restart(new_store) -> None:
    store = new_store()
    await store.open()
    for number in range(3):
        await store.append("alice", "default", exchange(f"hello {number}", 100.0 + number), keep=4, max_sessions=2)
    await store.append("bob", "default", exchange("bob here", 200.0, "img_x"), keep=4, max_sessions=2)
    # The newest four messages are kept, oldest first.
    assert [m.content for m in await store.history("alice", "default", 10)] == ["hello 1", "re: hello 1", "hello 2", "re: hello 2"]
    assert [m.content for m in await store.history("alice", "default", 1)] == ["re: hello 2"]
    assert await store.messages("carol", "default") is None
    assert [m.image_id for m in await store.messages("bob", "default")] == [None, "img_x"]
    await store.append("alice", "art", exchange("a dragon", 300.0), keep=4, max_sessions=2)
    await store.append("alice", "third", exchange("a castle", 400.0), keep=4, max_sessions=2)
    # Two sessions each at most: Alice's least recently used went, Bob's is untouched.
    assert [(s.session_id, s.messages, s.created_at, s.updated_at) for s in await store.sessions("alice")] == [
        ("third", 2, 400.0, 400.0),
        ("art", 2, 300.0, 300.0),
    ]
    assert await store.history("alice", "default", 10) == []
    await store.close()

    store = new_store()
    await store.open()
    assert [s.session_id for s in await store.sessions("bob")] == ["default"]
    assert [m.content for m in await store.messages("alice", "art")] == ["a dragon", "re: a dragon"]
    assert await store.delete("bob", "art") is False
    assert await store.delete("alice", "art") is True
    assert await store.messages("alice", "art") is None
    assert [s.session_id for s in await store.sessions("alice")] == ["third"]
    await store.close()


async def test_the_embedded_store_shares_the_gallerys_file(tmp_path: Path) -> None:
    gallery = GalleryStore(tmp_path)
    sessions = SqliteSessions(tmp_path / INDEX_FILE)
    await gallery.open()
    await sessions.open()
    metadata = ImageMetadata("a fox", "", "sdxl", 1, 64, 64, 2, 7.5, "euler", (), 0.1, 0.0)
    [image_id] = await gallery.add("alice", [(b"\x89PNG\r\n\x1a\n", metadata)])
    await sessions.append("alice", "default", exchange("#generate a fox", 1.0, image_id), keep=10, max_sessions=10)
    await sessions.close()
    await gallery.close()
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == [INDEX_FILE]

    gallery = GalleryStore(tmp_path)
    sessions = SqliteSessions(tmp_path / INDEX_FILE)
    await gallery.open()
    await sessions.open()
    assert [record.id for record in (await gallery.list(ListQuery(owner="alice", limit=10)))[0]] == [image_id]
    assert (await sessions.messages("alice", "default"))[1].image_id == image_id
    await sessions.close()
    await gallery.close()


async def test_one_callers_concurrent_chats_keep_to_max_sessions(new_store) -> None:
    """Several of one caller's chats ending at once, each in a session of its own, past max_sessions:
    every exchange is stored or trimmed away, none fails, and max_sessions holds."""
    store = new_store()
    await store.open()
    for round_ in range(10):
        at = 100.0 + round_
        await asyncio.gather(
            *(store.append("alice", f"s{index}", exchange(f"hello {index}", at + index / 10), keep=4, max_sessions=1)
              for index in range(3))
        )  # fmt: skip
        assert len(await store.sessions("alice")) == 1
    await store.close()
