"""`chat-demo`: a private server on a free port and two windows, alice
(talking to bob) and bob, side by side and logged in.

The one module that imports both sides: it runs a `chat_server.ChatServer`
in a thread of its own process, with its own data directory and demo
accounts (never the user's), and opens two `client_window.ChatWindow`s whose
sessions are `chat_client.ChatSession`s. Without a display it prints one
line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from chat_client import ChatSession
from chat_server import ChatServer
from common import __version__
from server_records import ServerConfig

if TYPE_CHECKING:
    from client_window import ChatWindow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chat-demo",
        description="Start a private chat server on a free port and two windows, alice "
        "(talking to bob) and bob, side by side and logged in.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:  # tkinter is a package of its own on Debian (python3-tk)
        import tkinter as tk

        from client_window import ChatWindow, Settings, open_root
    except ImportError as exc:
        print(f"chat-demo: no window without tkinter ({exc}); install python3-tk",
              file=sys.stderr)  # fmt: skip
        return 2
    root = open_root("chat-demo")
    if root is None:
        return 2
    root.withdraw()
    # Its own server, data and demo accounts: never the user's.
    workdir = tempfile.TemporaryDirectory(prefix="chat-demo-")
    # One process: the two registrations' key exchanges run on the server's loop.
    server = ChatServer(
        ("127.0.0.1", 0), ServerConfig(data_dir=Path(workdir.name) / "server", key_workers=0)
    )
    serving = threading.Thread(target=server.serve_forever, daemon=True, name="demo-server")
    serving.start()
    host, port = server.address
    width = max(560, min(760, root.winfo_screenwidth() // 2 - 20))
    height = max(420, min(620, root.winfo_screenheight() - 120))
    windows: list[ChatWindow] = []

    def closed(window: ChatWindow) -> None:
        windows.remove(window)
        if not windows:
            root.quit()

    for i, (user, peer) in enumerate((("alice", "bob"), ("bob", ""))):
        settings = Settings(server=f"{host}:{port}", username=user,
                            geometry=f"{width}x{height}+{10 + i * (width + 20)}+40")  # fmt: skip
        options = {"store_root": Path(workdir.name) / "client"}
        window = ChatWindow(
            tk.Toplevel(root), settings, session_factory=ChatSession, session_options=options,
            on_closed=closed,
        )  # fmt: skip
        window.connect_var.set(peer)
        window.password_var.set(f"{user}-demo-password")
        window.submit_login()
        windows.append(window)
    print(f"chat-demo: server on {host}:{port}; close both windows to stop", file=sys.stderr)

    def stop(signum: int, frame: object) -> None:
        # From a signal handler only schedule: Tk is touched on its own loop.
        root.after(0, root.quit)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        root.mainloop()
    except KeyboardInterrupt:
        pass
    finally:
        for window in list(windows):
            window.close()  # logs out
        server.shutdown()
        serving.join(5)
        server.close()
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
