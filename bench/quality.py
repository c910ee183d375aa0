"""Quality frontier: CE cost vs activated experts of every selection policy on the trained MoE.

The model is the project's own ``Qwen3MoeForCausalLM`` (6 layers, 64 experts, top-8, in
``bench/data/model``; see ``docs/quality.md``), evaluated teacher-forced. At each position the ``B`` sequences of a
batch form the decode batch the policy selects for (per layer); with ``g > 1`` (speculative
verification) ``g`` consecutive positions of one sequence are one request. Reference: plain top-k
on the same sequences (computed once per batch; every operating point then runs on that batch).

Text: the committed held-out eval set, or ``--eval-text SRC ...`` (any plain text, ``NAME=PATH``,
one dataset per source; :mod:`sglang_xshare.hf.text`): tokenised with the evaluation model's tokenizer,
windows shuffled across documents, ``--split heldout|train|all`` by the training run's document
split. The three training corpora::

    apt-get install -y python3.11-doc linux-doc-6.1 dict-gcide
    --eval-text pydoc=/usr/share/doc/python3.11/html/_sources \\
                kernel=/usr/share/doc/linux-doc-6.1/Documentation gcide=/usr/share/dictd/gcide.dict.dz

Operating points (``--grid`` names, or ``--points "SPEC;SPEC"``): a spec is ``POLICY key=value
...`` with keys ``k0``, ``budget`` (``0.7``, ``24``, ``mass:0.9``), ``layers`` (per-layer
overrides, ``0:0.8/5:mass:0.95``), ``p`` (nucleus warm-up), ``min_score``, ``cap``, ``mr``
(request budget), ``guard`` (verify-row guard: each request's target row keeps its top-``guard``;
consecutive requests only), ``g`` (tokens per request), ``req`` (``consecutive``: a request is ``g``
consecutive positions of one sequence, the correlation of target + draft rows; ``shuffled``: the
uncorrelated control of :class:`~sglang_xshare.hf.StepLayout`), ``ep`` (xshare_ep ranks).

Speculative points (``g > 1``) also measure argmax agreement, the acceptance proxy of greedy
speculative decoding (:mod:`sglang_xshare.hf.agreement`): the fraction of verify rows (and of
target rows) whose greedy next token is unchanged vs plain top-k, and the oracle-draft acceptance
length. ``--grid specdepth`` sweeps g = 2, 4, 8 in both request layouts; the report then compares
the xshare and xshare_spec frontiers at equal expert ratio per (B, g, layout) and draws
``NAME.png``. ``--grid specguard`` sweeps the verify-row guard (g = 4, 8; xshare budgets 0.7-0.9
with the guard off, ``guard=k`` and ``guard=k/2``, and the unguarded frontier around them): every
guarded point against the unguarded point of the same budget (paired) and against the unguarded
frontier at its own expert ratio.

Statistics: every point runs on the same batches, so differences are paired per batch; CIs are
95 % t intervals over batches (a batch's sequences share routing decisions and are not
independent); per-sequence deltas are stored too.

Outputs (``--out``/``--name``): ``NAME.json`` (every batch's raw numbers), ``NAME.md`` (points,
frontier comparison), ``NAME_B{B}.png`` (one per batch size, OEA and cap on the same axes, Pareto
frontiers drawn). ``--shard i/n`` runs every n-th batch; ``--merge`` joins shard JSONs.
``--pick-default TRAIN.json`` chooses the ``auto`` preset from a training-split sweep.

Usage::

    .venv/bin/python bench/quality.py --quick                           # smoke run (the eval set in bench/data/model)
    .venv/bin/python bench/quality.py --eval-text ... --split heldout   # see docs/quality.md
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sglang_xshare.benchio import markdown_table, run_metadata, write_results
from sglang_xshare.config import Budget, BudgetSchedule, SelectionConfig
from sglang_xshare.hf import (RoutingHook, StepLayout, argmax_agreement, load_eval_set, load_model, make_batches,
                              routing_spec_of, sequence_ce_argmax)
from sglang_xshare.hf.evaluate import t_quantile_975
from sglang_xshare.placement import Placement
from sglang_xshare.select import Selector

BASELINES = ("cap", "oea")
OURS = ("xshare",)
DEFAULT_TEXT = ["pydoc=/usr/share/doc/python3.11/html/_sources", "kernel=/usr/share/doc/linux-doc-6.1/Documentation",
                "gcide=/usr/share/dictd/gcide.dict.dz"]


# ---- operating points ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One operating point: ``spec`` is its canonical text (the key of every result)."""

    spec: str
    policy: str
    cfg: SelectionConfig
    g: int = 1
    ep: int = 0
    req: str = "consecutive"

    @property
    def layout(self) -> StepLayout:
        return StepLayout(self.g, self.req)

    def selector(self, routing) -> Selector:
        pl = Placement.expert_parallel(routing.num_experts, self.ep) if self.ep > 1 else None
        return Selector(routing, self.cfg, placement=pl, backend="reference")


def parse_point(spec: str) -> Point:
    """``"xshare k0=2 budget=mass:0.95 p=0.8"`` -> :class:`Point` (see the module docstring)."""
    words = spec.split()
    if not words:
        raise ValueError("empty point spec")
    policy, kv = words[0], {}
    for w in words[1:]:
        k, sep, v = w.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: expected key=value, got {w!r}")
        kv[k] = v
    known = {"k0", "budget", "layers", "p", "min_score", "cap", "mr", "g", "ep", "req", "guard"}
    if set(kv) - known:
        raise ValueError(f"{spec!r}: unknown keys {sorted(set(kv) - known)}")
    budget = None
    if "budget" in kv:
        budget = BudgetSchedule.parse(kv["budget"], kv.get("layers", "").replace("/", ",") or None)
    cfg = SelectionConfig(policy=policy, k0=int(kv.get("k0", 1)), budget=budget,
                          request_budget=Budget.parse(kv["mr"], "mr") if "mr" in kv else None,
                          cap=int(kv["cap"]) if "cap" in kv else None, min_score=float(kv.get("min_score", 0)),
                          warmup_p=float(kv.get("p", 0)), verify_guard=int(kv.get("guard", 0)))
    req = kv.get("req", "consecutive")
    if req not in ("consecutive", "shuffled"):
        raise ValueError(f"{spec!r}: req must be 'consecutive' or 'shuffled', got {req!r}")
    return Point(" ".join(words), policy, cfg, int(kv.get("g", 1)), int(kv.get("ep", 0)), req)


