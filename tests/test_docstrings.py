"""Every public definition of ``diffmask`` has a docstring whose ``Args:`` match its signature.

The modules are parsed with :mod:`ast`, never imported, so the check is fast and needs none of
the heavy dependencies. The rule, for every ``.py`` file under ``diffmask/``:

* **Public definitions** are module-level functions and classes (also those nested in a
  module-level ``if``/``try``) whose name does not start with ``_``, and the methods of those
  classes whose name does not start with ``_``. ``@overload`` stubs and ``@x.setter`` /
  ``@x.deleter`` methods are skipped (the docstring lives on the implementation / getter).
* **(a) Docstring.** Each public definition has a non-empty docstring.
* **(b) No drift.** When a docstring has a Google-style ``Args:`` section (also spelled
  ``Arguments:`` or ``Parameters:``), every entry has the form ``name: ...``,
  ``name (type): ...`` or ``a, b: ...``, and every documented name is a parameter of the
  signature (``self``/``cls`` ignored; ``*args``/``**kwargs`` may be written with or without
  stars).
* **(c) Complete.** An ``Args:`` section names every parameter of the signature, defaults
  included (a parameter added without a word is drift too); only ``*args``/``**kwargs`` may be
  left out. No ``Args:`` section at all is allowed (short helpers whose summary says it all).
* **Classes.** The class docstring's ``Args:`` describes the constructor: the parameters of the
  class's own ``__init__`` (or ``__new__``), or for a dataclass / ``NamedTuple`` / ``TypedDict``
  its annotated fields. A class inheriting its constructor has nothing to check against, so its
  ``Args:`` is not checked. An ``__init__`` with its own docstring is checked like a method.

Each offender is printed as ``path:line name: problem``; one test per module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diffmask"
MODULES = sorted(PACKAGE.rglob("*.py"))

ARGS_HEADERS = ("Args:", "Arguments:", "Parameters:")
# a Google-style entry: ``name:``, ``name (type):``, ``a, b:``, ``*args:``, ``**kwargs (Any):``
_NAME = r"\*{0,2}[A-Za-z_]\w*"
ENTRY = re.compile(rf"^(?P<names>{_NAME}(?:\s*,\s*{_NAME})*)\s*(?:\([^)]*\))?\s*:(?:\s|$)")
# fields of these class kinds are the constructor's parameters
FIELD_CLASS_DECORATORS = {"dataclass", "attrs", "define", "frozen"}
FIELD_CLASS_BASES = {"NamedTuple", "TypedDict"}


def _decorator_names(node: ast.AST) -> list[str]:
    """The dotted names of a definition's decorators, calls unwrapped (``dataclass(frozen=True)``)."""
    names = []
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        names.append(ast.unparse(target))
    return names


def _skipped(node: ast.AST) -> bool:
    """``@overload`` stubs and property setters / deleters carry no docstring of their own."""
    for name in _decorator_names(node):
        if name.split(".")[-1] == "overload" or name.endswith((".setter", ".deleter")):
            return True
    return False


def args_section(doc: str) -> list[tuple[int, str]] | None:
    """The entry lines of the ``Args:`` section of a cleaned docstring.

    Args:
        doc: the docstring as :func:`ast.get_docstring` returns it (dedented).

    Returns:
        ``(offset, text)`` for each entry line (continuation lines dropped), offset being the line
        index within the docstring; None when the docstring has no ``Args:`` section.
    """
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() not in ARGS_HEADERS:
            continue
        header_indent = len(line) - len(line.lstrip())
        entry_indent = None
        entries = []
        for j in range(i + 1, len(lines)):
            text = lines[j]
            if not text.strip():
                continue
            indent = len(text) - len(text.lstrip())
            if indent <= header_indent:
                break
            if entry_indent is None:
                entry_indent = indent
            if indent == entry_indent:
                entries.append((j, text.strip()))
            elif indent < entry_indent:
                break
        return entries
    return None


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> tuple[set[str], set[str]]:
    """``(all parameter names, names that must be documented)``; ``self``/``cls`` dropped.

    Every named parameter must be documented; ``*args``/``**kwargs`` may be.
    """
    a = fn.args
    positional = a.posonlyargs + a.args
    if method and positional and positional[0].arg in ("self", "cls", "mcs"):
        positional = positional[1:]
    required = {p.arg for p in positional} | {p.arg for p in a.kwonlyargs}
    names = set(required)
    for star in (a.vararg, a.kwarg):
        if star is not None:
            names.add(star.arg)
    return names, required


def _constructor(cls: ast.ClassDef) -> tuple[set[str], set[str]] | None:
    """The constructor's ``(parameters, parameters to document)``; None when it is inherited."""
    for name in ("__init__", "__new__"):
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                return _signature(item, method=True)
    decorators = {d.split(".")[-1] for d in _decorator_names(cls)}
    bases = {ast.unparse(b).split(".")[-1] for b in cls.bases}
    if decorators & FIELD_CLASS_DECORATORS or bases & FIELD_CLASS_BASES:
        names = set()
        for item in cls.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                if "ClassVar" in ast.unparse(item.annotation):
                    continue
                names.add(item.target.id)
        return names, set(names)
    return None


