"""The selection kernel's grid barrier next to a kernel that holds the SMs (GPU).

The one-launch batch kernel meets at a grid barrier, which needs all its programs resident at
once. Here another stream first fills every SM with a "hog" kernel whose blocks retire one by
one over ``--stagger-ms`` (so SMs free up gradually), then the selection runs on a second stream:

* cooperative launch (the default on a GPU): the driver starts the grid only when all its
  programs can be resident -- the result must equal the reference exactly, no fault counted;
* plain launch with a short barrier timeout (``max_spins``): early programs wait for programs that
  are not resident yet, give up, and must route their tokens by each token's own top-k (never by
  partial sums) and count the event -- the result must be a valid routing (each token keeps its
  own top-k0, tokens of programs that did not give up equal the reference) and the fault counter
  must have grown;
* the cooperative kernel captured in a CUDA graph: replays equal eager.

Writes ``bench/results/<name>.{json,md}``.

    python bench/barrier_safety.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch
import triton
import triton.language as tl

from sglang_xshare import BudgetSchedule, RoutingSpec, SelectionConfig, Selector
from sglang_xshare.benchio import markdown_table, run_metadata, write_results
from sglang_xshare.kernels.workspace import buffers, fault_counter
from sglang_xshare.select import compute_scores


@triton.jit
def _now(x):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer; // $1", "=l,r", [x], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def hog_kernel(out_ptr, base_ns, step_ns):
    """Block ``b`` spins ``base_ns + b * step_ns`` nanoseconds (a staggered release of the SMs)."""
    pid = tl.program_id(0)
    t0 = _now(pid)
    target = base_ns + pid.to(tl.int64) * step_ns
    now = t0
    n = 0
    while now - t0 < target:
        now = _now(pid)
        n += 1
    tl.store(out_ptr + pid, n)


def run(coop: bool, max_spins: int | None, args, sel: Selector, x: torch.Tensor, ref) -> dict:
    dev = x.device
    sel.workspace.clear()
    sel.workspace["cooperative"] = coop
    if max_spins is not None:
        sel.workspace["max_spins"] = max_spins
    sel(x)  # compile + allocate outside the measured run
    torch.cuda.synchronize()
    p = buffers(sel.workspace, "xshare", x.shape[0], x.shape[1], sel.routing.top_k, dev, x.dtype).plan
    faults = fault_counter(dev)
    f0 = int(faults)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    blocks = 2 * sms
    hog_out = torch.zeros(blocks, dtype=torch.int64, device=dev)
    s_hog, s_sel = torch.cuda.Stream(), torch.cuda.Stream()
    step = int(args.stagger_ms * 1e6 / blocks)
    with torch.cuda.stream(s_hog):
        hog_kernel[(blocks,)](hog_out, int(args.base_ms * 1e6), step, num_warps=32)
    torch.cuda._sleep(1000)  # let the hog take the SMs first
    with torch.cuda.stream(s_sel):
        out = sel(x)
    torch.cuda.synchronize()
    grew = int(faults) - f0
    exact = bool(torch.equal(out.topk_ids, ref.topk_ids))
    # valid routing whatever happened: every token keeps its own top-k0, nothing out of range
    own = torch.topk(compute_scores(x, sel.routing).sel, sel.config.k0, dim=-1).indices
    keeps = bool((out.topk_ids.unsqueeze(-1) == own.unsqueeze(1).to(out.topk_ids.dtype)).any(1).all())
    in_range = bool(((out.topk_ids >= -1) & (out.topk_ids < x.shape[1])).all())
    rows_ref = int((out.topk_ids == ref.topk_ids).all(-1).sum())
    return dict(cooperative=coop, max_spins=max_spins, programs=p.nb, sync=p.sync, faults_added=grew, exact=exact,
                keeps_topk0=keeps, ids_in_range=in_range, rows_equal_reference=rows_ref, rows=x.shape[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--E", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--base-ms", type=float, default=5.0)
    ap.add_argument("--stagger-ms", type=float, default=60.0)
    ap.add_argument("--name", default="barrier_safety")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    routing = RoutingSpec(args.E, args.k)
    cfg = SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("0.6"))
    sel = Selector(routing, cfg, backend="kernel")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.T, args.E, device=dev, generator=g) * 2
    ref = Selector(routing, cfg, backend="reference")(x.cpu())
    ref = type(ref)(*(t.to(dev) if t is not None else None for t in ref))
    results = [run(True, None, args, sel, x, ref), run(False, 200, args, sel, x, ref)]
    # cooperative launch captured in a CUDA graph
    sel.workspace.clear()
    sel.workspace["cooperative"] = True
    eager = sel(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sel(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sel(x)
    graph.replay()
    torch.cuda.synchronize()
    graph_ok = bool(torch.equal(captured.topk_ids, eager.topk_ids) and torch.equal(eager.topk_ids, ref.topk_ids))
    rows = [[("cooperative" if r["cooperative"] else f"plain, max_spins={r['max_spins']}"), r["programs"], r["sync"],
             r["exact"], r["faults_added"], r["keeps_topk0"], r["ids_in_range"], f"{r['rows_equal_reference']}/{r['rows']}"]
            for r in results]
    md = (f"xshare (E={args.E}, k={args.k}, budget 0.6) over T={args.T} tokens launched while a hog kernel holds "
          f"every SM ({2} blocks of 32 warps per SM, released one by one over {args.stagger_ms} ms).\n\n"
          + markdown_table(["launch", "programs", "sync", "equals reference", "barrier faults counted",
                            "every token keeps its top-k0", "ids in range", "rows equal to reference"], rows)
          + f"\n\nCooperative launch captured in a CUDA graph, replay equals eager and reference: **{graph_ok}**.\n")
    write_results(args.out, args.name, {"runs": results, "graph_replay_equal": graph_ok}, md, run_metadata())
    print(md)
    ok = results[0]["exact"] and results[0]["faults_added"] == 0 and results[1]["keeps_topk0"] and \
        results[1]["ids_in_range"] and graph_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