def grid(name: str) -> list[str]:
    """Named sets of point specs."""
    if name == "frontier":
        pts = ["topk"] + [f"cap cap={c}" for c in range(1, 8)] + [f"oea k0={k}" for k in range(1, 7)]
        pts += [f"xshare k0={k0} budget={f}" for k0 in (1, 2, 3, 4) for f in (0.5, 0.6, 0.7, 0.8, 0.9)]
        pts += [f"xshare k0={k0} budget=mass:{m}" for k0 in (1, 2) for m in (0.8, 0.9, 0.95, 0.98)]
        pts += [f"xshare k0=1 budget={b} p={p}" for p in (0.5, 0.6, 0.7, 0.8, 0.9) for b in ("1", "0.75", "0.9")]
        pts += ["xshare k0=1 budget=0.8 min_score=0.02", "xshare k0=1 budget=0.8 min_score=0.05",
                "xshare k0=2 budget=mass:0.95 min_score=0.02"]
        return pts
    if name == "train":  # the candidate family the default is picked from (+ the baselines)
        pts = ["topk"] + [f"cap cap={c}" for c in range(3, 8)] + [f"oea k0={k}" for k in range(2, 7)]
        pts += [f"xshare k0={k0} budget={f}" for k0 in (1, 2, 3, 4) for f in (0.7, 0.8, 0.9)]
        pts += [f"xshare k0={k0} budget=mass:{m}" for k0 in (1, 2) for m in (0.9, 0.95, 0.98)]
        pts += [f"xshare k0=1 budget={b} p={p}" for p in (0.6, 0.7, 0.8, 0.9) for b in ("1", "0.75", "0.9")]
        return pts
    if name == "layers":  # one layer at a time cut to 0.5 of its top-k experts (sensitivity for --layer-plan)
        return ["topk"] + [f"xshare k0=1 budget=1.0 layers={layer}:0.5" for layer in range(6)]
    if name == "spec":
        pts = ["topk g=4"] + [f"xshare k0=1 budget={f} g=4" for f in (0.6, 0.8)]
        pts += [f"xshare_spec k0={k0} budget={f} mr={mr} g=4" for k0 in (1,) for f in (0.6, 0.8)
                for mr in ("frac:0.9", "mass:0.95", "12", "16")]
        pts += [f"xshare_spec k0=2 budget=0.8 mr={mr} g=4" for mr in ("mass:0.95", "16")]
        return pts
    if name == "specdepth":  # draft depth x request layout: the xshare vs xshare_spec frontiers
        pts = []
        for g in (2, 4, 8):
            pts += [f"xshare k0=1 budget={f} g={g}" for f in (0.5, 0.6, 0.7, 0.8, 0.9)]
            for req in ("", " req=shuffled"):  # xshare ignores requests: only xshare_spec needs both layouts
                pts += [f"xshare_spec k0=1 budget=1.0 mr=frac:{f} g={g}{req}" for f in (0.6, 0.8)]
                pts += [f"xshare_spec k0=1 budget={f} mr={mr} g={g}{req}" for f in (0.6, 0.8)
                        for mr in ("frac:0.9", "mass:0.95")]
        return pts
    if name == "specguard":  # the verify-row guard: guard off / k / k/2 at equal budget, the unguarded frontier
        pts = []
        for g in (4, 8):
            pts += [f"xshare k0=1 budget={f} g={g}" for f in (0.6, 0.7, 0.8, 0.9, 0.95, 1.0)]
            pts += [f"xshare k0=1 budget={f} g={g} guard={gk}" for gk in (8, 4) for f in (0.7, 0.8, 0.9)]
        return pts
    raise ValueError(f"unknown grid {name!r}")


def family(policy: str, g: int, req: str = "consecutive") -> str:
    if policy == "topk":
        return "topk"
    return policy if g == 1 else f"{policy} (g={g}{', shuffled' if req == 'shuffled' else ''})"


# ---- the sweep -----------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _batches_per_b(s: str) -> dict[int, int]:
    return {int(b): int(n) for b, _, n in (item.partition(":") for item in s.split(",") if item.strip())}


def run_batch(model, sel: Selector | None, tok: torch.Tensor, ref: torch.Tensor, layout: StepLayout,
              output_error: bool, ref_argmax: torch.Tensor | None = None) -> dict:
    """One point on one batch: CE delta, per-sequence deltas, distinct experts, kept mass; with
    ``g > 1`` and ``ref_argmax [B, S]`` (plain top-k's greedy tokens) the argmax agreement too."""
    with RoutingHook(model, sel, layout, measure_output_error=output_error) as hook:
        ce, am = sequence_ce_argmax(model, tok)
        st = hook.stats
    L = len(st)
    agree = argmax_agreement(am, ref_argmax, layout.tokens_per_request) if (
        ref_argmax is not None and layout.tokens_per_request > 1) else {}
    return {**agree,
        "delta": float(ce.mean() - ref.mean()), "ce_ref": float(ref.mean()),
        "seq_deltas": [round(x, 7) for x in (ce - ref).tolist()],
        "distinct": sum(s.distinct / max(s.steps, 1) for s in st) / L,
        "distinct_topk": sum(s.distinct_topk / max(s.steps, 1) for s in st) / L,
        "kept_mass": sum(s.kept_mass for s in st), "topk_mass": sum(s.topk_mass for s in st),
        "err_sq": sum(s.err_sq for s in st), "ref_sq": sum(s.ref_sq for s in st),
    }


