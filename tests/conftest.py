"""Shared fixtures: a real server on an ephemeral port (in a thread or as a
process) with its own data directory, short loopback timers, a home of its
own for every test (so clients never touch the real user's data), and
helpers to read session events."""

from __future__ import annotations

import gc
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# No wall-clock judgement of a property test (a test's own @settings may
# still ask for one): on a machine at load average 30+ generating inputs is
# slow, and hypothesis's deadline and too_slow health check then fail tests
# about something else (test_fanout_chunk did so at load 38).
settings.register_profile(
    "suite", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
settings.load_profile("suite")
# CI runs each landing once, so it replays the same examples every time
# (derandomized); runs elsewhere keep exploring new ones. A failure found
# locally is pinned as an explicit test (see test_reliability.py).
settings.register_profile("ci", parent=settings.get_profile("suite"), derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Compiled code is cached even where PYTHONDONTWRITEBYTECODE is set (some
# shells and CI images set it): without the cache every xdist worker
# rewrites and compiles all the test modules again (~3 s of CPU each, six
# workers) and every server and client process the tests start compiles
# the project's modules (~0.07 s each, hundreds of them): a fifth of the
# suite's CPU on 2 cores. The cache goes under pytest's own cache directory
# (git-ignored), not beside the sources, which is what the variable is
# usually set to avoid.
if sys.dont_write_bytecode:
    _PYCACHE = str(ROOT / ".pytest_cache" / "pycache")
    sys.pycache_prefix = _PYCACHE  # for this process (pytest's rewritten tests too)
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = _PYCACHE  # for the processes the tests start
    del os.environ["PYTHONDONTWRITEBYTECODE"]

from chat_client import ChatSession, MessageReceived  # noqa: E402
from chat_server import ChatServer, ServerConfig  # noqa: E402
from common import format_address  # noqa: E402
from server_store import MemoryStore, MessageStore, ServerStore  # noqa: E402

#: Loopback timers (docs/RELIABILITY.md: tests use 50 ms / 1 s).
RTO_MIN, RTO_MAX = 0.05, 1.0
#: RFC 7677's minimum; the real default (600,000) costs each login 0.15 s+.
TEST_ITERATIONS = 4096
#: Every test user's password unless a test says otherwise.
PASSWORD = "correct horse battery staple"
#: How long a test client's first login tries before it gives up
#: (`server_unreachable`) unless the test says otherwise: the client's own 5 s
#: ran out at load average 40+ before a starved server answered, failing
#: tests about something else. A test of the giving up sets its own.
LOGIN_TIMEOUT = 30.0


#: The slowest tests, measured (see the file's head).
SLOW_TESTS = ROOT / "tests" / "slow_tests.txt"
#: pytest-xdist workers unless `-n` says otherwise. Six on a 2-core machine:
#: many tests wait on real processes' timers (retransmissions, kill -9 and
#: restart), so waiting overlaps; measured on 2 cores: 126 s with 4 workers,
#: 106 s with 6, 108 s with 8.
WORKERS = 6
#: Tests handed to a worker at a time unless `--maxschedchunk` says
#: otherwise: two, in the order `pytest_collection_modifyitems` sets (the
#: slowest first); by default xdist deals out chunks of ~50 consecutive tests
#: at the start, which would give one worker all the slow ones.
SCHEDULE_CHUNK = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`WORKERS` workers, `SCHEDULE_CHUNK` tests at a time, when pytest-xdist
    is loaded and the command line does not choose: here rather than in
    pyproject's addopts, where they broke `-p no:xdist` (its options unknown
    then). Runs before xdist's own hook reads them (a conftest's hook runs
    before a plugin's of the same priority)."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return  # (a worker must not start workers of its own: that is a fork bomb)
    if config.option.numprocesses is None:
        config.option.numprocesses = WORKERS
    if config.option.maxschedchunk is None:
        config.option.maxschedchunk = SCHEDULE_CHUNK


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest tests first (tests/slow_tests.txt), the others after them
    in their usual order: with `--maxschedchunk 2` (`SCHEDULE_CHUNK`) xdist hands
    them out two at a time as workers come free, so the long ones overlap at
    the start and the run ends on short ones. Every worker sorts the same
    collection by the same file, so their orders agree (xdist checks)."""
    seconds: dict[str, float] = {}
    for line in SLOW_TESTS.read_text("utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            taken, node_id = line.split(None, 1)
            seconds[node_id] = float(taken)
    items.sort(key=lambda item: -seconds.get(item.nodeid, 0.0))  # stable: the rest keep order


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection built (every test module, hypothesis, tkinter, the
    project's modules: ~100,000 objects that live as long as the process)
    is moved out of the collector's sight (`gc.freeze`): otherwise every
    full collection walks all of it again, ~0.06 s each, and the suite
    runs hundreds of them (each GUI test's `tk_left_in_cycles` runs two,
    the interpreter more on its own). What a test creates is still
    collected and still seen by `tk_left_in_cycles`."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """HOME and XDG_* of this test only (child processes inherit them), and
    the default password in CHAT_PASSWORD for terminal clients."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("CHAT_PASSWORD", PASSWORD)
    return home


def tk_left_in_cycles() -> list[str]:
    """Collect here (on the calling thread) and name the Tk objects that only
    a collection could free: roots and interpreters, variables and images in
    reference cycles or kept only by one (a root held by its widgets' cycles:
    a widget kept as its parent's attribute). They are freed here, on this
    thread.

    Such an object is a hazard wherever automatic collection runs: it is
    freed by whichever thread runs the collector next, a server or network
    thread of the process. There a Tk variable's __del__ calls Tcl from the
    wrong thread, and freeing the last reference to an interpreter (a Tk root
    in a cycle) aborts the process ("Tcl_AsyncDelete: async handler deleted
    by the wrong thread"): an xdist worker died so in test_health_view's
    real-link test, freeing the root the test before it had left in a cycle.
    Widgets alone are not named: they hold no Tcl state of their own, and
    reach the interpreter only through their root."""
    import tkinter
    from _tkinter import TkappType

    hazards = (tkinter.Tk, tkinter.Variable, tkinter.Image, TkappType)
    debug = gc.get_debug()
    gc.set_debug(debug | gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [obj for obj in gc.garbage if isinstance(obj, hazards)]
        names = sorted(f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in found)
    finally:
        gc.set_debug(debug)
        saved = list(gc.garbage)
        gc.garbage.clear()
    del found
    del saved  # the cycles are whole again, and garbage: freed by the next collection,
    gc.collect()  # this one, on this thread
    return names


@pytest.fixture(autouse=True)
def tk_freed_on_the_main_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a test on the X display: at its end, a collection on this (the
    main, Tk's) thread, which fails the test if it left a Tk root, variable
    or image in a reference cycle (`tk_left_in_cycles`): the test after it
    would otherwise have it freed by whichever thread collects next.
    Automatic collection stays on while a test runs, so a product cycle that
    leaves a Tk object to a network thread's collection still breaks a test
    (it was turned off before, which hid that bug class)."""
    if "display" not in request.fixturenames:
        yield
        return
    yield
    left = tk_left_in_cycles()
    assert not left, (
        f"the test left {left} in reference cycles: break them (destroy the root, drop the "
        "references) so that no other thread's collection frees them"
    )


def test_config(data_dir: Path | None, **overrides: Any) -> ServerConfig:
    """A server configuration for loopback tests (fast timers, cheap PBKDF2)."""
    options: dict[str, Any] = {
        "rto_min": RTO_MIN, "rto_max": RTO_MAX, "iterations": TEST_ITERATIONS,
        "data_dir": data_dir,
        # In-process servers keep to one process (tests count their file
        # descriptors and processes); tests of the worker pool ask for it.
        "key_workers": 0,
    }  # fmt: skip
    options.update(overrides)
    return ServerConfig(**options)


class RunningServer:
    def __init__(self, server: ChatServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.address = server.address
        self.relay = server.relay

    @property
    def addr_text(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


def start_server(config: ServerConfig | None = None) -> RunningServer:
    """A server thread; without a config it keeps everything in memory."""
    config = config or test_config(None)
    server = ChatServer(("127.0.0.1", 0), config)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="test-server")
    thread.start()
    return RunningServer(server, thread)


def stop_server(running: RunningServer) -> None:
    running.server.shutdown()
    running.thread.join(5)
    running.server.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server in a thread of this process, on a free port, with a data
    directory (SQLite) of its own."""
    running = start_server(test_config(tmp_path / "server-data"))
    yield running
    stop_server(running)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MessageStore]:
    """Each implementation of the store seam in turn: the same relay
    scenarios run on `MemoryStore` and on SQLite (`ServerStore`)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        yield disk
    finally:
        disk.close()


class ServerProcess:
    def __init__(
        self, proc: subprocess.Popen[str], host: str, port: int, ready_line: str = ""
    ) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.ready_line = ready_line  # what it printed once ready

    @property
    def addr_text(self) -> str:
        return format_address(self.host, self.port)


def spawn_server(
    *extra: str, data_dir: Path, port: int = 0, key_workers: int | None = 0
) -> ServerProcess:
    """`python chat_server.py` as a real process; waits for its ready line.

    `key_workers` is its `--key-workers` (None: the server's default). 0 by
    default: registrations' key exchanges on its loop, since a worker is one
    more Python process to start (~0.1 s of CPU) for every server that
    registers a user, a hundred servers in the suite. test_relay's
    `test_terminal_flow_end_to_end` runs with the default workers and checks
    they ran; test_security's `test_server_registers_through_its_process_pool`
    and tests/test_keyx.py test the pool itself."""
    if key_workers is not None and "--key-workers" not in extra:
        extra = ("--key-workers", str(key_workers), *extra)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "chat_server.py"), "--port", str(port),
         "--rto-min", str(RTO_MIN), "--rto-max", str(RTO_MAX), "--log-level", "warning",
         "--data-dir", str(data_dir), "--pbkdf2-iterations", str(TEST_ITERATIONS), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    # host:port, or [v6]:port as a client takes it back
    match = re.search(r"listening on (?:\[([^\]\s]+)\]|(\S+?)):(\d+)", line)
    if not match:
        proc.kill()
        raise AssertionError(
            f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return ServerProcess(proc, match.group(1) or match.group(2), int(match.group(3)), line)


def stop_process(running: ServerProcess) -> None:
    if running.proc.poll() is None:
        running.proc.terminate()
        try:
            running.proc.wait(5)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait(5)
    for stream in (running.proc.stdout, running.proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    running = spawn_server(data_dir=tmp_path / "server-data")
    yield running
    stop_process(running)


def client_command(*args: str) -> list[str]:
    """A terminal client's command line (a `--login-timeout` in `args` wins)."""
    return [sys.executable, str(ROOT / "chat_client.py"), "--no-gui", "--rto-min", str(RTO_MIN),
            "--rto-max", str(RTO_MAX), "--login-timeout", str(LOGIN_TIMEOUT), *args]  # fmt: skip


def make_session(**kwargs: Any) -> ChatSession:
    """A ChatSession with loopback timers; log in with
    `session.login(addr, name, peer, password=PASSWORD)`."""
    kwargs.setdefault("rto_min", RTO_MIN)
    kwargs.setdefault("rto_max", RTO_MAX)
    kwargs.setdefault("login_timeout", LOGIN_TIMEOUT)
    return ChatSession(**kwargs)


def wait_for(session_or_queue: Any, predicate: Any, timeout: float = 10.0) -> Any:
    """The first event on the session's queue matching `predicate`; others are
    kept in the returned list attribute `seen` of the session (for later checks)."""
    events: queue.Queue[Any] = getattr(session_or_queue, "events", session_or_queue)
    deadline = time.monotonic() + timeout
    seen = getattr(session_or_queue, "seen_events", None)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting; saw {seen[-10:] if seen else 'n/a'}")
        try:
            event = events.get(timeout=remaining)
        except queue.Empty:
            continue
        if seen is not None:
            seen.append(event)
        if isinstance(event, MessageReceived) and isinstance(session_or_queue, ChatSession):
            session_or_queue.shown(event.id)  # taken by the test: shown, so receipted
        if predicate(event):
            return event


def env_for_tests() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
