"""The layout rules, read from the code with `ast` (README, "Architecture").

`protocol.py`, `chat_server.py` and `chat_client.py` are the heads; every
other top-level module says its side in its name (`server_*`, `client_*`)
or is shared (`protocol`, `reliability`, `common`). No server module
imports a client module or the reverse, except `client_demo`, which starts
a server beside two windows; the client's parts never import its head;
there is no import cycle; and the documents the code cites are in the
repository.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHARED = {"protocol", "reliability", "common"}
BOTH_SIDES = {"client_demo"}  # the demo runs a server and two windows in one process


def modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(ROOT.glob("*.py"))}


def imports(path: Path, project: set[str]) -> set[str]:
    """The project's modules `path` imports anywhere: at the top, inside a
    function (a lazy import closes a cycle just the same) or for typing."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & project


def side(module: str) -> str | None:
    if module in SHARED:
        return "shared"
    if module == "chat_server" or module.startswith("server_"):
        return "server"
    if module == "chat_client" or module.startswith("client_"):
        return "client"
    return None


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def test_every_module_says_its_side() -> None:
    unnamed = [name for name in modules() if side(name) is None]
    assert not unnamed, f"name these server_* or client_* (or make them shared): {unnamed}"


def test_no_import_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for other in sorted(edges[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])


def test_no_side_imports_the_other() -> None:
    wrong = []
    for name, imported in graph().items():
        if name in BOTH_SIDES:
            continue
        mine = side(name)
        for other in sorted(imported):
            theirs = side(other)
            if mine == "shared" and theirs != "shared":
                wrong.append(f"{name} (shared) imports {other} ({theirs})")
            elif {mine, theirs} == {"server", "client"}:
                wrong.append(f"{name} ({mine}) imports {other} ({theirs})")
            elif other in BOTH_SIDES:
                wrong.append(f"{name} imports {other}, which imports both sides")
    assert not wrong, "\n".join(wrong)


def test_the_clients_parts_do_not_import_its_head() -> None:
    wrong = [
        name
        for name, imported in graph().items()
        if name.startswith("client_") and name not in BOTH_SIDES and "chat_client" in imported
    ]
    assert not wrong, f"import chat_client: {wrong} (take what you need as an argument)"


def test_the_shared_module_is_standard_library_only() -> None:
    found = modules()
    assert imports(found["common"], set(found)) == set()


def test_documents_the_code_cites_are_in_the_repository() -> None:
    """A comment naming `X.md` names a file of this repository, by its path
    from the root, and nothing points outside it."""
    missing = []
    here = Path(__file__).resolve()  # which names what it looks for
    sources = [
        p
        for p in ROOT.rglob("*.py")
        if p != here and not {".git", ".venv", "artifacts"} & set(p.relative_to(ROOT).parts)
    ]
    for path in sources:
        text = path.read_text("utf-8")
        where = path.relative_to(ROOT)
        for cited in sorted(set(re.findall(r"[\w./-]*\w\.md\b", text))):
            if not (ROOT / cited).is_file():
                missing.append(f"{where}: {cited}")
        for outside in ("/work/", "shared/"):
            if outside in text:
                missing.append(f"{where}: {outside}")
    assert not missing, "\n".join(missing)
