"""House rules, read from the source so they stay true.

Floors: rl/ (the loop) may import models/ and rewards/; models/ and rewards/ never import rl/;
rewards/ imports models/ only for the demo's shapes domain; models/ never imports rewards/; no
module imports itself back through any chain of imports, lazy (function-level) imports included.

The trainer: its phases pass data to each other as return values, so no Trainer attribute is
set outside construction (an attribute written in one phase and read in a later one is a hidden
argument)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("rl", "rewards", "models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (module level or inside functions)."""
    found = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            # The longest project module the dotted name starts with.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source():
    """The reader sees lazy imports and `from pkg import sub` (else the checks below prove nothing)."""
    graph = import_graph()
    assert "rl.checkpoint" in graph["rl.train"]  # `from rl import checkpoint`, inside __init__
    assert "rewards.runner" in graph["rl.train"]  # a function-level import
    assert "models.shapes.scenes" in graph["rewards.shapes_geneval"] or "models.shapes.checker" in graph["rewards.shapes_geneval"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_floors_never_import_the_loop():
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() if not m.startswith("rl") for d in deps if d.split(".")[0] == "rl"]
    assert not wrong, "models/ and rewards/ must not import rl/:\n" + "\n".join(wrong)


def test_rewards_import_models_only_for_the_demo_domain_and_models_never_import_rewards():
    graph = import_graph()
    wrong = [
        f"{m} imports {d}" for m, deps in graph.items() for d in deps
        if (m.startswith("rewards") and d.startswith("models") and not d.startswith("models.shapes"))
        or (m.startswith("models") and d.startswith("rewards"))
    ]
    assert not wrong, "\n".join(wrong)


def test_adapters_never_build_fixtures():
    graph = import_graph()
    adapters = [m for m in graph if m.startswith("models.") and m.count(".") == 1 and m not in ("models.base", "models.config")]
    assert adapters, "no adapter modules found"
    wrong = [f"{m} imports {d}" for m in adapters for d in graph[m] if d.startswith("models.fixtures")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def attributes_set_outside_construction(source: str, class_name: str, construction=("__init__", "_configure_deepspeed")) -> list[str]:
    """`self.x = ...` (or augmented / annotated) in methods of `class_name` other than construction."""
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == class_name)
    found = []
    for method in cls.body:
        if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) or method.name in construction:
            continue
        for node in ast.walk(method):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                        found.append(f"{method.name}: self.{leaf.attr}")
    return found


def test_trainer_phases_hand_data_on_by_return_value():
    assert attributes_set_outside_construction("class T:\n def run(self):\n  self.cond = 1\n", "T") == ["run: self.cond"]
    found = attributes_set_outside_construction((ROOT / "rl" / "train.py").read_text(), "Trainer")
    assert not found, "Trainer state written outside construction:\n" + "\n".join(found)


def test_a_folder_shadowing_models_or_rewards_stops_the_trainer_with_a_message(tmp_path):
    """Run from a folder with its own models/ package: rl.train stops and names the folder."""
    import os
    import subprocess
    import sys

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "rl.train", str(ROOT / "configs" / "tiny_cpu.yaml")], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    assert result.returncode != 0
    assert f"finds {tmp_path / 'models'}" in result.stderr and "shadows it" in result.stderr, result.stderr[-2000:]


# Each model family's names as code and prose write them; a new family adds its own.
FAMILY_NAMES = [
    r"sd\s?3(?:\.5)?", r"stable.?diffusion", r"qwen.?image", r"flux", r"kontext", r"klein", r"z.?image",
]


def family_mentions(text: str, extra: list[str] = ()) -> list[str]:
    import re

    names = FAMILY_NAMES + [re.escape(name).replace("_", "[-_ .]?") for name in extra]
    pattern = re.compile("|".join(f"(?:{name})" for name in names), re.IGNORECASE)
    return [match.group(0) for match in pattern.finditer(text)]


def test_no_model_family_is_named_in_the_loop_or_the_rewards():
    """Model-specific code lives in models/ only: no file of rl/ or rewards/ names a model family
    or a registered adapter, in code or prose, so adding a family touches models/ and configs/."""
    from models import ADAPTERS

    assert family_mentions("loads FLUX.1 Kontext, Qwen-Image and SD3.5", ["z_image"]) == ["FLUX", "Kontext", "Qwen-Image", "SD3.5"]
    assert family_mentions("Qwen3-VL judges", list(ADAPTERS)) == []  # the judges' VLM is not a family
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for package in ("rl", "rewards")
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in family_mentions(path.read_text(), list(ADAPTERS))
    ]
    assert not found, "model families named outside models/:\n" + "\n".join(found)
