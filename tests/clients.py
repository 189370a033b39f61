"""Client wrappers and event helpers for tests: `RecordingClient` (a
`ChatSession` plus everything it reported, pumped from the test's thread),
and helpers to drain event queues and to wait for conditions."""

from __future__ import annotations

import queue
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from chat_client import (
    ChatSession,
    Disconnected,
    ErrorEvent,
    LinkChanged,
    LoggedIn,
    MessageReceived,
    PresenceChanged,
    StatusChanged,
    WhoList,
)
from tests.conftest import PASSWORD, make_session


def drain(events: queue.Queue[Any], timeout: float = 0.0) -> Iterator[Any]:
    """The events waiting on `events` (blocking up to `timeout` for the first)."""
    first = True
    while True:
        try:
            if timeout and first:
                event = events.get(timeout=timeout)
            else:
                event = events.get_nowait()
        except queue.Empty:
            return
        first = False
        yield event


def pump_until(
    pump: Callable[[float], object],
    condition: Callable[[], bool],
    timeout: float,
    poll: float,
    failure: Callable[[], str],
) -> None:
    """Call `pump(step)` (step at most `poll`) until `condition()` holds;
    after `timeout` seconds raise AssertionError(`failure()`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(failure())
        pump(min(remaining, poll))


class RecordingClient:
    """A `ChatSession` plus everything it reported, sorted for the checks."""

    #: How long `close()` (and `close_all`'s logout) waits by default.
    close_timeout = 5.0
    #: The longest a `wait()` blocks on the queue before looking at its condition again.
    wait_poll = 0.1
    #: Every client alive: while a test waits on one, the others' events are
    #: taken too, as each one's own front end would (a received message is
    #: receipted only once it is taken, so a sender waiting for `delivered`
    #: needs the recipient's events read).
    live: ClassVar[weakref.WeakSet[RecordingClient]] = weakref.WeakSet()

    def __init__(self, name: str, **kwargs: Any) -> None:
        RecordingClient.live.add(self)
        self.name = name
        #: Take each received message as shown (False: a front end that dies
        #: before it shows anything).
        self.shows = True
        self.session: ChatSession = make_session(**kwargs)
        self.started = False
        self.events: list[Any] = []
        self.received: list[MessageReceived] = []
        self.states: dict[str, list[str]] = defaultdict(list)
        self.reasons: dict[str, str | None] = {}
        self.order: dict[str, list[str]] = defaultdict(list)  # state -> ids in event order
        self.errors: list[ErrorEvent] = []
        self.presence: list[PresenceChanged] = []
        self.who_lists: list[WhoList] = []
        self.links: list[tuple[float, bool]] = []
        self.logins = 0
        self.disconnected: str | None = None

    @property
    def logged_in(self) -> bool:
        return self.logins > 0

    def login(
        self,
        server: tuple[str, int] | str,
        connect_to: str | None = None,
        password: str = PASSWORD,
    ) -> bool:
        self.started = True
        return self.session.login(server, self.name, connect_to, password=password)

    def pump(self, timeout: float = 0.0) -> bool:
        """Take the events waiting (or the first one within `timeout`)."""
        got = False
        for event in drain(self.session.events, timeout):
            got = True
            self.record(event)
        return got

    def record(self, event: Any) -> None:
        """Take one event; a received message counts as shown once taken
        (the test is the front end), which lets its receipt go."""
        self.events.append(event)
        if isinstance(event, MessageReceived):
            self.received.append(event)
            if self.shows:
                self.session.shown(event.id)
        elif isinstance(event, StatusChanged):
            self.states[event.id].append(event.state)
            self.order[event.state].append(event.id)
            if event.reason is not None:
                self.reasons[event.id] = event.reason
        elif isinstance(event, ErrorEvent):
            self.errors.append(event)
        elif isinstance(event, PresenceChanged):
            self.presence.append(event)
        elif isinstance(event, WhoList):
            self.who_lists.append(event)
        elif isinstance(event, LinkChanged):
            self.links.append((time.monotonic(), event.up))
        elif isinstance(event, LoggedIn):
            self.logins += 1
        elif isinstance(event, Disconnected):
            self.disconnected = event.reason

    def pump_others(self) -> None:
        for other in list(RecordingClient.live):
            if other is not self:
                other.pump()

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        def pump(step: float) -> None:
            self.pump(step)
            self.pump_others()

        pump_until(
            pump,
            condition,
            timeout,
            self.wait_poll,
            lambda: (
                f"{self.name}: timed out after {timeout} s waiting for {what or condition}; "
                f"last events {self.events[-10:]}"
            ),
        )

    def reached(self, msg_id: str, state: str) -> bool:
        return state in self.states.get(msg_id, [])

    def delivered(self, ids: list[str]) -> int:
        return sum(1 for i in ids if self.states[i][-1:] == ["delivered"])

    def texts(self) -> list[str]:
        return [m.text for m in self.received]

    def send(self, text: str, to: str | None = None) -> str:
        msg_id = self.session.send(text, to)
        assert msg_id is not None, f"{self.name} could not send {text!r}"
        return msg_id

    def close(self, timeout: float | None = None) -> None:
        """Log out (waiting for acceptances up to `timeout`, by default
        `close_timeout`) and end the thread."""
        if self.session.running:
            self.session.close(self.close_timeout if timeout is None else timeout)
        self.dispose()

    def dispose(self) -> None:
        if self.session.running:
            self.session.abort()
        if not self.started:
            self.session.discard()  # a test that failed before its login


def pump_all(clients: Sequence[RecordingClient], idle: float = 0.02) -> None:
    """Take every client's waiting events; sleep `idle` seconds if there were none."""
    if not any([c.pump() for c in clients]):
        time.sleep(idle)


def wait_all(
    clients: Sequence[RecordingClient],
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    idle: float = 0.01,
    stay_connected: bool = False,
) -> None:
    """Pump all `clients` until `condition()` holds; with `stay_connected`,
    fail as soon as one of them is disconnected."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pump_all(clients, idle)
        if stay_connected:
            for client in clients:
                assert client.disconnected is None, (
                    client.name,
                    client.disconnected,
                    client.errors,
                )


def close_all(clients: Sequence[RecordingClient]) -> None:
    """Log everyone out at once (each may wait for its logout to be acked)."""
    for client in clients:
        if client.session.running:
            client.session.logout(client.close_timeout)
    for client in clients:
        client.close()


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll `condition()` every `interval` seconds for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
