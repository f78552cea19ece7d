"""The shape of the package, read from the source (no imports run): the subpackages of ``tprd``
import each other only downwards, no two modules import each other (directly or round a loop,
lazy imports inside functions included), and the distiller reads detectors only through their
declared interface (no ``hasattr``/``getattr`` probes, signature inspection or class-name tests)."""
import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tprd"

#: subpackage (or top-level module) -> the ones it may import. Lower layers first; ``testing`` (the
#: parity harnesses) sits above everything and nothing in the core imports it.
ALLOWED = {
    "errors": set(),
    "progress": set(),
    "visualization": set(),
    "utils": set(),
    "layers": set(),
    "config": set(),
    "modeling": {"layers", "config", "utils", "errors"},
    "data": {"errors", "progress", "utils", "config"},
    "evaluation": {"data", "errors", "progress", "utils"},
    "checkpoint": {"modeling", "layers", "config", "errors", "utils"},
    "distill": {"checkpoint", "modeling", "layers", "config", "errors", "utils"},
    "engine": {"distill", "checkpoint", "modeling", "layers", "config", "data", "evaluation", "errors",
               "progress", "utils", "visualization"},
    "testing": {"distill", "checkpoint", "modeling", "layers", "config", "data", "errors", "utils"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """``(line, imported module)`` for every import of ``tprd`` in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            # ``from .pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            targets += [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "tprd" or t.startswith("tprd."):
                yield node.lineno, t


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph():
    edges = defaultdict(set)
    where = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _module_name(path)
        for line, target in _imports(path):
            while target and not _exists(target):  # ``from tprd.x import name`` -> module tprd.x
                target = target.rpartition(".")[0]
            if target and target != src:
                edges[src].add(target)
                where.setdefault((src, target), f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges, where


def _cycles(edges):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def _is_package_init(module: str) -> bool:
    return (PACKAGE.parent / Path(*module.split(".")) / "__init__.py").is_file()


def test_subpackages_import_only_downwards():
    edges, where = _graph()
    assert set(ALLOWED) >= {_top(m) for m in edges if _top(m)}, "a new subpackage: give it a place in ALLOWED"
    wrong = []
    for src, targets in edges.items():
        for target in targets:
            a, b = _top(src), _top(target)
            if a and b and a != b and b not in ALLOWED[a]:
                wrong.append(f"{where[(src, target)]}: {src} imports {target} ({a} may not import {b})")
    assert not wrong, "\n".join(wrong)


def test_subpackage_graph_has_no_cycle():
    edges, _ = _graph()
    packages = defaultdict(set)
    for src, targets in edges.items():
        for target in targets:
            if _top(src) and _top(target) and _top(src) != _top(target):
                packages[_top(src)].add(_top(target))
    assert not _cycles(packages), _cycles(packages)
    assert not _cycles({a: set(b) for a, b in ALLOWED.items()}), "ALLOWED itself has a cycle"


def test_no_module_import_cycle():
    """Between modules, lazy imports included; a package's ``__init__`` re-exporting its own
    submodules is not a cycle (the submodules never import the package back)."""
    edges, where = _graph()
    plain = {src: {t for t in targets if not (_is_package_init(t) and src.startswith(t + "."))}
             for src, targets in edges.items()}
    plain = {src: {t for t in targets if not (_is_package_init(src) and t.startswith(src + "."))}
             for src, targets in plain.items()}
    cycles = _cycles(plain)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_core_never_imports_the_test_harnesses():
    edges, where = _graph()
    wrong = [where[(s, t)] for s, ts in edges.items() for t in ts if _top(t) == "testing" and _top(s) != "testing"]
    assert not wrong, wrong


_DETECTOR = re.compile(r"^(self\.)?(student|teacher|detector|model|det)\b|^type\(")


def _distill_sources():
    return sorted((PACKAGE / "distill").rglob("*.py"))


@pytest.mark.parametrize("path", _distill_sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_distill_reads_detectors_only_through_the_interface(path):
    """In ``tprd/distill``: no ``hasattr``/``getattr`` on a student, teacher or model; no
    ``inspect.signature``; no tests of a class's name."""
    source = path.read_text()
    wrong = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            first = ast.get_source_segment(source, node.args[0]) if node.args else ""
            if _DETECTOR.match(first or ""):
                wrong.append(f"line {node.lineno}: {node.func.id}({first}, ...) probes a detector")
        if isinstance(node, ast.Attribute) and node.attr in ("signature", "getfullargspec", "getargspec"):
            wrong.append(f"line {node.lineno}: inspect.{node.attr}")
        if isinstance(node, ast.Compare):
            sides = [node.left] + list(node.comparators)
            if any(isinstance(s, ast.Attribute) and s.attr in ("__name__", "__qualname__") for s in sides):
                wrong.append(f"line {node.lineno}: compares a class name")
    assert not wrong, f"{path}:\n" + "\n".join(wrong)
