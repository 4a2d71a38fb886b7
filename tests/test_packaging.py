"""pyproject.toml declares exactly what the code imports: no missing dependency (an ImportError for users of a
plain install) and no unused one (einops was declared for a year and never imported)."""

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_SOURCE = ("emim_triton", "kernels", "models")  # the three folders the distribution installs

# import name -> distribution name, where they differ
DISTRIBUTION_OF = {"PIL": "pillow", "yaml": "pyyaml"}
# imported only inside try/except ImportError, and offered as an extra
OPTIONAL = {"tensorboard"}


def _requirement_name(requirement: str) -> str:
    for separator in "<>=!~[; ":
        requirement = requirement.split(separator)[0]
    return requirement.lower()


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _third_party_imports(folders) -> set[str]:
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    # the project itself, and modules that sit beside the importing file (tests' helpers, bench scripts)
    local = {"emim_triton", "kernels", "models"} | {p.stem for f in folders for p in (ROOT / f).rglob("*.py")}
    return {DISTRIBUTION_OF.get(n, n).lower() for n in names
            if n not in sys.stdlib_module_names and n not in local}


def test_every_import_of_the_package_is_a_declared_dependency_and_every_dependency_is_imported():
    declared = {_requirement_name(r) for r in _pyproject()["dependencies"]}
    imported = _third_party_imports(INSTALLED_SOURCE) - OPTIONAL
    assert imported - declared == set(), "imported but not declared"
    assert declared - imported == set(), "declared but never imported"


def test_extras_add_only_what_the_core_lacks():
    project = _pyproject()
    core = {_requirement_name(r) for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        repeated = core & {_requirement_name(r) for r in requirements}
        assert not repeated, f"[{extra}] repeats core dependencies {sorted(repeated)}"


def test_tests_and_benchmarks_import_only_what_core_and_dev_declare():
    project = _pyproject()
    available = {_requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    imported = _third_party_imports(("tests", "bench")) - {"pytest_benchmark"}
    assert imported - available - {"_pytest"} == set()
