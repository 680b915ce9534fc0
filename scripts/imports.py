"""The import graph of kitsprep and kitstrain, read from the source (imports inside
functions and under TYPE_CHECKING count too), checked against the order of the rooms.

    python scripts/imports.py            # the room graph, then any violation; exit 1 on one
    python scripts/imports.py --modules  # every module's imports of the project

Data flows one way. kitstrain's rooms, lowest first: a room may import the rooms before it
and itself, never one after it; kitsprep imports no kitstrain. Inside a room, modules may
import each other but never in a circle. tests/test_imports.py runs `violations()`.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kitsprep", "kitstrain")

# kitstrain's rooms, lowest first. core: what every room needs (device, precision, the
# training options, the run directory); metrics: Dice and surface Dice on numpy arrays;
# data: store -> batches; model: networks and losses; infer: a model applied to slices
# (validation runs it, so it sits below the loop); train: the loop; report: tables and
# pictures, formatting only; runs: a finished run loaded, predicting, scored; then the
# Python API and the CLI on top. Below them all, kitstrain's own package module: the version,
# and the API's names, which it imports lazily at run time (by name, not by import).
ROOMS = (
    "__init__",
    "core",
    "metrics",
    "data",
    "model",
    "infer",
    "train",
    "report",
    "runs",
    "api",
    "cli",
)
TOP = {"__main__"}  # `python -m kitstrain`


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # `from pkg import mod` names a module; `from mod import name` the module itself
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import kitsprep.store.reader` -> that module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def room(module: str) -> str | None:
    """kitstrain.train.fit -> 'train'; kitstrain.metrics -> 'metrics'; kitsprep -> None."""
    parts = module.split(".")
    if parts[0] != "kitstrain":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one node (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        ra = room(a)
        if ra is None:
            continue
        rooms[ra]
        for b in targets:
            rb = room(b)
            if rb is not None and rb != ra:
                rooms[ra].add(rb)
    return dict(rooms)


def violations(edges: dict[str, set[str]] | None = None) -> list[str]:
    """One line per import against the order, room cycle or module cycle."""
    edges = graph() if edges is None else edges
    order = {r: i for i, r in enumerate(ROOMS)}
    bad = []
    for a, targets in sorted(edges.items()):
        ra = room(a)
        for b in sorted(targets):
            rb = room(b)
            if ra is None and rb is not None:
                bad.append(f"{a} imports {b}: kitsprep must not import kitstrain")
            elif ra is None or rb is None or ra == rb:
                continue
            elif ra not in order and ra not in TOP:
                bad.append(f"{a}: room {ra!r} is not in ROOMS; add it in its place")
            elif rb in TOP or rb not in order:
                bad.append(f"{a} imports {b}: nothing imports the top ({rb})")
            elif ra not in TOP and order[rb] > order[ra]:
                bad.append(f"{a} imports {b}: room {ra} sits below {rb}")
    bad += [f"room cycle: {' <-> '.join(c)}" for c in cycles(room_graph(edges))]
    bad += [f"module cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    return bad


def main(argv: list[str]) -> int:
    edges = graph()
    if "--modules" in argv:
        for a in sorted(edges):
            print(f"{a} -> {', '.join(sorted(edges[a])) or '-'}")
    else:
        rooms = room_graph(edges)
        for r in [*ROOMS, *sorted(TOP)]:
            if r in rooms:
                print(f"{r:9} -> {', '.join(sorted(rooms[r], key=_rank)) or '-'}")
    bad = violations(edges)
    for line in bad:
        print(line)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(bad)} violations")
    return 1 if bad else 0


def _rank(r: str) -> int:
    return ROOMS.index(r) if r in ROOMS else len(ROOMS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
