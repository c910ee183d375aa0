"""``sglang-xshare`` command line: ``replay`` (compare policies on a routing trace).

``replay`` prints its comparison table; it writes ``<name>.json`` / ``<name>.md`` only into an
explicit ``--out`` folder. Bad values exit with status 2 and an ``error:`` line naming the flag
as typed here (``--budget``, not the server's ``--xshare-budget``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .config import POLICY_NAMES, BudgetSchedule, XShareConfigError
from .select.traits import policy_traits

__all__ = ["main", "build_parser", "REPLAY_FLAGS"]

#: Core flag names (what :class:`XShareConfigError` carries) -> this front-end's flags.
REPLAY_FLAGS = {
    "--xshare-policy": "--policy",
    "--xshare-budget": "--budget",
    "--xshare-layer-budgets": "--layer-budgets",
    "--xshare-request-budget": "--request-budget",
    "--xshare-warmup-k0": "--k0",
    "--xshare-cap": "--cap",
    "--xshare-hard-cap": "--hard-cap",
    "--xshare-warmup-p": "--warmup-p",
    "--xshare-verify-budget": "--verify-budget",
    "--xshare-verify-guard": "--verify-guard",
}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="sglang-xshare", description="Batch-aware expert selection for SGLang MoE decode.",
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("replay", help="replay a routing trace through the policies and print one comparison table",
                       formatter_class=fmt,
                       description="Replay a routing trace through the policies and print one comparison table "
                                   "(written to files only with --out).")
    r.add_argument("--trace", type=Path, default=None, help="trace .npz (None: bench/data/model/trace_mixed_b16.npz of the repository checkout)")
    r.add_argument("--policy", default="xshare", choices=[n for n in POLICY_NAMES if not policy_traits(n).plain_topk],
                   help="our policy, compared with topk, cap and oea")
    r.add_argument("--also", default="", help="more policies to add to the table, comma separated")
    r.add_argument("--budget", default="0.7",
                   help="batch budget m_l: count (24), fraction (0.7), mass:0.9 or a preset (auto: budget, k0, p)")
    r.add_argument("--warmup-p", type=float, default=0.0, help="nucleus warm-up p of the budgeted policies (0 = off)")
    r.add_argument("--layer-budgets", default=None, help="per-layer overrides, LAYER:BUDGET,...")
    r.add_argument("--request-budget", default=None, help="xshare_spec per-request budget m_r")
    r.add_argument("--verify-budget", default=None,
                   help="batch budget of speculative verify batches (steps of a trace with request groups) for --policy "
                        "and --also, instead of --budget")
    r.add_argument("--verify-guard", type=int, default=0, metavar="K",
                   help="verify-row guard of --policy and --also: each request's target row keeps its own top-K "
                        "in verify batches (0 = off)")
    r.add_argument("--k0", type=int, default=1, help="warm-up floor: every token keeps its top-k0")
    r.add_argument("--cap", type=int, default=None, help="k' of the cap baseline (None: ceil(k/2))")
    r.add_argument("--ep-size", type=int, default=1, help="EP ranks for per-rank loads and xshare_ep")
    r.add_argument("--hard-cap", action="store_true",
                   help="xshare_ep: the budget is a hard cap on distinct experts (see --xshare-hard-cap)")
    r.add_argument("--out", type=Path, default=None,
                   help="folder to write <name>.json/.md into (None: print only, write nothing)")
    r.add_argument("--name", default="replay", help="output file stem (with --out)")
    r.add_argument("--device", default="cpu", help="where to run the selection (cpu, cuda, cuda:1, ...)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_device(name: str) -> None:
    """Raise naming ``--device`` if ``name`` is not a device this machine can use."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise XShareConfigError("--device", f"not a device: {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise XShareConfigError("--device", f"{name!r} requested but CUDA is not available here "
                                            "(no GPU, or a CPU-only torch); use --device cpu")
    try:
        torch.zeros(1, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise XShareConfigError("--device", f"cannot use {name!r}: {e}") from None


def _replay(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from ._checkout import data_hint
    from .benchio import run_metadata, write_results
    from .placement import Placement
    from .replay import replay, standard_runs
    from .trace import Trace, default_trace_path, step_groups

    path = args.trace or default_trace_path()
    if not Path(path).exists():
        hint = "" if args.trace else f" ({data_hint('the default trace', '--trace PATH')})"
        raise XShareConfigError("--trace", f"no trace file at {path}{hint}")
    _check_device(args.device)
    trace = Trace.load(path)
    routing = trace.routing
    layers = [int(x) for x in trace.meta["layer_ids"]]
    unknown = sorted(set(BudgetSchedule.parse(args.budget, args.layer_budgets).per_layer) - set(layers))
    if unknown:
        raise XShareConfigError("--layer-budgets", f"layer(s) {unknown} are not MoE layers of the trace "
                                                   f"(its layers: {layers})")
    if args.ep_size < 1:
        raise XShareConfigError("--ep-size", f"must be >= 1, got {args.ep_size}")
    if args.verify_guard and not all(step_groups(trace)):
        raise XShareConfigError("--verify-guard", "the trace has steps whose requests are not runs of consecutive "
                                                  "slots: the guard cannot tell a request's target row there")
    placement = Placement.expert_parallel(routing.num_experts, args.ep_size) if args.ep_size > 1 else None
    extra = [x.strip() for x in args.also.split(",") if x.strip()]
    for x in extra:
        if x not in POLICY_NAMES:
            raise XShareConfigError("--also", f"unknown policy {x!r}; choose from {', '.join(POLICY_NAMES)}")
    runs = standard_runs(routing, args.policy, args.budget, k0=args.k0, cap=args.cap,
                         request_budget=args.request_budget, layer_budgets=args.layer_budgets, extra=extra,
                         hard_cap=args.hard_cap, warmup_p=args.warmup_p, verify_budget=args.verify_budget,
                         verify_guard=args.verify_guard)
    result = replay(trace, runs, placement, device=args.device, progress=not args.no_progress)
    info = result.info
    try:  # the trace as the user would type it: relative to the working directory when under it
        shown = Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = path
    md = (
        f"Trace: `{shown}` ({info['model']}; {info['trace_steps']} steps x {info['layers']} layers, "
        f"{info['batch_slots']} slots, E={info['num_experts']}, k={info['top_k']}), EP ranks: {info['ep_ranks']}; "
        f"{result.batches} batches. Means over (step, layer) batches; ratios to topk.\n\n" + result.table()
    )
    print(md)
    if args.out is not None:
        meta = run_metadata(["sglang-xshare", *argv])
        payload = {"info": info, "overall": result.overall, "per_layer": result.per_layer}
        jp, mp = write_results(args.out, args.name, payload, md, meta)
        print(f"\nwrote {jp} and {mp}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] not in ("replay", "-h", "--help"):
        argv = ["replay", *argv]  # replay is the default command
    args = parser.parse_args(argv)
    if args.cmd is None:
        args = parser.parse_args(["replay", *argv])
    try:
        return _replay(args, argv)
    except XShareConfigError as e:
        parser.error(str(e.renamed(REPLAY_FLAGS)))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
