"""Quality sweep: CE cost vs activated experts of every selection policy on the trained MoE.

The model is the project's own ``Qwen3MoeForCausalLM`` (6 layers, 64 experts, top-8; see
``bench/quality/README.md``), evaluated teacher-forced on held-out text it never trained on. At
each position the ``B`` sequences of a batch form the decode batch the policy selects for (per
layer); in speculative mode ``g = 1 + drafts`` consecutive positions of one sequence are one
request. Reference: plain top-k on the same sequences.

Operating points (per batch size ``B``):

* ``cap``          per-token top-k' (``--caps``)
* ``oea``          Opportunistic Expert Activation, warm-up ``k0`` (``--oea-k0``)
* ``xshare``       batch budget ``m_l`` as a fraction of top-k's distinct experts (``--budgets``)
* ``xshare_ep``    GPU-aware XShare on an EP placement of ``--ep-size`` ranks, same budgets
* ``xshare_spec``  speculative layout (``--spec-draft`` drafts), request budget ``--spec-request-budget``,
  same batch budgets
* ``--homogeneous-b``: ``xshare`` again with single-dataset batches (vs mixed) at that ``B``

Outputs ``bench/results/quality.{json,md}`` and ``bench/results/quality_pareto.png``.

Usage::

    .venv/bin/python bench/quality.py                    # full sweep (~10-15 min on 2 CPU cores)
    .venv/bin/python bench/quality.py --quick            # smoke run
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from sglang_xshare.benchio import markdown_table, run_metadata, write_results
from sglang_xshare.config import Budget, BudgetSchedule, SelectionConfig
from sglang_xshare.hf import (StepLayout, evaluate_point, load_eval_set, load_model, make_batches,
                              routing_spec_of, sequence_ce)
from sglang_xshare.placement import Placement
from sglang_xshare.select import Selector


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _batches_per_b(s: str) -> dict[int, int]:
    out = {}
    for item in s.split(","):
        b, _, n = item.partition(":")
        out[int(b)] = int(n)
    return out


def build_points(args: argparse.Namespace, E: int) -> list[dict]:
    """Operating points: ``{policy, setting, cfg, layout, composition, placement}`` (per ``B``)."""
    pts: list[dict] = [{"policy": "topk", "setting": "k", "cfg": SelectionConfig(policy="topk"), "g": 1}]
    for c in args.caps:
        pts.append({"policy": "cap", "setting": f"k'={c}", "cfg": SelectionConfig(policy="cap", cap=c), "g": 1})
    for k0 in args.oea_k0:
        pts.append({"policy": "oea", "setting": f"k0={k0}", "cfg": SelectionConfig(policy="oea", k0=k0), "g": 1})
    for f in args.budgets:
        sched = BudgetSchedule.parse(f"frac:{f}")
        pts.append({"policy": "xshare", "setting": f"m=frac:{f:g},k0={args.k0}",
                    "cfg": SelectionConfig(policy="xshare", k0=args.k0, budget=sched), "g": 1})
    for f in args.budgets:
        sched = BudgetSchedule.parse(f"frac:{f}")
        pts.append({"policy": "xshare_ep", "setting": f"m=frac:{f:g},k0={args.k0},ep={args.ep_size}",
                    "cfg": SelectionConfig(policy="xshare_ep", k0=args.k0, budget=sched),
                    "placement": Placement.expert_parallel(E, args.ep_size), "g": 1})
    g = 1 + args.spec_draft
    if args.spec_draft > 0:
        pts.append({"policy": "topk", "setting": f"k,g={g}", "cfg": SelectionConfig(policy="topk"), "g": g})
        for f in args.budgets:
            sched = BudgetSchedule.parse(f"frac:{f}")
            rb = Budget.parse(args.spec_request_budget, "--spec-request-budget")
            pts.append({"policy": "xshare_spec", "setting": f"m=frac:{f:g},m_r={rb},k0={args.k0},g={g}",
                        "cfg": SelectionConfig(policy="xshare_spec", k0=args.k0, budget=sched, request_budget=rb),
                        "g": g})
            pts.append({"policy": "xshare", "setting": f"m=frac:{f:g},k0={args.k0},g={g}",
                        "cfg": SelectionConfig(policy="xshare", k0=args.k0, budget=sched), "g": g})
    return pts


def plot(rows: list[dict], path: Path, batch_sizes: list[int]) -> None:
    """Pareto plot: activated experts per layer and step vs CE delta, one curve per policy, one panel per B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4.6 * len(batch_sizes), 4.2), squeeze=False)
    styles = {"topk": ("k", "*"), "cap": ("tab:gray", "s"), "oea": ("tab:orange", "^"),
              "xshare": ("tab:blue", "o"), "xshare_ep": ("tab:green", "D"), "xshare_spec": ("tab:red", "v")}
    for ax, B in zip(axes[0], batch_sizes):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["B"] != B:
                continue
            key = r["policy"] + (f" (g={r['g']})" if r["g"] > 1 else "") + (" homog." if r["composition"] != "mixed" else "")
            groups.setdefault(key, []).append(r)
        for key, rs in sorted(groups.items()):
            rs = sorted(rs, key=lambda r: r["distinct"])
            color, marker = styles.get(rs[0]["policy"], ("tab:purple", "x"))
            ls = "--" if rs[0]["g"] > 1 else (":" if rs[0]["composition"] != "mixed" else "-")
            ax.errorbar([r["distinct"] for r in rs], [r["delta"] for r in rs], yerr=[r["ci95"] for r in rs],
                        color=color, marker=marker, ls=ls, capsize=2, label=key, ms=5)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=0.02)
        ax.set_title(f"B = {B}")
        ax.set_xlabel("activated experts per layer and step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("CE delta vs top-k (nats/token, symlog; bars: 95% CI)")
    labels: dict[str, object] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(lab, h)
    fig.legend(list(labels.values()), list(labels.keys()), loc="lower center", ncol=min(len(labels), 9), fontsize=8)
    fig.suptitle("Quality vs activated experts (trained Qwen3-MoE, 64 experts, top-8, held-out text; "
                 "solid: mixed batches, dotted: homogeneous, dashed: g = 1 + 3 drafts per request)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: shipped model)")
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16, 64])
    ap.add_argument("--num-batches", type=_batches_per_b, default=_batches_per_b("1:12,4:8,16:6,64:4"),
                    help="batches per batch size, B:N,...")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--budgets", type=_floats, default=[0.4, 0.6, 0.8], help="xshare batch budgets (fractions)")
    ap.add_argument("--k0", type=int, default=1)
    ap.add_argument("--caps", type=_ints, default=[2, 4, 6])
    ap.add_argument("--oea-k0", type=_ints, default=[1, 2, 4])
    ap.add_argument("--ep-size", type=int, default=8)
    ap.add_argument("--spec-draft", type=int, default=3, help="draft tokens per request (0: no spec points)")
    ap.add_argument("--spec-request-budget", default="frac:0.75")
    ap.add_argument("--homogeneous-b", type=_ints, default=[16], help="B values also run with homogeneous batches")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny ops, esp. on a shared CPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="quality")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (B=4,16; 2 batches; seq 32)")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the PNG from a results JSON")
    args = ap.parse_args()
    if args.replot is not None:
        import json

        data = json.loads(args.replot.read_text())
        png = args.replot.with_name(args.replot.stem + "_pareto.png")
        plot(data["rows"], png, data["config"]["batch_sizes"])
        print(f"wrote {png}")
        return
    if args.quick:
        args.batch_sizes, args.num_batches, args.seq_len = [4, 16], {4: 2, 16: 2}, 32
        args.budgets, args.caps, args.oea_k0, args.homogeneous_b = [0.5], [4], [1], []
    torch.set_num_threads(args.threads)
    meta = run_metadata()
    model = load_model(args.model)
    model.config._experts_implementation = "eager"  # fastest on CPU, exact skip of sentinel slots
    routing = routing_spec_of(model.config)
    ev = load_eval_set()
    points = build_points(args, routing.num_experts)

    # jobs: (B, composition, point)
    jobs = []
    for B in args.batch_sizes:
        if B not in args.num_batches:
            raise SystemExit(f"--num-batches has no entry for B={B}")
        for p in points:
            jobs.append((B, "mixed", p))
        if B in args.homogeneous_b:
            for p in points:
                if p["policy"] in ("topk", "xshare") and p["g"] == 1:
                    jobs.append((B, "homogeneous", p))
    total = sum(args.num_batches[B] for B, _, _ in jobs)
    rows: list[dict] = []
    ref_cache: dict[tuple[int, str], list[torch.Tensor]] = {}
    t0 = time.perf_counter()
    with tqdm(total=total, desc="quality sweep", unit="batch") as bar:
        for B, comp, p in jobs:
            batches = make_batches(ev, B, args.num_batches[B], comp, seq_len=args.seq_len)
            if (B, comp) not in ref_cache:  # plain top-k per-sequence CE (independent of batching)
                ref_cache[(B, comp)] = [sequence_ce(model, t) for t, _ in batches]
            sel = Selector(routing, p["cfg"], placement=p.get("placement"), backend="reference")
            bar.set_postfix_str(f"B={B} {comp[:3]} {p['policy']} {p['setting']}")
            res = evaluate_point(model, sel, batches, ref_cache[(B, comp)], StepLayout(p["g"]),
                                 measure_output_error=True, progress=bar)
            row = {"B": B, "composition": comp, "policy": p["policy"], "setting": p["setting"], "g": p["g"],
                   **{k: v for k, v in asdict(res).items()}}
            row["act_ratio"] = res.distinct / res.distinct_topk if res.distinct_topk else float("nan")
            rows.append(row)
    elapsed = time.perf_counter() - t0

    headers = ["B", "batches", "policy", "setting", "experts/layer", "top-k experts", "ratio",
               "CE top-k", "dCE", "dCE %", "95% CI", "kept mass", "MoE rel err"]
    table = [[r["B"], r["composition"], r["policy"], r["setting"], r["distinct"], r["distinct_topk"],
              r["act_ratio"], r["ce_ref"], r["delta"], 100 * r["delta_rel"], r["ci95"],
              r["retained_mass"], r["moe_rel_err"]] for r in rows]
    table_md = markdown_table(headers, table)
    print(table_md)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{args.name}_pareto.png"
    plot(rows, png, args.batch_sizes)
    md = (
        f"Model: `{args.model or 'sglang_xshare/data/model'}` ({routing.num_experts} experts, top-{routing.top_k}, "
        f"{len(model.config.layer_types) if hasattr(model.config, 'layer_types') else model.config.num_hidden_layers} layers), "
        f"held-out eval set of {', '.join(ev.datasets)}; teacher-forced, {args.seq_len} positions per sequence; "
        f"decode batch = the B sequences at one position (g > 1: g consecutive positions of a sequence are one "
        f"request). dCE = mean per-batch CE(policy) - CE(top-k) in nats/token, 95% CI over batches "
        f"(t interval; batches per B: {args.num_batches}). 'experts/layer' = distinct experts activated per layer "
        f"and decode step. Sweep time {elapsed:.0f} s.\n\n"
        f"![pareto]({png.name})\n\n" + table_md + "\n"
    )
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "model": {"num_experts": routing.num_experts, "top_k": routing.top_k,
                         "path": str(args.model or "sglang_xshare/data/model")},
               "elapsed_s": elapsed, "rows": rows}
    jp, mp = write_results(args.out, args.name, payload, md, meta)
    print(f"wrote {jp}, {mp}, {png}")


if __name__ == "__main__":
    main()
