"""The distribution installs `formats/` and `cli/` as `deepcompress.formats` and `deepcompress.cli`."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_imports_subpackages():
    import deepcompress.cli
    import deepcompress.formats

    assert Path(deepcompress.formats.__file__).parent == ROOT / "formats"
    assert Path(deepcompress.cli.__file__).parent == ROOT / "cli"


@pytest.mark.slow
def test_wheel_contains_subpackages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("deepcompress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "deepcompress/__init__.py" in names
    assert "deepcompress/formats/__init__.py" in names
    assert "deepcompress/formats/dcz.py" in names
    assert "deepcompress/formats/SPEC.md" in names
    assert "deepcompress/formats/header.dict" in names
    assert "deepcompress/cli/main.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def _imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve to a package
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("folder,forbidden", [
    ("formats", ("deepcompress", "..")),        # lossless code stands alone
    ("deepcompress", ("deepcompress.cli", "cli")),
    ("benchmarks", ("deepcompress.cli", "cli")),  # benchmarks use the library, not the CLI
])
def test_imports_run_one_way(folder, forbidden):
    for path in sorted((ROOT / folder).glob("*.py")):
        for name in _imports(path):
            assert not any(name == f or name.startswith(f + ".") for f in forbidden), (path, name)
