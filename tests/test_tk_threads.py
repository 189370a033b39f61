"""Tk is touched on the main thread only, in the tests too: a Tk object a
test leaves in a reference cycle must not be freed by a collection that
another thread of the test process runs (a server thread, a session's
network thread). There a Tk variable's __del__ calls Tcl from the wrong
thread, and freeing the interpreter aborts the process; an xdist worker
died so in test_health_view. `tests.conftest.tk_freed_on_the_main_thread`
collects such cycles on the main thread at the end of each test on the
display, and no other thread collects while one runs."""

from __future__ import annotations

import gc
import threading
import tkinter as tk
import weakref

from tests.xvfb import display  # noqa: F401 (a fixture)


def test_tk_objects_in_a_cycle_are_not_freed_by_another_threads_collection(
    display: str,  # noqa: F811
) -> None:
    root = tk.Tk()
    root.withdraw()
    interp = root.tk  # the interpreter stays referenced here: freeing it on a thread would abort
    variable = tk.StringVar(root, "x")
    root.variable = variable  # type: ignore[attr-defined]  # a cycle through the root
    variable.root = root  # type: ignore[attr-defined]
    root.destroy()
    name = str(variable)
    freed = weakref.ref(variable)
    del root, variable
    assert freed() is not None, "in a cycle: only a collection frees it"

    def allocate() -> None:
        """What a server thread does all the time: make container objects
        that live a while, which is what starts an automatic collection."""
        kept: list[list[int]] = [[] for _ in range(100_000)]
        del kept

    worker = threading.Thread(target=allocate, name="not-tk")
    worker.start()
    worker.join()
    assert freed() is not None, "a collection on another thread freed a Tk variable"
    gc.collect()  # here, on the main thread: Variable.__del__ unsets it in Tcl
    assert freed() is None
    assert interp.call("info", "exists", name) in (0, "0")
