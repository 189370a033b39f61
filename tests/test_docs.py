"""The documents stay true to the code, read with `ast` (no import, no run).

- docs/ARCHITECTURE.md: every file (`name.py`), class, function (`name()`),
  constant and `Class.member` it names in backticks exists in the code, so
  a rename that forgets the document fails here rather than misleading the
  next reader.
- README.md, "Terminal client": the error-code table lists exactly the
  `ErrorCode` members the server and the client can emit (DESIGN contract:
  "the README's table lists exactly the codes the code can emit"), and its
  fatal ones are exactly the client's fatal login errors that can happen.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs/ARCHITECTURE.md"
README = ROOT / "README.md"

IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
#: `Name`, `module.Name.member`, `function()`, `Class.method(args)`: what is checked.
CODE_NAME = re.compile(rf"({IDENTIFIER}(?:\.{IDENTIFIER})*)(\(.*\))?")


class Index:
    """What the project's modules define: per module its top-level names,
    per class its members (methods, class attributes and enum members, and
    the `self.x` attributes its methods assign)."""

    def __init__(self, paths: list[Path]) -> None:
        self.modules: dict[str, set[str]] = {}
        self.classes: dict[str, set[str]] = defaultdict(set)  # class name -> members
        self.module_classes: dict[tuple[str, str], set[str]] = {}
        self.functions: set[str] = set()  # every def, at any depth
        self.top_level: set[str] = set()  # every module's top-level names
        for path in paths:
            self._read(path)

    def _read(self, path: Path) -> None:
        tree = ast.parse(path.read_text("utf-8"), str(path))
        names: set[str] = set()
        for node in tree.body:
            names.update(_bound(node))
            if isinstance(node, ast.ClassDef):
                members = _members(node)
                self.classes[node.name] |= members
                self.module_classes[(path.stem, node.name)] = members
        for sub in ast.walk(tree):
            if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions.add(sub.name)
        self.modules[path.stem] = names
        self.top_level |= names

    def problem(self, text: str) -> str | None:
        """Why `text` (the inside of one backtick span) names nothing, or None."""
        if re.fullmatch(r"[\w./-]+\.(py|md)", text):
            return None if (ROOT / text).is_file() else "no such file"
        match = CODE_NAME.fullmatch(text)
        if match is None:
            return None  # not a name: a command line, a JSON value, ...
        parts = match.group(1).split(".")
        called = match.group(2) is not None
        if parts[0] in sys.stdlib_module_names or hasattr(builtins, parts[0]):
            return None  # `typing.Protocol`, `None`: not the project's
        if parts[0] in self.modules and len(parts) > 1:  # module.Name[.member]
            module, name, rest = parts[0], parts[1], parts[2:]
            if name not in self.modules[module]:
                return f"{module}.py defines no {name}"
            if rest and (module, name) in self.module_classes:
                if rest[0] not in self.module_classes[(module, name)]:
                    return f"{module}.{name} has no {rest[0]}"
            return None
        if len(parts) > 1:  # Class.member
            cls, member = parts[0], parts[1]
            if cls not in self.classes:
                return f"no class {cls}"
            if member not in self.classes[cls]:
                return f"{cls} has no {member}"
            return None
        name = parts[0]
        if called:
            return None if name in self.functions else "no such function"
        if name[0].isupper():  # a class, a type alias or a constant
            known = name in self.top_level or any(name in m for m in self.classes.values())
            return None if known else "no such class or constant"
        return None  # a lowercase word: a field, a state, a JSON value


def _bound(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    found: set[str] = set()
    for target in targets:
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name):
                found.add(sub.id)
    return found


def _members(cls: ast.ClassDef) -> set[str]:
    members: set[str] = set()
    for node in cls.body:
        members |= _bound(node)
    for sub in ast.walk(cls):
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.ctx, ast.Store)
            and isinstance(sub.value, ast.Name)
            and sub.value.id == "self"
        ):
            members.add(sub.attr)
    return members


def project_sources() -> list[Path]:
    return [*sorted(ROOT.glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]


def backticked(text: str) -> list[str]:
    """The inside of every inline backtick span (fenced blocks left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return re.findall(r"`([^`\n]+)`", text)


def test_every_name_in_the_architecture_document_exists() -> None:
    index = Index(project_sources())
    spans = backticked(ARCHITECTURE.read_text("utf-8"))
    assert len(spans) > 100  # the document names the code, and this reads it
    wrong = sorted({f"`{s}`: {why}" for s in spans if (why := index.problem(s)) is not None})
    assert not wrong, "docs/ARCHITECTURE.md names what the code lacks:\n" + "\n".join(wrong)


def test_the_name_check_catches_a_rename() -> None:
    index = Index(sorted(ROOT.glob("*.py")))  # the names below are the modules': half the reading
    assert index.problem("Relay.receive_datagrams") is None
    assert index.problem("Relay.receive_datagramz") == "Relay has no receive_datagramz"
    assert index.problem("server_store.MemoryStore") is None
    assert index.problem("server_store.NoStore") == "server_store.py defines no NoStore"
    assert index.problem("chat_serverr.py") == "no such file"
    assert index.problem("handle_timerr()") == "no such function"
    assert index.problem("ServerConfig.max_memory") is None
    assert index.problem("Session.conn") is None  # a `self.conn` or a dataclass field
    assert index.problem("--json") is None  # not a name


def test_the_readme_links_the_architecture_document() -> None:
    assert "(docs/ARCHITECTURE.md)" in README.read_text("utf-8")


# --- error codes ---------------------------------------------------------------


def side_modules() -> list[Path]:
    """The server's and the client's modules (protocol.py only defines the codes)."""
    return [
        path
        for path in sorted(ROOT.glob("*.py"))
        if path.stem in ("chat_server", "chat_client")
        or path.stem.startswith(("server_", "client_"))
    ]


def _error_code(node: ast.AST) -> str | None:
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "ErrorCode"
    ):
        return node.attr
    return None


