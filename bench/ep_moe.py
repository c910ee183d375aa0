#!/usr/bin/env python
"""Expert-parallel MoE layer benchmark: what each selection policy costs on the busiest EP rank.

Run under torchrun, one process per GPU (``bench/torchrun_ep_bench.sh`` sets the environment)::

    torchrun --nproc-per-node 2 bench/ep_moe.py --shape gptoss --policy topk,xshare,xshare_ep,oea \\
        --tokens 1,16,64,256 --backend nccl,deepep

For every backend, tokens-per-rank ``T`` and policy, on the same inputs in one run:

1. router logits of the global batch (``R * T`` tokens; each rank routes its own ``T`` rows, the
   DP-attention layout) from a trace when one matches ``E``/``k``, else the documented generator
   (:mod:`sglang_xshare.moe.routing_source`); hidden states random bf16;
2. selection by :class:`sglang_xshare.select.Selector` on each rank's tokens (``POLICY+global``:
   :class:`~sglang_xshare.moe.dp_attention.DPAttentionSelector`, one all-reduced view);
3. **correctness**: the EP layer's output vs :func:`~sglang_xshare.moe.reference.reference_moe_lazy`
   (same selection, float32, single process) -- relative error printed and stored; a run whose
   error exceeds ``--tol`` is marked failed and not timed;
4. metrics of the global batch (:func:`sglang_xshare.metrics.selection_metrics`): per-rank distinct
   experts and token-expert pairs, peak/mean, retained gating mass; all-to-all bytes (useful rows
   that leave the rank, and what the backend moves);
5. timing with CUDA events, medians over ``--iters`` after ``--warmup``: eager per stage
   (select / dispatch / experts / combine), and the **whole layer** -- router logits in: select
   (with the ``+global`` all-reduce), logical -> physical copies, dispatch, experts, combine --
   eager and replayed from one CUDA graph where the backend is capturable (``--batches``
   routing batches rotate between replays); each number is the max over ranks of the rank's
   median. "layer vs topk" compares whole layers.

Writes ``bench/results/<name>.json``, ``.md`` (tables, ratios vs ``topk``) and ``.png``; the
revision recorded is ``$XSHARE_GIT_REV`` when set (a copy without ``.git``), else ``git``'s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


from sglang_xshare.benchio import markdown_table, run_metadata, write_results
from sglang_xshare.config import BudgetSchedule, RoutingSpec, SelectionConfig
from sglang_xshare.dispatch import BACKENDS, make_dispatcher
from sglang_xshare.metrics import selection_metrics
from sglang_xshare.moe import EPMoELayer, SwiGLUExperts, make_expert_weights
from sglang_xshare.moe.dp_attention import DPAttentionSelector
from sglang_xshare.moe.reference import expert_weight_fn, reference_moe_lazy
from sglang_xshare.moe.routing_source import RoutingSource
from sglang_xshare.placement import Placement
from sglang_xshare.select import SelectionOutput, Selector, compute_scores

SHAPES = {
    "gptoss": dict(experts=128, top_k=4, hidden=2880, intermediate=2880),     # GPT-OSS-120B-like
    "deepseek": dict(experts=256, top_k=8, hidden=7168, intermediate=2048),   # DeepSeek-V3-like (one layer)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("custom", *SHAPES), default="custom", help="preset E/k/hidden/intermediate")
    p.add_argument("--policy", default="topk,xshare,xshare_ep,oea",
                   help="comma list of NAME[@BUDGET][+global]; +global = DP-attention global view (xshare, xshare_ep); "
                        "@BUDGET overrides --budget for that entry")
    p.add_argument("--tokens", default="1,16,64,256", help="tokens per rank, comma list")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--intermediate", type=int, default=2880)
    p.add_argument("--backend", default="auto", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--budget", default="0.5", help="xshare/xshare_ep batch budget (count, fraction or mass:X)")
    p.add_argument("--k0", type=int, default=1)
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--trace", default=None, help="routing trace .npz (default: the packaged one, if E/k match)")
    p.add_argument("--batches", type=int, default=4, help="routing batches (layers) per point")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-graph", action="store_true", help="time eager only")
    p.add_argument("--tol", type=float, default=2e-2, help="max relative error vs the reference")
    p.add_argument("--select-backend", choices=("auto", "reference", "kernel"), default="auto",
                   help="Selector backend (auto: the Triton kernels on CUDA, as in serving; the select stage is "
                        "part of the timed layer; +global always runs the reference's all-reduced view)")
    p.add_argument("--experts-impl", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="output file stem (default ep_moe_<shape>_ep<R>)")
    a = p.parse_args(argv)
    if a.shape != "custom":
        for k, v in SHAPES[a.shape].items():
            setattr(a, k, v)
    a.policies = [s.strip() for s in a.policy.split(",") if s.strip()]
    a.token_list = [int(s) for s in a.tokens.split(",") if s.strip()]
    a.backends = [s.strip() for s in a.backend.split(",") if s.strip()]
    for b in a.backends:
        if b not in BACKENDS:
            p.error(f"--backend: {b!r} is not one of {', '.join(BACKENDS)}")
    if "topk" not in a.policies:
        a.policies.insert(0, "topk")  # ratios are vs topk
    return a


# ----------------------------------------------------------------------------- helpers
class Timer:
    """CUDA events on GPU, perf_counter on CPU; ``elapsed`` in microseconds."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) * 1e3
        return (b - a) * 1e6

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_selection(sel: SelectionOutput, layer: EPMoELayer) -> SelectionOutput:
    """All ranks' selections concatenated in rank order (metrics of the global batch)."""
    phys = layer.physical_ids(sel)
    parts = []
    for t in (sel.topk_ids.int(), sel.topk_weights.float(), phys.int()):
        bufs = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(bufs, t.contiguous())
        parts.append(torch.cat(bufs))
    return SelectionOutput(parts[0], parts[1], parts[2])


