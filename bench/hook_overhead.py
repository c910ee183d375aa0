"""What the routing hook costs per MoE layer, inside a CUDA graph, against plain SGLang (GPU + SGLang).

For each routing shape and decode batch size ``T`` this builds ``L`` real SGLang ``TopK`` layers
(SGLang's ``forward_cuda`` path, standard output format), captures one CUDA graph that routes a
``[T, E]`` bf16 router output through all ``L`` layers (as a decode step does), and reports per
layer: the kernels in the graph (counted by the profiler over one replay) and the replay time
(median over ``--iters`` replays, CUDA events). Configurations:

* ``plain``        SGLang without the hook (its fused top-k + post-processing);
* ``<policy>``     the hook's fast path (one launch replaces SGLang's routing);
* ``<policy>/legacy`` the previous design, kept as the ``legacy`` path: SGLang's router runs,
                   then the policy, the empty-slot fill and restore around SGLang's post-processing
                   (forced with ``SGLANG_XSHARE_FORCE_PATH=legacy``);
* ``<policy>+metrics`` (``--metrics``) the fast path with the live metrics on (``--xshare-metrics``,
                   as ``bench/serve.py`` runs its servers);
* ``<policy>+ab``  (``--ab``) the fast path inside an in-server A/B (``--xshare-ab-switch``, policy arm
                   selected): SGLang's routing is computed too and the switch picks, as in
                   ``bench/serve.py --ab``.

The last two say how much of a policy's cost inside ``bench/serve.py``'s servers is the measurement
itself (the server profile of `serve_qwen3_tp2ep2_arms.md` saw ~1.7x this script's fast-path figures there).

Writes ``bench/results/<name>.{json,md}``; the table's "added" column is (config - plain) per layer.

    python bench/hook_overhead.py --T 1 16 64 --layers 24
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from sglang_xshare.benchio import markdown_table, run_metadata, write_results

SHAPES = {
    "qwen3 (E=128, k=8, softmax)": dict(E=128, k=8, kw={}),
    "deepseek-v3 (E=256, k=8, grouped sigmoid + bias)": dict(
        E=256, k=8, kw=dict(use_grouped_topk=True, num_expert_group=8, topk_group=4, scoring_func="sigmoid",
                            routed_scaling_factor=2.5)),
}
CONFIGS = {
    "xshare": dict(policy="xshare", budget="0.7"),
    "xshare_ep": dict(policy="xshare_ep", budget="0.7"),
    "oea": dict(policy="oea", warmup_k0=4),
    "cap": dict(policy="cap", cap=6),
}


def variants(no_legacy: bool = False, metrics: bool = False, ab_dir: str | None = None) -> list[tuple[str, dict, str | None]]:
    """The hooked configurations: ``(name, XShareServerConfig keyword arguments, forced path or None)``.

    ``metrics``: also each policy with the live metrics on; ``ab_dir``: also each policy inside an
    in-server A/B (switch files ``arm1`` / ``arm0`` written there): ``+ab`` its arm selected,
    ``+ab/sglang-arm`` SGLang's arm selected (the policy's kernel returns at once),
    ``+ab/sglang-arm/compute`` SGLang's arm under ``--xshare-ab-idle-arms compute`` (the policy
    selects anyway: what SGLang's arm paid in the A/B runs before that flag)."""
    out = [(n, dict(kw), None) for n, kw in CONFIGS.items()]
    if not no_legacy:
        out += [(f"{n}/legacy", dict(kw), "legacy") for n, kw in CONFIGS.items() if n in ("xshare", "cap")]
    if metrics:
        out += [(f"{n}+metrics", dict(kw, metrics=True), None) for n, kw in CONFIGS.items()]
    if ab_dir is not None:
        on, off = Path(ab_dir) / "arm1", Path(ab_dir) / "arm0"
        on.write_text("1\n")  # the policy's arm
        off.write_text("0\n")  # SGLang's arm
        for n, kw in CONFIGS.items():
            out += [(f"{n}+ab", dict(kw, ab_switch=str(on)), None),
                    (f"{n}+ab/sglang-arm", dict(kw, ab_switch=str(off)), None),
                    (f"{n}+ab/sglang-arm/compute", dict(kw, ab_switch=str(off), ab_idle_arms="compute"), None)]
    return out


def build_layers(topk_mod, shape: dict, L: int, device) -> list:
    layers = []
    for i in range(L):
        kw = dict(shape["kw"])
        if kw.get("scoring_func") == "sigmoid":
            kw["correction_bias"] = (torch.randn(shape["E"], device=device) * 0.05).float()
        tk = topk_mod.TopK(top_k=shape["k"], layer_id=i, renormalize=True,
                           output_format=topk_mod.TopKOutputFormat.STANDARD, **kw)
        layers.append(tk)
    return layers


