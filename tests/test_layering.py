"""The package's shape, checked on its source (`ast`, so comments and docstrings do not count):

- imports flow one way: cli -> tools / integrations -> api -> families -> thresholds files -> towers /
  decoders -> core (lazy imports inside functions included);
- outside `families/`, `towers/` and `decoders/` no code imports one family's module, probes a patch
  attribute (``model._dymu...``, ``features.dymu_group_of_patch``) or compares against a family's name:
  it goes through the family registry (`dymu.families.vlm_family_of`) and the public API;
- no module is over 450 lines.

The per-family bench sections are the one exception to the second rule, by design: each measures one
family's tower or decoder at real dimensions, so it builds that model and calls its encoder directly.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dymu"
MAX_LINES = 450

LAYERS = [  # highest first: a module may import its own layer and those below it
    ("cli", ("dymu.cli", "dymu.cli_options", "dymu.__main__")),
    ("tools", ("dymu.tools", "dymu.integrations")),
    ("api", ("dymu.api", "dymu.generation", "dymu.loading")),
    ("families", ("dymu.families",)),
    ("settings and thresholds files", ("dymu.settings", "dymu.thresholds")),
    ("towers / decoders", ("dymu.towers", "dymu.decoders", "dymu.kv_cache")),
]
ADAPTER_FOLDERS = ("dymu.families", "dymu.towers", "dymu.decoders")
# Family-side modules every family shares (not one family's): what the rest of the package may import.
SHARED_FAMILY_MODULES = ("dymu.families", "dymu.families.base", "dymu.families.prompting", "dymu.families.tower_vlm")
# The class-swap mechanism itself: it owns the patch attributes every adapter's patched module carries.
PATCH_MECHANISM = "dymu.patching"
# One family's measurement at real dimensions (see the module docstring).
PER_FAMILY_BENCH = ("dymu.tools.bench.qwen", "dymu.tools.bench.sections.gemma3", "dymu.tools.bench.sections.internvl",
                    "dymu.tools.bench.sections.onevision", "dymu.tools.bench.sections.smolvlm")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer(name: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(_within(name, p) for p in prefixes):
            return rank
    return len(LAYERS)  # core


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.AST) -> list[tuple[str, int]]:
    is_package = MODULES[name].name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports module x; `from .m import f` imports m
            found += ([(f"{target}.{a.name}", node.lineno) for a in node.names] if node.module is None
                      else [(target, node.lineno)])
    return [(t, line) for t, line in found if _within(t, "dymu")]


@pytest.fixture(scope="module")
def trees():
    return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def test_imports_flow_one_way(trees):
    upward = []
    for name, tree in trees.items():
        if name == "dymu":
            continue  # the package's lazy public names (importlib, by name)
        for target, line in _imports(name, tree):
            if target in MODULES or any(m.startswith(target + ".") for m in MODULES):
                if _layer(target) < _layer(name):
                    upward.append(f"{MODULES[name].relative_to(SRC)}:{line} imports {target}")
    assert not upward, "imports against the layering: " + "; ".join(upward)


def test_only_adapters_know_a_family(trees):
    family_names = _registered_family_names()
    found = []
    for name, tree in trees.items():
        if any(_within(name, folder) for folder in ADAPTER_FOLDERS) or name in (*PER_FAMILY_BENCH, PATCH_MECHANISM):
            continue
        where = MODULES[name].relative_to(SRC)
        for target, line in _imports(name, tree):
            if _within(target, "dymu.families") and target not in SHARED_FAMILY_MODULES:
                found.append(f"{where}:{line} imports {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and re.match(r"_dymu|dymu_group_of_", node.attr):
                found.append(f"{where}:{node.lineno} reads .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"_dymu\w*|dymu_group_of_\w+", node.value):
                    found.append(f"{where}:{node.lineno} names the attribute {node.value!r}")
            elif isinstance(node, ast.Compare):  # `family.name == "qwen_vl"` and the like
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in family_names:
                        found.append(f"{where}:{node.lineno} compares with the family name {side.value!r}")
    assert not found, "family knowledge outside the adapters: " + "; ".join(found)


def _registered_family_names() -> set[str]:
    from dymu.families import vlm_families

    return {family.name for family in vlm_families()}


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(SRC)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checks_see_what_they_look_for(tmp_path):
    """The rules above would catch a violation: an upward import and a probe, parsed the same way."""
    bad = ast.parse("from ..cli import main\ndef f(model):\n    return model.model._dymu\n")
    assert _imports("dymu.towers.encoder", bad) == [("dymu.cli", 1)]
    assert _layer("dymu.cli") < _layer("dymu.towers.encoder")
    assert any(isinstance(n, ast.Attribute) and n.attr == "_dymu" for n in ast.walk(bad))
