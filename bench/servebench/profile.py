"""Where a decode step's GPU time goes, from SGLang's own profiler (``/start_profile``).

:func:`profile_request` is the body of SGLang's ``/start_profile`` (its ``ProfileReq``): GPU
activity for ``num_steps`` forward steps, traces written by every TP rank into ``output_dir``
(``<prefix>-...-TP-<rank>...-DECODE.trace.json.gz``, torch profiler's Chrome format). Profiling by
stage, SGLang traces the first prefill batches and then ``num_steps`` decode steps, the latter once
the running batch holds ``SGLANG_PROFILE_BY_STAGE_DECODE_MIN_BS`` requests (set on the server, so
that a warm-up request at batch size 1 is not what gets profiled). :func:`kernel_breakdown`
reads such traces and sums the GPU kernels' time per category (:data:`CATEGORIES`, first match
of the lower-cased kernel name wins), per rank; decode steps are counted by ``cudaGraphLaunch``
calls (one per captured decode step).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterable

__all__ = ["CATEGORIES", "profile_request", "category", "kernel_breakdown", "selection_per_arm", "trace_files"]

#: ``(category, regex)`` in match order, on the lower-cased kernel name.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("xshare selection", r"^(batch|refine|spec_token|group)_kernel"),
    ("communication", r"nccl|all_?reduce|allgather|all_gather|reduce_scatter|cross_device|deep_?ep|dispatch|combine"
                      r"|intranode|internode|one_shot|two_shot"),
    ("SGLang routing", r"topk|top_k|softmax|moe_fused_gate"),
    ("MoE experts", r"moe|silu_and_mul|act_and_mul|m_grouped|grouped_gemm|deep_gemm"),
    ("attention", r"attn|attention|fwd_kernel|flash|mla|decode|rope|rotary"),
    ("dense GEMM", r"gemm|cutlass|sm90_|sm100_|nvjet|cublas|matmul|splitk"),
)
_COMPILED = tuple((name, re.compile(rx)) for name, rx in CATEGORIES)


def profile_request(output_dir: str | Path, num_steps: int, prefix: str) -> dict:
    """The JSON body of SGLang's ``/start_profile``: GPU kernels of the next ``num_steps`` forward
    steps (SGLang stops and writes the traces by itself), file names starting with ``prefix``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return {"output_dir": str(output_dir), "num_steps": int(num_steps), "activities": ["GPU"],
            "profile_by_stage": True, "profile_prefix": prefix}


def category(kernel_name: str) -> str:
    """The :data:`CATEGORIES` entry of a kernel name, else ``"other"``."""
    low = kernel_name.lower()
    return next((name for name, rx in _COMPILED if rx.search(low)), "other")


def trace_files(output_dir: str | Path, prefix: str, stage: str = "DECODE") -> list[Path]:
    """The ``stage`` trace files SGLang wrote for ``prefix`` (every rank), sorted."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.rglob(f"{prefix}-*") if p.is_file() and ".json" in p.name and f"-{stage}." in p.name)


def _events(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data.get("traceEvents", []) if isinstance(data, dict) else data


def _rank_of(path: Path) -> str:
    m = re.search(r"TP-(\d+)", path.name)
    return m.group(1) if m else path.name


#: Kernel categories that end a MoE layer's routing: the next selection kernel is the first
#: policy's again (SGLang's own routing, which an A/B layer runs before the policies, and the experts).
_LAYER_MARKS = ("SGLang routing", "MoE experts")


def kernel_breakdown(paths: Iterable[Path], top_kernels: int = 12) -> dict:
    """Per trace file (rank): GPU kernel time per category in µs, the kernel count, the
    ``cudaGraphLaunch`` calls (decode steps replayed from CUDA graphs), the ``top_kernels``
    kernel names with the most time (which kernels a category's time is), and the selection
    kernels' time by their position in the layer.

    The position: in a layer of an A/B server, SGLang's routing runs first and then each policy
    arm's selection in the order of its arms (server policy, then each ``--xshare-ab-arm``; one
    launch each on the fast path), before the experts. So, in time order, the selection kernels
    after a routing or experts kernel are numbered 0, 1, ...; with one launch per arm, position
    ``i`` is arm ``i + 1``'s selection (:func:`selection_per_arm`). A one-policy server has
    position 0 only.

    Returns:
        ``{rank: {"kernel_us": {category: µs}, "total_us": µs, "kernels": n, "graph_launches": n,
        "top_kernels": [{"name", "category", "us", "launches"}, ...],
        "selection_by_position": [{"us": µs, "launches": n}, ...]}}``.
    """
    out: dict[str, dict] = {}
    for path in paths:
        per: dict[str, float] = {}
        by_name: dict[str, list] = {}  # name -> [µs, launches]
        timed: list[tuple[float, str, float]] = []  # (start, category, µs) of every kernel
        kernels = launches = 0
        for ev in _events(path):
            if ev.get("ph") != "X":
                continue
            cat = str(ev.get("cat", "")).lower()
            if cat == "kernel":
                name, dur = str(ev.get("name", "")), float(ev.get("dur", 0.0))
                c = category(name)
                per[c] = per.get(c, 0.0) + dur
                acc = by_name.setdefault(name, [0.0, 0])
                acc[0] += dur
                acc[1] += 1
                timed.append((float(ev.get("ts", 0.0)), c, dur))
                kernels += 1
            elif cat == "cuda_runtime" and str(ev.get("name", "")).startswith("cudaGraphLaunch"):
                launches += 1
        positions: list[list] = []  # [µs, launches] per position
        pos = 0
        for _, c, dur in sorted(timed, key=lambda t: t[0]):
            if c in _LAYER_MARKS:
                pos = 0
            elif c == "xshare selection":
                while len(positions) <= pos:
                    positions.append([0.0, 0])
                positions[pos][0] += dur
                positions[pos][1] += 1
                pos += 1
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top_kernels]
        out[_rank_of(path)] = {"kernel_us": dict(sorted(per.items())), "total_us": sum(per.values()),
                               "kernels": kernels, "graph_launches": launches,
                               "top_kernels": [{"name": n[:160], "category": category(n), "us": us, "launches": k}
                                               for n, (us, k) in top],
                               "selection_by_position": [{"us": us, "launches": k} for us, k in positions]}
    return out


def selection_per_arm(rank: dict, arms: list[str]) -> dict[str, float] | None:
    """µs per layer call of each policy arm's selection, from one rank's :func:`kernel_breakdown`
    (position ``i`` = ``arms[i]``), or ``None`` when the positions do not match one launch per arm
    (another count of positions, or positions launched unequally often)."""
    pos = rank.get("selection_by_position") or []
    if not arms or len(pos) != len(arms) or len({p["launches"] for p in pos}) != 1 or not pos[0]["launches"]:
        return None
    return {a: p["us"] / p["launches"] for a, p in zip(arms, pos)}
