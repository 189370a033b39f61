"""The client's programs as a person starts them: without tkinter (Debian
ships it as python3-tk) the window programs say so in one line and exit 2,
never with a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

#: Runs `main` of a module as if tkinter were not installed.
WITHOUT_TK = (
    "import sys; sys.modules['tkinter'] = None; import {module}; sys.exit({module}.main({argv!r}))"
)


@pytest.mark.parametrize(
    ("module", "argv", "prog"),
    [("client_demo", [], "chat-demo"), ("chat_client", ["--user", "alice"], "chat-client")],
)
def test_window_programs_without_tkinter_say_so_in_one_line(
    module: str, argv: list[str], prog: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TK.format(module=module, argv=argv)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: no window without tkinter")
    assert "python3-tk" in lines[0]
