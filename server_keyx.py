"""Worker processes for the server's one expensive computation: the
Diffie-Hellman secret that unwraps a registration's keys (a 2048-bit modular
exponentiation, 3.7 ms of CPU holding the GIL).

Split from `chat_server.py`: done on the loop thread, every registration
would stall every session for that long, and a burst of new users would
freeze the server. `KeyExchangeWorkers` is a `concurrent.futures.Executor`
for `protocol.dh_secret` only, backed by a few child processes that each
read requests on stdin and answer on stdout, one line each:

    request:  <id> <private exponent, hex> <peer's public key, hex>
    answer:   <id> <secret, hex, or "-" for an invalid public key>

Why not `ProcessPoolExecutor`: its workers hold both ends of their queue,
so they outlive a server killed with SIGKILL, and they inherit its output.
These exit at the end of their stdin, which the kernel closes whatever
way the server ends. Workers start on the first registration, and one that
dies is replaced at the next; its unanswered requests fail with
`BrokenExecutor` (the caller then does the work itself). At most
`MAX_PENDING` requests wait per worker, so a request line always fits in
the pipe and `submit` never blocks the loop; beyond that it raises `Busy`.

`KeyExchanges` is what the relay talks to: it owns the pool, the backlog of
requests the pool cannot take yet and the queue of results coming back from
the pool's threads. The relay hands it a request and, woken, collects the
secrets on its loop (`Relay.key_exchange_done(now)`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from protocol import dh_secret

log = logging.getLogger("server_keyx")

#: Requests queued per worker at most (~0.1 s of work; 19 KB of the pipe's 64).
MAX_PENDING = 32
#: Key exchanges in the pool or its backlog at most (beyond: the registration
#: is refused as busy; ~4 s of work for 1 worker).
MAX_WAITING = 1000


class Busy(Exception):
    """Every worker has MAX_PENDING requests waiting: try again later."""


class _Worker:
    def __init__(self, on_answer: Callable[[_Worker, int, bytes | None], None]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,  # line-buffered requests
        )
        self.pending: dict[int, concurrent.futures.Future[Any]] = {}
        self.dead = False  # its reader has ended: no answer will come
        self._on_answer = on_answer
        self._reader = threading.Thread(target=self._read, name="chat-keyx", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            try:
                ident, _, value = line.strip().partition(" ")
                answer = None if value == "-" else bytes.fromhex(value)
                self._on_answer(self, int(ident), answer)
            except ValueError:
                self.proc.kill()  # not our worker talking: treat it as dead
                break
        self._on_answer(self, -1, None)  # the end: fail what is left

    def close(self) -> None:
        stdin: IO[str] | None = self.proc.stdin
        if stdin is not None:
            try:
                stdin.close()  # the worker's signal to exit
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class KeyExchangeWorkers(concurrent.futures.Executor):
    """`submit(dh_secret, private, peer_public)` -> a future of its result,
    computed in one of `workers` child processes."""

    def __init__(self, workers: int) -> None:
        self._size = max(1, workers)
        self._workers: list[_Worker] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()  # submit (the loop) vs answers (reader threads)
        self._closed = False

    def submit(  # type: ignore[override]
        self, fn: Callable[[int, bytes], bytes | None], /, private: int, peer_public: bytes
    ) -> concurrent.futures.Future[bytes | None]:
        if fn is not dh_secret:
            raise TypeError("KeyExchangeWorkers only computes protocol.dh_secret")
        with self._lock:
            dead = [w for w in self._workers if not w.alive]
            self._workers = [w for w in self._workers if w.alive]
        for gone in dead:  # outside the lock: closing waits for its reader, which takes it
            gone.close()
        future: concurrent.futures.Future[bytes | None] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            worker = self._pick()
            ident = next(self._ids)
            worker.pending[ident] = future
            try:
                assert worker.proc.stdin is not None
                worker.proc.stdin.write(f"{ident} {private:x} {peer_public.hex()}\n")
            except OSError as exc:  # it died just now
                del worker.pending[ident]
                raise concurrent.futures.BrokenExecutor(f"key exchange worker: {exc}") from None
        return future

    def _pick(self) -> _Worker:
        """The least busy live worker, starting one while below the size.
        Never one whose reader has ended (it may not be reaped yet)."""
        live = [w for w in self._workers if not w.dead]
        if len(live) < self._size and not any(not w.pending for w in live):
            try:
                worker = _Worker(self._answer)
            except OSError as exc:
                if not live:
                    raise concurrent.futures.BrokenExecutor(str(exc)) from None
            else:
                self._workers.append(worker)
                live.append(worker)
        worker = min(live, key=lambda w: len(w.pending))
        if len(worker.pending) >= MAX_PENDING:
            raise Busy(f"{len(self._workers)} workers with {MAX_PENDING} requests each")
        return worker

    def _answer(self, worker: _Worker, ident: int, secret: bytes | None) -> None:
        """From a reader thread. Futures are resolved outside the lock: their
        callbacks are the caller's."""
        lost: dict[int, concurrent.futures.Future[Any]] = {}
        with self._lock:
            if ident >= 0:
                future = worker.pending.pop(ident, None)
            else:
                worker.dead = True  # never picked again, even if not reaped yet
                future, lost, worker.pending = None, worker.pending, {}
        if future is not None:
            future.set_result(secret)
        for future in lost.values():
            future.set_exception(concurrent.futures.BrokenExecutor("a key exchange worker died"))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()  # unanswered requests fail as the reader ends


