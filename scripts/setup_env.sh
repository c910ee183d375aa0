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
# A dropped connection must not fail the set-up: CI once died on a 373 MB wheel
# (sglang-kernel) whose download broke at the same byte six times in one pip run.
# pip resumes within a run (--resume-retries, pip >= 25.1; older pips ignore the
# variable) and the whole step is retried from scratch after a pause.
export PIP_RETRIES=${PIP_RETRIES:-10} PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20}
retry() {  # retry CMD...: up to SETUP_TRIES attempts (default 4), 15 s, 30 s, 45 s apart
  local n=1 tries=${SETUP_TRIES:-4}
  until "$@"; do
    if [ "$n" -ge "$tries" ]; then
      echo "setup_env: failed $n times: $*" >&2
      return 1
    fi
    echo "setup_env: attempt $n of $tries failed: $*; again in $((15 * n)) s" >&2
    sleep $((15 * n))
    n=$((n + 1))
  done
}
retry python -m pip install -q --upgrade pip
# torch first: 2.13.0 resolves to the local CPU wheel where the machine provides one;
# sglang==0.5.23 then brings the torch build it pins.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || retry python -m pip install -q torch
retry python -m pip install -q -e ".[sglang,ray,quality,dev]"
python - <<'PY'
import importlib
for m in ("torch", "sglang", "ray", "transformers", "pytest", "hypothesis", "scipy", "sglang_xshare"):
    mod = importlib.import_module(m)
    print(f"  {m:14s} {getattr(mod, '__version__', 'ok')}")
PY