def make_selector(policy: str, args, routing: RoutingSpec, placement: Placement):
    """``NAME[@BUDGET][+global]`` -> a Selector (or its DP-attention global view)."""
    spec = policy[: -len("+global")] if policy.endswith("+global") else policy
    base, _, budget = spec.partition("@")
    budgeted = base.startswith("xshare")
    cfg = SelectionConfig(policy=base, k0=args.k0, min_score=args.min_score,
                          budget=BudgetSchedule.parse(budget or args.budget) if budgeted else None)
    sel = Selector(routing, cfg, placement=placement, backend=args.select_backend)
    if policy.endswith("+global"):
        return DPAttentionSelector(sel, "global")
    return sel


# ----------------------------------------------------------------------------- one point
def run_point(args, layer: EPMoELayer, selector, logits_all: list[torch.Tensor], hidden: list[torch.Tensor],
              routing: RoutingSpec, placement: Placement, timer: Timer, device: torch.device, graph_ok: bool) -> dict:
    rank, R = dist.get_rank(), dist.get_world_size()
    T = hidden[0].shape[0]
    mine = slice(rank * T, (rank + 1) * T)
    # -- select (eager timing after warm-up -- the first call of a shape compiles its kernel;
    #    includes the all-reduce of the +global view)
    xs = [lg[mine].contiguous() for lg in logits_all]
    sels = [selector(x, layer_id=b) for b, x in enumerate(xs)]
    t_sel = []
    for it in range(args.warmup + args.iters):
        b = it % len(xs)
        a = timer.mark()
        selector(xs[b], layer_id=b)
        z = timer.mark()
        if it >= args.warmup:
            timer.sync()
            t_sel.append(timer.elapsed(a, z))
    # -- metrics of the global batch, averaged over batches
    met: dict[str, float] = {}
    rank_exp = torch.zeros(R, dtype=torch.float64)
    rank_tok = torch.zeros(R, dtype=torch.float64)
    for lg, s in zip(logits_all, sels):
        full = gather_selection(s, layer)
        m = selection_metrics(full, compute_scores(lg, routing), torch.ones(lg.shape[0], dtype=torch.bool, device=device),
                              routing.top_k, placement)
        for k, v in m.items():
            if v.dim() == 0:
                met[k] = met.get(k, 0.0) + float(v) / len(sels)
        rank_exp += m["rank_experts"].double().cpu() / len(sels)
        rank_tok += m["rank_tokens"].double().cpu() / len(sels)
    # -- correctness on batch 0
    phys = [layer.physical_ids(s) for s in sels]
    out = layer.forward_selected(hidden[0], sels[0])
    ref = reference_moe_lazy(hidden[0], sels[0].topk_ids, sels[0].topk_weights, routing.num_experts,
                             expert_weight_fn(layer.experts.hidden, layer.experts.intermediate, args.seed, device))
    err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12)) if ref.abs().sum() > 0 else float(out.float().abs().max())
    err = max_over_ranks([err], device)[0]
    row = dict(T=T, rel_err=err, select_us=statistics.median(t_sel), **met,
               rank_experts=rank_exp.tolist(), rank_tokens=rank_tok.tolist())
    stats = layer.dispatcher.last_stats
    if err > args.tol or err != err:
        row["failed"] = f"relative error {err:.3g} > {args.tol}"
        return row
    # -- bytes (batch 0): useful rows leaving this rank, and what the backend moves (dispatch + combine)
    layer.dispatch(hidden[0], phys[0], sels[0].topk_weights)
    stats = layer.dispatcher.last_stats
    hb = stats.hidden_bytes_per_row
    row["a2a_useful_bytes"] = max_over_ranks([2.0 * float(stats.remote_rows(rank)) * hb], device)[0]
    row["a2a_wire_bytes"] = max_over_ranks([2.0 * float(stats.remote_wire_rows(rank)) * hb], device)[0]
    # -- eager per stage (select timed above)
    nb = len(sels)
    d_t, c_t, k_t = [], [], []
    dist.barrier()
    for it in range(args.warmup + args.iters):
        b = it % nb
        e0 = timer.mark()
        tokens, handle = layer.dispatch(hidden[b], phys[b], sels[b].topk_weights)
        e1 = timer.mark()
        y = layer.compute(tokens)
        e2 = timer.mark()
        layer.combine(y, handle)
        e3 = timer.mark()
        if it >= args.warmup:
            timer.sync()
            d_t.append(timer.elapsed(e0, e1))
            k_t.append(timer.elapsed(e1, e2))
            c_t.append(timer.elapsed(e2, e3))
    # -- the whole layer eager: router logits in (select, +global all-reduce, copies, dispatch, experts, combine)
    layer.selector = selector
    mine_logits = [lg[mine].contiguous() for lg in logits_all]
    tot = []
    dist.barrier()
    for it in range(args.warmup + args.iters):
        b = it % nb
        e0 = timer.mark()
        layer(hidden[b], mine_logits[b])
        e1 = timer.mark()
        if it >= args.warmup:
            timer.sync()
            tot.append(timer.elapsed(e0, e1))
    med = [statistics.median(v) for v in (d_t, k_t, c_t, tot, t_sel)]
    row["dispatch_us"], row["experts_us"], row["combine_us"], row["layer_eager_us"], row["select_us"] = max_over_ranks(med, device)
    # -- CUDA graph of the whole layer
    row["layer_graph_us"] = None
    if graph_ok and not args.no_graph:
        try:
            row["layer_graph_us"] = time_graph(args, layer, hidden, mine_logits, timer, device)
        except Exception as exc:  # noqa: BLE001 - reported, eager numbers stand
            row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    row["layer_us"] = row["layer_graph_us"] if row["layer_graph_us"] else row["layer_eager_us"]
    return row


