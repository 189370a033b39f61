"""The window's group findings of audit14, on a real X display against a
real server process: our own group messages take their place in the
group's order once the server numbers them (G2), live and after a restart
of the window. Driven with key events like tests/test_gui.py; the other
member is a `ChatSession`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chat_client import ChatSession, LoggedIn, MessageReceived, StatusChanged
from protocol import GroupAction, name_key
from tests.conftest import (
    PASSWORD,
    ServerProcess,
    make_session,
    spawn_server,
    stop_process,
    wait_for,
)
from tests.test_groups_gui import window_screenshot
from tests.test_gui import Gui, open_gui, press, pump, pump_until, type_text
from tests.xvfb import display  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture
def slow_fanout(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose fan-out budget is 1 group copy a second (burst 2):
    a member's third message in a row waits a second, as over a slow link."""
    running = spawn_server("--max-fanout-rate", "1", data_dir=tmp_path / "server-data")
    yield running
    stop_process(running)


@pytest.fixture
def app(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(None, monkeypatch)


def helper(app: Gui, server: ServerProcess, name: str) -> ChatSession:
    session = make_session()
    app.sessions.append(session)
    session.login(server.addr_text, name, password=PASSWORD)
    wait_for(session, lambda e: isinstance(e, LoggedIn))
    return session


def order_in(text: str, items: list[str]) -> list[str]:
    """`items` in the order they appear in `text`."""
    return sorted(items, key=text.index)


def test_own_group_messages_take_their_place_in_the_groups_order(
    app: Gui, slow_fanout: ServerProcess, tmp_path: Path
) -> None:
    bob = helper(app, slow_fanout, "bob")
    alice = app.window(server=slow_fanout.addr_text)
    app.login(alice, "alice")
    bob.group(GroupAction.CREATE, "ord", ("alice",))
    assert pump_until(app.root, lambda: name_key("#ord") in alice.conversations)
    alice.open_conversation("#ord")
    assert pump_until(app.root, lambda: "bob created the group" in alice.transcript_text())
    pump(app.root, 2.2)  # bob's budget is full again: his message goes at once

    typed = ["A1 first", "A2 second", "A3 third", "A4 fourth"]
    for text in typed:
        type_text(alice.composer, text)
        press(alice.composer, "Return")
    bob.send("B from bob", to="#ord")
    # The group's order, as bob has it: alice's messages by their seq, his by his.
    seqs: dict[str, int] = {}

    def record(event: object) -> bool:
        if isinstance(event, MessageReceived) and event.group == "ord":
            seqs[event.text] = event.seq
        if isinstance(event, StatusChanged) and event.state == "accepted" and event.seq:
            seqs["B from bob"] = event.seq
        return len(seqs) == 5

    wait_for(bob, record, timeout=20)
    group_order = sorted(seqs, key=seqs.__getitem__)
    assert group_order[-1] == "A4 fourth" and seqs["B from bob"] < seqs["A4 fourth"], (
        "alice's last message waited for the budget: bob's came between", seqs
    )  # fmt: skip
    conv = alice.current
    assert conv is not None and conv.name == "#ord"
    own = [line for line in conv.lines if line.kind == "own"]
    assert pump_until(app.root, lambda: all(line.state in ("accepted", "delivered")
                                            for line in own), 20)  # fmt: skip
    pump(app.root, 0.2)
    shown = alice.transcript_text()
    assert order_in(shown, group_order) == group_order, shown
    assert [line.text for line in conv.lines if line.text in seqs] == group_order
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    window_screenshot(alice, ARTIFACTS / "group-order-own.png")

    # After a restart of the window: the stored history reads back the same.
    assert alice.session is not None
    alice.session.logout(3.0)
    alice.close()
    again = app.window(server=slow_fanout.addr_text)
    app.login(again, "alice")
    again.open_conversation("#ord")
    assert pump_until(app.root, lambda: "B from bob" in again.transcript_text())
    shown = again.transcript_text()
    assert order_in(shown, group_order) == group_order, shown
    window_screenshot(again, ARTIFACTS / "group-order-own-restart.png")
