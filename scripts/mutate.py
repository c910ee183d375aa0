#!/usr/bin/env python3
"""Mutation check: apply one-line breaks of real behaviour, one at a time, and see a test fail.

Run on demand (not in CI)::

    python scripts/mutate.py                        # every mutation of scripts/mutations.toml
    python scripts/mutate.py --skip-group serving --skip-missing --only deepep-never-replace

Each entry of the list (``[[mutation]]`` in TOML) names ``file`` (relative to the repository
root), ``original`` (text that occurs exactly once in the file), ``replacement``, ``tests``
(pytest arguments: node ids, ``-k EXPR``), a ``group`` (``select``, ``kernels``, ``dispatch``,
``launch``, ``serving``, ...) and optionally ``note`` (why a survivor is an equivalent mutation).

The repository is copied once into a temporary directory (tracked and untracked, not ignored,
files; symbolic links kept) and every mutation is applied *there*: the working tree is never
written. After each run the file is restored and its SHA-256 checked against the original.
Each selection of tests first runs unmutated (``--no-baseline`` skips this); a selection that
fails unmutated marks its mutations ``baseline-fails`` instead of counting them as caught.

Results: ``caught`` (a test failed), ``survived`` (all passed), ``timeout`` (killed after
``--timeout`` seconds; counts as caught), ``error`` (pytest could not run the selection: import
or collection error, nothing collected), ``stale`` (the original text or the file is gone: only
with ``--skip-missing``, else the script stops), ``baseline-fails``. Writes a Markdown report
and a JSON file after every mutation (a cut-off run keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAUGHT_STATES = ("caught", "timeout")


@dataclasses.dataclass
class Mutation:
    """One entry of the list."""

    id: str
    file: str
    original: str
    replacement: str
    tests: list[str]
    group: str
    note: str = ""


@dataclasses.dataclass
class Outcome:
    """What running one mutation's tests gave."""

    id: str
    group: str
    file: str
    line: int | None
    original: str
    replacement: str
    tests: list[str]
    result: str
    seconds: float
    detail: str = ""
    note: str = ""
    run: str = ""  # revision and date of the run that produced it (``--merge`` mixes runs)


