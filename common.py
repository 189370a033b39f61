"""What the server and the client both need: the one module both sides import.

Every other module belongs to one side (`chat_server.py` and `server_*`,
`chat_client.py`, `client_core.py` and `client_*`) and never imports the
other side, so each can change without breaking the other. The helpers here
were copied on both sides before: where the app keeps its data and
settings, the lock that keeps a second process out of a store, the
packing of unsigned 64-bit ids into SQLite's signed integers, the server
address and port, and the argparse types that refuse out-of-range numbers.
Standard library only; no sockets, threads or clocks.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

APP_DIR = "udp-chat"
DEFAULT_PORT = 5555
#: The release, as `--version` prints it: the same as pyproject.toml's
#: `version` (a test keeps them equal), so a run from a clone without an
#: install says it too.
__version__ = "0.1.0"


# --- words for people -----------------------------------------------------------


def size_text(size: int) -> str:
    """A size for people: `812 bytes`, `40 KiB`, `10.0 MiB` (the server's
    words for a group held back, the client's lines and hovers)."""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size // 1024} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


# --- directories --------------------------------------------------------------


def data_dir() -> Path:
    """The user's data directory for this app (XDG, %LOCALAPPDATA%, macOS):
    the server keeps its store under `server/`, the client under `client/`."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / APP_DIR


def config_dir() -> Path:
    """The user's config directory for this app (XDG, %APPDATA%, macOS)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / APP_DIR


# --- the file lock --------------------------------------------------------------


class LockHeld(Exception):
    """Another process holds the lock on this file (the message is its path)."""


def lock_file(path: Path) -> IO[bytes]:
    """Hold an exclusive lock on `path` for the life of the returned file,
    or raise `LockHeld`."""
    handle = open(path, "a+b")  # noqa: SIM115 - kept open: the lock lives with it
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise LockHeld(str(path)) from None
    return handle


# --- integers in SQLite -------------------------------------------------------


def i64(value: int) -> int:
    """SQLite integers are signed 64-bit: store a u64 (an instance id) as i64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def u64(value: int) -> int:
    """The u64 that `i64` stored."""
    return value + (1 << 64) if value < 0 else value


# --- addresses ----------------------------------------------------------------


def format_address(host: str, port: int) -> str:
    """host:port as a person can paste it back into `--server`: an IPv6
    address in brackets (`[::1]:5556`), as `parse_server` reads it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_address(host: str, port: int) -> str:
    """One spelling of a resolved address, for naming what belongs to a
    server: an IPv4-mapped IPv6 address as IPv4, IPv6 compressed and in
    brackets (`[::1]:5555`). A host that is not an address stays as given."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return format_address(host, port)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return format_address(str(ip), port)


def parse_server(text: str) -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port); ValueError with a reason."""
    text = text.strip()
    if not text:
        raise ValueError("the server address is empty")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{port_text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range: a port is 1 to 65535")
    if not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if ":" in host and not _is_ipv6(host):
        # A name has no colon: two addresses typed into one field
        # ("127.0.0.1:5588127.0.0.1:5555") were tried as an IPv6 host and
        # "did not answer", which sent the person looking for the server.
        raise ValueError(f"{text!r} is not HOST:PORT (an IPv6 address goes in brackets: "
                         "[::1]:5555)")  # fmt: skip
    return host, port


def _is_ipv6(host: str) -> bool:
    """An IPv6 address, with or without a zone (`fe80::1%eth0`)."""
    try:
        ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return False
    return True


#: How many servers a client's list may name: a cluster's nodes, not a
#: directory; each one is resolved at login.
MAX_SERVERS = 16


def parse_servers(text: str) -> list[tuple[str, int]]:
    """'A[,B...]' (each as `parse_server` reads it) -> the servers in order,
    a repeated one kept once; ValueError naming the entry that is wrong."""
    servers: list[tuple[str, int]] = []
    entries = text.split(",")
    if len(entries) > MAX_SERVERS:
        raise ValueError(f"{len(entries)} servers listed; at most {MAX_SERVERS}")
    for number, entry in enumerate(entries, 1):
        if not entry.strip():
            if len(entries) == 1:
                raise ValueError("the server address is empty")
            raise ValueError(f"server {number} of {len(entries)} in the list is empty")
        try:
            server = parse_server(entry)
        except ValueError as exc:
            if len(entries) == 1:
                raise
            raise ValueError(f"server {number} of {len(entries)}: {exc}") from None
        if server not in servers:
            servers.append(server)
    return servers


def format_servers(servers: list[tuple[str, int]]) -> str:
    """A server list as `parse_servers` reads it back: `A,B`."""
    return ",".join(format_address(host, port) for host, port in servers)


# --- argparse types -------------------------------------------------------------
# Numbers that must lie in a range are refused by the parser ("error:
# argument --x: ...", exit status 2) instead of starting a program that
# cannot work (a session timeout of -5 s expires every login at once).


def _number(text: str) -> float:
    """A finite float: argparse's `float` takes "nan" and "inf", which would
    make every timer or rate comparison false or true for ever."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive(text: str) -> float:
    """An argparse type: a finite number above 0 (a timeout, a rate)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return parse
