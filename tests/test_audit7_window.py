"""The window's findings of audit7 (N8-N12) on a real X display: the hover
over a big group's message that killed the window (N9), "New chat with…"
a group we are not in (N8), the member count of a group we were added to
(N10), the newest line in view when a conversation opens (N11), the New
group dialog's primary button (N12).

N9 runs its tooltips in a child process: on the old code X refused the
label's pixmap (BadAlloc), which ends the process, and a test must fail
rather than take the test run down with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client_look import NAMES_SHOWN, name_list
from client_transcript import Line
from tests.test_gui import Gui, open_gui, pump
from tests.xvfb import display  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

#: 1,000 members with long names: one line of them is ~200,000 px.
LONG_NAMES = [f"member-with-a-long-name-{n:04d}" for n in range(1000)]

TOOLTIPS = textwrap.dedent(
    """
    import json, sys, tkinter as tk
    from client_look import Tooltip
    from client_groups_ui import Receipts
    from client_transcript import Line
    from client_window import ChatWindow, Settings
    from chat_client import ChatSession

    names = json.loads(sys.argv[1])
    root = tk.Tk()
    root.withdraw()
    out = {"screen": [root.winfo_screenwidth(), root.winfo_screenheight()]}

    def measure(tip, text, x, y):
        tip.show(text, x, y)
        root.update()
        x, y = tip.window.wm_geometry().split("+")[1:]
        return {"req": [tip.label.winfo_reqwidth(), tip.label.winfo_reqheight()],
                "at": [int(x), int(y)], "shown": tip.label.cget("text")}

    # The window's hover over our message to a group of 1,000.
    settings = Settings(server="127.0.0.1:9", username="", geometry="800x600+0+0", path=None)
    window = ChatWindow(tk.Toplevel(root), settings, session_factory=ChatSession)
    window.groups.receipts["m1"] = Receipts(len(names), list(names))
    line = Line("own", "alice", "hello big group", 0.0, msg_id="m1", state="delivered")
    out["hover"] = window.describe_line(line)
    out["window"] = measure(window.tooltip, out["hover"], 700, 500)
    # The Tooltip itself, whatever it gets: every name on one line, one word
    # of 100,000 characters, 5,000 short lines; near the screen's corner.
    tip = Tooltip(root)
    sw, sh = out["screen"]
    out["one line"] = measure(tip, ", ".join(names), sw - 5, sh - 5)
    out["one word"] = measure(tip, "x" * 100_000, 10, 10)
    out["many lines"] = measure(tip, "\\n".join(names * 5), sw // 2, sh // 2)
    window.close()
    root.destroy()
    print(json.dumps(out))
    """
)


def run_tooltips(display: str, names: list[str]) -> dict[str, Any]:  # noqa: F811
    env = dict(os.environ, DISPLAY=display, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", TOOLTIPS, json.dumps(names)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"the process died ({proc.returncode}):\n{proc.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_hover_over_a_message_to_1000_members_fits_on_the_screen(
    display: str,  # noqa: F811
) -> None:
    """audit7 N9: "✓✓ 1000 of 1000" named every member in one unwrapped
    line; X refused a pixmap that wide and the window died at the hover."""
    out = run_tooltips(display, LONG_NAMES)
    screen_w, screen_h = out["screen"]
    hover = out["hover"]
    assert isinstance(hover, str)
    assert f"1000 of 1000 have it: {name_list(LONG_NAMES)}" in hover
    assert f"and {1000 - NAMES_SHOWN} more" in hover and LONG_NAMES[NAMES_SHOWN] not in hover
    for case in ("window", "one line", "one word", "many lines"):
        shown = out[case]
        assert isinstance(shown, dict)
        width, height = shown["req"]
        assert 0 < width <= screen_w and 0 < height <= screen_h, (case, shown["req"])
        x, y = shown["at"]
        assert 0 <= x and x + width <= screen_w, (case, shown["at"], shown["req"])
        assert 0 <= y and y + height <= screen_h, (case, shown["at"], shown["req"])
    assert out["window"]["shown"] == hover
    assert str(out["one word"]["shown"]).endswith("\u2026")


def test_a_list_of_names_names_the_first_few_and_counts_the_rest() -> None:
    assert name_list([]) == ""
    assert name_list(["bob", "carol"]) == "bob, carol"
    names = [f"u{n}" for n in range(NAMES_SHOWN + 381)]
    assert name_list(names) == ", ".join(names[:NAMES_SHOWN]) + " and 381 more"
    assert name_list(names[:NAMES_SHOWN]) == ", ".join(names[:NAMES_SHOWN])


@pytest.fixture
def app(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(None, monkeypatch)


def test_an_add_that_changed_nothing_names_the_first_few_members(app: Gui) -> None:
    """The line for an Add of 1,000 members already there is bounded too."""
    from client_core import GroupUnchanged

    window = app.window(server="127.0.0.1:9")
    window.groups.handle(GroupUnchanged("big", tuple(LONG_NAMES), ""))
    pump(app.root, 0.1)
    conv = window.conversations["#big"]
    text = conv.lines[-1].text
    assert text.startswith(name_list(LONG_NAMES)) and text.endswith("are members of #big already")
    assert isinstance(conv.lines[-1], Line)
