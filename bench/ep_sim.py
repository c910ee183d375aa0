#!/usr/bin/env python
"""Simulated busiest-rank load of each policy at larger EP sizes (CPU, no GPU needed).

For EP = 2, 4, 8, 16, 32 (pure EP placement, ``E / R`` experts per rank) and decode batches of
``T`` tokens per rank (``R * T`` tokens in all, the DP-attention layout), replay router logits
through the selection policies and report, averaged over ``--batches`` batches (layers x steps):

* ``peak_experts`` -- distinct experts on the busiest rank (the weights it must read), and its
  ratio to ``topk`` (**peak-load ratio**); ``peak_tokens`` -- token-expert pairs on the busiest rank;
* ``peak/mean`` -- load imbalance; ``retained`` -- kept share of the top-k gating mass;
* two views for the batch-aware policies: ``global`` (one expert set for all ranks' tokens: the
  DP-attention all-reduce, :class:`~sglang_xshare.moe.dp_attention.DPAttentionSelector`; equal to
  the policy on the whole batch, which is what is computed here) and ``local`` (each rank selects
  on its own ``T`` tokens; the busiest rank reads the union).

Routing comes from a trace (``--trace``, default the packaged one) when it exists; otherwise from
the documented generator of :mod:`sglang_xshare.moe.routing_source` with ``--experts``/``--top-k``.
Writes ``bench/results/<name>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


from sglang_xshare.benchio import markdown_table, run_metadata, write_results
from sglang_xshare.config import BudgetSchedule, RoutingSpec, SelectionConfig
from sglang_xshare.metrics import selection_metrics
from sglang_xshare.moe.routing_source import RoutingSource
from sglang_xshare.placement import Placement
from sglang_xshare.select import SelectionOutput, Selector, compute_scores

BATCH_AWARE = ("xshare", "xshare_ep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=None, help="routing trace .npz (default: the packaged one)")
    p.add_argument("--experts", type=int, default=128, help="E for the generator when no trace is used")
    p.add_argument("--top-k", type=int, default=4, help="k for the generator when no trace is used")
    p.add_argument("--ep", default="2,4,8,16,32")
    p.add_argument("--tokens", default="16,64", help="decode tokens per rank")
    p.add_argument("--policy", default="topk,xshare,xshare_ep,oea")
    p.add_argument("--budget", default="0.5")
    p.add_argument("--k0", type=int, default=1)
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    a.ep_list = [int(x) for x in a.ep.split(",") if x.strip()]
    a.token_list = [int(x) for x in a.tokens.split(",") if x.strip()]
    a.policies = [x.strip() for x in a.policy.split(",") if x.strip()]
    if "topk" not in a.policies:
        a.policies.insert(0, "topk")
    return a


def concat(outs: list[SelectionOutput]) -> SelectionOutput:
    phys = None if outs[0].physical_ids is None else torch.cat([o.physical_ids for o in outs])
    return SelectionOutput(torch.cat([o.topk_ids for o in outs]), torch.cat([o.topk_weights for o in outs]), phys)


def simulate(args, source: RoutingSource, routing: RoutingSpec) -> list[dict]:
    from tqdm import tqdm

    E = routing.num_experts
    rows = []
    eps = [r for r in args.ep_list if E % r == 0]
    work = [(R, T, pol, view) for R in eps for T in args.token_list for pol in args.policies
            for view in (("global", "local") if pol in BATCH_AWARE else ("global",))]
    for R, T, pol, view in tqdm(work, desc="ep_sim", file=sys.stdout):
        placement = Placement.expert_parallel(E, R)
        cfg = SelectionConfig(policy=pol, k0=args.k0, min_score=args.min_score,
                              budget=BudgetSchedule.parse(args.budget) if pol in BATCH_AWARE else None)
        sel = Selector(routing, cfg, placement=placement, backend="reference")
        acc: dict[str, float] = {}
        for b in range(args.batches):
            logits = source.batch(R * T, layer=b % source.num_layers, index=b * 131 + T)
            if view == "global":
                out = sel(logits)
            else:
                out = concat([sel(logits[r * T:(r + 1) * T]) for r in range(R)])
            m = selection_metrics(out, compute_scores(logits, routing), torch.ones(R * T, dtype=torch.bool), routing.top_k, placement)
            for k, v in m.items():
                if v.dim() == 0:
                    acc[k] = acc.get(k, 0.0) + float(v) / args.batches
        rows.append(dict(ep=R, T=T, policy=pol, view=view, **acc))
    base = {(r["ep"], r["T"]): r for r in rows if r["policy"] == "topk"}
    for r in rows:
        b = base[(r["ep"], r["T"])]
        r["peak_ratio"] = r["peak_experts"] / max(b["peak_experts"], 1e-9)
        r["peak_tokens_ratio"] = r["peak_tokens"] / max(b["peak_tokens"], 1e-9)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(Ts), figsize=(5.5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for key in dict.fromkeys((r["policy"], r["view"]) for r in rows):
            pts = [r for r in rows if r["T"] == T and (r["policy"], r["view"]) == key]
            ax.plot([r["ep"] for r in pts], [r["peak_ratio"] for r in pts], marker="o",
                    label=f"{key[0]} ({key[1]})" if key[0] in BATCH_AWARE else key[0])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("EP size")
        ax.set_ylabel("busiest-rank distinct experts / topk")
        ax.set_title(f"{T} decode tokens per rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pick_source(args) -> tuple[RoutingSource, RoutingSpec]:
    """The trace given (at its own E/k), else the packaged trace, else the generator (--experts/--top-k)."""
    from sglang_xshare.trace import Trace, default_trace_path

    path = Path(args.trace) if args.trace else default_trace_path()
    if path.exists():
        tr = Trace.load(path)
        return RoutingSource(tr.logits.shape[-1], int(tr.meta["top_k"]), str(path), seed=args.seed), tr.routing
    if args.trace:
        raise SystemExit(f"--trace: {path} does not exist")
    return (RoutingSource(args.experts, args.top_k, None, seed=args.seed),
            RoutingSpec(num_experts=args.experts, top_k=args.top_k))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source, routing = pick_source(args)
    rows = simulate(args, source, routing)
    E, k = routing.num_experts, routing.top_k
    heads = ["EP", "T/rank", "policy", "view", "peak experts", "peak ratio vs topk", "mean experts", "peak/mean",
             "peak pairs", "peak pairs ratio", "distinct", "retained"]
    tab = [[r["ep"], r["T"], r["policy"], r["view"], r["peak_experts"], r["peak_ratio"], r["mean_experts"],
            r["peak_over_mean"], r["peak_tokens"], r["peak_tokens_ratio"], r["distinct"], r["retained_mass"]] for r in rows]
    skipped = [R for R in args.ep_list if E % R]
    md = "\n".join([
        f"Routing: {source.description}; E={E}, top-k={k}, budget {args.budget}, k0={args.k0}, min_score={args.min_score}, "
        f"{args.batches} batches per point (averages).",
        "Placement: pure EP. `global` = one expert set for all ranks' tokens (DP-attention all-reduce); "
        "`local` = each rank selects on its own tokens. `peak ratio` = busiest-rank distinct experts / topk's."
        + (f" Skipped EP sizes (E not divisible): {skipped}." if skipped else ""),
        "",
        markdown_table(heads, tab),
    ])
    stem = args.name or f"ep_sim_E{E}_k{k}"
    meta = run_metadata()
    jp, mp = write_results(args.out, stem, {"args": vars(args), "routing": source.description, "rows": rows}, md, meta)
    png = Path(args.out) / f"{stem}.png"
    plot(rows, png, f"Simulated peak-load ratio, E={E} k={k}, budget {args.budget}")
    print(md)
    print(f"[ep_sim] wrote {jp}, {mp}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
