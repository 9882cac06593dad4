"""The house rules of ARCHITECTURE.md, checked on the source: no import cycle, who may import whom,
imports inside functions only where they are lazy imports of heavy optional libraries, and no file
over MAX_LINES lines (one job per file)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moevlm"
# Imported inside functions on purpose: each takes seconds (torch.distributed.checkpoint: 0.7 s, for
# sharded checkpoints only), and many runs never need it.
LAZY_LIBRARIES = ("transformers", "huggingface_hub", "peft", "mlflow", "requests", "fastapi", "uvicorn", "starlette",
                  "datasets", "pyarrow", "torch.distributed.checkpoint", "bitsandbytes")
# A file past this has grown more than one job: split it where the jobs part (ARCHITECTURE.md).
MAX_LINES = 400
# Files that wrap transformers models and so may import it at module level.
HF_WRAPPERS = {"moevlm.models.hf_config", "moevlm.models.hf_vision", "moevlm.models.hf_lm", "moevlm.models.factory",
               "moevlm.models.moe_install", "moevlm.models.lora"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)




MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
INFERENCE = ("moevlm.generate", "moevlm.compiled", "moevlm.evaluate", "moevlm.device", "moevlm.metrics",
             *(name for name in MODULES if name.startswith(("moevlm.checkpoint", "moevlm.export", "moevlm.serve"))))


def imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) of every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in in_function, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # "from a import b" imports module a.b when there is one
                target = f"{node.module}.{alias.name}"
                found.append((target if target in MODULES else node.module, id(node) in in_function, node.lineno))
    return found


def own_imports(name: str, lazy: bool | None = None) -> set[str]:
    return {target for target, inside, _ in imports(name)
            if target.startswith("moevlm") and (lazy is None or inside == lazy)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def long_files(root: Path, limit: int = MAX_LINES) -> list[str]:
    """``path: N lines`` of each file under ``root`` (sources, the server's page) longer than ``limit``."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            lines = len(path.read_bytes().splitlines())
            if lines > limit:
                found.append(f"{path.relative_to(root)}: {lines} lines")
    return found


def test_no_file_of_the_package_is_over_max_lines():
    assert long_files(PACKAGE) == []


def test_long_files_finds_a_long_file(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files(tmp_path) == [f"pkg/long.py: {MAX_LINES + 1} lines"]


def test_the_package_has_no_import_cycle():
    graph = {name: own_imports(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_are_lazy_heavy_libraries_or_the_cli_commands():
    offenders = [f"{name}:{line}: {target}" for name in MODULES for target, inside, line in imports(name)
                 if inside and not target.startswith(LAZY_LIBRARIES)
                 # cli.py: each command imports its library (and torch) when it runs, so --help answers at once
                 and not (name == "moevlm.cli" and target.startswith(("moevlm.", "torch")))]
    assert not offenders


@pytest.mark.parametrize("name", [name for name in MODULES if name.startswith("moevlm.models.")])
def test_models_import_only_config_errors_and_models(name):
    allowed = ("moevlm.config", "moevlm.errors", "moevlm.models")
    assert {target for target in own_imports(name) if not target.startswith(allowed)} == set()
    top_level = {target for target, inside, _ in imports(name) if not inside}
    assert not {t for t in top_level if t.startswith(("torch.distributed", "fastapi"))}
    if name not in HF_WRAPPERS:
        assert not {t for t in top_level if t.startswith("transformers")}


@pytest.mark.parametrize("name", [name for name in MODULES if name.startswith("moevlm.data.")])
def test_data_imports_no_model(name):
    assert not {target for target in own_imports(name) if target.startswith(("moevlm.models", "moevlm.train"))}


@pytest.mark.parametrize("name", list(INFERENCE) + [name for name in MODULES if name.startswith("moevlm.serve")])
def test_inference_never_imports_the_trainer(name):
    assert not {target for target in own_imports(name) if target.startswith("moevlm.train")}


def test_every_lazy_import_says_why():
    missing = []
    for name, path in MODULES.items():
        lines = path.read_text().split("\n")
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lazy = [node for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))
                    and (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name)
                    .startswith(LAZY_LIBRARIES)]
            if lazy:
                first = min(node.lineno for node in lazy)
                if "#" not in lines[first - 1] and not lines[first - 2].strip().startswith("#"):
                    missing.append(f"{name}:{first}")
    assert not missing


def test_the_server_stack_is_imported_only_when_serving():
    top_level = [f"{name}: {target}" for name in MODULES for target, inside, _ in imports(name)
                 if not inside and target.startswith(("fastapi", "uvicorn", "starlette"))]
    assert not top_level
