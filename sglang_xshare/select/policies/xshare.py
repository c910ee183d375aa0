"""``xshare``: batch-budgeted expert selection (Vankov et al., arXiv 2602.07265).

Per layer and batch:

1. *aggregate*: ``mass[e] = sum_t contrib[t, e]`` (each valid token's gate weight on ``e``, over
   its own top-k by default -- then the objective is exactly the retained top-k gating mass);
2. *warm-up*: every valid token's top-``k0`` experts are in;
3. *budgeted pick*: add experts by descending ``mass`` until ``max(m_l, |warm|)`` distinct
   experts (the objective is modular in the chosen set, so greedy is exact);
4. *refine*: each token routes to its best ``<= k`` experts inside the chosen set (optionally
   only slots whose gate weight is >= ``min_score`` beyond the first ``k0``), weights renormalised.
"""

from __future__ import annotations

from ..common import batch_stats, greedy_pick, refine, resolve_budget, token_sets
from ..contract import BatchContext, Scores, SelectionOutput


def reference(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """XShare with the layer's batch budget ``ctx.budget``."""
    assert ctx.budget is not None, "xshare needs ctx.budget"
    sets = token_sets(scores, ctx)
    mass, warm, union = batch_stats(sets, ctx)
    m = resolve_budget(ctx.budget, mass, warm, union)
    chosen = greedy_pick(mass, warm, m)
    return refine(scores, chosen, ctx)
