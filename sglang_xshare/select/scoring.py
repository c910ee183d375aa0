"""Router logits -> :class:`~.contract.Scores` (the model's own scoring, made NaN/inf-safe).

Covers what SGLang's ``select_experts`` covers for the routed experts: softmax or sigmoid
scoring, DeepSeek-V2 grouped top-k (group score = best expert of the group) and DeepSeek-V3
biased grouped top-k (group score = sum of the group's two best biased scores, the bias only
used to choose). Vectorised, no host sync.
"""

from __future__ import annotations

import torch

from ..config import RoutingSpec
from .contract import Scores

__all__ = ["sanitize_logits", "compute_scores", "descending_order"]

_NEG_INF = float("-inf")


def descending_order(x: torch.Tensor) -> torch.Tensor:
    """``[..., N] int64``: indices of ``x`` by descending value, ties by lower index (stable)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` any float -> ``[T, E] float32``: NaN -> -inf, +inf -> float32 max;
    a row with no finite entry becomes all zeros (uniform routing)."""
    x = logits.float()
    x = torch.nan_to_num(x, nan=_NEG_INF, posinf=torch.finfo(torch.float32).max, neginf=_NEG_INF)
    dead = ~torch.isfinite(x).any(dim=-1, keepdim=True)
    return torch.where(dead, torch.zeros_like(x), x)


def compute_scores(router_logits: torch.Tensor, routing: RoutingSpec,
                   correction_bias: torch.Tensor | None = None) -> Scores:
    """Score every expert for every token.

    Args:
        router_logits: ``[T, E]`` float (fp32 / bf16 / fp16) router output.
        routing: the model's routing spec.
        correction_bias: ``[E]`` float, DeepSeek-V3 ``e_score_correction_bias`` (choice only).

    Returns:
        :class:`Scores` with ``sel`` and ``gate`` ``[T, E] float32``.
    """
    x = sanitize_logits(router_logits)
    gate = torch.softmax(x, dim=-1) if routing.scoring == "softmax" else torch.sigmoid(x)
    sel = gate if correction_bias is None else gate + correction_bias.float().unsqueeze(0)
    if routing.num_expert_group is not None:
        sel = _mask_groups(sel, routing.num_expert_group, routing.topk_group, biased=correction_bias is not None)
    return Scores(sel=sel, gate=gate)


def _mask_groups(sel: torch.Tensor, num_groups: int, topk_group: int | None, biased: bool) -> torch.Tensor:
    """Keep the ``topk_group`` best groups of each token, ``-inf`` elsewhere (SGLang's rule)."""
    T, E = sel.shape
    grouped = sel.view(T, num_groups, E // num_groups)
    if biased:  # DeepSeek-V3: sum of the two best (biased) scores of the group
        group_score = grouped.topk(min(2, E // num_groups), dim=-1).values.sum(dim=-1)
    else:  # DeepSeek-V2: the best score of the group
        group_score = grouped.max(dim=-1).values
    keep_groups = descending_order(group_score)[:, :topk_group]
    group_mask = torch.zeros(T, num_groups, dtype=torch.bool, device=sel.device)
    group_mask.scatter_(1, keep_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)
    return sel.masked_fill(~expert_mask, _NEG_INF)
