"""``sglang-xshare`` command line: ``replay`` (compare policies on a routing trace)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .config import POLICY_NAMES, XShareConfigError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglang-xshare", description="Batch-aware expert selection for SGLang MoE decode.")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("replay", help="replay a routing trace through the policies and print one comparison table")
    r.add_argument("--trace", type=Path, default=None, help="trace .npz (default: the trace shipped with the package)")
    r.add_argument("--policy", default="xshare", choices=[n for n in POLICY_NAMES if n not in ("topk",)],
                   help="our policy, compared with topk, cap and oea (default: xshare)")
    r.add_argument("--also", default="", help="more policies to add to the table, comma separated")
    r.add_argument("--budget", default="0.7",
                   help="batch budget m_l: count (24), fraction (0.7), mass:0.9 or a preset (auto: budget, k0, p)")
    r.add_argument("--warmup-p", type=float, default=0.0, help="nucleus warm-up p of the budgeted policies (0 = off)")
    r.add_argument("--layer-budgets", default=None, help="per-layer overrides, LAYER:BUDGET,...")
    r.add_argument("--request-budget", default=None, help="xshare_spec per-request budget m_r")
    r.add_argument("--k0", type=int, default=1, help="warm-up floor: every token keeps its top-k0")
    r.add_argument("--cap", type=int, default=None, help="k' of the cap baseline (default ceil(k/2))")
    r.add_argument("--ep-size", type=int, default=1, help="EP ranks for per-rank loads and xshare_ep")
    r.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for <name>.json/.md")
    r.add_argument("--name", default="replay", help="output file stem")
    r.add_argument("--device", default="cpu")
    r.add_argument("--no-progress", action="store_true")
    return p


def _replay(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .benchio import run_metadata, write_results
    from .placement import Placement
    from .replay import replay, standard_runs
    from .trace import Trace, default_trace_path

    path = args.trace or default_trace_path()
    if not Path(path).exists():
        raise XShareConfigError("--trace", f"no trace file at {path}")
    trace = Trace.load(path)
    routing = trace.routing
    placement = Placement.expert_parallel(routing.num_experts, args.ep_size) if args.ep_size > 1 else None
    extra = [x.strip() for x in args.also.split(",") if x.strip()]
    for x in extra:
        if x not in POLICY_NAMES:
            raise XShareConfigError("--also", f"unknown policy {x!r}; choose from {', '.join(POLICY_NAMES)}")
    runs = standard_runs(routing, args.policy, args.budget, k0=args.k0, cap=args.cap,
                         request_budget=args.request_budget, layer_budgets=args.layer_budgets, extra=extra,
                         warmup_p=args.warmup_p)
    result = replay(trace, runs, placement, device=args.device, progress=not args.no_progress)
    meta = run_metadata(["sglang-xshare", *argv])
    info = result.info
    md = (
        f"Trace: `{path}` ({info['model']}; {info['trace_steps']} steps x {info['layers']} layers, "
        f"{info['batch_slots']} slots, E={info['num_experts']}, k={info['top_k']}), EP ranks: {info['ep_ranks']}; "
        f"{result.batches} batches. Means over (step, layer) batches; ratios to topk.\n\n" + result.table()
    )
    print(md)
    jp, mp = write_results(args.out, args.name, {"info": info, "overall": result.overall, "per_layer": result.per_layer}, md, meta)
    print(f"\nwrote {jp} and {mp}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        args = parser.parse_args(["replay", *argv])
    try:
        return _replay(args, argv)
    except XShareConfigError as e:
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
