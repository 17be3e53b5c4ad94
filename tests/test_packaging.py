"""The install maps core/ to `rex` and components/ to `rex.components`, and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import tomllib

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