def sweep(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    if args.device == "cpu":
        model.config._experts_implementation = "eager"  # fastest on CPU, exact skip of sentinel slots
    routing = routing_spec_of(model.config)
    if args.eval_windows:
        from sglang_xshare.hf.text import load_windows

        ev, text = load_windows(args.eval_windows)
        text = dict(text, windows_file=str(args.eval_windows))
    elif args.eval_text:
        from sglang_xshare.hf.text import load_text_eval_set, save_windows

        ev = load_text_eval_set(args.eval_text, seq_len=args.seq_len, split=args.split, max_tokens=args.max_tokens,
                                seed=args.seed, max_windows=args.max_windows)
        text = {"sources": args.eval_text, "split": args.split, "windows_per_dataset": int(ev.tokens.shape[1]),
                "max_tokens": args.max_tokens, "seed": args.seed}
        if args.save_windows:
            print(f"wrote {save_windows(ev, args.save_windows, text)}")
            if args.save_only:
                raise SystemExit(0)
    else:
        ev = load_eval_set()
        text = {"sources": ["evaluation set (held-out)"], "split": "heldout", "windows_per_dataset": int(ev.tokens.shape[1])}
    specs = [s for name in args.grid for s in grid(name)] + [s for s in (args.points or "").split(";") if s.strip()]
    points = [parse_point(s) for s in dict.fromkeys(specs)]
    spec_b = set(args.spec_batch_sizes)
    shard_i, shard_n = args.shard
    plan = []  # (B, batch index, points)
    for B in args.batch_sizes:  # (one request: the shuffled layout is the consecutive one)
        pts = [p for p in points if p.g == 1 or (B in spec_b and (B > 1 or p.req == "consecutive"))]
        for bi in range(args.num_batches[B]):
            if bi % shard_n == shard_i:
                plan.append((B, bi, pts))
    selectors = {p.spec: (p.selector(routing) if p.policy != "topk" else None) for p in points}
    raw: dict[str, dict[str, dict[str, dict]]] = {}  # B -> spec -> batch index -> result
    t0 = time.perf_counter()
    with tqdm(total=sum(len(p) for _, _, p in plan), desc="quality sweep", unit="pt") as bar:
        cache: dict[int, list] = {}
        for B, bi, pts in plan:
            if B not in cache:
                cache = {B: make_batches(ev, B, args.num_batches[B], "mixed", seq_len=args.seq_len)}
            tok = cache[B][bi][0]
            ref, ref_am = sequence_ce_argmax(model, tok)  # plain top-k, once per batch
            for p in pts:
                bar.set_postfix_str(f"B={B} #{bi} {p.spec}")
                r = run_batch(model, selectors[p.spec], tok, ref, p.layout, args.output_error, ref_am)
                raw.setdefault(str(B), {}).setdefault(p.spec, {})[str(bi)] = r
                bar.update(1)
    return {"config": {"batch_sizes": args.batch_sizes, "num_batches": args.num_batches, "seq_len": args.seq_len,
                       "grid": args.grid, "points": [p.spec for p in points], "spec_batch_sizes": args.spec_batch_sizes,
                       "shard": list(args.shard), "device": args.device, "output_error": args.output_error,
                       "threads": args.threads},
            "text": text, "model": {"num_experts": routing.num_experts, "top_k": routing.top_k,
                                    "path": str(args.model or "bench/data/model")},
            "elapsed_s": time.perf_counter() - t0, "raw": raw}


def merge(payloads: list[dict]) -> dict:
    """Join shard results (same config but the shard)."""
    out = json.loads(json.dumps(payloads[0]))
    out["merged_from"] = [{"meta": p.get("meta"), "config": p["config"], "elapsed_s": p["elapsed_s"]} for p in payloads]
    for p in payloads[1:]:
        for B, per in p["raw"].items():
            for spec, batches in per.items():
                out["raw"].setdefault(B, {}).setdefault(spec, {}).update(batches)
        out["elapsed_s"] += p["elapsed_s"]
    out["config"]["shard"] = [0, 1]
    return out


# ---- statistics ----------------------------------------------------------------------------------

def _mean_ci(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t_quantile_975(n - 1) * sd / math.sqrt(n)


def summarize(payload: dict) -> list[dict]:
    """One row per (B, point): means, 95 % CI over batches, expert ratio, kept mass."""
    rows = []
    for B, per in payload["raw"].items():
        for spec, batches in per.items():
            idx = sorted(batches, key=int)
            rs = [batches[i] for i in idx]
            p = parse_point(spec)
            delta, ci = _mean_ci([r["delta"] for r in rs])
            ce_ref = sum(r["ce_ref"] for r in rs) / len(rs)
            distinct = sum(r["distinct"] for r in rs) / len(rs)
            distinct_topk = sum(r["distinct_topk"] for r in rs) / len(rs)
            ref_sq = sum(r["ref_sq"] for r in rs)
            agree = {}
            for key in ("agree", "agree_first", "accept"):  # speculative points (older JSONs: absent)
                if all(key in r for r in rs):
                    m, c = _mean_ci([r[key] for r in rs])
                    agree.update({key: m, f"{key}_ci95": c, f"batch_{key}": [r[key] for r in rs]})
            rows.append({
                **agree, "req": p.req, "guard": p.cfg.verify_guard,
                "B": int(B), "spec": spec, "policy": p.policy, "family": family(p.policy, p.g, p.req), "g": p.g,
                "batches": len(rs), "batch_ids": [int(i) for i in idx], "delta": delta, "ci95": ci, "ce_ref": ce_ref,
                "delta_rel": delta / ce_ref, "distinct": distinct, "distinct_topk": distinct_topk,
                "ratio": distinct / distinct_topk,
                "retained_mass": sum(r["kept_mass"] for r in rs) / max(sum(r["topk_mass"] for r in rs), 1e-30),
                "moe_rel_err": math.sqrt(sum(r["err_sq"] for r in rs) / ref_sq) if ref_sq > 0 else None,
                "batch_deltas": [r["delta"] for r in rs],
                "batch_ratios": [r["distinct"] / max(r["distinct_topk"], 1e-30) for r in rs],
            })
    rows.sort(key=lambda r: (r["B"], r["g"], ("topk", "cap", "oea").index(r["policy"])
                             if r["policy"] in ("topk", "cap", "oea") else 3, r["spec"]))
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """Points no other point beats on both fewer experts and lower CE delta (by ratio)."""
    out, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["ratio"], r["delta"])):
        if r["delta"] < best:
            out.append(r)
            best = r["delta"]
    return out


def _best_below(rows: list[dict], r: float, tol: float = 0.005) -> dict | None:
    ok = [x for x in rows if x["ratio"] <= r + tol]
    return min(ok, key=lambda x: x["delta"]) if ok else None


def paired(a: dict, b: dict, key: str = "batch_deltas") -> tuple[float, float]:
    """Mean and 95 % CI of ``a - b`` over their common batches (paired), of the per-batch ``key``."""
    common = sorted(set(a["batch_ids"]) & set(b["batch_ids"]))
    da = dict(zip(a["batch_ids"], a[key]))
    db = dict(zip(b["batch_ids"], b[key]))
    return _mean_ci([da[i] - db[i] for i in common])


def _verdict(d: float, ci: float, better: str, worse: str) -> str:
    if d == 0 and ci == 0:
        return "same selection"
    return better if d + ci < 0 else (worse if d - ci > 0 else "n.s.")


def _bracket(xs: list[dict], ratio: float) -> tuple[dict, dict] | None:
    """The two points of ``xs`` (sorted by ratio) around ``ratio`` -- the last at or below it and
    the first at or above it -- or ``None`` outside their range."""
    lo = [r for r in xs if r["ratio"] <= ratio]
    hi = [r for r in xs if r["ratio"] >= ratio]
    return (lo[-1], hi[0]) if lo and hi else None


def _interp(lo: dict, hi: dict, x: float, key: str) -> dict[int, float]:
    """Per-batch ``key`` of the segment ``lo``-``hi`` (two points of one family) at ratio ``x``."""
    w = 0.0 if hi["ratio"] == lo["ratio"] else (x - lo["ratio"]) / (hi["ratio"] - lo["ratio"])
    a, b = dict(zip(lo["batch_ids"], lo[key])), dict(zip(hi["batch_ids"], hi[key]))
    return {i: (1 - w) * a[i] + w * b[i] for i in a if i in b}


