"""Tk is touched on the main thread only, in the tests too: a Tk object a
test leaves in a reference cycle must not be freed by a collection that
another thread of the test process runs (a server thread, a session's
network thread). There a Tk variable's __del__ calls Tcl from the wrong
thread, and freeing the interpreter aborts the process; an xdist worker
died so in test_health_view. `tests.conftest.tk_freed_on_the_main_thread`
fails a test on the display that leaves one (`tk_left_in_cycles` names and
frees them on the main thread), with automatic collection left on while
the test runs, so that a product cycle of that kind can break a test."""

from __future__ import annotations

import gc
import tkinter as tk
import weakref

from tests.conftest import tk_left_in_cycles
from tests.xvfb import display  # noqa: F401 (a fixture)


def test_a_tk_variable_left_in_a_cycle_is_named_and_freed_on_this_thread(
    display: str,  # noqa: F811
) -> None:
    assert gc.isenabled(), "automatic collection stays on during a test on the display"
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
    left = tk_left_in_cycles()
    assert "tkinter.StringVar" in left and "tkinter.Tk" in left, left
    assert freed() is None, "freed by that collection, here"
    assert interp.call("info", "exists", name) in (0, "0"), "its __del__ ran: unset in Tcl"


def test_a_root_destroyed_and_dropped_leaves_nothing(display: str) -> None:  # noqa: F811
    root = tk.Tk()
    root.withdraw()
    variable = tk.StringVar(root, "x")
    label = tk.Label(root, textvariable=variable)
    label.pack()
    root.update()
    root.destroy()
    del root, variable, label
    assert tk_left_in_cycles() == []
