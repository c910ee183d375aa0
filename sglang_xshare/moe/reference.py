"""Single-process reference MoE: the same selection, every expert in one process, float32 math.

Used as the oracle of the EP layer (CPU tests with gloo processes, and on the GPU before timing):
``out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t])`` over the token's kept slots (``id != -1``),
with the expert weights of :func:`~sglang_xshare.moe.experts.make_expert_weights`. Replicated
physical copies of one logical expert have identical weights, so the reference works on logical ids.
"""

from __future__ import annotations

from typing import Callable

import torch

from .experts import expert_forward_dense, make_expert_weights

__all__ = ["reference_moe", "reference_moe_lazy", "expert_weight_fn"]


def reference_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Dense reference over all logical experts.

    Args:
        hidden: ``[T, H]`` (bf16 or float). topk_ids: ``[T, k] int`` logical ids, ``-1`` = empty slot.
        topk_weights: ``[T, k] float32``. w13: ``[E, 2I, H] bf16``. w2: ``[E, H, I] bf16``.

    Returns:
        ``[T, H] float32``.
    """
    return reference_moe_lazy(hidden, topk_ids, topk_weights, w13.shape[0], lambda e: (w13[e], w2[e]))


def reference_moe_lazy(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                       weights_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Like :func:`reference_moe`, fetching each used expert's ``(w13_e, w2_e)`` on demand.

    Only experts some token selected are built (host loop over experts, not tokens): the GPU check
    of the benchmark regenerates one expert at a time instead of holding all ``E``.
    """
    T, H = hidden.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    ids = topk_ids.long()
    used = torch.unique(ids[ids >= 0]).tolist()
    for e in used:
        if not (0 <= e < num_experts):
            raise ValueError(f"expert id {e} outside [0, {num_experts})")
        coef = torch.where(ids == e, topk_weights.float(), torch.zeros((), device=hidden.device)).sum(dim=1)
        rows = torch.nonzero(coef != 0).flatten()
        if rows.numel() == 0:
            continue
        w13_e, w2_e = weights_of(e)
        out.index_add_(0, rows, expert_forward_dense(hidden.index_select(0, rows), w13_e, w2_e) * coef[rows].unsqueeze(1))
    return out


def expert_weight_fn(hidden: int, intermediate: int, seed: int, device: torch.device | str) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``e -> (w13_e [2I, H], w2_e [H, I])`` built by :func:`make_expert_weights` (same values as the EP ranks)."""

    def fn(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        w13, w2 = make_expert_weights([e], hidden, intermediate, seed=seed, device=device)
        return w13[0], w2[0]

    return fn