def compare_spec(rows: list[dict]) -> list[dict]:
    """Speculative verification (``g > 1``): every ``xshare_spec`` point (request budget, then batch budget)
    against the ``xshare`` frontier (batch budget over the union) at the SAME expert ratio: the xshare points of
    the same (B, g) bracketing its ratio, interpolated linearly per batch (CE delta and oracle-draft acceptance),
    differences paired per batch (``xshare`` ignores requests: its points serve both layouts). Points outside
    the xshare points' ratio range are not compared."""
    out = []
    spec_rows = [r for r in rows if r["g"] > 1 and r["policy"] == "xshare_spec"]
    for b in sorted(spec_rows, key=lambda r: (r["g"], r["B"], r["req"], r["ratio"])):
        xs = sorted((r for r in rows if r["B"] == b["B"] and r["g"] == b["g"] and r["policy"] == "xshare"),
                    key=lambda r: r["ratio"])
        row = {"B": b["B"], "g": b["g"], "req": b["req"], "spec": b["spec"], "ratio": b["ratio"], "delta": b["delta"],
               "ci95": b["ci95"], **{k: b.get(k) for k in ("agree", "agree_first", "accept")}}
        around = _bracket(xs, b["ratio"])
        if around is None:
            row["verdict"] = "outside the xshare points' ratios"
            out.append(row)
            continue
        lo, hi = around
        row["xshare_between"] = f"{lo['spec']} .. {hi['spec']}"
        mine = dict(zip(b["batch_ids"], b["batch_deltas"]))
        ref = _interp(lo, hi, b["ratio"], "batch_deltas")
        d, ci = _mean_ci([mine[i] - ref[i] for i in ref])
        row.update(xshare_delta=sum(ref.values()) / len(ref), diff=d, diff_ci=ci,
                   verdict=_verdict(d, ci, "xshare_spec better", "xshare better"))
        if "batch_accept" in b and "batch_accept" in lo and "batch_accept" in hi:
            ma, ra = dict(zip(b["batch_ids"], b["batch_accept"])), _interp(lo, hi, b["ratio"], "batch_accept")
            da, cia = _mean_ci([ma[i] - ra[i] for i in ra])
            row.update(xshare_accept=sum(ra.values()) / len(ra), accept_diff=da, accept_diff_ci=cia)
        out.append(row)
    return out


def spec_md(cr: list[dict]) -> str:
    """The :func:`compare_spec` table."""
    return markdown_table(
        ["g", "B", "requests", "xshare_spec point", "ratio", "dCE", "agree", "target rows", "accept",
         "xshare at this ratio: dCE", "accept", "spec - xshare dCE (paired)", "95% CI", "spec - xshare accept",
         "95% CI", "verdict"],
        [[c["g"], c["B"], c["req"], c["spec"], c["ratio"], c["delta"], c.get("agree") or "-", c.get("agree_first") or "-",
          c.get("accept") or "-", c.get("xshare_delta", "-"), c.get("xshare_accept", "-"), c.get("diff", "-"),
          c.get("diff_ci", "-"), c.get("accept_diff", "-"), c.get("accept_diff_ci", "-"), c["verdict"]] for c in cr])



def _unguarded(spec: str) -> str:
    """The spec of a guarded point without its guard."""
    return " ".join(w for w in spec.split() if not w.startswith("guard="))


def _paired_on(mine: dict, ref: dict[int, float], key: str) -> tuple[float, float]:
    """Mean and 95 % CI of ``mine``'s per-batch ``key`` minus ``ref`` (batch id -> value)."""
    m = dict(zip(mine["batch_ids"], mine[key]))
    return _mean_ci([m[i] - ref[i] for i in ref if i in m])


GUARD_KEYS = (("delta", "batch_deltas"), ("accept", "batch_accept"), ("agree_first", "batch_agree_first"),
              ("agree", "batch_agree"))


def compare_guard(rows: list[dict]) -> list[dict]:
    """The verify-row guard (``g > 1``): every guarded xshare point (1) against the unguarded point
    of the same (B, g, budget) -- dCE, oracle-draft acceptance, target-row and all-row agreement,
    ``guard - no guard`` paired per batch -- and (2) against the unguarded xshare frontier of the
    same (B, g) at the guarded point's own expert ratio (the two unguarded points bracketing it,
    interpolated linearly per batch, as :func:`compare_spec`): the guard raises the ratio where the
    target rows' top-k exceed the budget, so (2) is the comparison at equal cost."""
    out = []
    guarded = [r for r in rows if r["g"] > 1 and r.get("guard") and r["policy"] == "xshare"]
    by_spec = {(r["B"], r["spec"]): r for r in rows}
    for b in sorted(guarded, key=lambda r: (r["g"], r["B"], r["guard"], r["ratio"])):
        row = {"B": b["B"], "g": b["g"], "spec": b["spec"], "guard": b["guard"], "ratio": b["ratio"],
               **{k: b.get(k) for k, _ in GUARD_KEYS}, "ci95": b["ci95"]}
        off = by_spec.get((b["B"], _unguarded(b["spec"])))
        if off is not None:
            row.update(off_spec=off["spec"], off_ratio=off["ratio"], **{f"off_{k}": off.get(k) for k, _ in GUARD_KEYS})
            for k, bk in GUARD_KEYS:
                if bk in b and bk in off:
                    d, ci = _paired_on(b, dict(zip(off["batch_ids"], off[bk])), bk)
                    row.update({f"same_{k}": d, f"same_{k}_ci": ci})
        xs = sorted((r for r in rows if r["B"] == b["B"] and r["g"] == b["g"] and r["policy"] == "xshare"
                     and not r.get("guard")), key=lambda r: r["ratio"])
        around = _bracket(xs, b["ratio"])
        if around is None:
            row["verdict"] = "outside the unguarded points' ratios"
            out.append(row)
            continue
        lo, hi = around
        row["front_between"] = f"{lo['spec']} .. {hi['spec']}"
        for k, bk in GUARD_KEYS:
            if bk in b and bk in lo and bk in hi:
                ref = _interp(lo, hi, b["ratio"], bk)
                d, ci = _paired_on(b, ref, bk)
                row.update({f"front_{k}": sum(ref.values()) / len(ref), f"eq_{k}": d, f"eq_{k}_ci": ci})
        ce = _verdict(row["eq_delta"], row["eq_delta_ci"], "guard lower dCE", "guard higher dCE")
        acc = (_verdict(-row["eq_accept"], row["eq_accept_ci"], "guard higher accept", "guard lower accept")
               if "eq_accept" in row else "-")
        row["verdict"] = f"{ce}; {acc}"
        out.append(row)
    return out


def guard_md(cr: list[dict]) -> str:
    """The :func:`compare_guard` tables: the same budget (paired), then the equal-ratio frontier."""
    def v(c: dict, k: str):
        return c.get(k, "-") if c.get(k) is not None else "-"

    same = markdown_table(
        ["g", "B", "guarded point", "ratio", "ratio off", "dCE", "dCE off", "guard - off dCE", "95% CI",
         "accept", "accept off", "guard - off accept", "95% CI", "target rows", "off", "guard - off target", "95% CI",
         "guard - off agree (all rows)", "95% CI"],
        [[c["g"], c["B"], c["spec"], c["ratio"], v(c, "off_ratio"), c["delta"], v(c, "off_delta"), v(c, "same_delta"),
          v(c, "same_delta_ci"), v(c, "accept"), v(c, "off_accept"), v(c, "same_accept"), v(c, "same_accept_ci"),
          v(c, "agree_first"), v(c, "off_agree_first"), v(c, "same_agree_first"), v(c, "same_agree_first_ci"),
          v(c, "same_agree"), v(c, "same_agree_ci")] for c in cr])
    eq = markdown_table(
        ["g", "B", "guarded point", "ratio", "dCE", "unguarded frontier at this ratio: dCE", "guard - frontier dCE",
         "95% CI", "accept", "frontier accept", "guard - frontier accept", "95% CI", "guard - frontier target rows",
         "95% CI", "verdict"],
        [[c["g"], c["B"], c["spec"], c["ratio"], c["delta"], v(c, "front_delta"), v(c, "eq_delta"), v(c, "eq_delta_ci"),
          v(c, "accept"), v(c, "front_accept"), v(c, "eq_accept"), v(c, "eq_accept_ci"), v(c, "eq_agree_first"),
          v(c, "eq_agree_first_ci"), c["verdict"]] for c in cr])
    return ("### The same budget, guard on vs off (paired per batch)\n\n" + same
            + "\n\n### Equal expert ratio: the guarded point vs the unguarded xshare frontier\n\n" + eq)


