"""An X display for the GUI tests: the one in $DISPLAY if it works, else a
private Xvfb on a free display number, stopped at the end of the session.

Without a working display and without Xvfb the tests FAIL (a GUI that is
never tested is not a pass): install it with `apt-get install xvfb`.

`screenshot(path)` saves a PNG of the whole screen for a person to look at
(`import -window root` from ImageMagick, else `xwd -root` + `convert`).
`window_ids(title)` and `window_geometry(id)` find the top-level windows of
any process on the display by their exact title (xdotool, else xwininfo).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCREEN = "1600x900x24"
START_TIMEOUT = 10.0
INSTALL_HINT = "install Xvfb (Debian/Ubuntu: `apt-get install xvfb`)"


def display_works(display: str) -> bool:
    """True if a Tk window can open on `display` (checked in a subprocess,
    so a broken display cannot hang or kill the test process)."""
    env = dict(os.environ, DISPLAY=display)
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import tkinter; tkinter.Tk().destroy()"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


class Xvfb:
    """A private Xvfb process on display `:number`."""

    def __init__(self, proc: subprocess.Popen[bytes], number: int, log: Path) -> None:
        self.proc = proc
        self.number = number
        self.log = log

    @property
    def display(self) -> str:
        return f":{self.number}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.unlink(missing_ok=True)


def start_xvfb(binary: str) -> Xvfb:
    """Start Xvfb on a display number it picks itself (`-displayfd`): two
    test processes starting one at once each get their own. (Choosing a
    free number here raced: the loser's Xvfb failed to start while the
    winner's socket answered, so two workers shared a display, and the
    loser's windows died with it.)"""
    fd, name = tempfile.mkstemp(prefix="xvfb-", suffix=".log")
    log = Path(name)
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(fd, "wb") as log_file:
            proc = subprocess.Popen(
                [binary, "-displayfd", str(write_end), "-screen", "0", SCREEN,
                 "-nolisten", "tcp"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                pass_fds=(write_end,),
            )  # fmt: skip
        os.close(write_end)
        write_end = -1
        answer = b""
        deadline = time.monotonic() + START_TIMEOUT
        while not answer.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], 0.1)
            if ready:
                chunk = os.read(read_end, 16)
                if not chunk:
                    break  # it exited
                answer += chunk
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if answer.strip().isdigit():
        return Xvfb(proc, int(answer), log)
    server = Xvfb(proc, -1, log)
    output = log.read_text("utf-8", "replace").strip().splitlines()
    server.stop()
    pytest.fail(f"could not start Xvfb: {output[-1] if output else 'no display number'}",
                pytrace=False)  # fmt: skip


class _Shared:
    """The process's private Xvfb, shared by every module's `display`: each
    test module imports the fixture, which makes it a fixture of its own
    per module (session-scoped, but one instance per module), and each
    started an Xvfb before, kept to the end of the session: six or seven a
    worker, each started for a few tests. The last user stops it."""

    server: Xvfb | None = None
    users = 0
    previous: str | None = None  # $DISPLAY before it


@pytest.fixture(scope="session")
def display() -> Iterator[str]:
    """The X display the GUI tests use (also set in os.environ["DISPLAY"]).
    Each pytest-xdist worker takes a private Xvfb when there is one: windows
    of two tests running at once on one display take each other's focus.
    One Xvfb a process, whichever test modules use it (`_Shared`)."""
    if _Shared.server is None:
        current = os.environ.get("DISPLAY")
        binary = shutil.which("Xvfb")
        private = "PYTEST_XDIST_WORKER" in os.environ and binary is not None
        if current and not private and display_works(current):
            yield current
            return
        if binary is None:
            why = f"DISPLAY={current!r} does not work" if current else "DISPLAY is not set"
            pytest.fail(f"the GUI tests need an X display: {why} and Xvfb is not installed; "
                        f"{INSTALL_HINT}", pytrace=False)  # fmt: skip
        _Shared.server = start_xvfb(binary)
        _Shared.previous = current
        os.environ["DISPLAY"] = _Shared.server.display
    server = _Shared.server
    _Shared.users += 1
    try:
        yield server.display
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            if _Shared.previous is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = _Shared.previous
            _Shared.server = None
            server.stop()


def screenshot(path: str | Path) -> Path | None:
    """Save a PNG of the root window to `path` (relative paths go under
    tests/artifacts/). Returns the path, or None (with a printed note) when
    no screenshot tool is installed: the test itself goes on."""
    target = Path(path)
    if not target.is_absolute():
        target = ARTIFACTS / target
    target.parent.mkdir(parents=True, exist_ok=True)
    display = os.environ.get("DISPLAY", "")
    if shutil.which("import"):
        commands = [["import", "-display", display, "-window", "root", str(target)]]
    elif shutil.which("xwd") and shutil.which("convert"):
        raw = target.with_suffix(".xwd")
        commands = [
            ["xwd", "-display", display, "-root", "-silent", "-out", str(raw)],
            ["convert", str(raw), str(target)],
        ]
    else:
        print(f"screenshot {target.name} skipped: install imagemagick (or xwd + convert)")
        return None
    try:
        for command in commands:
            subprocess.run(command, check=True, timeout=30, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"screenshot {target.name} failed: {exc}")
        return None
    finally:
        target.with_suffix(".xwd").unlink(missing_ok=True)
    return target


def _x_tool(*command: str) -> str:
    """stdout of an X client on the current display ("" if it fails)."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=15, check=False,
            env=dict(os.environ), stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout if result.returncode == 0 else ""


def window_ids(title: str) -> list[int]:
    """Ids of the windows on the display whose title is exactly `title`."""
    if shutil.which("xdotool"):
        found = _x_tool("xdotool", "search", "--name", f"^{re.escape(title)}$")
        return [int(line) for line in found.split()]
    if shutil.which("xwininfo"):
        tree = _x_tool("xwininfo", "-root", "-tree")
        quoted = f'"{title}"'
        return [int(line.split()[0], 16) for line in tree.splitlines()
                if quoted in line and line.split()[0].startswith("0x")]  # fmt: skip
    pytest.fail("finding windows needs xdotool or xwininfo (apt-get install xdotool)",
                pytrace=False)  # fmt: skip


def window_geometry(window_id: int) -> tuple[int, int, int, int]:
    """(x, y, width, height) of a window on the screen."""
    info = _x_tool("xwininfo", "-id", str(window_id))
    fields = {}
    for key in ("Absolute upper-left X", "Absolute upper-left Y", "Width", "Height"):
        match = re.search(rf"{key}:\s+(-?\d+)", info)
        assert match, f"xwininfo -id {window_id}: no {key!r} in {info!r}"
        fields[key] = int(match.group(1))
    return (fields["Absolute upper-left X"], fields["Absolute upper-left Y"],
            fields["Width"], fields["Height"])  # fmt: skip