def check_docstring(doc: str | None, params: tuple[set[str], set[str]] | None, where: str) -> list[str]:
    """Problems of one docstring against its signature, each as ``where: problem``.

    Args:
        doc: the cleaned docstring, None when absent.
        params: ``(parameters, parameters to document)`` of the signature; None: not checkable.
        where: ``path:line name`` prefix of each message.

    Returns:
        The messages, empty when the docstring passes.
    """
    if doc is None or not doc.strip():
        return [f"{where}: missing docstring"]
    entries = args_section(doc)
    if entries is None or params is None:
        return []
    names, required = params
    problems = []
    documented: set[str] = set()
    malformed = False
    for _, text in entries:
        m = ENTRY.match(text)
        if m is None:
            problems.append(f"{where}: malformed Args entry {text[:60]!r} (want 'name: description')")
            malformed = True
            continue
        for raw in m.group("names").split(","):
            name = raw.strip().lstrip("*")
            documented.add(name)
            if name not in names:
                problems.append(f"{where}: Args documents {raw.strip()!r}, not a parameter of the signature")
    if not entries:
        problems.append(f"{where}: empty Args section")
    missing = sorted(required - documented)
    if missing and not malformed:  # a malformed entry may be the missing one: report it alone
        problems.append(f"{where}: Args omits parameter(s) {', '.join(missing)}")
    return problems


def _top_level(body: list[ast.stmt]):
    """Module-level statements, looking into ``if``/``try`` blocks (``TYPE_CHECKING``, fallbacks)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level(block)
        else:
            yield node


def check_source(source: str, path: str) -> list[str]:
    """Every offender of one module's source, as ``path:line name: problem``.

    Args:
        source: the module's text.
        path: the path printed in the messages.

    Returns:
        The messages in source order, empty when the module passes.
    """
    tree = ast.parse(source, filename=path)
    problems: list[str] = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in _top_level(tree.body):
        if isinstance(node, functions) and not node.name.startswith("_") and not _skipped(node):
            where = f"{path}:{node.lineno} {node.name}"
            problems += check_docstring(ast.get_docstring(node), _signature(node, False), where)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            where = f"{path}:{node.lineno} {node.name}"
            problems += check_docstring(ast.get_docstring(node), _constructor(node), where)
            for item in node.body:
                if not isinstance(item, functions) or _skipped(item):
                    continue
                doc = ast.get_docstring(item)
                where = f"{path}:{item.lineno} {node.name}.{item.name}"
                if not item.name.startswith("_"):
                    problems += check_docstring(doc, _signature(item, True), where)
                elif item.name == "__init__" and doc is not None:
                    problems += check_docstring(doc, _signature(item, True), where)
    return problems


def _rel(path: Path) -> str:
    """A module's path relative to the repository root, as printed in the messages."""
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("module", MODULES, ids=_rel)
def test_public_definitions_are_documented(module: Path) -> None:
    problems = check_source(module.read_text(encoding="utf-8"), _rel(module))
    for line in problems:
        print(line)
    assert not problems, f"{len(problems)} docstring problem(s):\n" + "\n".join(problems)


def test_package_is_found() -> None:
    assert len(MODULES) > 50 and (PACKAGE / "__init__.py") in MODULES


CHECKER_CASES = '''
def undocumented(a):
    return a


def drift(a):
    """Drifted.

    Args:
        a: kept.
        token_index: gone.
    """


def incomplete(a, b, c=0, *, d):
    """Missing the required ones.

    Args:
        a, c: grouped.
    """


def fine(a, b=2, *args, key: int = 0, **kwargs):
    """All good.

    Args:
        a (int): first,
            with a continuation line: not an entry.
        b, key: the others.
        *args: extra.

    Returns:
        Nothing.
    """


def malformed(a):
    """Bad entry.

    Args:
        a -- no colon.
    """


class Built:
    """Constructor args in the class docstring.

    Args:
        size: the size.
        ghost: not a parameter.
    """

    def __init__(self, size):
        self.size = size

    def run(self):
        pass

    def _private(self):
        pass


@dataclass(frozen=True)
class Fields:
    """Dataclass fields are the constructor.

    Args:
        x, y: the fields (``z`` is a class variable).
    """

    x: int
    y: int = 0
    z: ClassVar[int] = 0


class _Hidden:
    def method(self):
        pass
'''


def test_checker_finds_each_kind_of_offender() -> None:
    found = check_source(CHECKER_CASES, "m.py")
    text = "\n".join(found)
    assert "m.py:2 undocumented: missing docstring" in found
    assert "m.py:6 drift: Args documents 'token_index', not a parameter of the signature" in found
    assert "m.py:15 incomplete: Args omits parameter(s) b, d" in found
    assert not [p for p in found if " fine:" in p]
    assert "m.py:37 malformed: malformed Args entry" in text
    assert "Built: Args documents 'ghost'" in text
    assert " Built.run: missing docstring" in text
    assert "_private" not in text and "_Hidden" not in text and "Fields" not in text
    assert len(found) == 6, text