def compare(rows: list[dict], select_rows: list[dict] | None = None,
            grid_r: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)) -> list[dict]:
    """At every B and activated-expert ratio ``r``: the best xshare configuration using at most ``r``
    of top-k's experts vs the best OEA / cap configuration doing the same, paired CI of the difference.

    ``select_rows`` (e.g. a training-split sweep): choose the best configurations there, evaluate
    them here (no winner's curse from picking among many points on the data that scores them).
    """
    out = []
    sel_rows = select_rows if select_rows is not None else rows
    for B in sorted({r["B"] for r in rows}):
        here = {r["spec"]: r for r in rows if r["B"] == B and r["g"] == 1}
        pick = [r for r in sel_rows if r["B"] == B and r["g"] == 1 and r["spec"] in here]
        for rr in grid_r:
            ours = _best_below([r for r in pick if r["policy"] in OURS], rr)
            base = _best_below([r for r in pick if r["policy"] in BASELINES], rr)
            row = {"B": B, "r": rr, "ours": ours and ours["spec"], "base": base and base["spec"]}
            if ours is not None:
                o = here[ours["spec"]]
                row.update(ours_ratio=o["ratio"], ours_delta=o["delta"], ours_ci=o["ci95"])
            if base is not None:
                b = here[base["spec"]]
                row.update(base_ratio=b["ratio"], base_delta=b["delta"], base_ci=b["ci95"])
            if ours is not None and base is not None:
                d, ci = paired(here[ours["spec"]], here[base["spec"]])
                row.update(diff=d, diff_ci=ci,
                           verdict="xshare better" if d + ci < 0 else ("baseline better" if d - ci > 0 else
                                                                       ("same config" if d == 0 and ci == 0 else "n.s.")))
            elif ours is not None:
                row["verdict"] = "only xshare reaches r"
            else:
                row["verdict"] = "xshare cannot reach r" if base is not None else "nothing reaches r"
            out.append(row)
    return out


# ---- default operating point -----------------------------------------------------------------------

def _kernel_supported(spec: str) -> bool:
    """Whether a point's knobs all run in the Triton kernels (the nucleus warm-up does not yet)."""
    return parse_point(spec).cfg.warmup_p <= 0


def pick_default(rows: list[dict], bound_rel: float = 0.005, margin: float = 1.0,
                 reference_only: bool = False) -> dict:
    """Among xshare configurations (one setting for every B), the one with the largest mean expert
    cut over the batch sizes whose CE delta, mean + ``margin`` x CI half-width, stays within
    ``bound_rel`` of top-k's CE at every B. Only configurations the serving kernels run, unless
    ``reference_only`` (then knobs of the PyTorch reference alone, e.g. the nucleus warm-up, too)."""
    bs = sorted({r["B"] for r in rows})
    by_spec: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["policy"] in OURS and r["g"] == 1 and (reference_only or _kernel_supported(r["spec"])):
            by_spec.setdefault(r["spec"], {})[r["B"]] = r
    cands = []
    for spec, per in by_spec.items():
        if set(per) != set(bs):
            continue
        ok = all(per[B]["delta"] + margin * (per[B]["ci95"] if per[B]["ci95"] == per[B]["ci95"] else 0)
                 <= bound_rel * per[B]["ce_ref"] for B in bs)
        cut = sum(1 - per[B]["ratio"] for B in bs) / len(bs)
        cands.append({"spec": spec, "feasible": ok, "mean_cut": cut,
                      "per_B": {B: {"ratio": per[B]["ratio"], "delta": per[B]["delta"], "ci95": per[B]["ci95"],
                                    "delta_rel": per[B]["delta_rel"]} for B in bs}})
    feas = sorted((c for c in cands if c["feasible"]), key=lambda c: -c["mean_cut"])
    if not feas:
        raise SystemExit("no xshare configuration meets the bound at every B")
    per_b = {}  # what one setting per batch size would allow (same rule, each B on its own)
    for B in bs:
        ok = [r for r in rows if r["B"] == B and r["policy"] in OURS and r["g"] == 1
              and (reference_only or _kernel_supported(r["spec"])) and r["delta"] + margin * (r["ci95"] if r["ci95"] == r["ci95"] else 0) <= bound_rel * r["ce_ref"]]
        if ok:
            b = max(ok, key=lambda r: 1 - r["ratio"])
            per_b[B] = {"spec": b["spec"], "ratio": b["ratio"], "delta": b["delta"], "ci95": b["ci95"],
                        "delta_rel": b["delta_rel"]}
    return {"bound_rel": bound_rel, "margin": margin, "reference_only_knobs": reference_only, "chosen": feas[0],
            "runners_up": feas[1:6], "per_B_best": per_b}


def layer_plan(rows: list[dict], targets: list[float], num_layers: int = 6, lo: float = 0.3) -> list[str]:
    """Per-layer budgets by marginal CE per expert (learned from a sensitivity sweep in which one layer at a
    time is cut, ``xshare k0=1 budget=1.0 layers=L:F``): layers that lose less CE per expert cut get
    tighter budgets, the mean fraction equal to each target. Returns point specs."""
    slope = {}
    for r in rows:
        p = parse_point(r["spec"])
        if p.policy != "xshare" or p.cfg.budget is None or len(p.cfg.budget.per_layer) != 1:
            continue
        (layer, b), = p.cfg.budget.per_layer.items()
        cut = num_layers * (1 - r["ratio"])  # only this layer's experts change
        slope.setdefault(layer, []).append(max(r["delta"], 1e-4) / max(cut, 1e-6))
    if len(slope) != num_layers:
        raise SystemExit(f"sensitivity rows cover layers {sorted(slope)}, need all {num_layers}")
    s = {l: sum(v) / len(v) for l, v in slope.items()}
    inv = {l: 1 / s[l] for l in s}
    specs = []
    for F in targets:
        total = (1 - F) * num_layers
        frac = {l: max(lo, 1 - total * inv[l] / sum(inv.values())) for l in s}
        specs.append(f"xshare k0=1 budget={F:g} layers=" + "/".join(f"{l}:{frac[l]:.3f}" for l in sorted(frac)))
    return specs


