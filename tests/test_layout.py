"""The layout a new user and a Space rely on, and the security floors of the installed stack."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# Known advisories: gradio file-route/SSRF fixed in 6.20; torch.load weights_only default in 2.6;
# transformers 4.50+ fixed the ReDoS/deserialisation advisories of 2024-25.
SECURITY_FLOORS = {"gradio": "6.20", "torch": "2.6", "transformers": "4.50"}


def _requirements() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def test_datasets_folder_holds_data_only():
    # a .py file there would shadow the `datasets` library for everything run from the checkout
    assert not list((ROOT / "datasets").rglob("*.py"))


def test_requirements_name_the_stack():
    names = {r.name.lower() for r in _requirements()}
    for needed in ("gradio", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "sentencepiece"):
        assert needed in names


@pytest.mark.parametrize("req", _requirements(), ids=lambda r: r.name)
def test_installed_versions_satisfy_requirements(req):
    installed = Version(version(req.name))
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not satisfy {req}"


@pytest.mark.parametrize("name,floor", sorted(SECURITY_FLOORS.items()))
def test_security_floors_hold_in_requirements_and_install(name, floor):
    req = next(r for r in _requirements() if r.name.lower() == name)
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version(floor), f"requirements.txt must pin {name}>={floor}"
    assert Version(version(name)) >= Version(floor)


def test_readme_starts_with_space_metadata_and_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    meta = text.split("---")[1]
    assert re.search(r"^sdk: gradio$", meta, re.M) and re.search(r"^app_file: app.py$", meta, re.M)
    pinned = re.search(r"^sdk_version: (\S+)$", meta, re.M)
    assert pinned and Version(pinned.group(1)) == Version(version("gradio"))
    first_screen = text[:2500]
    assert "make run" in first_screen and "make test" in first_screen


def test_ci_calls_the_readme_test_command_only():
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[-1].strip() == "make test"


def _tuner_imports() -> dict[str, set[str]]:
    """Each tuner module -> the tuner modules it imports, at the top or inside a function (an import put off
    into a function still ties the two modules together)."""
    import ast

    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (ROOT / "tuner").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tuner"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in files}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_tuner_modules_import_each_other_without_circles():
    # a circle makes the import order matter and keeps either module from being read (or tested) alone
    graph = _tuner_imports()
    assert graph["tuner.export_cli"] >= {"tuner.export", "tuner.gguf"}  # the graph sees what it must
    circles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, f"import circles: {circles}"
