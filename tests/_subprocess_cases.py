"""Run a test file's cases as a script in a subprocess and collect its ``RESULT {json}`` lines.

Used by the tests that need a fresh interpreter (``TRITON_INTERPRET`` must be set before Triton is
imported): the file is run with its case names as arguments and prints one ``RESULT`` line per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cases(script: str | Path, names, env: dict[str, str], timeout: float = 600) -> dict[str, dict]:
    """``{name: record}`` of the ``RESULT`` lines ``script`` printed for ``names`` (``env`` added to
    the environment, the repository on ``PYTHONPATH``); fails the test when nothing came back."""
    full = dict(os.environ, **env, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), *names], env=full, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)
    res = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            res[r["name"]] = r
    if not res:
        pytest.fail(f"{Path(script).name} produced no results (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return res
