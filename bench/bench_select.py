"""Selection kernels on the GPU: exactness against the reference, then time per call under CUDA graphs.

For each model shape, policy and batch size this script

1. checks the Triton kernel against the PyTorch reference on fresh random logits -- plus
   tie-heavy and non-finite logits with padded tokens at two batch sizes -- (ids and physical
   ids exactly, weights within fp32 rounding) and that two calls are bit-identical; every
   launch-knob variant of the sweep is checked the same way;
2. captures ``--graph-calls`` calls in one ``torch.cuda.CUDAGraph`` (after an eager warm-up
   call), checks that a replay reproduces the eager outputs, and times replays with CUDA
   events (median over ``--reps`` replays, divided by the calls per graph) -- the way the
   selection runs inside SGLang's decode graph, many layers per graph;
3. times the policy's PyTorch reference (graph-captured when it can be, else eager) and plain
   top-k (softmax / sigmoid, grouped mask, ``torch.topk``, renormalise: what SGLang's torch
   path does without us) on the same inputs, in the same run.

``xshare_spec`` is the fused path (requests = runs of 4 consecutive tokens, ``request_group``,
as in SGLang's verify batches); ``xshare_spec_ids`` the same batches passed as arbitrary
``request_ids`` (three launches). ``xshare_ep`` runs on EP = 8 ranks; ``xshare_ep_rep`` adds
one redundant expert per rank (EPLB-style).

Writes ``<out>/<name>.{json,md,png}`` (command, git revision, device, date; rewritten after
every batch size, so a run cut short still leaves its numbers) and prints a table. Kernels are
compiled first in parallel worker processes (Triton's on-disk cache serves the timing).

    python bench/bench_select.py                       # full grid, sweep included
    python bench/bench_select.py --T 1 16 64 256       # the targets' batch sizes only
    python bench/bench_select.py --models qwen3-128x8 --policies topk xshare   # one shape (the sweep too)
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from sglang_xshare.benchio import markdown_table, run_metadata, write_results
from sglang_xshare.config import Budget, BudgetSchedule, RoutingSpec, SelectionConfig
from sglang_xshare.placement import Placement
from sglang_xshare.select import Selector, compute_scores
from sglang_xshare.select.traits import policy_traits
from sglang_xshare.select.inputs import make_logits
from sglang_xshare.select.scoring import _mask_groups

# name -> (E, k, scoring, n_group, topk_group, correction bias, logits dtype)
MODELS = {
    "olmoe-64x8": (64, 8, "softmax", None, None, False, "bfloat16"),
    "e64k2-fp32": (64, 2, "softmax", None, None, False, "float32"),
    "e128k4-fp32": (128, 4, "softmax", None, None, False, "float32"),
    "qwen3-128x8": (128, 8, "softmax", None, None, False, "bfloat16"),
    "dsv2-160x6-grp": (160, 6, "softmax", 8, 3, False, "bfloat16"),
    "dsv3-256x8-grp-bias": (256, 8, "sigmoid", 8, 4, True, "bfloat16"),
    "kimi-384x8-bias": (384, 8, "sigmoid", None, None, True, "bfloat16"),
}
POLICIES = ["topk", "cap", "oea", "oea_simple", "xshare", "xshare_ep", "xshare_ep_rep", "xshare_spec",
            "xshare_spec_ids"]
T_VALUES = [1, 16, 64, 256, 1024, 4096]
EP = 8
SPEC_GROUP = 4
#: Adversarial exactness inputs (kind, padded tokens) at these batch sizes.
ADVERSARIAL_T = (16, 64)

SWEEP_MODELS = ["qwen3-128x8", "dsv3-256x8-grp-bias"]
SWEEP_POLICIES = ["xshare", "xshare_ep", "xshare_spec"]
SWEEP_KNOBS = [{"num_warps": 8}, {"tile_elems": 256}, {"tile_elems": 1024}, {"sync": 2}, {"pair_chunk": 32},
               {"two_stage": True}, {"two_stage": False},
               # one program, no grid barrier: looping over the default tiles, or one tile of the batch
               {"programs": 1}, {"programs": 1, "tile_elems": 2048}, {"programs": 1, "tile_elems": 8192}]
SWEEP_T = (1, 16, 64, 256)


def import_kernels():
    """``sglang_xshare.kernels.select`` (imported on first use: it needs Triton)."""
    return importlib.import_module("sglang_xshare.kernels.select")


def make_selector(model: str, policy: str, device) -> tuple[Selector, torch.Tensor | None]:
    """The reference :class:`Selector` of a (model, policy) pair and its correction bias."""
    E, k, scoring, ng, tg, has_bias, _ = MODELS[model]
    routing = RoutingSpec(E, k, scoring=scoring, renormalize=True, num_expert_group=ng, topk_group=tg,
                          has_correction_bias=has_bias)
    bias = (torch.randn(E, generator=torch.Generator().manual_seed(7)) * 0.05).to(device) if has_bias else None
    name = {"xshare_ep_rep": "xshare_ep", "xshare_spec_ids": "xshare_spec"}.get(policy, policy)
    kw: dict = {}
    traits = policy_traits(name)
    if traits.per_token_cap:
        kw["cap"] = max(1, k // 2)
    if traits.budgeted:
        kw["budget"] = BudgetSchedule.parse("0.6")
    if traits.uses_requests:
        kw["request_budget"] = Budget.parse("0.8", "--xshare-request-budget")
    cfg = SelectionConfig(policy=name, k0=1, **kw)
    placement = None
    if traits.uses_placement:
        if policy == "xshare_ep_rep":  # one redundant copy per rank (EPLB-style)
            per = E // EP
            g = torch.Generator().manual_seed(11)
            p2l = []
            for r in range(EP):
                p2l += list(range(r * per, (r + 1) * per)) + [int(torch.randint(0, E, (1,), generator=g))]
            placement = Placement.from_map(E, EP, p2l)
        else:
            placement = Placement.expert_parallel(E, EP)
    return Selector(routing, cfg, placement, backend="reference", correction_bias=bias), bias


class Case:
    """One (model, policy, T, inputs): reference selector, kernel, context, inputs, knobs."""

    def __init__(self, model: str, policy: str, T: int, device, seed: int = 0, knobs: dict | None = None,
                 kind: str = "randn", n_valid: int | None = None) -> None:
        self.model, self.policy, self.T = model, policy, T
        self.sel, self.bias = make_selector(model, policy, device)
        self.kernel = getattr(import_kernels(), f"{self.sel.config.policy}_kernel")
        E, dtype = MODELS[model][0], getattr(torch, MODELS[model][6])
        self.x = make_logits(kind, T, E, seed, dtype, device)
        group = SPEC_GROUP if policy == "xshare_spec" else None
        rid = torch.arange(T, device=device) // SPEC_GROUP if policy == "xshare_spec_ids" else None
        self.ctx = self.sel.context(T, device, 0, n_valid, rid, group)
        self.workspace: dict = dict(knobs or {})

    def run_kernel(self):
        return self.kernel(self.x, self.sel.routing, self.ctx, self.bias, self.workspace)

    def run_reference(self):
        return self.sel.entry.reference(compute_scores(self.x, self.sel.routing, self.bias), self.ctx)

    def run_plain(self):
        """Plain top-k of the model's router, torch ops (SGLang's torch path)."""
        r = self.sel.routing
        x = self.x.float()
        gate = torch.softmax(x, dim=-1) if r.scoring == "softmax" else torch.sigmoid(x)
        s = gate if self.bias is None else gate + self.bias
        if r.num_expert_group is not None:
            s = _mask_groups(s, r.num_expert_group, r.topk_group, biased=self.bias is not None)
        ids = torch.topk(s, r.top_k, dim=-1).indices
        w = gate.gather(1, ids)
        w = w / w.sum(dim=-1, keepdim=True)
        return ids.to(torch.int32), w

    def plan(self) -> dict:
        """The launch plan the kernel used (after a call): tile rows, grid, sync mode, warps."""
        for key, buf in self.workspace.items():
            if isinstance(key, tuple) and key and key[0] == "buffers":
                p = buf.plan
                return {"bt": p.bt, "nb": p.nb, "chunks": p.chunks, "sync": p.sync, "warps": p.num_warps}
        return {}


def compare(ref, out) -> str:
    """'' when equal (ids / physical ids exactly, weights within fp32 rounding)."""
    bad = (out.topk_ids != ref.topk_ids).any(dim=1)
    if bad.any():
        t = int(bad.nonzero()[0])
        return (f"ids differ on {int(bad.sum())}/{bad.numel()} tokens, first {t}: "
                f"kernel {out.topk_ids[t].tolist()} ref {ref.topk_ids[t].tolist()}")
    if not torch.allclose(out.topk_weights, ref.topk_weights, rtol=2e-5, atol=1e-6):
        return f"weights differ, max abs {(out.topk_weights - ref.topk_weights).abs().max().item():.3g}"
    if ref.physical_ids is not None and (out.physical_ids is None or not torch.equal(out.physical_ids, ref.physical_ids)):
        return "physical ids differ"
    return ""


def check_case(model: str, policy: str, T: int, seed: int, device, kind: str = "randn", n_valid: int | None = None,
               knobs: dict | None = None) -> dict:
    """Kernel vs reference on fresh inputs, and two calls bit-identical; with phase times."""
    t0 = time.perf_counter()
    rec = {"model": model, "policy": policy, "T": T, "seed": seed, "kind": kind, "n_valid": n_valid,
           **({"knobs": knobs} if knobs else {})}
    try:
        c = Case(model, policy, T, device, seed=seed, knobs=knobs, kind=kind, n_valid=n_valid)
        out = c.run_kernel()
        again = c.run_kernel()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        msg = compare(c.run_reference(), out)
        if not msg and not (torch.equal(out.topk_ids, again.topk_ids)
                            and torch.equal(out.topk_weights, again.topk_weights)):
            msg = "two calls differ"
        rec["plan"] = c.plan()
        rec["seconds"] = {"compile+run": t1 - t0, "reference": time.perf_counter() - t1}
    except Exception:
        msg = "exception: " + traceback.format_exc(limit=3)[-600:]
    rec.update(ok=msg == "", msg=msg)
    return rec


def swept(fixed: list[str], asked: list[str]) -> list[str]:
    """The sweep's models / policies (``fixed``) among those asked for (``--models`` / ``--policies``)."""
    return [x for x in fixed if x in asked]