def emitted_codes() -> set[str]:
    """The `ErrorCode` members the code sends or reports: those passed to a
    call (`Refused(nonce, ErrorCode.X, ...)`, `self._fail(..., ErrorCode.X,
    ...)`, `ErrorEvent(ErrorCode.X.label, ...)`, `ClientError(ErrorCode.X,
    ...)`), not those only compared with or listed in a set."""
    found: set[str] = set()
    for path in side_modules():
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            if not isinstance(node, ast.Call):
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if isinstance(arg, ast.Attribute) and arg.attr == "label":
                    arg = arg.value
                if (code := _error_code(arg)) is not None:
                    found.add(code.lower())
    return found


def fatal_login_errors() -> set[str]:
    """`client_core.FATAL_LOGIN_ERRORS`, read from its definition."""
    tree = ast.parse((ROOT / "client_core.py").read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "FATAL_LOGIN_ERRORS" for t in node.targets
        ):
            return {code.lower() for sub in ast.walk(node) if (code := _error_code(sub))}
    raise AssertionError("client_core.py defines no FATAL_LOGIN_ERRORS")


def defined_codes() -> set[str]:
    tree = ast.parse((ROOT / "protocol.py").read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "ErrorCode":
            return {name.lower() for stmt in node.body for name in _bound(stmt) if name.isupper()}
    raise AssertionError("protocol.py defines no ErrorCode")


def readme_error_table() -> dict[str, str]:
    """The README's error-code table: code -> its "fatal" cell."""
    text = README.read_text("utf-8")
    start = text.index("| code | ")
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        code = re.fullmatch(r"`(\w+)`", cells[0])
        assert code is not None, f"README error table row without a `code`: {line}"
        rows[code.group(1)] = cells[-1]
    return rows


def test_the_readme_lists_exactly_the_error_codes_the_code_emits() -> None:
    emitted = emitted_codes()
    assert emitted <= defined_codes()
    assert {"server_error", "duplicate_id", "logged_out", "no_peer"} <= emitted  # it reads calls
    listed = set(readme_error_table())
    assert listed - emitted == set(), "in the README's table, never emitted: delete their rows"
    assert emitted - listed == set(), "emitted, missing in the README's table: add their rows"


def test_the_readmes_fatal_codes_are_the_clients_fatal_login_errors() -> None:
    fatal = {code for code, cell in readme_error_table().items() if cell.startswith("yes")}
    assert fatal == fatal_login_errors() & emitted_codes()
    # The contract (DESIGN: the only fatal login errors).
    assert fatal == {
        "invalid_name",
        "bad_password",
        "password_required",
        "server_unreachable",
        "logged_in_elsewhere",
    }
