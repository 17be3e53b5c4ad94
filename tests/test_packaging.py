"""The install maps core/ to `rex` and components/ to `rex.components`, and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

from tests.conftest import REPO


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("core", "rex"), ("components", "rex.components")):
        for init in (REPO / top).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / top).parts
            found.add(".".join((name, *relative)))
    assert found == listed


def test_rex_imports_and_no_generic_top_level_module_is_installed(tmp_path):
    code = (
        "import importlib.util, rex, rex.components, rex.cli;"
        "print(importlib.util.find_spec('core'), importlib.util.find_spec('components'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None None"


def test_the_wheel_carries_the_component_index(tmp_path):
    # The registry reads rex/config/components.json at run time: an install without it could
    # not find a single built-in component.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        check=True,
    )
    (wheel,) = tmp_path.glob("rex-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "rex/config/components.json" in archive.namelist()
