"""The repository checkout around the package: the top-level sub-packages and the evaluation data.

``sglang_xshare.kernels`` (Triton kernels) and ``sglang_xshare.launch`` (Ray launcher) live in the
top-level ``kernels/`` and ``launch/`` folders; pyproject maps them into the package with
``package-dir``, so a wheel or an editable install puts them in place. :func:`map_subpackages` does
the same when the package is imported straight from a checkout (``PYTHONPATH=<checkout>``), so the
checkout's own copy is the one that runs.

The evaluation model, its eval set and the recorded routing traces are not in the wheel: they stay in
the checkout under ``bench/data/model`` (:data:`DATA_DIR`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["CHECKOUT_ROOT", "DATA_DIR", "SUBPACKAGES", "data_hint", "map_subpackages"]

#: The folder above the package: the repository root when imported from a checkout.
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
#: Evaluation model, eval set and traces (present only in a checkout).
DATA_DIR = CHECKOUT_ROOT / "bench" / "data"
#: Sub-package name -> top-level folder (the same mapping as pyproject's ``package-dir``).
SUBPACKAGES = {"sglang_xshare.kernels": "kernels", "sglang_xshare.launch": "launch"}


def data_hint(what: str, flag: str) -> str:
    """Error text for a default data file that is missing: where it lives and which flag replaces it."""
    return (f"{what} is kept in the repository checkout (bench/data/model), not in the installed package; "
            f"run from a checkout or pass {flag}")


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped sub-packages in the checkout's top-level folders."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def map_subpackages() -> None:
    """In a checkout whose package folder lacks ``kernels`` / ``launch``, import them from the top level.

    Does nothing in an installed wheel (the sub-packages sit inside the package there) and when the
    finder is already installed.
    """
    if not (CHECKOUT_ROOT / "pyproject.toml").is_file():
        return
    pkg = Path(__file__).resolve().parent
    folders = {name: CHECKOUT_ROOT / top for name, top in SUBPACKAGES.items()
               if not (pkg / name.rpartition(".")[2]).exists() and (CHECKOUT_ROOT / top / "__init__.py").is_file()}
    if folders and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder(folders))
