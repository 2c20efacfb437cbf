"""The package layering of README "Architecture", read from every import statement (inside functions too).

Each package may import only the packages listed for it; a new upward import, an import cycle between packages,
a bare `import model`-style import (it would load a second copy of a module from the repository root) or a
private name imported from another package fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS: dict[str, set[str]] = {
    "model": set(),
    "objectives": set(),
    "tracking": {"model"},
    "serving": {"model", "objectives", "tracking"},
    "components": {"model", "objectives", "tracking", "serving"},
    "infra": {"model", "tracking", "serving", "components"},
    "pipelines": {"model", "objectives", "tracking", "serving", "components", "infra"},
}
"""Package → the project packages it may import (lowest layer first; setup.py's FOLDERS is the same list)."""
PACKAGES = tuple(LAYERS)


def _python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every absolute import in `path`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def _package_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in _python_files(package):
            for line, module, _ in _imports(path):
                parts = module.split(".")
                if parts[0] == "vlpipe" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != package:
                    edges.setdefault((package, parts[1]), []).append(
                        f"{path.relative_to(ROOT)}:{line} imports {module}"
                    )
    return edges


def test_setup_installs_exactly_the_layered_packages():
    tree = ast.parse((ROOT / "setup.py").read_text())
    folders = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FOLDERS"
    )
    assert tuple(ast.literal_eval(folders)) == PACKAGES


def test_no_bare_project_imports():
    """Only `vlpipe.<package>` imports: `import model` would resolve from the repository root as another copy."""
    bad = []
    for path in [*(p for package in PACKAGES for p in _python_files(package)), *_python_files("tests")]:
        for line, module, _ in _imports(path):
            if module.split(".")[0] in PACKAGES:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "use the vlpipe. form:\n" + "\n".join(bad)


def test_packages_import_only_lower_layers():
    upward = [
        where
        for (package, imported), places in _package_edges().items()
        if imported not in LAYERS[package]
        for where in places
    ]
    assert not upward, "imports against the layering (README Architecture):\n" + "\n".join(upward)


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for package, imported in _package_edges():
        graph[package].add(imported)

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(nxt == target or reaches(nxt, target, seen | {nxt}) for nxt in graph[start] - seen)

    cycles = sorted(p for p in PACKAGES if reaches(p, p, set()))
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_no_private_names_across_packages():
    bad = []
    for package in PACKAGES:
        for path in _python_files(package):
            for line, module, names in _imports(path):
                parts = module.split(".")
                foreign = parts[0] == "vlpipe" and len(parts) > 1 and parts[1] != package
                private = [n for n in names if n.startswith("_")] + [
                    p for p in parts[2:] if p.startswith("_") and not p.startswith("__")
                ]
                if foreign and private:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {module}")
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["model", "objectives"])
def test_library_packages_never_import_kfp(package):
    bad = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _python_files(package)
        for line, module, _ in _imports(path)
        if module.split(".")[0] == "kfp"
    ]
    assert not bad


@pytest.mark.slow
def test_the_distribution_installs_only_the_vlpipe_name(tmp_path):
    """A built wheel holds `vlpipe/` and its metadata only; from outside the checkout `import model` fails."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy, so the build leaves no build/ in the checkout
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("vlpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "vlpipe",
        f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
    }
    packages = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    assert {
        "vlpipe/model",
        "vlpipe/components/sft",
        "vlpipe/tracking",
        "vlpipe/pipelines/recipes",
    } <= packages
    assert "vlpipe/pipelines/recipes/tiny.yaml" in names
    check = (
        "import importlib.util as u, vlpipe.model, vlpipe.pipelines.cli; "
        "assert all(u.find_spec(n) is None for n in ('model', 'components', 'pipelines', 'serving', 'infra', "
        "'objectives', 'tracking')), 'a bare top-level name is importable'"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=tmp_path, timeout=120)
