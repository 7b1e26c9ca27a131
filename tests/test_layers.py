"""The package is a stack: every import (module-level, function-level or under TYPE_CHECKING) points down, and no
two modules import each other. Read from the source with ``ast``, so nothing is imported to check it."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rvla_peft"

# Bottom to top. A module may import modules of its own layer or below; within a layer the graph must be acyclic.
LAYERS: list[tuple[str, list[str]]] = [
    ("leaf utilities", ["rvla_peft", "rvla_peft.utils", "rvla_peft.utils.*"]),
    ("maths", ["rvla_peft.stats", "rvla_peft.regularizers", "rvla_peft.algorithms", "rvla_peft.algorithms.*"]),
    ("perturbations", ["rvla_peft.perturbations", "rvla_peft.perturbations.*"]),
    # the policy families' catalogue and their config sections sit in the config layer (light: no torch)
    (
        "config",
        [
            "rvla_peft.config",
            "rvla_peft.config.*",
            "rvla_peft.policies.families",
            "rvla_peft.policies.*.configuration",
            "rvla_peft.run_folder",
        ],
    ),
    (
        "envs, models, adapter files",
        [
            "rvla_peft.renderer",
            "rvla_peft.envs",
            "rvla_peft.envs.*",
            "rvla_peft.models",
            "rvla_peft.models.*",
            "rvla_peft.adapters",
        ],
    ),  # fmt: skip
    ("policies", ["rvla_peft.policies", "rvla_peft.policies.*"]),
    ("rollout", ["rvla_peft.rollout", "rvla_peft.experts"]),
    (
        "training, evaluation, hub, export",
        [
            "rvla_peft.evaluation",
            "rvla_peft.report",
            "rvla_peft.memory",
            "rvla_peft.objective",
            "rvla_peft.metrics",
            "rvla_peft.checkpointing",
            "rvla_peft.callbacks",
            "rvla_peft.trainer",
            "rvla_peft.demos",
            "rvla_peft.pretrain",
            "rvla_peft.cards",
            "rvla_peft.hub",
            "rvla_peft.hub.card",
            "rvla_peft.hub.push",
            "rvla_peft.hub.run_files",
            "rvla_peft.exporting",
        ],
    ),  # fmt: skip
    (
        "command lines (and the python -m shims that run them)",
        [
            "rvla_peft.cli",
            "rvla_peft.cli.*",
            "rvla_peft.train",
            "rvla_peft.eval",
            "rvla_peft.export",
            "rvla_peft.hub.__main__",
        ],
    ),  # fmt: skip
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path], name: str | None = None) -> set[str]:
    """Package modules imported anywhere in ``path`` (``from a import b`` counts as ``a.b`` when that is a module)."""
    name = name or module_name(path)
    is_package = path.name == "__init__.py"
    found = set()
    for node in _walk_without_main_block(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _is_main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: what runs a library module as a command (``python -m rvla_peft.demos`` runs
    ``rvla_peft.cli.demos``), never imported, so not a dependency of the module."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _walk_without_main_block(tree: ast.AST):
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node) if not _is_main_block(child))


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) and not (p.endswith(".*") and module in exact()) for p in patterns):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def exact() -> set[str]:
    """Modules named exactly in some layer: a wildcard of another layer never claims them."""
    return {p for _, patterns in LAYERS for p in patterns if "*" not in p}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_every_import_points_down():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports pointing up the stack:\n" + "\n".join(upward)


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_function_level_and_type_checking_imports(tmp_path):
    """The checker itself: an import inside a function or under TYPE_CHECKING is an edge (one in a module's
    ``if __name__ == "__main__":`` block is not: it runs the command, it is never imported), and a cycle is found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rvla_peft.config import TrainConfig\n"
        "def f():\n    import rvla_peft.trainer\n"
        "if __name__ == '__main__':\n    from rvla_peft.cli.demos import main\n"
    )
    modules = {"rvla_peft.config": source, "rvla_peft.trainer": source, "rvla_peft.cli.demos": source}
    assert imports_of(source, modules, name="rvla_peft.m") == {"rvla_peft.config", "rvla_peft.trainer"}
