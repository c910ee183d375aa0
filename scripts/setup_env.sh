#!/usr/bin/env bash
# Create the project's virtual environment with everything the tests and benchmarks need
# (CPU machine): torch, SGLang 0.5.23 (pinned), Ray, transformers, pytest/hypothesis/scipy.
# Usage: bash scripts/setup_env.sh [VENV_DIR]   (idempotent; ~4-6 min and ~11 GiB the first time)
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  # a new environment takes ~11 GiB (SGLang's CUDA wheels among it); too little room shows up
  # as broken downloads, so say it first
  free_kib=$(df -Pk "$(dirname "$(readlink -f "$VENV")")" | awk 'NR == 2 {print $4}')
  if [ "${free_kib:-0}" -lt $((14 * 1024 * 1024)) ]; then
    echo "setup_env: warning: only $((free_kib / 1024 / 1024)) GiB free where $VENV goes; the set-up needs about 11 GiB" >&2
  fi
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# A broken download must not fail the set-up: CI once died on a 373 MB wheel
# (sglang-kernel) whose download broke at the same byte six times in one pip run (the
# disk was nearly full then, which pip can report as a broken connection: see the
# free-space warning below). pip resumes within a run (--resume-retries, pip >= 25.1;
# older pips ignore the variable) and the whole step is retried after a pause.
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
# If pip's download of a wheel breaks on every try (seen once: every attempt cut at the same
# byte of a 373 MB wheel, resumes getting nothing, while curl fetched the file whole), the file
# pip names in its error is fetched again in one piece into $WHEELS (curl, resumable; kept only
# if it is a sound zip) and the next attempt takes it from there.
WHEELS="$VENV/.wheels"
mkdir -p "$WHEELS"
pip_install() {  # pip_install ARGS...: pip install with $WHEELS as a source; after a broken download, refetch it
  local log status url f
  log=$(mktemp)
  status=0
  python -m pip install --find-links "$WHEELS" "$@" 2>"$log" || status=$?
  cat "$log" >&2
  if [ "$status" -ne 0 ]; then
    for url in $(grep -o 'URL: [^ ]*\.whl' "$log" | cut -c6- | sort -u); do
      f="$WHEELS/${url##*/}"
      echo "setup_env: fetching ${url##*/} again in one piece" >&2
      if curl -fsSL -C - --retry 5 --retry-all-errors -o "$f.part" "$url"; then
        if python -m zipfile -t "$f.part" >/dev/null 2>&1; then mv "$f.part" "$f"; else rm -f "$f.part"; fi
      fi
    done
  fi
  rm -f "$log"
  return "$status"
}
retry python -m pip install -q --upgrade pip
# torch first: 2.13.0 resolves to the local CPU wheel where the machine provides one;
# sglang==0.5.23 then brings the torch build it pins.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || retry pip_install -q torch
retry pip_install -q -e ".[sglang,ray,quality,dev]"
python - <<'PY'
import importlib
for m in ("torch", "sglang", "ray", "transformers", "pytest", "hypothesis", "scipy", "sglang_xshare"):
    mod = importlib.import_module(m)
    print(f"  {m:14s} {getattr(mod, '__version__', 'ok')}")
PY
