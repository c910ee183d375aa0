"""Speed and quality of every serving operating point, in one row: what a configuration buys and what it costs.

Reads the result files of ``bench/serve.py`` (one per model shape, in-server A/B and/or separate
servers) and the held-out quality sweep of ``bench/quality.py`` (``bench/results/quality.json``)
and writes ``<name>.{json,md,png}``:

* per configuration and concurrency: the TPOT speed-up over SGLang's own routing (in-server A/B:
  rep by rep against the same server's SGLang arm; separate servers: paired within rounds), its
  95 % t interval over the pairs, the output tok/s ratio, the distinct-expert ratio the server
  measured (xshare's live metrics: the policy's experts per MoE layer call / plain top-k's on the
  same batches), and the cross-entropy cost on the evaluation model at that expert ratio and batch size;
* where the run was profiled (``--profile-steps``): the decode step's GPU time by category, the
  expert kernels' time ratio, the *conversion* and the speed-up the profile implies.

Quality mapping. The serving presets have random weights (their routing says nothing about
quality), and the evaluation model has 64 experts and top-8, not the served shapes. A
serving point is therefore mapped *by expert ratio and batch size*: the batch size is the
concurrency, rounded up to the next batch size the sweep measured (1, 4, 16, 64; conservative,
the cost of a given ratio grows with the batch); the cost is that of the evaluation model's setting of
the same policy family that activates at most the same ratio (+0.005) with the smallest CE delta
(``at ratio``), and, where the sweep has it, the same setting itself (``same setting``: e.g.
``auto`` is ``xshare k0=3 budget=0.8``). dCE % = CE delta / top-k's CE, held-out text.

Conversion. ``t`` = the policy arm's expert-kernel ms per step / SGLang's arm's, ``e`` = the
distinct-expert ratio: ``t / e`` (1.0 when expert time falls exactly with the experts read; above 1
when part of the cut is not turned into time) and the share of the cut converted,
``(1 - t) / (1 - e)``. The ideal end-to-end speed-up is SGLang's step time over that step with
the expert time scaled by ``e`` and nothing else changed.

    python bench/speed_quality.py --serve bench/results/serve_qwen3_tp1_arms.json \\
        bench/results/serve_gptoss_tp1_arms.json --name speed_quality_1gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sglang_xshare.benchio import markdown_table, mean_ci, run_metadata, write_results
from sglang_xshare.config import PRESETS
from sglang_xshare.select.traits import TRAITS

from servebench.configs import parse_config

ROOT = Path(__file__).resolve().parents[1]
QUALITY_BS = (1, 4, 16, 64)
def quality_batch(concurrency: int) -> int:
    """The sweep's batch size for a serving concurrency: the next measured one at or above it (64 beyond)."""
    return next((b for b in QUALITY_BS if b >= concurrency), QUALITY_BS[-1])


def family_and_setting(label: str) -> tuple[str | None, str | None]:
    """A serving configuration label -> (policy family, the quality sweep's spec of the same setting or ``None``)."""
    try:
        cfg = parse_config(label)
    except ValueError:
        return None, None
    flags = dict(zip(cfg.flags[::2], cfg.flags[1::2]))
    pol = cfg.policy
    if pol in TRAITS and TRAITS[pol].budgeted:
        budget = flags.get("--xshare-budget")
        k0 = int(flags.get("--xshare-warmup-k0", 1))
        if budget in PRESETS:
            pre = PRESETS[budget]
            budget, k0 = pre.budget, pre.k0
        if budget is None:
            return "xshare", None
        if not (budget.startswith("mass:") or "." in budget):  # an expert count: no same setting on E=64
            return "xshare", None
        return "xshare", f"xshare k0={k0} budget={budget}"
    if pol in ("oea", "oea_simple"):
        return "oea", f"oea k0={flags.get('--xshare-warmup-k0', 1)}"
    if pol == "cap":
        return "cap", f"cap cap={flags.get('--xshare-cap')}"
    return None, None


def _spec_norm(spec: str) -> str:
    return " ".join(p if not p.startswith("budget=") or ":" in p else f"budget={float(p[7:]):g}" for p in spec.split())


#: An expert ratio at or above this is no cut (top-k's own experts, up to rounding of the live means).
NO_CUT_RATIO = 0.995


