"""The window keeps a draft per conversation (audit8 P4), on a real X
display against a real server, driven with key and mouse events: a line
refused in a group just left stays with that group, and New group, which
opens the new group by itself, starts with an empty composer (before, the
kept line went along and "after leavingold1" was sent to the new group);
what is typed and not sent comes back when its conversation is opened
again, as in Gajim and Signal."""

from __future__ import annotations

from chat_client import MessageReceived
from client_window import ChatWindow
from protocol import GroupAction, name_key
from tests.test_groups_gui import contact_text, gui, shows  # noqa: F401 (a fixture)
from tests.test_gui import Gui, press, pump, pump_until, type_text
from tests.xvfb import display  # noqa: F401 (a fixture)


def click_contact(window: ChatWindow, name: str) -> None:
    """Click with the mouse on `name`'s row of the contact list."""
    canvas = window.contacts
    key = name_key(name)
    canvas.see(key)
    canvas.update()
    y = canvas.index(key) * canvas.ROW + canvas.ROW // 2 - int(canvas.canvasy(0))
    canvas.event_generate("<Button-1>", x=30, y=y)
    canvas.update()


def test_a_line_typed_in_one_conversation_never_goes_to_another(gui: Gui) -> None:  # noqa: F811
    bob = gui.session("bob")
    bob_got: list[tuple[str, str]] = []  # (conversation, text) of every message bob got

    def bob_gets(text: str) -> None:
        def seen(event: object) -> bool:
            if isinstance(event, MessageReceived):
                bob_got.append((event.conversation, event.text))
                return event.text == text
            return False

        shows(bob, seen)

    alice = gui.window()
    gui.login(alice, "alice")
    bob.group(GroupAction.CREATE, "team", ("alice",))
    assert pump_until(gui.root, lambda: contact_text(alice, "#team")[0] == "#team")
    click_contact(alice, "#team")
    assert alice.current is not None and alice.current.name == "#team"

    # alice leaves #team; a line typed there is refused and kept.
    panel = alice.groups.panel
    panel.leave_button.invoke()
    assert panel.confirm is not None
    panel.confirm.leave_button.invoke()
    assert pump_until(gui.root, lambda: "alice left" in alice.transcript_text())
    type_text(alice.composer, "after leaving")
    press(alice.composer, "Return")
    assert "not a member of #team any more" in alice.transcript_text()
    assert alice.composed() == "after leaving"

    # New group opens #life by itself: its composer is #life's, empty.
    alice.groups.new_button.invoke()
    assert pump_until(gui.root, lambda: alice.groups.dialog is not None)
    dialog = alice.groups.dialog
    assert dialog is not None
    type_text(dialog.name_entry, "life")
    type_text(dialog.members_entry, "bob")
    dialog.members_entry.event_generate("<KeyPress>", keysym="Return")
    assert pump_until(gui.root, lambda: alice.current is not None
                      and alice.current.name == "#life")  # fmt: skip
    assert alice.composed() == "", "the line refused in #team stays with #team"
    type_text(alice.composer, "old1")
    press(alice.composer, "Return")
    bob_gets("old1")
    assert bob_got == [("#life", "old1")]

    # A draft per conversation: each comes back where it was typed.
    type_text(alice.composer, "half a thought")
    click_contact(alice, "#team")
    assert alice.current is not None and alice.current.name == "#team"
    assert alice.composed() == "after leaving"
    press(alice.composer, "z", control=True)  # Undo does not bring back #life's text
    assert "half a thought" not in alice.composed()
    click_contact(alice, "#life")
    assert alice.composed() == "half a thought"
    press(alice.composer, "Return")
    bob_gets("half a thought")
    assert bob_got == [("#life", "old1"), ("#life", "half a thought")]
    pump(gui.root, 0.2)
    assert alice.composed() == ""
