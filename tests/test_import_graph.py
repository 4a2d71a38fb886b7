"""The package's modules import each other without cycles, so each layer can be read (and tested) on its own:
functional -> ops -> triton_backend -> kernels, the tuner above the launcher, the models on the public op.

The graph is read from the source (every import statement, lazy ones inside functions included), not from
what happens to be imported at run time.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's source lives (pyproject.toml's package-dir)
PACKAGE_DIRS = {"emim_triton": ROOT / "emim_triton", "emim_triton.kernels": ROOT / "kernels",
                "emim_triton.models": ROOT / "models"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[0] in ("kernels", "models") and package == "emim_triton":
                continue  # not inside emim_triton/ on disk, but keep the guard explicit
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from package import module` names a module; `from module import function` does not
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages re-export: not a dependency cycle
    return {name: {t for t in targets if not (t.startswith(name + ".") and modules[name].name == "__init__.py")}
            for name, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
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


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_fused_path_goes_one_way():
    """functional -> ops -> (autotune ->) triton_backend -> kernels, and nothing below looks up."""
    graph = import_graph()
    assert "emim_triton.ops" in graph["emim_triton.functional"]
    assert {"emim_triton.triton_backend", "emim_triton.autotune"} <= graph["emim_triton.ops"]
    above_the_launcher = {"emim_triton.functional", "emim_triton.ops", "emim_triton.autotune", "emim_triton"}
    assert not graph["emim_triton.triton_backend"] & above_the_launcher
    assert not any(graph[m] & above_the_launcher for m in graph if m.startswith("emim_triton.kernels"))