def quality_cost(rows: list[dict], family: str | None, setting: str | None, ratio: float | None, B: int) -> dict:
    """The evaluation model's cost at batch ``B``: the same ``setting`` and the best of ``family`` at ``ratio``."""
    out: dict = {"B": B}
    at_b = [r for r in rows if r["B"] == B and r.get("g", 1) == 1]
    if setting is not None:
        same = next((r for r in at_b if _spec_norm(r["spec"]) == _spec_norm(setting)), None)
        if same is not None:
            out["same"] = {"spec": same["spec"], "ratio": same["ratio"], "dce_pct": 100 * same["delta_rel"],
                           "ci_pct": 100 * same["ci95"] / same["ce_ref"]}
    if ratio is not None and ratio >= NO_CUT_RATIO:
        # the server ran top-k's own experts: nothing was cut, so there is no cost to map
        out["at_ratio"] = {"spec": None, "note": f"none: no cut (ratio {ratio:.3f})"}
    elif family is not None and ratio is not None:
        cand = [r for r in at_b if r["family"] == family and r["ratio"] <= ratio + 0.005]
        if cand:
            b = min(cand, key=lambda r: r["delta_rel"])
            out["at_ratio"] = {"spec": b["spec"], "ratio": b["ratio"], "dce_pct": 100 * b["delta_rel"],
                               "ci_pct": 100 * b["ci95"] / b["ce_ref"]}
        else:
            out["at_ratio"] = {"spec": None, "note": f"no {family} setting of the sweep cuts to {ratio:.3f} at B={B}"}
    return out


def profile_rows(serve: dict, speed: dict[tuple[str, int], dict]) -> list[dict]:
    """Conversion and ideal speed-up from each profiled level (policy arms against the SGLang arm)."""
    out = []
    for rec in serve.get("records", []):
        for lvl in rec.get("levels", []):
            prof = lvl.get("profile") or {}
            sg = (prof.get("sglang") or {}).get("0")
            if not sg or not sg.get("graph_launches"):
                continue
            n_sg = sg["graph_launches"]
            sg_step = sg["total_us"] / n_sg / 1000
            sg_exp = sg["kernel_us"].get("MoE experts", 0.0) / n_sg / 1000
            for arm, per_rank in prof.items():
                r0 = (per_rank or {}).get("0")
                if arm == "sglang" or not r0 or not r0.get("graph_launches"):
                    continue
                n = r0["graph_launches"]
                step = r0["total_us"] / n / 1000
                exp = r0["kernel_us"].get("MoE experts", 0.0) / n / 1000
                sp = speed.get((arm, lvl["concurrency"]), {})
                e = sp.get("expert_ratio")
                t = exp / sg_exp if sg_exp else None
                row = {"config": arm, "concurrency": lvl["concurrency"], "sglang_step_ms": sg_step, "step_ms": step,
                       "sglang_experts_ms": sg_exp, "experts_ms": exp, "expert_time_ratio": t, "expert_ratio": e,
                       "selection_ms": r0["kernel_us"].get("xshare selection", 0.0) / n / 1000,
                       "sglang_routing_ms": sg["kernel_us"].get("SGLang routing", 0.0) / n_sg / 1000,
                       "attention_ms": r0["kernel_us"].get("attention", 0.0) / n / 1000,
                       "other_ms": sum(v for k, v in r0["kernel_us"].items()
                                       if k not in ("MoE experts", "xshare selection", "SGLang routing", "attention")) / n / 1000,
                       "profile_speedup": sg_step / step if step else None, "measured_speedup": sp.get("speedup")}
                if t is not None and e:
                    row["conversion"] = t / e
                    row["cut_converted"] = (1 - t) / (1 - e) if e < 1 else None
                    row["ideal_speedup"] = sg_step / (sg_step - sg_exp * (1 - e))
                out.append(row)
    return out


def speed_rows(serve: dict, quality_rows: list[dict]) -> list[dict]:
    """One row per (configuration, concurrency) of a serve result: speed-up with CI, expert ratio, cost."""
    out = []
    for r in serve["rows"]:
        if r["config"] in ("off", "plain", "topk"):
            continue
        ab = r.get("ab_tpot_speedups") or []
        sep = r.get("tpot_paired_speedups") or []
        method, pairs = ("in-server A/B", ab) if ab else ("separate servers", sep)
        m, ci = mean_ci(pairs)
        ratio = (r["experts"] / r["topk_experts"]) if r.get("experts") and r.get("topk_experts") else None
        fam, setting = family_and_setting(r["config"])
        B = quality_batch(r["concurrency"])
        out.append({"config": r["config"], "concurrency": r["concurrency"], "method": method, "pairs": len(pairs),
                    "speedup": m, "speedup_ci": ci, "speedup_median": r.get("ab_tpot_speedup") if ab else r.get("tpot_paired_speedup"),
                    "tok_ratio": r.get("ab_tok_ratio") if ab else r.get("paired_ratio"),
                    "tpot_ms": r.get("tpot_med_ms"), "sglang_tpot_ms": r.get("ab_sglang_tpot_ms"),
                    "experts": r.get("experts"), "topk_experts": r.get("topk_experts"), "expert_ratio": ratio,
                    "quality": quality_cost(quality_rows, fam, setting, ratio, B)})
    return out


