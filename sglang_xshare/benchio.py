"""Provenance and output files of every benchmark: command, git revision, device, date."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["run_metadata", "write_results", "markdown_table", "md_cell", "mean_ci", "t_quantile_975", "GIT_REV_ENV"]


#: The repository this package sits in (the revision is read there, whatever the cwd).
_ROOT = Path(__file__).resolve().parents[1]
#: Environment variable naming the revision of a copy without (or with a foreign) ``.git`` --
#: e.g. a working tree copied to a GPU machine: the caller exports its ``git rev-parse --short HEAD``.
GIT_REV_ENV = "XSHARE_GIT_REV"


#: Two-sided 95 % Student-t quantiles for few degrees of freedom (where the series below is off).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_quantile_975(dof: int) -> float:
    """Two-sided 95 % Student-t quantile of ``dof`` degrees of freedom (scipy when installed, else
    a table up to 9 and the Abramowitz-Stegun 26.7.5 series beyond); ``nan`` for ``dof < 1``."""
    if dof < 1:
        return float("nan")
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:
        if dof in _T975:
            return _T975[dof]
        z = 1.959963984540054
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def mean_ci(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and 95 % t half-width of the finite values (``None`` entries dropped): ``(None, None)``
    without any, ``(value, None)`` for one."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    n = len(v)
    m = math.fsum(v) / n
    if n < 2:
        return m, None
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in v) / (n - 1))
    return m, t_quantile_975(n - 1) * sd / math.sqrt(n)


def _git_revision() -> str:
    """``$XSHARE_GIT_REV`` when set, else this checkout's short ``HEAD`` (``+dirty`` with
    uncommitted changes to tracked files), else ``"unknown"``."""
    env = os.environ.get(GIT_REV_ENV, "").strip()
    if env:
        return env
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=_ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, cwd=_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{n} x {torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    except ImportError:
        return f"CPU {platform.machine()}"


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, str]:
    """``command``, ``git`` (:data:`GIT_REV_ENV` wins), ``device``, ``date`` (UTC, ISO 8601) of the current run."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "command": " ".join(shlex.quote(a) for a in argv),
        "git": _git_revision(),
        "device": _device(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def md_cell(v: Any) -> str:
    """One Markdown table cell: floats with 4 significant digits, ``|`` escaped (a label such as
    ``"xshare@0.7 | oea+k0=4"`` would otherwise split the row)."""
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells through :func:`md_cell`)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, payload: dict[str, Any], markdown: str,
                  meta: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` (payload + meta) and ``<name>.md`` (meta header + markdown)."""
    meta = meta or run_metadata()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / f"{name}.json", out / f"{name}.md"
    jp.write_text(json.dumps({"meta": meta, **payload}, indent=2, sort_keys=False) + "\n")
    header = (
        f"# {name}\n\n"
        f"- command: `{meta['command']}`\n- git: `{meta['git']}`\n- device: {meta['device']}\n- date: {meta['date']}\n\n"
    )
    mp.write_text(header + markdown.rstrip() + "\n")
    return jp, mp
