"""``topk``: the model's own router -- every valid token keeps its top-k (SGLang's ``select_experts``)."""

from __future__ import annotations

import torch

from ..common import refine
from ..contract import BatchContext, Scores, SelectionOutput


def reference(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """Plain top-k of ``scores.sel``; weights from ``scores.gate`` (renormalised if the model does)."""
    allowed = torch.ones(1, scores.sel.shape[1], dtype=torch.bool, device=scores.sel.device)
    return refine(scores, allowed, ctx)