def check_items(models: list[str], policies: list[str], t_of, seeds: int, sweep: bool) -> list[tuple]:
    """``(model, policy, T, seed, kind, n_valid, knobs)`` of every exactness check."""
    items = []
    for m in models:
        for p in policies:
            for T in t_of(m):
                items += [(m, p, T, 101 + s, "randn", None, None) for s in range(seeds)]
                if T in ADVERSARIAL_T:
                    items += [(m, p, T, 201, "ties", None, None), (m, p, T, 202, "nonfinite", T - 3, None),
                              (m, p, T, 203, "range", None, None), (m, p, T, 204, "underflow", T - 2, None)]
    if sweep:
        items += [(m, p, T, 301, "randn", None, kn) for m in swept(SWEEP_MODELS, models) for p in swept(SWEEP_POLICIES, policies)
                  for T in SWEEP_T for kn in SWEEP_KNOBS]
    return items


def _check_worker(items: list[tuple]) -> list[dict]:
    """Compile (fills Triton's on-disk cache) and check a share of the items in one process."""
    dev = torch.device("cuda")
    out = [check_case(m, p, T, sd, dev, kind, nv, kn) for m, p, T, sd, kind, nv, kn in items]
    torch.cuda.synchronize()
    return out


def check_parallel(items: list[tuple], workers: int) -> list[dict]:
    """Run :func:`_check_worker` over ``workers`` spawned processes (compiles in parallel)."""
    chunks = [c for c in (items[i::workers] for i in range(workers)) if c]
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(chunks)) as pool:
        res = pool.map(_check_worker, chunks)
    return [r for rs in res for r in rs]