def measure(layers, T: int, E: int, iters: int, device) -> tuple[float, float]:
    """(kernels per layer, µs per layer) of one graph routing a ``[T, E]`` batch through ``layers``."""
    g = torch.Generator(device=device).manual_seed(T)
    logits = [torch.randn(T, E, device=device, generator=g, dtype=torch.float32).to(torch.bfloat16) * 2
              for _ in layers]
    hidden = torch.randn(T, 64, device=device, dtype=torch.bfloat16)
    n = torch.tensor(T, device=device, dtype=torch.int32)

    def step():
        return [tk.forward_cuda(hidden, lg, num_token_non_padded=n) for tk, lg in zip(layers, logits)]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()  # eager warm-up: compiles, allocates the workspaces
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
                  and "Memset" not in e.name)
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return kernels / len(layers), statistics.median(times) / len(layers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--name", default="hook_overhead")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-legacy", action="store_true", help="skip the legacy-path rows")
    ap.add_argument("--metrics", action="store_true", help="also each policy with the live metrics on")
    ap.add_argument("--ab", action="store_true",
                    help="also each policy inside an in-server A/B: its arm selected, SGLang's arm selected, and "
                         "SGLang's arm under --xshare-ab-idle-arms compute")
    args = ap.parse_args()
    import os
    import tempfile

    ab_dir = tempfile.mkdtemp(prefix="xshare_ab_") if args.ab else None

    from sglang.srt.layers.moe import topk as topk_mod
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    from sglang_xshare.serving import install as hook
    from sglang_xshare.serving import runtime
    from sglang_xshare.serving.config import XShareServerConfig

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    publish(ServerArgs(model_path="dummy"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
    import socket

    from sglang.srt.distributed import parallel_state as ps

    with socket.socket() as sk:  # SGLang's routing reads its TP group: a world of one, as a TP=1 server has
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                    distributed_init_method=f"tcp://127.0.0.1:{port}", backend="nccl")
    ps.initialize_model_parallel(backend="nccl")
    rows, table = [], []
    for sname, shape in SHAPES.items():
        for T in args.T:
            hook.uninstall()
            base_k, base_us = measure(build_layers(topk_mod, shape, args.layers, device), T, shape["E"], args.iters, device)
            rows.append(dict(shape=sname, T=T, config="plain", kernels=base_k, us=base_us))
            table.append([sname, T, "plain (SGLang)", f"{base_k:.1f}", f"{base_us:.2f}", "-", "-"])
            for name, kw, force in variants(args.no_legacy, args.metrics, ab_dir):
                if force:
                    os.environ["SGLANG_XSHARE_FORCE_PATH"] = force
                else:
                    os.environ.pop("SGLANG_XSHARE_FORCE_PATH", None)
                hook.install(XShareServerConfig(empty_slots="minus_one", min_tokens="1", **kw))
                try:
                    k, us = measure(build_layers(topk_mod, shape, args.layers, device), T, shape["E"], args.iters, device)
                    paths = sorted({p for lp in runtime.current().layers.values() for p in lp.paths.values()})
                except Exception as e:  # report and go on
                    print(f"{sname} T={T} {name}: {type(e).__name__}: {e}", flush=True)
                    k, us, paths = float("nan"), float("nan"), ["error"]
                finally:
                    hook.uninstall()
                rows.append(dict(shape=sname, T=T, config=name, kernels=k, us=us, added_us=us - base_us,
                                 added_kernels=k - base_k, paths=paths))
                table.append([sname, T, f"{name} ({'/'.join(paths)})", f"{k:.1f}", f"{us:.2f}", f"{k - base_k:+.1f}",
                              f"{us - base_us:+.2f}"])
                print(table[-1], flush=True)
    os.environ.pop("SGLANG_XSHARE_FORCE_PATH", None)
    md = (f"Per MoE layer, inside one CUDA graph of {args.layers} SGLang `TopK` layers (bf16 router output, "
          f"`forward_cuda`, standard output), median of {args.iters} replays. Kernels counted by the profiler over "
          "one replay. `plain` = SGLang 0.5.23 without the hook; `<policy>` = the hook's fast path; "
          "`<policy>/legacy` = the hook's previous design (SGLang's router, then the policy and the empty-slot "
          "fill/restore around SGLang's post-processing); `<policy>+metrics` = the fast path with the live metrics "
          "on; `<policy>+ab` = the fast path as the selected arm of an in-server A/B (SGLang's routing computed "
          "too, `--xshare-ab-idle-arms skip`); `+ab/sglang-arm` = the same server with SGLang's arm selected (the "
          "policy's kernel returns at once); `+ab/sglang-arm/compute` = SGLang's arm under `--xshare-ab-idle-arms "
          "compute` (the policy selects anyway, as in the A/B runs before that flag).\n\n"
          + markdown_table(["routing", "T", "config (path)", "kernels / layer", "µs / layer", "added kernels",
                            "added µs"], table))
    write_results(args.out, args.name, {"rows": rows, "layers": args.layers, "iters": args.iters}, md, run_metadata())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
