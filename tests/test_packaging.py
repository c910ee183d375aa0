"""What the wheel carries: every package folder of the source tree, and nothing that needs ``bench/``.

pyproject lists the wheel's packages by name (``[tool.setuptools] packages``) and maps
``sglang_xshare.kernels`` / ``sglang_xshare.launch`` to the top-level ``kernels/`` / ``launch/``
(``package-dir``): a sub-package missing from that list is missing from an installed wheel, though
every test run from the checkout still imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Dotted name -> folder of every folder with an ``__init__.py`` under each ``package-dir`` root."""
    found = {}
    for name, folder in _setuptools()["package-dir"].items():
        top = ROOT / folder
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top).parts
            found[".".join((name, *rel))] = init.parent
    return found


def test_the_wheel_lists_every_package_folder():
    listed = set(_setuptools()["packages"])
    folders = _package_folders()
    assert set(folders) - listed == set(), "package folders missing from pyproject's packages"
    assert listed - set(folders) == set(), "pyproject lists packages that have no folder"


def test_the_package_imports_nothing_from_bench():
    """A module of the wheel that imports a helper of ``bench/`` (``servebench``) fails once installed."""
    bench_tops = {p.parent.name for p in (ROOT / "bench").glob("*/__init__.py")} | \
                 {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert "servebench" in bench_tops
    bad = []
    for folder in _package_folders().values():
        for path in folder.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                bad += [f"{path.relative_to(ROOT)}: import {n}" for n in names if n.split(".")[0] in bench_tops]
    assert not bad, bad