def write_default(args: argparse.Namespace, meta: dict) -> None:
    """``--pick-default TRAIN.json [--validate-on HELDOUT.json]`` -> ``NAME.{json,md}``."""
    train = json.loads(args.pick_default.read_text())
    res = pick_default(summarize(train), args.bound, args.margin, args.reference_only_knobs)
    spec = res["chosen"]["spec"]
    res["train_file"] = str(args.pick_default)
    res["train_meta"] = train["meta"]
    lines = [f"Chosen on **{args.pick_default}** (split `{train['text']['split']}`; command `{train['meta']['command']}`, "
             f"git `{train['meta']['git']}`, {train['meta']['device']}, {train['meta']['date']}): among the xshare "
             f"configurations swept there"
             + ("" if res["reference_only_knobs"] else " that the serving kernels run (no nucleus warm-up)")
             + f", the largest mean expert cut over B whose CE delta + {args.margin:g} x CI "
             f"stays <= {100 * args.bound:g} % of top-k's CE at every B.\n\n**`{spec}`**\n"]
    rows = [["train", B, v["ratio"], 1 - v["ratio"], v["delta"], v["ci95"], 100 * v["delta_rel"]]
            for B, v in res["chosen"]["per_B"].items()]
    if args.validate_on is not None:
        held = json.loads(args.validate_on.read_text())
        hr = [r for r in summarize(held) if r["spec"] == spec]
        res["heldout_file"] = str(args.validate_on)
        res["heldout"] = {r["B"]: {"ratio": r["ratio"], "delta": r["delta"], "ci95": r["ci95"],
                                   "delta_rel": r["delta_rel"], "batches": r["batches"]} for r in hr}
        res["heldout_within_bound"] = all(v["delta_rel"] <= args.bound for v in res["heldout"].values())
        rows += [["held-out", r["B"], r["ratio"], 1 - r["ratio"], r["delta"], r["ci95"], 100 * r["delta_rel"]] for r in hr]
        lines.append(f"Validated on **{args.validate_on}** (split `{held['text']['split']}`, git `{held['meta']['git']}`, "
                     f"{held['meta']['device']}): within the bound at every B: **{res['heldout_within_bound']}**.\n")
    table = markdown_table(["split", "B", "expert ratio", "expert cut", "dCE", "95% CI", "dCE %"], rows)
    held_rows = {}
    if args.validate_on is not None:
        held_rows = {(r["B"], r["spec"]): r for r in summarize(held)}
    pb = [[B, v["spec"], v["ratio"], 100 * v["delta_rel"],
           held_rows[(B, v["spec"])]["ratio"] if (B, v["spec"]) in held_rows else "-",
           100 * held_rows[(B, v["spec"])]["delta_rel"] if (B, v["spec"]) in held_rows else "-"]
          for B, v in res["per_B_best"].items()]
    table += ("\n\nOne setting per batch size instead (same rule, each B on its own; `auto` is one setting for "
              "every B):\n\n" + markdown_table(["B", "best on train", "train ratio", "train dCE %", "held-out ratio",
                                                  "held-out dCE %"], pb))
    runners = markdown_table(["runner-up (train)", "mean cut"], [[c["spec"], c["mean_cut"]] for c in res["runners_up"]])
    jp, mp = write_results(args.out, args.name, res, "\n".join(lines) + "\n" + table + "\n\n" + runners + "\n", meta)
    print(table)
    print(f"wrote {jp}, {mp}")


# ---- plots ---------------------------------------------------------------------------------------

STYLE = {"topk": ("k", "*"), "cap": ("tab:gray", "s"), "oea": ("tab:orange", "^"), "xshare": ("tab:blue", "o"),
         "xshare (g=4)": ("tab:cyan", "o"), "xshare_spec (g=4)": ("tab:red", "v"), "topk (g=4)": ("k", "P")}


