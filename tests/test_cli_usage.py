"""The programs' command lines as a person uses them (issue 16): `--version`,
usage errors, IPv6 addresses in pasteable form, the start-up line, and the
terminal client's own `/commands`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip


def test_version_constant_is_pyprojects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert common.__version__ == project["version"]


@pytest.mark.parametrize(
    ("script", "prog"),
    [("chat_server.py", "chat-server"), ("chat_client.py", "chat-client"),
     ("client_demo.py", "chat-demo")],
)  # fmt: skip
def test_version_flag_prints_program_and_version(script: str, prog: str) -> None:
    done = run(script, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{prog} {common.__version__}\n"
