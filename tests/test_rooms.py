"""The package's rooms hold: no import cycle between modules, no import from a lower room to a higher one.

Rooms, lowest first: the top-level basics (config, errors, schema, storage, ...), output/, then embed/ and
search/ side by side (neither imports the other), dev/, and the entry points cli.py and search/cli.py. Every
import that runs counts, at module level or inside a function, since either makes the two modules one unit;
annotations-only imports under `if TYPE_CHECKING:` do not.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "resnet_batch"
ENTRY_POINTS = {"resnet_batch.cli", "resnet_batch.search.cli"}
RANKS = {"output": 1, "embed": 2, "search": 2, "dev": 3}  # sub-packages; basics are 0, entry points 4


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file, functions included (not the annotations-only
    imports under `if TYPE_CHECKING:`, which never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module itself
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def room(module: str) -> tuple[int, str]:
    """(rank, room name) of a module."""
    if module in ENTRY_POINTS:
        return 4, "entry point"
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in RANKS:
        return RANKS[parts[1]], parts[1]
    return 0, "basics"


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_walk_sees_every_kind_of_import():
    edges = graph()
    assert len(edges) > 50 and "resnet_batch.output.store" in edges
    assert "resnet_batch.output.store" in edges["resnet_batch.output.ledger"]  # module level
    assert "resnet_batch.embed.sync" in edges["resnet_batch.embed.sync_run"]  # `from pkg import module`, in a function
    assert "resnet_batch.weights" not in edges["resnet_batch.provenance"]  # only under TYPE_CHECKING


def test_no_import_cycle():
    found = cycles(graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_no_import_from_a_lower_room_to_a_higher_one():
    wrong = []
    for module, targets in sorted(graph().items()):
        rank, name = room(module)
        for target in sorted(targets):
            t_rank, t_name = room(target)
            if t_rank > rank or (t_rank == rank and t_name != name and rank == RANKS["embed"]):
                wrong.append(f"{module} ({name}) imports {target} ({t_name})")
    assert wrong == [], "imports against the rooms:\n" + "\n".join(wrong)


def test_the_checks_catch_a_cycle_and_an_upward_arrow():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert room("resnet_batch.output.store") < room("resnet_batch.embed.runner") < room("resnet_batch.cli")
    assert room("resnet_batch.schema")[0] == 0 and room("resnet_batch.search.cli")[0] == 4


def test_tests_share_helpers_never_each_other():
    """Test modules import what they share from tests/helpers/, never another test module or conftest."""
    tests = Path(__file__).resolve().parent
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            wrong += [f"{path.relative_to(tests)} imports {n}" for n in names
                      if n == "tests.conftest" or n.startswith("tests.test_")]
    assert wrong == [], "\n".join(wrong)