def plot_b(rows: list[dict], B: int, path: Path, title: str, default: str | None = None) -> None:
    """CE delta vs activated-expert ratio at one B; points per family, Pareto frontiers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["B"] == B and r["g"] == 1]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for fam in ("cap", "oea", "xshare"):
        pts = [r for r in rs if r["policy"] == fam]
        if not pts:
            continue
        c, m = STYLE[fam]
        ax.errorbar([r["ratio"] for r in pts], [r["delta"] for r in pts], yerr=[r["ci95"] for r in pts],
                    color=c, marker=m, ls="none", ms=5, capsize=2, alpha=0.55 if fam == "xshare" else 0.9,
                    label=f"{fam} ({len(pts)} configs)")
    for name, fams, c in (("OEA + cap frontier", BASELINES, "tab:orange"), ("xshare frontier", OURS, "tab:blue")):
        front = pareto([r for r in rs if r["policy"] in fams or r["policy"] == "topk"])
        ax.step([r["ratio"] for r in front], [r["delta"] for r in front], where="post", color=c, lw=1.6,
                label=name)
    if default is not None:
        d = next((r for r in rs if r["spec"] == default), None)
        if d is not None:
            ax.plot([d["ratio"]], [d["delta"]], marker="*", ms=16, color="tab:green", ls="none",
                    label=f"auto default ({d['spec']})")
    ax.axhline(0, color="k", lw=0.5)
    if rs:
        ax.axhline(0.005 * rs[0]["ce_ref"], color="tab:green", lw=0.8, ls="--", label="0.5 % of top-k CE")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlim(0.3, 1.02)
    ax.set_xlabel("activated experts / top-k's distinct experts (per layer and decode step)")
    ax.set_ylabel("CE delta vs top-k, nats/token (symlog; bars: 95 % CI)")
    ax.set_title(f"B = {B}: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spec(rows: list[dict], path: Path, title: str) -> None:
    """Speculative frontiers: per draft depth g (row pairs) and B (columns), CE delta and oracle-draft
    acceptance vs activated-expert ratio for xshare and xshare_spec (both request layouts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["g"] > 1 and "accept" in r]
    gs, bs = sorted({r["g"] for r in rs}), sorted({r["B"] for r in rs})
    fig, axes = plt.subplots(2 * len(gs), len(bs), figsize=(4.2 * len(bs), 3.0 * 2 * len(gs)), squeeze=False)
    fams = (("xshare", "consecutive", "tab:blue", "o", "xshare"),
            ("xshare_spec", "consecutive", "tab:red", "v", "xshare_spec (consecutive requests)"),
            ("xshare_spec", "shuffled", "tab:orange", "^", "xshare_spec (shuffled requests)"))
    for i, g in enumerate(gs):
        for j, B in enumerate(bs):
            ax_ce, ax_acc = axes[2 * i, j], axes[2 * i + 1, j]
            for pol, req, c, m, label in fams:
                pts = sorted((r for r in rs if r["g"] == g and r["B"] == B and r["policy"] == pol and r["req"] == req),
                             key=lambda r: r["ratio"])
                if not pts:
                    continue
                x = [r["ratio"] for r in pts]
                ax_ce.errorbar(x, [r["delta"] for r in pts], yerr=[r["ci95"] for r in pts], color=c, marker=m,
                               ls="none", ms=4, capsize=2, alpha=0.8, label=label)
                front = pareto(pts)
                ax_ce.step([r["ratio"] for r in front], [r["delta"] for r in front], where="post", color=c, lw=1.2)
                ax_acc.errorbar(x, [r["accept"] for r in pts], yerr=[r["accept_ci95"] for r in pts], color=c,
                                marker=m, ls="none", ms=4, capsize=2, alpha=0.8, label=label)
            _style_spec_panels(ax_ce, ax_acc, g, B, 0.4)
    axes[0, 0].legend(fontsize=6, loc="upper right")
    fig.suptitle(f"speculative verification, {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _style_spec_panels(ax_ce, ax_acc, g: int, B: int, xmin: float) -> None:
    """Axes of one (g, B) panel pair of the speculative plots: CE delta above, acceptance below."""
    ax_ce.axhline(0, color="k", lw=0.5)
    ax_ce.set_title(f"g = {g}, B = {B}", fontsize=9)
    ax_ce.set_ylabel("CE delta (nats/token)", fontsize=8)
    ax_acc.set_ylabel("oracle-draft acceptance", fontsize=8)
    for ax in (ax_ce, ax_acc):
        ax.set_xlim(xmin, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax_acc.set_xlabel("expert ratio", fontsize=8)


def plot_guard(rows: list[dict], path: Path, title: str) -> None:
    """The verify-row guard: per draft depth g (row pairs) and B (columns), CE delta and oracle-draft
    acceptance vs expert ratio of unguarded xshare (its frontier drawn) and each guard width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["g"] > 1 and r["policy"] == "xshare" and "accept" in r]
    gs, bs = sorted({r["g"] for r in rs}), sorted({r["B"] for r in rs})
    widths = sorted({r["guard"] for r in rs if r["guard"]}, reverse=True)
    colors = ["tab:red", "tab:green", "tab:purple", "tab:orange"]
    fig, axes = plt.subplots(2 * len(gs), len(bs), figsize=(4.2 * len(bs), 3.0 * 2 * len(gs)), squeeze=False)
    for i, g in enumerate(gs):
        for j, B in enumerate(bs):
            ax_ce, ax_acc = axes[2 * i, j], axes[2 * i + 1, j]
            fams = [(0, "tab:blue", "o", "xshare, no guard")]
            fams += [(w, colors[n % len(colors)], "v^sD"[n % 4], f"xshare, guard={w}") for n, w in enumerate(widths)]
            for w, c, m, label in fams:
                pts = sorted((r for r in rs if r["g"] == g and r["B"] == B and r["guard"] == w), key=lambda r: r["ratio"])
                if not pts:
                    continue
                x = [r["ratio"] for r in pts]
                ax_ce.errorbar(x, [r["delta"] for r in pts], yerr=[r["ci95"] for r in pts], color=c, marker=m,
                               ls="-" if w == 0 else "none", lw=1.0, ms=4, capsize=2, alpha=0.85, label=label)
                ax_acc.errorbar(x, [r["accept"] for r in pts], yerr=[r["accept_ci95"] for r in pts], color=c,
                                marker=m, ls="-" if w == 0 else "none", lw=1.0, ms=4, capsize=2, alpha=0.85, label=label)
            _style_spec_panels(ax_ce, ax_acc, g, B, 0.55)
    axes[1, 0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"verify-row guard, {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- reporting -----------------------------------------------------------------------------------

def report(payload: dict, args: argparse.Namespace, meta: dict) -> None:
    rows = summarize(payload)
    select_rows = None
    if args.select_on is not None:
        select_rows = summarize(json.loads(args.select_on.read_text()))
    cmp_rows = compare(rows)
    cmp_train = compare(rows, select_rows) if select_rows is not None else None
    default = None
    if args.default_spec:
        default = args.default_spec
    out, name = args.out, args.name
    out.mkdir(parents=True, exist_ok=True)
    text = payload["text"]
    title = f"{', '.join(Path(s.split('=')[0]).name for s in text['sources'])} ({text['split']})"
    pngs = [out / f"{name}_B{B}.png" for B in sorted({r["B"] for r in rows if r["g"] == 1})]
    spec_rows = compare_spec(rows)
    spec_png = out / f"{name}.png" if spec_rows else None
    guard_rows = compare_guard(rows)
    guard_png = (out / f"{name}_guard.png" if spec_rows else out / f"{name}.png") if guard_rows else None
    nb = {B: max(len(r["batch_ids"]) for r in rows if r["B"] == B) for B in sorted({r["B"] for r in rows})}
    table = markdown_table(
        ["B", "point", "batches", "experts/layer", "top-k experts", "ratio", "dCE", "95% CI", "dCE %", "kept mass",
         "argmax agree (rows)", "target rows", "oracle-draft accept"],
        [[r["B"], r["spec"], r["batches"], r["distinct"], r["distinct_topk"], r["ratio"], r["delta"], r["ci95"],
          100 * r["delta_rel"], r["retained_mass"], r.get("agree", "-"), r.get("agree_first", "-"), r.get("accept", "-")]
         for r in rows])
    def cmp_md(cr: list[dict]) -> str:
        return markdown_table(
            ["B", "ratio <=", "best xshare", "its ratio", "its dCE", "best OEA/cap", "its ratio", "its dCE",
             "xshare - baseline (paired)", "95% CI", "verdict"],
            [[c["B"], c["r"], c.get("ours") or "-", c.get("ours_ratio", "-"), c.get("ours_delta", "-"),
              c.get("base") or "-", c.get("base_ratio", "-"), c.get("base_delta", "-"), c.get("diff", "-"),
              c.get("diff_ci", "-"), c["verdict"]] for c in cr])

    cmp_table = cmp_md(cmp_rows)
    md = (
        f"Model: `{payload['model']['path']}` ({payload['model']['num_experts']} experts, top-{payload['model']['top_k']}). "
        f"Text: {', '.join('`' + s + '`' for s in text['sources'])}, split **{text['split']}**, "
        f"{text['windows_per_dataset']} windows per dataset; teacher-forced, {payload['config']['seq_len']} positions "
        f"per sequence; mixed batches. Batches per B: {nb}. dCE = mean per-batch CE(policy) - CE(top-k) "
        f"(nats/token), 95 % t CI over batches. ratio = distinct experts activated per layer and decode step / "
        f"plain top-k's for the same tokens. Sweep time {payload['elapsed_s']:.0f} s "
        f"(device {payload['config']['device']}).\n\n"
        + "".join(f"![B={p.stem.split('_B')[-1]}]({p.name}) " for p in pngs) + "\n\n"
        + "".join(f"Merged from: `{m['meta']['command']}` (git `{m['meta']['git']}`, {m['meta']['device']}, "
                  f"{m['meta']['date']}, {m['elapsed_s']:.0f} s)\n\n" for m in payload.get("merged_from") or [] if m.get("meta"))
        + (f"![speculative frontiers]({spec_png.name})\n\n" if spec_png is not None else "")
        + ("## Speculative verification: xshare vs xshare_spec at equal expert ratio\n\n"
           "g rows per request (target + g - 1 drafts, teacher-forced: the drafts are the text, an oracle draft of "
           "plain top-k's greedy output); requests `consecutive` (g consecutive positions of one sequence) or "
           "`shuffled` (the row at offset i of sequence b joins request (b + i) mod B: the uncorrelated control). "
           "Every xshare_spec point against the xshare frontier of the same (g, B) at its own expert ratio (the two "
           "xshare points bracketing it, interpolated linearly per batch); dCE and acceptance differences paired "
           "per batch. agree = fraction of "
           "verify rows whose greedy next token equals plain top-k's, target = the same over each request's first "
           "row, accept = mean leading unchanged rows / g (the acceptance length of the oracle draft).\n\n"
           + spec_md(spec_rows) + "\n\n" if spec_rows else "")
        + (f"![verify-row guard]({guard_png.name})\n\n" if guard_png is not None else "")
        + ("## Speculative verification: the verify-row guard\n\n"
           "g rows per request (target + g - 1 drafts, teacher-forced: the drafts are the text, an oracle draft of "
           "plain top-k's greedy output), consecutive requests. `guard=K`: each request's target row (its first) keeps "
           "its own top-K experts (its warm-up floor raised from k0 to K), the draft rows keep k0; the batch budget "
           "applies on top (the warm-up may exceed it). Every guarded point against the unguarded point of the same "
           "budget, and against the unguarded xshare frontier of the same (g, B) at its own expert ratio (the two "
           "unguarded points bracketing it, interpolated linearly per batch); differences guard - no guard, paired per "
           "batch, 95 % t CI. accept = mean leading unchanged rows / g (the oracle draft's acceptance length), target "
           "rows = fraction of target rows whose greedy next token equals plain top-k's, agree = the same over all "
           "rows.\n\n" + guard_md(guard_rows) + "\n\n" if guard_rows else "")
        + ("## Frontier comparison\n\n"
        "At each B and ratio r: the best xshare configuration activating at most r (+0.005) of top-k's experts vs "
        "the best OEA (any k0) or cap (any k') configuration doing the same; difference paired per batch "
        "(t interval). Configurations chosen and scored on this data (every point of the sweep; with many more "
        "xshare points than baseline points, picking the best on the data that scores it favours xshare a little).\n\n"
        + cmp_table + "\n\n" if pngs else "")
        + ("### The same, configurations chosen on `" + str(args.select_on) + "`\n\nOnly points swept there "
           "too; scored here (no selection bias).\n\n" + cmp_md(cmp_train) + "\n\n" if cmp_train is not None else "")
        + "## Every point\n\n" + table + "\n")
    payload = dict(payload)
    payload["rows"] = [{k: v for k, v in r.items()} for r in rows]
    payload["comparison"] = cmp_rows
    payload["comparison_spec"] = spec_rows
    payload["comparison_guard"] = guard_rows
    payload["comparison_selected_on"] = {"file": str(args.select_on), "rows": cmp_train} if cmp_train is not None else None
    jp, mp = write_results(out, name, payload, md, meta)
    print(cmp_table if pngs else (spec_md(spec_rows) if spec_rows else guard_md(guard_rows)))
    print(f"wrote {jp}, {mp}")
    try:
        for png in pngs:
            plot_b(rows, int(png.stem.split("_B")[-1]), png, title, default)
            print(f"wrote {png}")
        if spec_png is not None:
            plot_spec(rows, spec_png, title)
            print(f"wrote {spec_png}")
        if guard_png is not None:
            plot_guard(rows, guard_png, title)
            print(f"wrote {guard_png}")
    except ImportError as e:  # e.g. no matplotlib on a GPU host: redraw later with --replot
        print(f"no plots ({e}); run --replot {jp}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: evaluation model)")
    ap.add_argument("--eval-text", nargs="+", default=None, metavar="[NAME=]PATH",
                    help="plain-text sources, one dataset each ('default': the three training corpora)")
    ap.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    ap.add_argument("--save-windows", type=Path, default=None, help="also write the tokenised windows (.npz)")
    ap.add_argument("--save-only", action="store_true", help="with --save-windows: only write them")
    ap.add_argument("--eval-windows", type=Path, default=None,
                    help="windows written by --save-windows (a machine without the corpora, e.g. a GPU host)")
    ap.add_argument("--max-tokens", type=int, default=1_000_000, help="tokens read per dataset (random documents)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-windows", type=int, default=None, help="windows kept per dataset (default: all)")
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16, 64])
    ap.add_argument("--num-batches", type=_batches_per_b, default=_batches_per_b("1:32,4:32,16:32,64:32"),
                    help="batches per batch size, B:N,...")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--grid", type=lambda s: [x for x in s.split(",") if x], default=["frontier", "spec"])
    ap.add_argument("--points", default=None, help="extra point specs, ';' separated")
    ap.add_argument("--spec-batch-sizes", type=_ints, default=[4, 16], help="B values that run the g > 1 points")
    ap.add_argument("--output-error", action="store_true", help="also measure the MoE-output error (one more experts call)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shard", type=lambda s: tuple(int(x) for x in s.split("/")), default=(0, 1), help="i/n")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny ops)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="quality")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="join shard JSONs, then report")
    ap.add_argument("--replot", type=Path, default=None, help="report again from a results JSON")
    ap.add_argument("--select-on", type=Path, default=None, help="choose the compared configurations on this JSON")
    ap.add_argument("--default-spec", default=None, help="mark this point in the plots")
    ap.add_argument("--pick-default", type=Path, default=None, help="choose the auto preset from a (training) JSON")
    ap.add_argument("--validate-on", type=Path, default=None, help="with --pick-default: report the pick on this JSON")
    ap.add_argument("--bound", type=float, default=0.005, help="with --pick-default: CE delta bound, relative")
    ap.add_argument("--margin", type=float, default=1.0, help="with --pick-default: CI half-widths added to the delta")
    ap.add_argument("--reference-only-knobs", action="store_true",
                    help="with --pick-default: also consider knobs the serving kernels do not run (nucleus warm-up)")
    ap.add_argument("--layer-plan", type=Path, default=None,
                    help="print per-layer budget points from a one-layer-at-a-time sensitivity JSON (--targets)")
    ap.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.7, 0.8])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (evaluation set, B=4,16, 2 batches)")
    args = ap.parse_args()
    if args.eval_text == ["default"]:
        args.eval_text = DEFAULT_TEXT
    torch.set_num_threads(args.threads)  # before run_metadata, which records the thread count
    meta = run_metadata()
    if args.layer_plan is not None:
        print(";".join(layer_plan(summarize(json.loads(args.layer_plan.read_text())), args.targets)))
        return
    if args.pick_default is not None:
        write_default(args, meta)
        return
    if args.replot is not None:
        payload = json.loads(args.replot.read_text())
        meta = payload.pop("meta")
        for k in ("rows", "comparison", "comparison_selected_on", "comparison_spec", "comparison_guard"):
            payload.pop(k, None)
        report(payload, args, meta)
        return
    if args.merge is not None:
        payload = merge([json.loads(p.read_text()) for p in args.merge])
        for k in ("rows", "comparison", "comparison_selected_on", "comparison_spec", "comparison_guard", "meta"):
            payload.pop(k, None)
        report(payload, args, meta)
        return
    if args.quick:
        args.batch_sizes, args.num_batches, args.seq_len = [4, 16], {4: 2, 16: 2}, 32
        args.grid, args.points = [], "topk;cap cap=4;oea k0=2;xshare k0=1 budget=0.6;xshare k0=1 budget=0.8 p=0.7"
        args.spec_batch_sizes = []
    for B in args.batch_sizes:
        if B not in args.num_batches:
            raise SystemExit(f"--num-batches has no entry for B={B}")
    report(sweep(args), args, meta)


if __name__ == "__main__":
    main()
