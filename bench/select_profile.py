"""Where a selection call's time goes, on the GPU: one table of graph-replay timings over the
launch knobs that isolate each part, for two shapes (E = 256 grouped + bias, E = 64).

* ``topk`` at T = bt, one program: scoring + the K refinement passes, by rows per program and warps;
* ``oea`` at T = bt, one program: adds the scan's K passes and the partials (no ranking pick);
* ``oea`` / ``xshare`` / ``xshare_ep`` at T = 64 with bt rows per tile (64 / bt programs): the grid
  barrier (``sync 1``) vs two launches (``sync 2``), and the pick's cost on top of OEA;
* ``xshare`` / ``xshare_ep`` at T = 1 by warps: the pick alone.

Kernels are compiled first in parallel processes. Writes ``$OUT/prof.json`` (or ``--out``).
Pair with ``ncu --clock-control none --section WarpStateStats --section SchedulerStats`` on
``bench/select_profile.py --one MODEL POLICY T`` for stall reasons (``bench/results/select_profile/``
holds one such profile of an earlier kernel version, and the table it measured).

    python bench/select_profile.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path


import torch

import bench_select as bs

MODELS = {"dsv3": "dsv3-256x8-grp-bias", "olmoe": "olmoe-64x8"}


def tile_for(E: int, bt: int) -> int:
    """The ``tile_elems`` knob that gives ``bt`` rows per tile."""
    return bt * max(16, 1 << (E - 1).bit_length())


def cases() -> list[tuple[str, str, int, dict]]:
    out = []
    for mk, model in MODELS.items():
        E = bs.MODELS[model][0]
        for w in (1, 2, 4):
            for bt in (1, 2, 4, 8, 16):
                out.append((mk, "topk", bt, {"num_warps": w, "tile_elems": tile_for(E, bt)}))
                out.append((mk, "oea", bt, {"num_warps": w, "tile_elems": tile_for(E, bt)}))
        for w in (1, 4):
            for bt in (1, 2, 4, 8):
                for pol in ("oea", "xshare", "xshare_ep"):
                    out.append((mk, pol, 64, {"num_warps": w, "tile_elems": tile_for(E, bt)}))
                    out.append((mk, pol, 64, {"num_warps": w, "tile_elems": tile_for(E, bt), "sync": 2}))
        for pol in ("xshare", "xshare_ep"):
            for w in (1, 2, 4, 8):
                out.append((mk, pol, 1, {"num_warps": w}))
    return out


def _compile(items: list) -> list:
    dev = torch.device("cuda")
    errs = []
    for mk, pol, T, kn in items:
        try:
            bs.Case(MODELS[mk], pol, T, dev, seed=3, knobs=kn).run_kernel()
        except Exception as e:  # reported, the rest still compile
            errs.append(f"{mk} {pol} T={T} {kn}: {e!r}"[:300])
    torch.cuda.synchronize()
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).resolve().parent / "results")))
    ap.add_argument("--workers", type=int, default=min(15, os.cpu_count() or 1))
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "POLICY", "T"), help="just run one case 3 times (for ncu)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.one:
        c = bs.Case(args.one[0], args.one[1], int(args.one[2]), dev, seed=3)
        for _ in range(3):
            c.run_kernel()
        torch.cuda.synchronize()
        return
    todo = cases()
    t0 = time.time()
    with get_context("spawn").Pool(args.workers) as pool:
        errs = [e for es in pool.map(_compile, [todo[i::args.workers] for i in range(args.workers)]) for e in es]
    print(f"compiled {len(todo)} cases in {time.time() - t0:.0f}s; errors: {errs[:3]}", flush=True)
    timing = type("Args", (), {"graph_calls": 20, "reps": 25})()
    res = []
    for mk, pol, T, kn in todo:
        r = bs._time_case(MODELS[mk], pol, T, dev, timing, {}, kn, with_baselines=False)
        p = r.get("plan") or {}
        res.append(dict(model=mk, policy=pol, T=T, knobs=kn, us=r.get("kernel_us"), plan=p))
        print(f"{mk:6s} {pol:10s} T={T:3d} w{kn.get('num_warps')} bt{p.get('bt')} nb{p.get('nb')} s{p.get('sync')} "
              f"{r.get('kernel_us', float('nan')):7.2f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prof.json").write_text(json.dumps(res, indent=1))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
