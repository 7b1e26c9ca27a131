"""The package is a stack: every import (module-level, function-level or under TYPE_CHECKING) points down, and no
two modules import each other. Read from the source with ``ast``, so nothing is imported to check it.

Importing ``a.b.c`` first runs the ``__init__`` of ``a`` and of ``a.b``: an import counts as an edge to what those
``__init__`` files import when they load (module level; a PEP 562 ``__getattr__`` runs only when a name is read, and
an edge to it is the edge of whoever reads the name through ``from a.b import Name``). A module's own packages are
left out: they are already loading when it runs."""

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
            "rvla_peft.tracking",
            "rvla_peft.trainer",
            "rvla_peft.demos",
            "rvla_peft.pretrain",
            "rvla_peft.sft",
            "rvla_peft.cards",
            "rvla_peft.hub",
            "rvla_peft.hub.card",
            "rvla_peft.hub.push",
            "rvla_peft.hub.run_files",
            "rvla_peft.exporting",
            "rvla_peft.serving",
            "rvla_peft.serving.*",
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
            "rvla_peft.serve",
            "rvla_peft.hub.__main__",
        ],
    ),  # fmt: skip
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in package.rglob("*.py")}


def _loading_statements(body: list[ast.stmt]):
    """The statements that run when a module loads: not the bodies of functions, nor ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_main_block(node):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _loading_statements(node.orelse)
            continue
        yield node
        for block in ("body", "orelse", "finalbody", "handlers"):  # if / for / while / with / try / class bodies
            yield from _loading_statements(getattr(node, block, []))


def imports_of(path: Path, modules: dict[str, Path], name: str | None = None, when_loaded: bool = False) -> set[str]:
    """Package modules imported anywhere in ``path`` (``from a import b`` counts as ``a.b`` when that is a module);
    with ``when_loaded``, only those imported as the module loads (not in functions, not under TYPE_CHECKING)."""
    name = name or module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    found = set()
    for node in _loading_statements(tree.body) if when_loaded else _walk_without_main_block(tree):
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


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module's edges: what it imports, and what the ``__init__`` of each package above an imported module
    imports as it loads (``import a.b.c`` runs ``a/b/__init__.py``), its own packages left out."""
    modules = all_modules(package)
    direct = {name: imports_of(path, modules, name) for name, path in modules.items()}
    on_load = {
        name: imports_of(path, modules, name, when_loaded=True)
        for name, path in modules.items()
        if path.name == "__init__.py"
    }
    edges = {}
    for name, targets in direct.items():
        through = set()
        for target in targets:
            parts = target.split(".")
            for package_name in (".".join(parts[:n]) for n in range(1, len(parts))):
                if not (name == package_name or name.startswith(package_name + ".")):
                    through |= on_load[package_name]
        edges[name] = (targets | through) - {name}
    return edges


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


def test_the_checker_counts_what_a_package_init_runs_as_it_loads(tmp_path):
    """The cycle that a leaf imported first hits: ``families`` imports ``parsing`` of package ``cfg``, whose
    ``__init__`` loads ``schema``, which imports ``families``. No statement names ``cfg/__init__.py`` from
    ``families``, yet Python runs it. The same ``__init__`` made lazy (PEP 562) is no longer on the path."""
    root = tmp_path / "pkg"
    (root / "cfg").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "families.py").write_text("from pkg.cfg.parsing import check\n")
    (root / "cfg" / "parsing.py").write_text("def check(): ...\n")
    (root / "cfg" / "schema.py").write_text("from pkg.cfg.parsing import check\nimport pkg.families\n")
    (root / "cfg" / "__init__.py").write_text("from pkg.cfg.schema import load\n")
    edges = graph(root)
    assert edges["pkg.families"] == {"pkg.cfg.parsing", "pkg.cfg.schema"}
    assert edges["pkg.cfg.schema"] == {"pkg.cfg.parsing", "pkg.families"}  # its own package is already loading
    assert find_cycle(edges) == ["pkg.cfg.schema", "pkg.families", "pkg.cfg.schema"]
    (root / "cfg" / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.cfg.schema import load\n"
        "def __getattr__(name):\n    from pkg.cfg import schema\n    return getattr(schema, name)\n"
    )
    edges = graph(root)
    assert edges["pkg.families"] == {"pkg.cfg.parsing"}
    assert edges["pkg.cfg"] == {"pkg.cfg.schema"}  # reading a name through the package still loads the schema
    assert find_cycle(edges) is None