def _serve(requests: IO[str], answers: IO[str]) -> None:
    """The worker's loop: one answer line per request line, until EOF."""
    for line in requests:
        ident, private, public = line.split()
        secret = dh_secret(int(private, 16), bytes.fromhex(public))
        answers.write(f"{ident} {secret.hex() if secret is not None else '-'}\n")
        answers.flush()


if __name__ == "__main__":
    # Ctrl-C at the server's terminal reaches the workers too: the server
    # decides when they end (it closes their stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(sys.stdin, sys.stdout)


Job = tuple[int, bytes]  # dh_secret's arguments: private exponent, peer's public key
T = TypeVar("T")


class KeyExchanges(Generic[T]):
    """Diffie-Hellman secrets for the relay, away from its loop when given a
    pool (`KeyExchangeWorkers`). `request(job, tag)` queues one (False when
    `MAX_WAITING` already wait: the caller says it is busy); the pool's
    threads put results on a queue and call `wake()`; the loop collects
    them with `completed()`, as (tag, secret) in the order they came back.
    A request the pool cannot take yet waits in the backlog and goes to
    the pool as results make room; one the pool fails (shut down, or its
    worker died) is computed on the loop by `completed()`, slower but
    never lost. Without a pool, nothing is deferred (`deferred` is False):
    the caller computes secrets itself."""

    def __init__(
        self, pool: concurrent.futures.Executor | None, wake: Callable[[], None] = lambda: None,
        limit: int = MAX_WAITING,
    ) -> None:  # fmt: skip
        self._pool = pool
        self._wake = wake
        self._limit = limit
        self.waiting = 0  # requests in the pool or its backlog
        self.pooled = 0  # secrets computed by the pool
        self._backlog: collections.deque[tuple[Job, T]] = collections.deque()
        self._results: queue.SimpleQueue[tuple[Job, T, bytes | None | BaseException]] = (
            queue.SimpleQueue()
        )

    @property
    def deferred(self) -> bool:
        return self._pool is not None

    def request(self, job: Job, tag: T) -> bool:
        """Queue `dh_secret(*job)`; its result comes back with `tag`."""
        if self._pool is None:
            raise RuntimeError("no pool: compute the secret on the loop (see `deferred`)")
        if self.waiting >= self._limit:
            return False
        self.waiting += 1
        self._backlog.append((job, tag))
        self._submit()
        return True

    def _submit(self) -> None:
        assert self._pool is not None
        while self._backlog:
            job, tag = self._backlog[0]
            try:
                future = self._pool.submit(dh_secret, *job)
            except Busy:
                return  # the next result makes room (`completed` calls again)
            except (RuntimeError, concurrent.futures.BrokenExecutor) as exc:  # shut down, broken
                self._backlog.popleft()
                self._results.put((job, tag, exc))  # computed on the loop by `completed`
                continue
            self._backlog.popleft()
            future.add_done_callback(functools.partial(self._done, job, tag))

    def _done(self, job: Job, tag: T, future: concurrent.futures.Future[bytes | None]) -> None:
        """On the pool's thread: hand the result to the loop. Only the result
        travels on (a callback holding its future is a reference cycle, left
        for the rare full collections: memory per registration)."""
        try:
            result: bytes | None | BaseException = future.result()
        except BaseException as exc:  # a worker died: the loop does it itself
            result = exc
        self._results.put((job, tag, result))
        self._wake()

    def completed(self) -> list[tuple[T, bytes | None]]:
        """On the loop: the secrets back since the last call (computing here
        those the pool failed), after handing the backlog what room they made."""
        if not self.waiting:
            return []  # the usual case, on every pass of the loop: no exception raised
        done: list[tuple[T, bytes | None]] = []
        while True:
            try:
                job, tag, result = self._results.get_nowait()
            except queue.Empty:
                break
            self.waiting -= 1
            if isinstance(result, BaseException):
                log.warning("registration key exchange on the loop: the pool failed (%s)", result)
                done.append((tag, dh_secret(*job)))
            else:
                self.pooled += 1
                done.append((tag, result))
        if self._backlog:
            self._submit()
        return done
