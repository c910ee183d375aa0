"""``oea`` / ``oea_simple``: Opportunistic Expert Activation (Oncescu et al., arXiv 2511.02237).

Phase 1 (baseline): every valid token keeps its top-``k0``; their union is the batch's active set.
Phase 2 (piggyback): each token adds, in its own score order, experts that are already active
because of other tokens, up to ``k`` in all.

* ``oea``: the piggyback pool is the token's whole ranking (any active expert).
* ``oea_simple`` ("simplified OEA"): the pool is restricted to the token's own original top-k.

No expert outside the baseline union is ever activated, so OEA is XShare with a zero extra budget.
"""

from __future__ import annotations

from ..common import batch_stats, refine, token_sets
from ..contract import BatchContext, Scores, SelectionOutput


def reference(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """Full OEA: best ``<= k`` experts of each token inside the union of all top-``k0`` sets."""
    sets = token_sets(scores, ctx)
    active = batch_stats(sets, ctx)[1]
    return refine(scores, active, ctx)


def reference_simple(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """Simplified OEA: each token keeps those of its own top-k that are in the active set."""
    sets = token_sets(scores, ctx)
    active = batch_stats(sets, ctx)[1]
    return refine(scores, active & sets.topk, ctx)
