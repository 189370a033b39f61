"""The benchmark of the relay server: `python -m bench` (see bench/README.md).

Stdlib only. `run.py` starts real server processes (`chat_server.py`) and a
bare forwarding loop (`bare_relay.py`), drives them with load clients in
several processes (`loadgen.py`), and prints a table plus the same figures
as JSON under `bench/results/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
