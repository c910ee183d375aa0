"""``cap``: per-token cap top-k' (k' <= k), the static baseline of "Faster MoE LLM Inference for
Extremely Large Models": each token keeps only its best ``k'`` experts; slots ``k'..k-1`` are -1."""

from __future__ import annotations

import torch

from ..common import refine
from ..contract import BatchContext, Scores, SelectionOutput


def reference(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """Top-``ctx.cap`` of each token, padded with -1 to ``k`` slots; weights renormalised over the kept."""
    assert ctx.cap is not None, "cap policy needs ctx.cap"
    allowed = torch.ones(1, scores.sel.shape[1], dtype=torch.bool, device=scores.sel.device)
    return refine(scores, allowed, ctx, limit=ctx.cap)
