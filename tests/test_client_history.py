"""The client store's history for histories of any length (issue 17 item 2):
pages before a row, the page around a row, the contact list by last
activity, and search over the whole history through an FTS5 table kept in
step by triggers (and built for a store made before it). On temporary
SQLite files, no window, no server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_store import (
    PAGE,
    ClientStore,
    find_folded,
    fold,
    read_around,
    read_contacts,
    read_history,
    row_of,
    search_history,
)
from protocol import MsgId, name_key
from tests.window_fakes import PEER_INSTANCE, fill_history


def store_path(root: Path, user: str = "alice") -> Path:
    return root / name_key(user) / "client.db"


def test_pages_walk_back_to_the_first_message(tmp_path: Path) -> None:
    fill_history(tmp_path, "alice", ["bob", "carol"], 1001)  # 501 lines with bob
    path = store_path(tmp_path)
    seen: list[str] = []
    before = None
    while True:
        page = read_history(path, "bob", PAGE, before=before)
        if not page:
            break
        assert len(page) <= PAGE
        seen[:0] = [line.text for line in page]
        before = page[0].row_id
    assert seen == [f"message number {i}" for i in range(0, 1001, 2)], "every line once, in order"


def test_the_page_around_a_row_holds_it_in_the_middle(tmp_path: Path) -> None:
    fill_history(tmp_path, "alice", ["bob"], 1000)
    path = store_path(tmp_path)
    target = read_history(path, "bob", 1, before=501)[0]
    around = read_around(path, "bob", target.row_id, limit=20)
    assert [line.row_id for line in around] == list(range(target.row_id - 10, target.row_id + 10))


def test_contacts_come_from_the_history_most_recent_first(tmp_path: Path) -> None:
    peers = [f"peer{i:04d}" for i in range(300)]
    fill_history(tmp_path, "alice", peers, 900)
    path = store_path(tmp_path)
    contacts = read_contacts(path)
    assert [c.name for c in contacts] == peers[::-1], "one row each, last activity first"
    assert contacts[0].last_ms > contacts[-1].last_ms
    store = ClientStore(path.parent, "alice")
    try:  # new activity with the oldest moves it to the top
        store.add_incoming("peer0000", MsgId(PEER_INSTANCE, 10_000), "news", 1, 10_000)
        store.mark_shown(10_000)
        store.commit()
    finally:
        store.close()
    assert read_contacts(path)[0].name == "peer0000"


def test_search_covers_the_whole_history_case_insensitively(tmp_path: Path) -> None:
    texts = {0: "the very first Needle", 4000: "a needle in the middle", 9999: "no match here"}
    fill_history(tmp_path, "alice", ["bob"], 10_000, text=lambda i: texts.get(i, f"hay {i}"))
    path = store_path(tmp_path)
    newest = search_history(path, "bob", "NEEDLE")
    assert newest is not None
    older = search_history(path, "bob", "NEEDLE", before=newest)
    assert older is not None and older < newest
    assert search_history(path, "bob", "needle", before=older) is None
    [middle] = read_around(path, "bob", newest, limit=1)
    [first] = read_around(path, "bob", older, limit=1)
    assert middle.text == "a needle in the middle" and first.text == "the very first Needle"
    assert search_history(path, "bob", "eed") == newest, "a piece of a word is found"
    assert search_history(path, "bob", "ne") == newest, "shorter than a trigram: read the rows"
    assert search_history(path, "carol", "needle") is None, "only the conversation asked"
    assert search_history(path, "bob", "absent") is None


def test_search_finds_text_beside_emoji_and_folds_case(tmp_path: Path) -> None:
    texts = ["party \U0001f389 TIME", "Привет, мир", "\u05e9\u05dc\u05d5\u05dd world"]
    fill_history(tmp_path, "alice", ["bob"], 3, text=lambda i: texts[i])
    path = store_path(tmp_path)
    assert search_history(path, "bob", "time") is not None
    assert search_history(path, "bob", "\U0001f389 t") is not None
    assert search_history(path, "bob", "ПРИВЕТ") is not None, "case folded beyond ASCII"
    assert search_history(path, "bob", "\u05e9\u05dc\u05d5\u05dd") is not None
    # On screen Python's casefold is used (ß is ss), mapped back to the text.
    assert find_folded("Straße", "SS") == [(4, 5)]


def test_the_index_and_the_contacts_follow_inserts_and_deletes(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "alice", "alice")
    try:
        assert store.searchable
        store.add_incoming("bob", MsgId(PEER_INSTANCE, 1), "a fresh Word", 1, 1)
        store.mark_shown(1)
        store.commit()
        path = store.path
        row = search_history(path, "bob", "word")
        assert row is not None
        assert row_of(path, False, "bob", MsgId(PEER_INSTANCE, 1).label()) == row
        assert [c.name for c in read_contacts(path)] == ["bob"]
        store.db.execute("DELETE FROM history WHERE id=?", (row,))
        assert search_history(path, "bob", "word") is None
        assert read_contacts(path) == [], "no history with bob left: not a contact"
        count = store.db.execute("SELECT COUNT(*) FROM history_fts WHERE history_fts MATCH 'word'")
        assert count.fetchone()[0] == 0, "the index forgot the deleted row"
    finally:
        store.close()


def test_a_message_not_shown_yet_is_not_a_hit(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "alice", "alice")
    try:
        store.add_incoming("bob", MsgId(PEER_INSTANCE, 1), "pending text", 1, 1)
        store.commit()
        assert search_history(store.path, "bob", "pending") is None
        store.mark_shown(1)
        assert search_history(store.path, "bob", "pending") is not None
    finally:
        store.close()


def test_a_store_made_before_the_index_gets_it_and_its_peers_on_open(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "alice", "alice")
    store.close()
    db = sqlite3.connect(store.path)  # as the store was before issue 17: no index, no triggers
    db.executescript(
        "DROP TRIGGER history_fts_insert; DROP TRIGGER history_fts_delete;"
        " DROP TRIGGER history_fts_update; DROP TABLE history_fts;"
        " DROP TRIGGER history_peers_insert; DROP TRIGGER history_peers_delete;"
        " DROP TABLE history_peers;"
    )
    db.executemany(
        "INSERT INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key, instance_id,"
        " client_seq, state) VALUES ('bob', 'bob', 0, ?, 1, 'bob', 7, ?, NULL)",
        [(f"old line {i}", i) for i in range(50)],
    )
    db.commit()
    db.close()
    assert search_history(store.path, "bob", "line 42") is not None, "read without the index"
    assert read_contacts(store.path) == [], "no list of peers yet"
    reopened = ClientStore(tmp_path / "alice", "alice")
    reopened.close()
    assert [c.name for c in read_contacts(store.path)] == ["bob"], "made on open"
    db = sqlite3.connect(store.path)
    try:
        hits = db.execute(
            "SELECT rowid FROM history_fts WHERE history_fts MATCH '\"line 42\"'"
        ).fetchall()
    finally:
        db.close()
    assert len(hits) == 1, "the index was built over the rows already there"


@pytest.mark.parametrize("needle", [" ", '"', "a\"b'c", "*", "NEAR(", "x OR y", "\U0001f389"])
def test_odd_needles_are_text_not_query_syntax(tmp_path: Path, needle: str) -> None:
    fill_history(
        tmp_path, "alice", ["bob"], 5, text=lambda i: 'say "a"b\'c" * NEAR( x OR y \U0001f389'
    )
    path = store_path(tmp_path)
    assert search_history(path, "bob", needle) is not None, needle
    assert search_history(path, "bob", "") is None


@given(
    st.text(alphabet="aAbBsS\u00df\u0130i\U0001f389 ", max_size=40),
    st.text(alphabet="aAbsS\u00df", min_size=1, max_size=3),
)
def test_find_folded_maps_each_hit_back_to_its_text(haystack: str, needle: str) -> None:
    hits = find_folded(haystack, needle)
    assert len(hits) == fold(haystack).count(fold(needle)), "every hit, none twice"
    for start, end in hits:
        assert fold(needle) in fold(haystack[start:end])
    assert hits == sorted(hits)