def _median_us(fn, reps: int, per_call: int) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / per_call)
    return statistics.median(times)


def time_graph(fn, calls: int, reps: int):
    """Capture ``calls`` calls of ``fn`` in a CUDA graph; (median us per call, last outputs)."""
    fn()  # eager warm-up: compiles, allocates the workspace
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn() for _ in range(calls)]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    return _median_us(g.replay, reps, calls), outs[-1]


def time_eager(fn, budget_s: float = 0.3):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = int(min(30, max(3, budget_s / max(one, 1e-6))))
    return _median_us(fn, reps, 1)


def _time_case(model: str, policy: str, T: int, dev, args, plain_cache: dict, knobs: dict | None = None,
               with_baselines: bool = True) -> dict:
    """Time one (model, policy, T): kernel under graph replay, reference, plain top-k."""
    rec = {"model": model, "policy": policy, "T": T, "E": MODELS[model][0], "k": MODELS[model][1],
           "dtype": MODELS[model][6], **({"knobs": knobs} if knobs else {})}
    try:
        c = Case(model, policy, T, dev, seed=5, knobs=knobs)
        eager = c.run_kernel()
        torch.cuda.synchronize()
        rec["plan"] = c.plan()
        rec["kernel_us"], graph_out = time_graph(c.run_kernel, args.graph_calls, args.reps)
        rec["replay_equals_eager"] = compare(eager, graph_out) == ""
        if not with_baselines:
            return rec
        if (model, T) not in plain_cache:
            plain_cache[(model, T)] = time_graph(c.run_plain, args.graph_calls, args.reps)[0]
        rec["plain_topk_us"] = plain_cache[(model, T)]
        if c.sel.entry.uses_placement:  # builds its placement tables on the host per call
            rec["reference_us"], rec["reference_mode"] = time_eager(c.run_reference), "eager"
        else:
            try:
                rec["reference_us"] = time_graph(c.run_reference, 5, max(5, args.reps // 3))[0]
                rec["reference_mode"] = "graph"
            except Exception:
                torch.cuda.synchronize()
                rec["reference_us"], rec["reference_mode"] = time_eager(c.run_reference), "eager"
        rec["speedup_vs_reference"] = rec["reference_us"] / rec["kernel_us"]
        rec["ratio_to_plain_topk"] = rec["kernel_us"] / rec["plain_topk_us"]
    except Exception:
        rec["error"] = traceback.format_exc(limit=3)[-600:]
        print(f"TIMING FAIL {model} {policy} T={T} {knobs or ''}: {rec['error']}", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--policies", nargs="*", default=POLICIES)
    ap.add_argument("--T", nargs="*", type=int, default=None)
    ap.add_argument("--graph-calls", type=int, default=20, help="selection calls per captured graph")
    ap.add_argument("--reps", type=int, default=30, help="timed graph replays (median)")
    ap.add_argument("--large-models", nargs="*", default=None,
                    help="models timed and checked at T > 256 (default: all)")
    ap.add_argument("--seeds", type=int, default=2, help="random inputs per shape in the exactness check")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the launch-knob sweep")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default="bench_select")
    ap.add_argument("--time-budget", type=float, default=540.0, help="stop timing new shapes after this many seconds")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_select needs a CUDA GPU")
    t_start = time.time()
    models = args.models or list(MODELS)
    Ts = args.T or T_VALUES
    dev = torch.device("cuda")
    meta = run_metadata()  # honours XSHARE_GIT_REV (the device copy's .git, if any, is not this checkout's)
    large = set(models if args.large_models is None else args.large_models)

    def t_of(m: str) -> tuple:
        return tuple(T for T in Ts if T <= 256 or m in large)

    items = check_items(models, args.policies, t_of, args.seeds, args.sweep)
    print(f"device {meta['device']}  git {meta['git']}  {len(models)} models x {len(args.policies)} policies x T {Ts}; "
          f"{len(items)} exactness checks", flush=True)
    # 1. exactness on fresh inputs, in parallel processes that also compile every kernel
    #    variant once (Triton's on-disk cache serves the timing below)
    checks = check_parallel(items, args.workers) if args.workers > 1 else _check_worker(items)
    n_ok = sum(c["ok"] for c in checks)
    for c in checks:
        if not c["ok"]:
            print(f"CHECK FAIL {c['model']} {c['policy']} T={c['T']} {c['kind']} {c.get('knobs', '')}: {c['msg']}",
                  flush=True)
    print(f"exactness: {n_ok}/{len(checks)} checks equal the reference  ({time.time() - t_start:.0f}s)", flush=True)

    # 2./3. timings: the targets' batch sizes, the knob sweep, then the large batches; the files
    #    are rewritten after every batch size, so a run cut short still leaves its numbers
    results, sweep = [], []
    plain_cache: dict = {}

    def over() -> bool:
        return time.time() - t_start > args.time_budget

    def time_T(T: int) -> None:
        for model in [m for m in models if T in t_of(m)]:
            if over():
                return
            for policy in args.policies:
                results.append(_time_case(model, policy, T, dev, args, plain_cache))
            last = results[-len(args.policies):]
            print(f"  {model} T={T} ({time.time() - t_start:.0f}s): "
                  + " ".join(f"{x['policy']} {x.get('kernel_us', float('nan')):.1f}" for x in last), flush=True)
        report(args, meta, checks, results, sweep)

    for T in [T for T in Ts if T <= 256]:
        time_T(T)
    if args.sweep:
        for model in swept(SWEEP_MODELS, models):
            for T in SWEEP_T:
                for policy in swept(SWEEP_POLICIES, args.policies):
                    for kn in SWEEP_KNOBS:
                        if not over():
                            sweep.append(_time_case(model, policy, T, dev, args, plain_cache, kn, with_baselines=False))
        print(f"  sweep done ({time.time() - t_start:.0f}s)", flush=True)
        report(args, meta, checks, results, sweep)
    for T in [T for T in Ts if T > 256]:
        time_T(T)
    report(args, meta, checks, results, sweep, quiet=False)
    print(f"total {time.time() - t_start:.0f}s")


def _plan_str(p: dict) -> str:
    if not p:
        return ""
    return f"bt{p['bt']} nb{p['nb']}" + (f"x{p['chunks']}" if p["chunks"] > 1 else "") + f" s{p['sync']} w{p['warps']}"


def report(args, meta: dict, checks: list, results: list, sweep: list, quiet: bool = True) -> None:
    """Write ``<out>/<name>.{json,md,png}`` (and print the tables unless ``quiet``)."""
    n_ok = sum(c["ok"] for c in checks)
    rows = [[r["model"], r["policy"], r["T"], r["kernel_us"], r["reference_us"], r["reference_mode"],
             r["plain_topk_us"], r["speedup_vs_reference"], r["ratio_to_plain_topk"],
             "yes" if r["replay_equals_eager"] else "NO", _plan_str(r.get("plan", {}))]
            for r in results if "reference_us" in r]
    in_target = [r for r in results if "reference_us" in r and r["T"] <= 256 and r["E"] <= 256]
    summary = []
    for policy in args.policies:
        rs = [r for r in in_target if r["policy"] == policy]
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["kernel_us"])
        summary.append([policy, len(rs), statistics.median(r["kernel_us"] for r in rs), worst["kernel_us"],
                        f"{worst['model']} T={worst['T']}", min(r["speedup_vs_reference"] for r in rs),
                        statistics.median(r["ratio_to_plain_topk"] for r in rs),
                        sum(r["kernel_us"] <= 10.0 for r in rs)])
    headers = ["model", "policy", "T", "kernel us", "reference us", "ref mode", "plain top-k us",
               "x vs reference", "kernel / plain", "replay == eager", "plan"]
    sum_headers = ["policy", "shapes (T<=256, E<=256)", "median kernel us", "worst kernel us", "at",
                   "min x vs reference", "median kernel / plain", "shapes <= 10 us"]
    base = {(r["model"], r["policy"], r["T"]): r for r in results if "kernel_us" in r}
    sweep_rows = []
    for r in sweep:
        if "kernel_us" not in r:
            continue
        b = base.get((r["model"], r["policy"], r["T"]))
        sweep_rows.append([r["model"], r["policy"], r["T"], json.dumps(r["knobs"]), _plan_str(r.get("plan", {})),
                           r["kernel_us"], b["kernel_us"] if b else float("nan"),
                           _plan_str(b.get("plan", {})) if b else ""])
    sweep_headers = ["model", "policy", "T", "knobs", "plan", "kernel us", "default us", "default plan"]
    md = (
        f"Median microseconds per selection call under CUDA-graph replay ({args.graph_calls} calls per graph, "
        f"{args.reps} replays); reference graph-captured where possible, else eager; plain top-k = torch "
        f"softmax/sigmoid + grouped mask + topk + renormalise, graph-captured. Plan: rows per tile (bt), "
        f"programs (nb, x tiles each), sync (0 one program, 1 grid barrier, 2 two launches), warps.\n\n"
        f"Exactness vs reference: {n_ok}/{len(checks)} checks (ids and physical ids exactly, weights within "
        f"fp32 rounding, two calls bit-identical; random, tie-heavy and non-finite + padded inputs; every sweep "
        f"variant).\n\n## Targets (T <= 256, E <= 256, k <= 8)\n\n"
        + markdown_table(sum_headers, summary) + "\n\n## All shapes\n\n" + markdown_table(headers, rows) + "\n"
    )
    if sweep_rows:
        md += "\n## Launch knobs (xshare / xshare_ep / xshare_spec)\n\n" + markdown_table(sweep_headers, sweep_rows) + "\n"
    failed = [c for c in checks if not c["ok"]]
    if failed:
        md += "\n## Exactness failures\n\n" + "\n".join(
            f"- {c['model']} {c['policy']} T={c['T']} {c['kind']} {c.get('knobs', '')}: {c['msg'][:300]}"
            for c in failed[:50]) + "\n"
    payload = {"args": vars(args), "checks": checks, "results": results, "sweep": sweep,
               "summary": [dict(zip(sum_headers, s)) for s in summary]}
    jp, mdp = write_results(args.out, args.name, payload, md, meta)
    plot(results, Path(args.out) / f"{args.name}.png", meta)
    if not quiet:
        print(markdown_table(headers, rows))
        print()
        print(markdown_table(sum_headers, summary))
        if sweep_rows:
            print(markdown_table(sweep_headers, sweep_rows))
        print(f"exactness: {n_ok}/{len(checks)}; wrote {jp} {mdp}")


def plot(results: list, path: Path, meta: dict) -> None:
    """Kernel microseconds vs batch size, one panel per model, one line per policy (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if "kernel_us" in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    if not models:
        return
    cols = min(4, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for policy in dict.fromkeys(r["policy"] for r in ok):
            pts = sorted((r["T"], r["kernel_us"]) for r in ok if r["model"] == model and r["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=policy)
        pts = sorted({(r["T"], r["plain_topk_us"]) for r in ok if r["model"] == model and "plain_topk_us" in r})
        if pts:
            ax.plot(*zip(*pts), "k--", lw=1, label="plain torch top-k")
        ax.axhline(10.0, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("us per call (graph replay)")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"selection kernels, {meta['device']}, git {meta['git']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
