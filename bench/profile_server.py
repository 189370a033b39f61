"""Run the real server (`chat_server.main`) under cProfile.

    python bench/profile_server.py --profile-out FILE [chat_server options...]

The socket loop (the main thread) is profiled into FILE and the SQLite store
thread into FILE.store (cProfile sees one thread at a time, so the store's
`_run` is wrapped here; the server's code is not changed). The stats are
written when the server stops (SIGTERM or SIGINT). `python -m bench
--profile` runs the 16-pair load against this and prints the top functions.

With PROFILE_CLOCK=cpu in the environment each thread is timed by its own
CPU time (`time.thread_time`, a system call per event: slower, but a
machine shared with other work no longer shows as time spent in `poll`,
`sendto` or a lock); the default is the wall clock.
"""

from __future__ import annotations

import cProfile
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chat_server
import server_store


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--profile-out" not in args:
        print("usage: profile_server.py --profile-out FILE [chat_server options]", file=sys.stderr)
        return 2
    at = args.index("--profile-out")
    out = Path(args[at + 1])
    del args[at : at + 2]

    clock = time.thread_time if os.environ.get("PROFILE_CLOCK") == "cpu" else time.perf_counter
    store_profile = cProfile.Profile(clock)
    original_run = server_store.ServerStore._run

    def profiled_run(self: server_store.ServerStore) -> None:
        store_profile.runcall(original_run, self)

    server_store.ServerStore._run = profiled_run  # type: ignore[method-assign]
    loop_profile = cProfile.Profile(clock)
    try:
        code: int = loop_profile.runcall(chat_server.main, args)
    finally:
        loop_profile.dump_stats(str(out))
        store_profile.dump_stats(str(out) + ".store")
    return code


if __name__ == "__main__":
    sys.exit(main())
