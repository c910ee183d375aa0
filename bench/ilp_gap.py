"""xshare_ep's greedy vs the exact ILP (scipy milp) on random small instances.

Without replicas the greedy is exact (partition matroid); with redundant experts (EPLB) the copy
choice makes the greedy a heuristic. This measures both gaps: the warm-up peak (greedy vs the
least possible) and the kept mass at the ILP's capacity.

    python bench/ilp_gap.py --instances 200
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from sglang_xshare.benchio import markdown_table, run_metadata, write_results
from sglang_xshare.placement import Placement
from sglang_xshare.select.oracle import solve_xshare_ep
from sglang_xshare.select.policies.xshare_ep import pick_partitioned, pick_replicated


def one(seed: int, E: int, R: int, redundant: int, b: int) -> dict:
    rng = np.random.default_rng(seed)
    mass = rng.gamma(0.6, size=E) * (rng.random(E) < 0.8)
    warm = rng.random(E) < 0.25
    p2l = np.concatenate([rng.permutation(E), rng.choice(E, redundant, replace=False)])
    placement = Placement.from_map(E, R, torch.tensor(p2l))
    pick = pick_replicated if placement.has_replicas else pick_partitioned
    chosen, copy = pick(torch.tensor(mass, dtype=torch.float32), torch.tensor(warm), torch.tensor(b), placement, True)
    ranks = (copy[chosen] // placement.experts_per_rank).numpy()
    peak = int(np.bincount(ranks, minlength=R).max()) if ranks.size else 0
    opt = solve_xshare_ep(mass, warm, b, placement)
    got = float(mass[chosen.numpy()].sum())
    return {"peak": peak, "opt_peak": opt.capacity, "mass": got, "opt_mass": opt.mass,
            "mass_gap": (opt.mass - got) / opt.mass if opt.mass > 0 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    cases = [(16, 4, 0, 2), (32, 4, 0, 4), (16, 4, 4, 2), (32, 8, 8, 3), (24, 4, 8, 3)]
    rows, payload = [], {}
    for E, R, red, b in cases:
        res = [one(s, E, R, red, b) for s in tqdm(range(args.instances), desc=f"E={E} R={R} redundant={red}")]
        peak_excess = np.array([r["peak"] - r["opt_peak"] for r in res])
        gaps = np.array([r["mass_gap"] for r in res if r["peak"] <= r["opt_peak"]])
        key = f"E{E}_R{R}_red{red}_b{b}"
        payload[key] = {
            "instances": len(res),
            "peak_above_ilp": int((peak_excess > 0).sum()),
            "mean_mass_gap": float(gaps.mean()) if gaps.size else None,
            "max_mass_gap": float(gaps.max()) if gaps.size else None,
            "optimal_fraction": float(np.mean([r["peak"] <= r["opt_peak"] and r["mass_gap"] < 1e-6 for r in res])),
        }
        p = payload[key]
        rows.append([E, R, red, b, len(res), p["peak_above_ilp"], p["mean_mass_gap"] or 0.0, p["max_mass_gap"] or 0.0, p["optimal_fraction"]])
    md = markdown_table(["E", "ranks", "redundant", "b", "instances", "peak > ILP", "mean mass gap", "max mass gap", "optimal"], rows)
    print(md)
    write_results(args.out, "ilp_gap", {"cases": payload}, md, run_metadata())


if __name__ == "__main__":
    main()
