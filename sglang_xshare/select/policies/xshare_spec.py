"""``xshare_spec``: XShare for speculative decoding -- the hierarchical, correlation-aware proxy.

The target + draft tokens of one request are strongly correlated, so selection is two-level:

1. per request ``r``: warm-up (its tokens' top-``k0``) then descending request mass up to
   ``max(m_r, |warm_r|)`` experts -> ``S_r``;
2. per batch: over the candidates ``U = union_r S_r``, warm-up (all tokens' top-``k0``) then
   descending batch mass (each request's mass counted on its own ``S_r``) up to
   ``max(m_l, |warm|)`` -> ``S``;
3. each token refines inside ``S_r(token) & S``.

Requests: ``ctx.request_ids`` (``[T] int64`` in ``[0, T)``) or ``ctx.request_group = g`` (token
``t`` is in request ``t // g``); neither makes every token its own request.
The ``mass:X`` batch budget is a fraction of the whole batch's top-k mass.

Without a request budget (``ctx.request_budget is None``, the default) there is no request stage:
the batch budget over the union of the requests' tokens, i.e. exactly :mod:`.xshare` (on the
evaluation model a request budget never lowered the CE cost at equal expert ratio; see
``docs/policies.md``).
"""

from __future__ import annotations

import torch

from ..common import exact_sum, greedy_pick, group_any, group_mass, refine, resolve_budget, token_sets
from ..contract import BatchContext, Scores, SelectionOutput
from . import xshare


def reference(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """Two-level XShare with ``ctx.request_budget`` (``m_r``) and ``ctx.budget`` (``m_l``); without
    ``m_r``: :func:`.xshare.reference` (the batch budget over the union)."""
    assert ctx.budget is not None, "xshare_spec needs ctx.budget"
    if ctx.request_budget is None:
        return xshare.reference(scores, ctx)
    T = scores.sel.shape[0]
    if ctx.request_ids is not None:
        rid = ctx.request_ids.to(torch.int64).clamp(0, max(T - 1, 0))
    else:
        rid = torch.arange(T, device=scores.sel.device) // int(ctx.request_group or 1)
    sets = token_sets(scores, ctx)
    mass_r = group_mass(sets.contrib, rid, T)
    warm_r = group_any(sets.warm, rid, T)
    union_r = group_any(sets.topk, rid, T)
    chosen_r = greedy_pick(mass_r, warm_r, resolve_budget(ctx.request_budget, mass_r, warm_r, union_r))

    mass_b = exact_sum(torch.where(chosen_r, mass_r, torch.zeros_like(mass_r)), 0, keepdim=True)
    warm_b = warm_r.any(dim=0, keepdim=True)
    union_b = union_r.any(dim=0, keepdim=True)
    m_l = resolve_budget(ctx.budget, mass_b, warm_b, union_b, total=exact_sum(mass_r, (0, 1)).reshape(1))
    chosen_b = greedy_pick(mass_b, warm_b, m_l)
    return refine(scores, chosen_r[rid] & chosen_b, ctx)
