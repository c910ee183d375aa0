"""Per-batch, per-layer metrics of a selection (device tensors; no host sync).

What a decode MoE layer pays and what the model loses:

* ``distinct`` -- distinct logical experts activated (weights read under TP);
* ``rank_experts [R]`` / ``rank_tokens [R]`` -- distinct physical experts and token-expert pairs
  per EP rank (weights read / GEMM rows per rank); ``peak_experts``, ``peak_over_mean``;
* ``retained_mass`` -- fraction of the batch's top-k gating mass kept (mass of kept experts that
  were in the token's own top-k, over the top-k mass);
* ``kept_mass`` -- all kept gating mass (refinement may add experts outside a token's top-k) over the top-k mass;
* ``short_tokens`` -- valid tokens with fewer than ``k`` experts.

Policies that do not choose physical copies (all but ``xshare_ep``) are charged on each logical
expert's lowest physical copy (SGLang's static EPLB dispatch without redundancy).
"""

from __future__ import annotations

import torch

from .placement import Placement
from .select.contract import Scores, SelectionOutput
from .select.scoring import descending_order

__all__ = ["METRIC_NAMES", "selection_metrics"]

METRIC_NAMES: tuple[str, ...] = (
    "distinct",
    "peak_experts",
    "mean_experts",
    "peak_over_mean",
    "peak_tokens",
    "retained_mass",
    "kept_mass",
    "short_tokens",
    "valid_tokens",
)


def selection_metrics(out: SelectionOutput, scores: Scores, valid: torch.Tensor, top_k: int,
                      placement: Placement | None = None) -> dict[str, torch.Tensor]:
    """Metrics of one selection.

    Args:
        out: the policy's output (``[T, k]`` ids / weights / optional physical ids).
        scores: the scores it was computed from (``gate [T, E]`` is used for masses).
        valid: ``[T] bool`` non-padded tokens.
        top_k: the model's ``k``.
        placement: EP placement (default: one rank holding every expert).

    Returns:
        dict of 0-d float32 tensors named as :data:`METRIC_NAMES`, plus ``rank_experts [R]``
        and ``rank_tokens [R]`` (float32).
    """
    gate = scores.gate
    T, E = gate.shape
    dev = gate.device
    placement = placement or Placement.tensor_parallel(E)
    ids = out.topk_ids.to(torch.int64)
    kept = ids >= 0
    safe = ids.clamp(min=0)

    used = torch.zeros(E, dtype=torch.float32, device=dev).index_add_(0, safe.flatten(), kept.flatten().float()) > 0

    if out.physical_ids is not None:
        phys = out.physical_ids.to(torch.int64)
    else:
        phys = torch.where(kept, placement.logical_to_primary_physical(dev)[safe], torch.full_like(ids, -1))
    P, R = placement.num_physical, placement.num_ranks
    p_kept = phys >= 0
    p_safe = phys.clamp(min=0)
    pair_count = torch.zeros(P, dtype=torch.float32, device=dev).index_add_(0, p_safe.flatten(), p_kept.flatten().float())
    rank_of = placement.physical_rank(dev)
    rank_experts = torch.zeros(R, dtype=torch.float32, device=dev).index_add_(0, rank_of, (pair_count > 0).float())
    rank_tokens = torch.zeros(R, dtype=torch.float32, device=dev).index_add_(0, rank_of, pair_count)

    order = descending_order(scores.sel)
    in_topk = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, order[:, :top_k], True) & valid.unsqueeze(1)
    topk_mass = torch.where(in_topk, gate, torch.zeros_like(gate)).sum()
    kept_gate = torch.where(kept, gate.gather(1, safe), torch.zeros_like(gate[:, :1]).expand_as(ids))
    kept_in_topk = kept & in_topk.gather(1, safe)
    retained = torch.where(kept_in_topk, kept_gate, torch.zeros_like(kept_gate)).sum()
    denom = topk_mass.clamp_min(torch.finfo(torch.float32).tiny)
    n_valid = valid.sum().float()
    mean_experts = rank_experts.mean()
    return {
        "distinct": used.sum().float(),
        "peak_experts": rank_experts.max(),
        "mean_experts": mean_experts,
        "peak_over_mean": rank_experts.max() / mean_experts.clamp_min(1e-9),
        "peak_tokens": rank_tokens.max(),
        "retained_mass": torch.where(topk_mass > 0, retained / denom, torch.ones_like(denom)),
        "kept_mass": torch.where(topk_mass > 0, kept_gate.sum() / denom, torch.ones_like(denom)),
        "short_tokens": ((kept.sum(dim=1) < top_k) & valid).sum().float(),
        "valid_tokens": n_valid,
        "rank_experts": rank_experts,
        "rank_tokens": rank_tokens,
    }
