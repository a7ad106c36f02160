"""Imports flow one way: base <- models <- compress; models <- export <- targets <- glue <- cli. Every import counts,
function-level ones included (an import inside a function hides a cycle, it does not remove it)."""

import ast
from pathlib import Path

import pytest

import pocketformer

ROOT = Path(pocketformer.__file__).parent

# Layer of each module, by its first path part under pocketformer/ (a subpackage or a top-level module).
LAYERS = {
    "__init__": "base", "errors": "base", "progress": "base", "store": "base", "space": "base", "data": "base",
    "registry": "base", "verdict": "base", "latency": "base", "offline": "base", "text": "base",
    "models": "models",
    "train": "train",
    "compress": "compress",
    "export": "export",
    "targets": "targets",
    "app": "app",
    "recipe": "glue", "extract": "glue", "pipeline": "glue", "report": "glue", "search": "glue",
    "lm_pipeline": "glue", "stage_cache": "glue",
    "cli": "cli",
}
# What each layer may import (besides itself).
ALLOWED = {
    "base": set(),
    "models": {"base"},
    "train": {"base", "models"},
    "compress": {"base", "models", "train"},
    "export": {"base", "models"},
    "targets": {"base", "models", "export"},
    "app": {"base", "models", "export", "targets"},
    "glue": {"base", "models", "train", "compress", "export", "targets", "app"},
    "cli": {"base", "models", "train", "compress", "export", "targets", "app", "glue"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every pocketformer module `path` imports, at any depth of its code, as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pocketformer")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("pocketformer"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names if (ROOT.parent / Path(
                    *f"{target}.{a.name}".split("."))).with_suffix(".py").exists()}
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return LAYERS["__init__" if len(parts) == 1 else parts[1]]


MODULES = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if len(m.split(".")) > 1 and m.split(".")[1] not in LAYERS)
    assert not unknown, f"give these a layer in LAYERS: {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    mine = layer(module)
    wrong = sorted(i for i in MODULES[module] if layer(i) != mine and layer(i) not in ALLOWED[mine])
    assert not wrong, f"{module} ({mine}) imports {wrong}"


def test_no_import_cycles():
    graph = {m: {i for i in deps if i in MODULES and i != m} for m, deps in MODULES.items()}
    # a package's __init__ importing its own modules is how registration works; cycles through it are not counted
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue  # a module and its own package
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
