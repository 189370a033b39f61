"""Two sessions of one user writing one profile at once (a second process
of the same user, or a window logging in again while the last one's
network thread still finishes: `test_gui_groups3` met "database is locked"
so at load 20).

The client store groups a loop pass's writes in one transaction. Begun
deferred, a pass that read before it wrote took its snapshot at the read;
if the other writer committed in between, SQLite refuses the write at once
(SQLITE_BUSY_SNAPSHOT: "database is locked") without waiting the busy
timeout, and the network thread failed. Begun IMMEDIATE, the pass takes
the write lock first and the other writer waits for it (busy_timeout)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from client_store import ClientStore
from protocol import MsgId


def test_a_pass_that_reads_then_writes_waits_for_the_other_writer(tmp_path: Path) -> None:
    first = ClientStore(tmp_path, "alice")
    second = ClientStore(tmp_path, "alice")  # alice again here: read-only outbox, same history
    assert second.locked and not first.locked
    errors: list[sqlite3.Error] = []

    def the_other_pass() -> None:
        try:
            first.add_incoming("bob", MsgId(7, 1), "to the first session", 1000, 1)
            first.commit()
        except sqlite3.Error as exc:
            errors.append(exc)

    try:
        second.begin()  # a loop pass of the second session...
        assert second.state_of(MsgId(second.instance_id, 1)) is None  # ...reads first
        other = threading.Thread(target=the_other_pass)
        other.start()
        other.join(0.5)  # before: the first commits here, under the second's snapshot
        second.add_incoming("bob", MsgId(7, 2), "to the second session", 2000, 2)
        second.commit()
        other.join(10)
        assert not other.is_alive()
        assert not errors, errors
    finally:
        first.close()
        second.close()
    db = sqlite3.connect(tmp_path / "client.db")
    try:
        texts = {row[0] for row in db.execute("SELECT text FROM history WHERE outgoing=0")}
    finally:
        db.close()
    assert texts == {"to the first session", "to the second session"}
