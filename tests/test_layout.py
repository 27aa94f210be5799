"""The package's layering, read from the source with ``ast`` (every import statement, function-level and
``TYPE_CHECKING`` ones included): no import cycle, the library never imports the application (``rosa.app``),
kernels know nothing of layers, the tuner nothing of how masks are chosen; and the modules' first names still
give the same objects."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import rosa

SRC = Path(rosa.__file__).resolve().parent
# Entry points and aliases that stand for the application under the names it had before rosa.app existed.
APP_ALIASES = {"rosa.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (SRC.parent / relative).with_suffix(".py").is_file() or (
        SRC.parent / relative / "__init__.py"
    ).is_file()


def _imports(path: Path) -> set[str]:
    """The rosa modules ``path`` imports, resolved (``from .sparse import ops`` -> ``rosa.sparse.ops``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if _is_module(full) else base)
    return {m for m in found if m == "rosa" or m.startswith("rosa.")}


GRAPH = {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _reaches(start: str, allowed=lambda m: True) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen and allowed(target):
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_is_read():
    assert "rosa.sparse.ops" in GRAPH["rosa.sparse.delta"]
    assert "rosa.mask.layers" in GRAPH["rosa.mask.files"]
    assert "rosa.peft_registration" in GRAPH["rosa"]
    assert "rosa.mask.builder" in GRAPH["rosa.split"]
    assert len(GRAPH) > 30


def test_no_import_cycle():
    cycles = sorted(m for m in GRAPH if m in _reaches(m))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_the_library_never_imports_the_application():
    library = [m for m in GRAPH if not m.startswith("rosa.app") and m not in APP_ALIASES]
    offenders = {m: sorted(t for t in GRAPH[m] if t.startswith("rosa.app")) for m in library}
    assert not {m: t for m, t in offenders.items() if t}


@pytest.mark.parametrize(
    ("layer", "must_not_reach"),
    [
        ("rosa.sparse", ("rosa.layer", "rosa.model", "rosa.config", "rosa.mask")),  # kernels know no layers
        ("rosa.layer", ("rosa.model", "rosa.mask", "rosa.schedule")),  # layers know no models, no masks
        # choosing a mask knows no tuner and no schedule; the schedule drives masks, and the tuner drives it
        ("rosa.mask", ("rosa.model", "rosa.schedule", "rosa.split", "rosa.peft_registration")),
        ("rosa.schedule", ("rosa.model", "rosa.split", "rosa.peft_registration")),
        ("rosa.model", ("rosa.peft_registration", "rosa.split")),
        ("rosa.config", ("rosa.layer", "rosa.model", "rosa.mask", "rosa.schedule", "rosa.peft_registration")),
    ],
)
def test_imports_go_one_way(layer, must_not_reach):
    modules = [m for m in GRAPH if m == layer or m.startswith(f"{layer}.")]
    for module in modules:
        reached = _reaches(module)
        bad = sorted(
            t for t in reached for banned in must_not_reach if t == banned or t.startswith(f"{banned}.")
        )
        assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("rosa.masks", "rosa.mask", ("collect_mask", "save_mask", "load_mask", "MaskError", "apply_mask")),
        ("rosa.scheduler", "rosa.schedule", ("RosaScheduler", "needs_mask_before_training", "JOINT")),
        ("rosa.scheduler", "rosa.schedule.callback", ("RosaTrainerCallback",)),
        ("rosa.cli", "rosa.app.cli", ("main",)),
    ],
)
def test_first_names_give_the_same_objects(old, new, names):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name), name
    assert (
        importlib.import_module("rosa.masks").rosa_layers is importlib.import_module("rosa.mask").mask_layers
    )


def _tree(module: str) -> ast.AST:
    path = SRC.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.parse(path.read_text(), str(path))


def test_no_import_machinery():
    """Registration with PEFT is a plain call at import: no module touches sys.meta_path or wraps loaders."""
    for module in GRAPH:
        source = ast.unparse(_tree(module))
        for banned in ("meta_path", "exec_module", "path_hooks"):
            assert banned not in source, f"{module} uses {banned}"


def test_no_private_attribute_crosses_a_module():
    """In the mask and schedule code a ``_name`` is read or written only on ``self`` / ``cls`` or on what its own
    module defines: they leave the tuner's and the layers' private state alone (and each other's)."""
    for module in (m for m in GRAPH if m.startswith(("rosa.mask", "rosa.schedule"))):
        tree = _tree(module)
        own = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {
            t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id not in ("self", "cls", *own)
                and not node.value.id[0].isupper()  # a class's own private helper of this module
            ):
                bad = f"{module}: {node.value.id}.{node.attr}"
                assert node.value.id in ("torch", "np", "sys", "os") or bad in ALLOWED_PRIVATE, bad


# Private names of other libraries rosa must use, each with its reason (pinned by tests of their own).
ALLOWED_PRIVATE: set[str] = set()


MAX_MODULE_LINES = 400  # one concern per module: longer ones get split along their seams


def test_no_module_is_longer_than_the_limit():
    long = {
        str(p.relative_to(SRC.parent)): n
        for p in sorted(SRC.parent.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
