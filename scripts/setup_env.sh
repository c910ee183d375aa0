#!/usr/bin/env bash
# Create the project's virtual environment with everything the tests and benchmarks need
# (CPU machine): torch, SGLang 0.5.23 (pinned), Ray, transformers, pytest/hypothesis/scipy.
# Usage: bash scripts/setup_env.sh [VENV_DIR]   (idempotent; ~4-6 min and ~11 GiB the first time)
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
# torch first: 2.13.0 resolves to the local CPU wheel where the machine provides one;
# sglang==0.5.23 then brings the torch build it pins.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".[sglang,ray,quality,dev]"
python - <<'PY'
import importlib
for m in ("torch", "sglang", "ray", "transformers", "pytest", "hypothesis", "scipy", "sglang_xshare"):
    mod = importlib.import_module(m)
    print(f"  {m:14s} {getattr(mod, '__version__', 'ok')}")
PY