def _f(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def _cost_cell(q: dict, key: str) -> str:
    c = q.get(key)
    if not c:
        return "-"
    if c.get("spec") is None:
        return c.get("note", "-")
    return f"{c['dce_pct']:.2f} ± {c['ci_pct']:.2f} % (`{c['spec']}`, ratio {c['ratio']:.3f})"


def markdown(shapes: list[dict]) -> str:
    lines = []
    for s in shapes:
        lines += [f"## {s['title']}", "", f"Source: `{s['file']}` (git `{s['meta'].get('git')}`, {s['meta'].get('device')}, "
                  f"SGLang {s['meta'].get('sglang')}, {s['meta'].get('date')}).", ""]
        lines.append(markdown_table(
            ["config", "conc.", "method", "TPOT speed-up (mean ± 95 % CI)", "tok/s ratio", "TPOT ms (SGLang arm)",
             "experts / layer (top-k)", "expert ratio", "quality B", "dCE at ratio (evaluation model)", "dCE same setting"],
            [[r["config"], r["concurrency"], f"{r['method']} ({r['pairs']} pairs)",
              f"{_f(r['speedup'])} ± {_f(r['speedup_ci'])}" if r["speedup_ci"] is not None else _f(r["speedup"]),
              _f(r["tok_ratio"]), f"{_f(r['tpot_ms'], 2)} ({_f(r['sglang_tpot_ms'], 2)})",
              f"{_f(r['experts'], 1)} ({_f(r['topk_experts'], 1)})", _f(r["expert_ratio"]), r["quality"]["B"],
              _cost_cell(r["quality"], "at_ratio"), _cost_cell(r["quality"], "same")] for r in s["rows"]]))
        if s["profile"]:
            lines += ["", "Where the decode step's GPU time goes (SGLang's profiler, kernel ms per step):", ""]
            lines.append(markdown_table(
                ["config", "conc.", "step ms (SGLang arm)", "experts ms (SGLang arm)", "selection ms", "SGLang routing ms",
                 "attention ms", "other ms", "expert time ratio t", "expert ratio e", "conversion t/e",
                 "cut converted (1-t)/(1-e)", "ideal speed-up", "profile speed-up", "measured speed-up"],
                [[p["config"], p["concurrency"], f"{_f(p['step_ms'])} ({_f(p['sglang_step_ms'])})",
                  f"{_f(p['experts_ms'])} ({_f(p['sglang_experts_ms'])})", _f(p["selection_ms"]),
                  _f(p["sglang_routing_ms"]), _f(p["attention_ms"]), _f(p["other_ms"]), _f(p["expert_time_ratio"]),
                  _f(p["expert_ratio"]), _f(p.get("conversion")), _f(p.get("cut_converted")), _f(p.get("ideal_speedup")),
                  _f(p["profile_speedup"]), _f(p["measured_speedup"])] for p in s["profile"]]))
        lines.append("")
    return "\n".join(lines)


def plot(shapes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        for cfg in dict.fromkeys(r["config"] for r in s["rows"]):
            rs = sorted((r for r in s["rows"] if r["config"] == cfg and r["speedup"] is not None), key=lambda r: r["concurrency"])
            if rs:
                ax.errorbar([r["concurrency"] for r in rs], [r["speedup"] for r in rs],
                            yerr=[r["speedup_ci"] or 0 for r in rs], marker="o", capsize=3, label=cfg)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("TPOT speed-up over SGLang's routing")
        ax.set_title(s["short"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", nargs="+", required=True, type=Path, help="bench/serve.py result JSON files")
    ap.add_argument("--quality", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    ap.add_argument("--name", default="speed_quality")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    qrows = json.loads(args.quality.read_text())["rows"]
    shapes = []
    for f in args.serve:
        serve = json.loads(f.read_text())
        rows = speed_rows(serve, qrows)
        speed = {(r["config"], r["concurrency"]): r for r in rows}
        shapes.append({"file": f.name, "title": serve.get("title", f.stem), "short": f.stem, "meta": serve.get("meta", {}),
                       "rows": rows, "profile": profile_rows(serve, speed)})
    note = ("Speed: TPOT speed-up over SGLang's own routing, mean ± 95 % t interval over the pairs (in-server A/B: each "
            "rep's policy arm against the same server's SGLang arm; separate servers: paired within rounds). Expert "
            "ratio: measured in the server. Quality: CE cost on the evaluation model (64 experts, top-8, held-out text, "
            f"`{args.quality.name}`), mapped by expert ratio and batch size (module docstring of "
            "`bench/speed_quality.py`).\n\n")
    md = note + markdown(shapes) + f"\n![speed-up against concurrency]({args.name}.png)\n"
    write_results(args.out, args.name, {"quality_file": args.quality.name, "shapes": shapes}, md,
                  run_metadata())
    plot(shapes, args.out / f"{args.name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
