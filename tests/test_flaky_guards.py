"""Guards for checks that must hold on a busy machine yet still fail on the
bug they are about (the reviewer's findings on the load-proofed tests).

A timed benchmark phase sends what the machine's speed allows; the smoke
test of the GUI phase counts on a minimum it always reaches: `TrafficSpec`'s
`at_least`, which keeps a phase sending past its end until then."""

from __future__ import annotations

import time
from pathlib import Path

from bench.loadgen import TrafficSpec, close_clients, log_in_clients, traffic_loop
from tests.conftest import start_server, stop_server
from tests.conftest import test_config as server_config  # not a test: no test_ name here


def test_a_phase_that_starts_after_its_end_still_sends_at_least_its_minimum(
    tmp_path: Path,
) -> None:
    """A sender that first runs after the phase's end (a starved process on
    a loaded machine) sent nothing before `at_least`; now it sends exactly
    that many (paced by `rate` no more, since the time is up), and every one
    is delivered. Without `at_least` it still sends none."""
    running = start_server(server_config(tmp_path / "data", user_msg_rate=1e6, user_msg_burst=1e6))
    spec = TrafficSpec(running.address, [("s0", "r0")], ["r0"], window=64, rate=1000.0)
    senders, receivers = log_in_clients(spec)
    try:
        past = time.monotonic() - 10.0  # t0 and the end both long gone
        traffic_loop(spec, senders, receivers, past, past + 1.0)
        assert senders[0].sent == 0, "without a minimum a late phase sends nothing"

        spec.at_least = 40
        past = time.monotonic() - 10.0
        traffic_loop(spec, senders, receivers, past, past + 1.0)
        assert senders[0].sent == 40
        assert senders[0].completed == receivers[0].received == 40
    finally:
        close_clients(senders)
        close_clients(receivers)
        stop_server(running)