def time_graph(args, layer: EPMoELayer, hidden, logits, timer: Timer, device) -> float:
    """Median replay time of one CUDA graph of the whole layer, ``layer(hidden, router_logits)``:
    select (+ the ``+global`` all-reduce), physical copies, dispatch, experts, combine. The
    static inputs rotate over the ``--batches`` routing batches between replays (layer 0's
    budget: a graph captures one layer)."""
    h_s, x_s = hidden[0].clone(), logits[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer(h_s, x_s)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):  # NCCL's watchdog thread keeps polling
        out_s = layer(h_s, x_s)
    torch.cuda.synchronize()
    # replay check: the graph computes what eager computes
    ref = layer(hidden[0], logits[0])
    g.replay()
    torch.cuda.synchronize()
    gerr = float((out_s.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
    if gerr > 1e-2:
        raise RuntimeError(f"graph replay differs from eager (rel {gerr:.3g})")
    times = []
    nb = len(hidden)
    dist.barrier()
    for it in range(args.warmup + args.iters):
        b = it % nb
        h_s.copy_(hidden[b])
        x_s.copy_(logits[b])
        a = timer.mark()
        g.replay()
        z = timer.mark()
        if it >= args.warmup:
            timer.sync()
            times.append(timer.elapsed(a, z))
    return max_over_ranks([statistics.median(times)], device)[0]


def time_allreduce(E: int, device, timer: Timer, iters: int = 50) -> float:
    """Median of one all-reduce of the DP-attention statistics ``[3, E] int64`` (max over ranks)."""
    x = torch.ones(3, E, dtype=torch.int64, device=device)
    v = []
    for it in range(10 + iters):
        a = timer.mark()
        dist.all_reduce(x)
        z = timer.mark()
        if it >= 10:
            timer.sync()
            v.append(timer.elapsed(a, z))
    return max_over_ranks([statistics.median(v)], device)[0]


# ----------------------------------------------------------------------------- report
def ratios(rows: list[dict]) -> None:
    """Add ``*_vs_topk`` ratios within each (backend, T)."""
    base = {(r["backend"], r["T"]): r for r in rows if r["policy"] == "topk" and "failed" not in r}
    for r in rows:
        b = base.get((r["backend"], r["T"]))
        if b is None or "failed" in r:
            continue
        r["peak_experts_vs_topk"] = r["peak_experts"] / max(b["peak_experts"], 1e-9)
        if r.get("layer_us") and b.get("layer_us"):
            r["layer_vs_topk"] = r["layer_us"] / b["layer_us"]
            r["layer_cut_pct"] = 100.0 * (1.0 - r["layer_vs_topk"])


def report(args, rows: list[dict], info: dict, meta: dict) -> str:
    heads = ["backend", "T/rank", "policy", "rel err", "peak exp", "mean exp", "peak/mean", "peak pairs", "retained",
             "a2a useful KB", "a2a wire KB", "select us", "dispatch us", "experts us", "combine us", "layer eager us",
             "layer graph us", "peak exp vs topk", "layer vs topk"]
    tab = []
    for r in rows:
        if "failed" in r:
            tab.append([r["backend"], r["T"], r["policy"], r["rel_err"], "FAILED: " + r["failed"]] + [""] * (len(heads) - 5))
            continue
        tab.append([r["backend"], r["T"], r["policy"], r["rel_err"], r["peak_experts"], r["mean_experts"], r["peak_over_mean"],
                    r["peak_tokens"], r["retained_mass"], r["a2a_useful_bytes"] / 1024, r["a2a_wire_bytes"] / 1024,
                    r["select_us"], r["dispatch_us"], r["experts_us"], r["combine_us"], r["layer_eager_us"],
                    r["layer_graph_us"] if r["layer_graph_us"] else "-", r.get("peak_experts_vs_topk", "-"),
                    r.get("layer_vs_topk", "-")])
    lines = [
        f"Shape: E={args.experts}, top-k={args.top_k}, hidden={args.hidden}, intermediate={args.intermediate}, "
        f"EP={info['ep']}, bf16 SwiGLU experts ({info['experts_impl']}), budget {args.budget}, k0={args.k0}, "
        f"min_score={args.min_score}.",
        f"Routing: {info['routing']}.",
        "Backends: " + "; ".join(f"`{b}`: {why}" for b, why in info["backend_reason"].items()) + "."
        + "".join(f" Backend `{b}` did not run: {err}." for b, err in info["backend_error"].items()),
        f"DP-attention all-reduce of [3, E] int64 statistics: {info['allreduce_us']:.1f} us (median, eager). "
        f"Select stage: `{args.select_backend}` backend (`+global`: the all-reduced reference view).",
        "Times: medians over iterations, max over ranks; `layer eager` / `layer graph` = the whole layer from router "
        "logits -- select (with the `+global` all-reduce), physical copies, dispatch, experts, combine -- eager / "
        "replayed from one CUDA graph; `layer vs topk` uses the graph time when there is one, else eager. `peak exp` "
        "= distinct experts on the busiest rank; `peak pairs` = token-expert pairs on the busiest rank; `retained` = "
        "kept share of the top-k gating mass.",
        "",
        markdown_table(heads, tab),
    ]
    return "\n".join(lines)


def plot(args, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in rows})
    fig, axes = plt.subplots(len(backends), 2, figsize=(11, 3.8 * len(backends)), squeeze=False)
    for i, be in enumerate(backends):
        for pol in dict.fromkeys(r["policy"] for r in rows):
            pts = [r for r in rows if r["backend"] == be and r["policy"] == pol and "failed" not in r]
            if not pts:
                continue
            x = [r["T"] for r in pts]
            axes[i, 0].plot(x, [r["peak_experts"] for r in pts], marker="o", label=pol)
            axes[i, 1].plot(x, [r["layer_us"] for r in pts], marker="o", label=pol)
        axes[i, 0].set_title(f"{be}: distinct experts on the busiest rank")
        axes[i, 1].set_title(f"{be}: MoE layer latency (us)")
        for ax in axes[i]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("decode tokens per rank")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"EP MoE E={args.experts} k={args.top_k} H={args.hidden} I={args.intermediate}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(args, rows: list[dict], info: dict, final: bool) -> None:
    """Rank 0 writes JSON, Markdown and PNG (again after every backend; the last write wins)."""
    if dist.get_rank() != 0:
        return
    ratios(rows)
    meta = run_metadata()
    stem = args.name or f"ep_moe_{args.shape}_E{args.experts}_k{args.top_k}_ep{info['ep']}"
    md = report(args, rows, info, meta)
    payload = {"args": dict(vars(args)), "info": info, "complete": final, "rows": rows}
    jp, mp = write_results(args.out, stem, payload, md, meta)
    png = Path(args.out) / f"{stem}.png"
    try:
        plot(args, rows, png)
    except Exception as exc:  # noqa: BLE001
        print(f"[ep_moe] plot failed: {exc}")
    if final:
        print(md)
        print(f"[ep_moe] wrote {jp}, {mp}, {png}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a single process: world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", LOCAL_RANK="0")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=180))
    rank, R = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timer = Timer(cuda)
    E, k, H, I = args.experts, args.top_k, args.hidden, args.intermediate
    placement = Placement.expert_parallel(E, R)
    L = placement.experts_per_rank
    routing = RoutingSpec(num_experts=E, top_k=k)
    w13, w2 = make_expert_weights(range(rank * L, (rank + 1) * L), H, I, seed=args.seed, device=device)
    experts = SwiGLUExperts(w13, w2, impl=args.experts_impl)
    source = RoutingSource(E, k, args.trace, seed=args.seed)
    info = {"ep": R, "routing": source.description, "backend_reason": {}, "backend_error": {},
            "experts_impl": "triton" if experts._use_triton(w13) else "torch"}
    info["allreduce_us"] = time_allreduce(E, device, timer)
    rows: list[dict] = []
    max_t = max(args.token_list)
    # inputs shared by every backend and policy (same on every rank for the logits)
    inputs = {}
    for T in args.token_list:
        logits = [source.batch(R * T, layer=b, index=T).to(device) for b in range(args.batches)]
        g = torch.Generator(device=device).manual_seed(args.seed * 31 + rank * 1009 + T)
        hidden = [torch.randn(T, H, generator=g, device=device).to(torch.bfloat16) for _ in range(args.batches)]
        inputs[T] = (logits, hidden)
    total = len(args.backends) * len(args.token_list) * len(args.policies)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="ep_moe", file=sys.stdout)
    for be in args.backends:
        try:
            disp = make_dispatcher(be, num_physical=placement.num_physical, hidden=H, top_k=k,
                                   max_tokens_per_rank=max_t, cuda_graph=True)
        except Exception as exc:  # noqa: BLE001 - DeepEP may be missing: say where, carry on
            info["backend_error"][be] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if rank == 0:
                print(f"[ep_moe] backend {be} unavailable: {info['backend_error'][be]}", flush=True)
            if bar:
                bar.update(len(args.token_list) * len(args.policies))
            continue
        name = f"{be}->{disp.name}"
        info["backend_reason"][name] = disp.reason
        if rank == 0:
            print(f"[ep_moe] backend {be}: {disp.name}: {disp.reason}", flush=True)
        layer = EPMoELayer(placement, disp, experts)
        graph_ok = cuda and disp.graph_capturable and experts._use_triton(w13)
        for T in args.token_list:
            logits, hidden = inputs[T]
            for pol in args.policies:
                try:
                    selector = make_selector(pol, args, routing, placement)
                    row = run_point(args, layer, selector, logits, hidden, routing, placement, timer, device, graph_ok)
                except Exception as exc:  # noqa: BLE001
                    row = {"T": T, "rel_err": float("nan"), "failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    if rank == 0:
                        traceback.print_exc()
                row.update(backend=name, policy=pol)
                rows.append(row)
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(f"{disp.name} T={T} {pol} peak={row.get('peak_experts', float('nan')):.1f} "
                                        f"layer={row.get('layer_us') or float('nan'):.0f}us")
        if hasattr(disp, "close"):
            disp.close()
        save(args, rows, info, final=False)  # partial results survive a later backend's crash
    if bar:
        bar.close()
    save(args, rows, info, final=True)
    try:
        from sglang_xshare.dispatch.deepep import destroy_buffers

        destroy_buffers()
    except Exception:  # noqa: BLE001 - deep_ep absent
        pass
    dist.barrier()
    dist.destroy_process_group()
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
