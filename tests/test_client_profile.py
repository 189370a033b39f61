"""Where a client keeps its data, and the window's account dialogs (issue 16,
item 1: "a failed login is saved as the last server and leaves a data
folder behind; `localhost:5555` and `127.0.0.1:5555` get separate
histories"; item 4: the window's menu).

- The profile folder is named by the address the server resolves to
  (`common.canonical_address`), so spellings of one server share it; a
  folder an older version made under the typed spelling is moved there.
- A first login that fails leaves no folder; one that existed stays.
- The window saves the server and name as the last ones only after a login.
- The window's "Account" menu: Change password... and Delete account...
"""

from __future__ import annotations

import shutil
import socket
import tkinter as tk
from pathlib import Path
from typing import Any

from chat_client import ChatSession, LoggedIn
from client_account_ui import cancel_waiting, change_password_dialog, delete_account_dialog
from client_store import ClientStore, profile_dir, read_history, store_dir
from client_window import ChatWindow, Settings
from common import canonical_address, data_dir
from protocol import MsgId
from tests.conftest import PASSWORD, RunningServer, make_session, wait_for
from tests.lossy_proxy import UP, LossyProxy
from tests.test_gui import SESSION_OPTIONS, Gui, gui, pump_until  # noqa: F401
from tests.xvfb import display  # noqa: F401


def profiles() -> list[Path]:
    root = data_dir() / "client"
    return sorted(p.relative_to(root) for p in root.glob("*/*")) if root.exists() else []


def log_in(addr: str, user: str, password: str = PASSWORD) -> tuple[ChatSession, Any]:
    session = make_session()
    session.login(addr, user, password=password)
    first = wait_for(session, lambda e: isinstance(e, LoggedIn) or getattr(e, "fatal", False))
    return session, first


def test_canonical_address_names_one_server_one_way() -> None:
    assert canonical_address("127.0.0.1", 5555) == "127.0.0.1:5555"
    assert canonical_address("::ffff:127.0.0.1", 5555) == "127.0.0.1:5555"
    assert canonical_address("0:0:0:0:0:0:0:1", 5555) == "[::1]:5555"
    assert canonical_address("::1", 80) == "[::1]:80"
    assert canonical_address("not-an-address", 1) == "not-an-address:1"


def test_spellings_of_one_server_share_one_profile(server: RunningServer) -> None:
    port = server.address[1]
    resolved = socket.getaddrinfo("localhost", port, type=socket.SOCK_DGRAM)[0][4][0]
    assert resolved == "127.0.0.1"  # the server listens there; localhost must reach it
    first, _ = log_in(f"localhost:{port}", "alice")
    msg = first.send("note to self", to="alice")
    assert msg is not None
    wait_for(first, lambda e: getattr(e, "state", None) == "accepted")
    first.close()
    second, _ = log_in(f"127.0.0.1:{port}", "Alice")
    try:
        assert second.store is not None
        assert second.store.directory == store_dir(f"127.0.0.1:{port}", "alice")
        lines = read_history(second.store.path, "alice")
        assert "note to self" in [line.text for line in lines]
    finally:
        second.close()
    assert profiles() == [Path(f"127.0.0.1_{port}") / "alice"]


def test_a_profile_under_an_old_spelling_is_moved_and_keeps_its_identity(tmp_path: Path) -> None:
    root = tmp_path / "client"
    legacy = store_dir("localhost:5555", "alice", root)
    store = ClientStore(legacy, "alice")
    store.add_outgoing(MsgId(store.instance_id, 1), "bob", "from the old folder")
    store.commit()
    instance = store.instance_id
    store.close()
    directory, new = profile_dir("127.0.0.1:5555", "localhost:5555", "alice", root)
    assert (directory, new) == (store_dir("127.0.0.1:5555", "alice", root), False)
    assert not legacy.exists() and not legacy.parent.exists()
    moved = ClientStore(directory, "alice")
    try:
        assert moved.instance_id == instance  # moved, not taken for a copy
        assert [text for _, _, text in moved.pending()] == ["from the old folder"]
    finally:
        moved.close()
    # Looked up again: the canonical folder, as it is.
    assert profile_dir("127.0.0.1:5555", "localhost:5555", "alice", root) == (directory, False)


def test_a_profile_in_use_under_an_old_spelling_is_used_where_it_is(tmp_path: Path) -> None:
    root = tmp_path / "client"
    legacy = store_dir("localhost:5555", "alice", root)
    holder = ClientStore(legacy, "alice")  # another process has it open
    try:
        assert profile_dir("127.0.0.1:5555", "localhost:5555", "alice", root) == (legacy, False)
    finally:
        holder.close()


