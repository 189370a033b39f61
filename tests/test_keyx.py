"""The server's key-exchange worker processes (`server_keyx`): right answers,
a dead worker fails only its own requests and is replaced, and no worker
outlives its server, however the server ends."""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import DH_PRIVATE_BITS, FFDHE2048_P, dh_public, dh_secret
from server_keyx import MAX_PENDING, Busy, KeyExchangeWorkers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workers() -> Iterator[KeyExchangeWorkers]:
    pool = KeyExchangeWorkers(2)
    yield pool
    pool.shutdown()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"worker {pid} is still running"
        time.sleep(0.05)


def test_answers_match_the_computation_in_process(workers: KeyExchangeWorkers) -> None:
    private = secrets.randbits(DH_PRIVATE_BITS)
    peers = [dh_public(secrets.randbits(DH_PRIVATE_BITS)) for _ in range(6)]
    invalid = [(1).to_bytes(256, "big"), (FFDHE2048_P - 1).to_bytes(256, "big")]
    futures = [workers.submit(dh_secret, private, peer) for peer in peers + invalid]
    results = [f.result(timeout=30) for f in futures]
    assert results == [dh_secret(private, peer) for peer in peers] + [None, None]
    with pytest.raises(TypeError):
        workers.submit(pow, 2, b"")  # type: ignore[arg-type]


def test_a_killed_worker_fails_its_requests_and_is_replaced(workers: KeyExchangeWorkers) -> None:
    private = secrets.randbits(DH_PRIVATE_BITS)
    peer = dh_public(secrets.randbits(DH_PRIVATE_BITS))
    assert workers.submit(dh_secret, private, peer).result(timeout=30) is not None
    (worker,) = workers._workers
    worker.proc.kill()
    worker.proc.wait()
    try:
        doomed = workers.submit(dh_secret, private, peer)
    except concurrent.futures.BrokenExecutor:
        pass  # noticed at submit: as good
    else:
        try:
            doomed.result(timeout=30)
        except concurrent.futures.BrokenExecutor:
            pass  # the request was lost with the worker, and said so
    # The next request goes to a new worker.
    assert workers.submit(dh_secret, private, peer).result(timeout=30) == dh_secret(private, peer)
    assert all(w.alive for w in workers._workers)
    workers.shutdown()
    with pytest.raises(RuntimeError):
        workers.submit(dh_secret, private, peer)


@pytest.mark.parametrize("ending", ["sigkill", "exit"])
def test_workers_do_not_outlive_their_server(ending: str) -> None:
    """A server killed with SIGKILL closes nothing itself: its workers must
    still go (they exit at the end of their stdin)."""
    script = textwrap.dedent(
        f"""
        import os, secrets, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from server_keyx import KeyExchangeWorkers
        from protocol import dh_public, dh_secret
        pool = KeyExchangeWorkers(2)
        pool.submit(dh_secret, 12345, dh_public(678)).result(timeout=30)
        print(pool._workers[0].proc.pid, flush=True)
        sys.stdin.readline()  # the test has seen the worker alive
        if {ending!r} == "exit":
            os._exit(0)  # no shutdown() either
        time.sleep(60)
        """
    )
    server = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        worker_pid = int(server.stdout.readline())
        # The server waits for our word before it ends: under load an exit
        # right after the print could take the worker with it before this
        # check (as it should), and the test read that as a worker never there.
        assert alive(worker_pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        if ending == "sigkill":
            server.send_signal(signal.SIGKILL)
        server.wait(30)
        wait_gone(worker_pid)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
        if server.stdin is not None:
            server.stdin.close()


def test_a_full_queue_says_busy_instead_of_blocking(workers: KeyExchangeWorkers) -> None:
    """At most MAX_PENDING requests wait per worker, so a request never
    waits for room in the pipe (the caller is the server's loop): with the
    workers stopped, the next one raises Busy at once; resumed, they answer
    everything they took."""
    private = secrets.randbits(DH_PRIVATE_BITS)
    peer = dh_public(secrets.randbits(DH_PRIVATE_BITS))
    first = [workers.submit(dh_secret, private, peer) for _ in range(2)]  # one per worker
    pids = [w.proc.pid for w in workers._workers]
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        taken = []
        with pytest.raises(Busy):  # after at most 2 x MAX_PENDING taken, never blocking
            for _ in range(2 * MAX_PENDING + 1):
                taken.append(workers.submit(dh_secret, private, peer))
        assert len(taken) >= 2 * MAX_PENDING - 2
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    expected = dh_secret(private, peer)
    assert all(f.result(timeout=60) == expected for f in first + taken)