def load_mutations(path: Path) -> list[Mutation]:
    """The ``[[mutation]]`` entries of a TOML file; raises ``ValueError`` on a malformed entry."""
    data = tomllib.loads(path.read_text())
    out: list[Mutation] = []
    seen: set[str] = set()
    for i, raw in enumerate(data.get("mutation", [])):
        missing = [k for k in ("id", "file", "original", "replacement", "tests", "group") if k not in raw]
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {missing}")
        if raw["id"] in seen:
            raise ValueError(f"{path}: duplicate id {raw['id']!r}")
        if raw["original"] == raw["replacement"]:
            raise ValueError(f"{path}: {raw['id']}: replacement equals the original")
        seen.add(raw["id"])
        tests = raw["tests"] if isinstance(raw["tests"], list) else shlex.split(raw["tests"])
        out.append(Mutation(raw["id"], raw["file"], raw["original"], raw["replacement"], list(tests), raw["group"],
                            raw.get("note", "")))
    return out


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the files git knows or would track (not ignored ones) from ``src`` to ``dst``; links stay links."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        s, d = src / name, dst / name
        if not s.is_symlink() and not s.exists():
            continue  # deleted in the working tree
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_symlink():
            os.symlink(os.readlink(s), d)
        else:
            shutil.copy2(s, d)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_pytest(tree: Path, tests: list[str], timeout: float, per_test: int) -> tuple[str, float, str]:
    """``(state, seconds, detail)`` of ``pytest -x -q tests`` in ``tree`` (its own process group,
    killed whole on timeout)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--timeout={per_test}", *tests]
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - t0, f"killed after {timeout:.0f} s"
    secs = time.monotonic() - t0
    lines = out.splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else ""
    if proc.returncode == 0:
        return "survived", secs, summary
    if proc.returncode == 1:
        return "caught", secs, (failed[0] if failed else summary)[:300]
    return "error", secs, f"pytest exit {proc.returncode}: {(failed[0] if failed else summary)[:300]}"


def locate(text: str, original: str) -> tuple[int, int]:
    """``(count, 1-based line of the first occurrence)`` of ``original`` in ``text``."""
    n = text.count(original)
    return n, (text[: text.find(original)].count("\n") + 1 if n else 0)


def mutate_one(tree: Path, m: Mutation, timeout: float, per_test: int, skip_missing: bool) -> Outcome:
    """Apply ``m`` in ``tree``, run its tests, restore the file (hash-checked)."""
    path = tree / m.file
    base = dict(id=m.id, group=m.group, file=m.file, original=m.original, replacement=m.replacement, tests=m.tests,
                note=m.note)
    if not path.exists():
        if skip_missing:
            return Outcome(line=None, result="stale", seconds=0.0, detail="file not found", **base)
        raise SystemExit(f"{m.id}: {m.file} does not exist (--skip-missing reports it as stale)")
    raw = path.read_bytes()
    before = hashlib.sha256(raw).hexdigest()
    text = raw.decode()
    count, line = locate(text, m.original)
    if count == 0:
        if skip_missing:
            return Outcome(line=None, result="stale", seconds=0.0, detail="original text not found", **base)
        raise SystemExit(f"{m.id}: original text not found in {m.file} (--skip-missing reports it as stale)")
    if count > 1:
        raise SystemExit(f"{m.id}: original text occurs {count} times in {m.file}; make it unique")
    try:
        path.write_text(text.replace(m.original, m.replacement, 1))
        state, secs, detail = run_pytest(tree, m.tests, timeout, per_test)
    finally:
        path.write_bytes(raw)
        if sha256(path) != before:
            raise SystemExit(f"{m.id}: {m.file} was not restored (hash differs); stop")
    return Outcome(line=line, result=state, seconds=round(secs, 1), detail=detail, **base)


def _cell(s: str, n: int = 90) -> str:
    s = s.strip().replace("|", "\\|").replace("\n", " ")
    return "`" + (s if len(s) <= n else s[: n - 1] + "…") + "`"


def write_reports(outcomes: list[Outcome], md: Path, js: Path, header: dict) -> None:
    """The Markdown table and the JSON list of ``outcomes``, with the run's ``header``."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    js.write_text(json.dumps({**header, "counts": counts, "mutations": [dataclasses.asdict(o) for o in outcomes]},
                             indent=1) + "\n")
    caught = sum(counts.get(s, 0) for s in CAUGHT_STATES)
    lines = [
        "# Mutation report", "",
        f"Command: `{header['command']}`  ",
        f"Revision: `{header['revision']}`; date {header['date']}; {header['machine']}; "
        f"per mutation timeout {header['timeout_s']} s, per test {header['per_test_s']} s. "
        "Rows kept from an earlier run (`--merge`) name their run in the JSON (`run`).", "",
        f"**{caught} caught** (timeouts included), **{counts.get('survived', 0)} survived**, "
        f"{counts.get('stale', 0)} stale, {counts.get('error', 0)} error, "
        f"{counts.get('baseline-fails', 0)} baseline fails, {counts.get('skipped', 0)} skipped "
        f"of {len(outcomes)} mutations.", "",
        "| id | group | file:line | original | replacement | tests | result | s | detail / note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        where = f"{o.file}:{o.line}" if o.line else o.file
        extra = (o.note or o.detail).replace("|", "\\|")[:200]
        lines.append(f"| {o.id} | {o.group} | {where} | {_cell(o.original)} | {_cell(o.replacement)} | "
                     f"{_cell(' '.join(o.tests), 70)} | {o.result} | {o.seconds:.1f} | {extra} |")
    md.write_text("\n".join(lines) + "\n")


def load_earlier(path: Path, ids: set[str]) -> dict[str, Outcome]:
    """The outcomes of an earlier JSON report still in the list (``--merge``), by id."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("mutations", [])
    return {r["id"]: Outcome(**r) for r in rows if r["id"] in ids}


def _revision() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!scripts/mutation_report.*"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return rev + ("+local changes" if dirty else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", type=Path, default=ROOT / "scripts" / "mutations.toml", help="the mutation list (TOML)")
    p.add_argument("--only", nargs="+", default=None, metavar="ID", help="run only these ids")
    p.add_argument("--group", nargs="+", default=None, help="run only these groups")
    p.add_argument("--skip-group", nargs="+", default=[], help="report these groups as skipped (e.g. serving)")
    p.add_argument("--skip-missing", action="store_true",
                   help="a mutation whose file or original text is gone is reported stale (default: stop)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutation's test run (default 300)")
    p.add_argument("--per-test-timeout", type=int, default=120, help="pytest-timeout per test, seconds (default 120)")
    p.add_argument("--no-baseline", action="store_true", help="do not run each test selection unmutated first")
    p.add_argument("--merge", action="store_true",
                   help="keep the other mutations' results of an earlier --json report (re-run a few ids)")
    p.add_argument("--md", type=Path, default=ROOT / "scripts" / "mutation_report.md", help="Markdown report")
    p.add_argument("--json", type=Path, default=ROOT / "scripts" / "mutation_report.json", help="JSON report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    muts = load_mutations(args.list)
    if args.only:
        unknown = set(args.only) - {m.id for m in muts}
        if unknown:
            raise SystemExit(f"--only: unknown ids {sorted(unknown)}")
        muts = [m for m in muts if m.id in args.only]
    if args.group:
        muts = [m for m in muts if m.group in args.group]
    header = {
        "command": "python scripts/mutate.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "revision": _revision(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "timeout_s": args.timeout, "per_test_s": args.per_test_timeout,
    }
    earlier = load_earlier(args.json, {m.id for m in load_mutations(args.list)}) if args.merge else {}
    outcomes: list[Outcome] = []

    def report() -> None:
        done = {o.id: o for o in outcomes}
        merged = [done.get(i) or earlier[i] for i in order if i in done or i in earlier]
        write_reports(merged, args.md, args.json, header)

    order = [m.id for m in load_mutations(args.list)]
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        tree = Path(tmp)
        copy_tree(ROOT, tree)
        baseline: dict[tuple[str, ...], tuple[str, str]] = {}
        for m in muts:
            if m.group in args.skip_group:
                outcomes.append(Outcome(m.id, m.group, m.file, None, m.original, m.replacement, m.tests, "skipped",
                                        0.0, f"group {m.group} skipped (--skip-group)", m.note,
                                        f"{header['revision']} {header['date']}"))
                continue
            key = tuple(m.tests)
            if not args.no_baseline and key not in baseline:
                state, secs, detail = run_pytest(tree, m.tests, args.timeout, args.per_test_timeout)
                baseline[key] = (state, detail)
                print(f"baseline {' '.join(m.tests)}: {'passes' if state == 'survived' else state} ({secs:.0f} s)",
                      flush=True)
            if key in baseline and baseline[key][0] != "survived":
                o = Outcome(m.id, m.group, m.file, None, m.original, m.replacement, m.tests, "baseline-fails", 0.0,
                            baseline[key][1], m.note)
            else:
                o = mutate_one(tree, m, args.timeout, args.per_test_timeout, args.skip_missing)
            o.run = f"{header['revision']} {header['date']}"
            outcomes.append(o)
            print(f"{o.result:>9}  {o.seconds:6.1f} s  {o.id}  {o.detail[:100]}", flush=True)
            report()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