def test_a_failed_first_login_leaves_no_folder(server: RunningServer) -> None:
    addr = server.addr_text
    owner, _ = log_in(addr, "bob")  # bob's account, and his profile here
    owner.close()
    assert profiles() == [Path(addr.replace(":", "_")) / "bob"]
    stranger, refused = log_in(addr, "bob", "not bob's password")
    assert refused.code == "bad_password"
    stranger.close()
    assert profiles() == [Path(addr.replace(":", "_")) / "bob"]  # his stays
    # A stranger's first login to another name, on a fresh profile: gone again.
    carol_owner, _ = log_in(addr, "carol")
    carol_owner.close()
    for path in (data_dir() / "client").glob("*/carol"):
        shutil.rmtree(path)  # carol's account exists; this machine has no profile of it
    failed, refused = log_in(addr, "carol", "wrong")
    assert refused.code == "bad_password"
    failed.close()
    assert profiles() == [Path(addr.replace(":", "_")) / "bob"]
    # Unless something was typed meanwhile: the outbox keeps it for the next
    # try. The server hears nothing until it was typed (on a loaded machine
    # the refusal could come before this thread typed, and then nothing is).
    with LossyProxy(server.address, seed=1) as gate:
        gate.set(UP, blackhole=True)
        gated = f"127.0.0.1:{gate.address[1]}"
        typed = make_session()
        typed.login(gated, "carol", password="wrong again")
        assert typed.send("typed while connecting", to="bob") is not None
        gate.set(UP, blackhole=False)
        refused = wait_for(typed, lambda e: getattr(e, "fatal", False))
        assert refused.code == "bad_password"
        typed.close()
    kept = store_dir(gated, "carol")
    assert kept.exists()
    shutil.rmtree(kept)
    # A server that does not answer: no folder for it either.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{sock.getsockname()[1]}"
    nobody = make_session(login_timeout=0.5)
    nobody.login(silent, "dave", password=PASSWORD)
    wait_for(nobody, lambda e: getattr(e, "code", None) == "server_unreachable")
    nobody.close()
    assert profiles() == [Path(addr.replace(":", "_")) / "bob"]


# --- the window ---------------------------------------------------------------------


def settings_window(app: Gui, path: Path) -> ChatWindow:
    assert app.server is not None
    settings = Settings(server="127.0.0.1:1", username="", path=path)
    window = ChatWindow(tk.Toplevel(app.root), settings, session_factory=ChatSession,
                        session_options=dict(SESSION_OPTIONS))  # fmt: skip
    app.windows.append(window)
    assert pump_until(app.root, lambda: window.top.winfo_ismapped(), 5)
    window.server_var.set(app.server.addr_text)
    return window


def test_the_window_saves_the_last_server_only_after_a_login(gui: Gui, tmp_path: Path) -> None:  # noqa: F811
    gui.session("alice")  # alice's account, with PASSWORD
    path = tmp_path / "settings.json"
    window = settings_window(gui, path)
    window.username_var.set("alice")
    window.password_var.set("wrong")
    window.login_button.invoke()
    assert pump_until(gui.root, lambda: window.login_error.cget("text") != "", 10)
    assert pump_until(gui.root, lambda: window.session is None, 5)
    assert not path.exists()  # not saved: the login failed
    window.password_var.set(PASSWORD)
    window.login_button.invoke()
    assert pump_until(gui.root, lambda: window.username is not None, 10)
    saved = Settings.load(path)
    assert gui.server is not None
    assert (saved.server, saved.username) == (gui.server.addr_text, "alice")


def test_the_window_changes_the_password_and_deletes_the_account(gui: Gui) -> None:  # noqa: F811
    window = gui.window()
    gui.login(window, "alice")
    menu = window.account_menu
    assert [menu.entrycget(i, "label") for i in range(2)] == [
        "Change password\u2026", "Delete account\u2026",
    ]  # fmt: skip
    dialog = change_password_dialog(window)
    assert dialog is not None
    for var, value in zip(dialog.vars, [PASSWORD, "new one", "other"], strict=True):
        var.set(value)
    dialog.submit()
    assert "differ" in str(dialog.problem.cget("text"))  # still open, nothing sent
    dialog.vars[2].set("new one")
    dialog.ok_button.invoke()
    assert not dialog.top.winfo_exists()
    assert window.session is not None
    assert pump_until(gui.root, lambda: "Password changed" in window.transcript_text()
                      or "Password changed" in str(window.peer_label.cget("text")), 10)  # fmt: skip
    dialog = delete_account_dialog(window)
    assert dialog is not None
    dialog.vars[0].set("new one")
    dialog.vars[1].set("not alice")
    dialog.submit()
    assert "Type alice" in str(dialog.problem.cget("text"))
    dialog.vars[1].set("Alice")
    dialog.ok_button.invoke()
    assert pump_until(gui.root, lambda: window.login_frame.winfo_ismapped(), 10)
    assert "deleted" in str(window.login_error.cget("text"))
    assert gui.server is not None and "alice" not in gui.server.relay.users


def test_the_window_cancels_what_waits_for_the_current_contact(gui: Gui) -> None:  # noqa: F811
    window = gui.window()
    gui.login(window, "alice", "frank")  # frank has no account
    window.composer.insert("1.0", "are you there, frank?")
    window.send_composed()
    assert pump_until(gui.root, lambda: "no user 'frank' yet" in window.transcript_text(), 10)
    assert cancel_waiting(window)
    assert pump_until(gui.root, lambda: "Cancelled 1 message to frank." in
                      window.transcript_text(), 10)  # fmt: skip
    assert "failed (cancelled)" in window.transcript_text()
    assert window.session is not None and window.session.store is not None
    assert window.session.store.pending() == []
