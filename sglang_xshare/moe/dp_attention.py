"""Selection under DP attention: one global expert set per layer for all EP ranks' tokens.

With SGLang's ``--enable-dp-attention`` every EP rank routes only its own tokens, yet an expert's
load is the union over *all* ranks' tokens: if each rank picks its own budgeted set, the sets
differ and the busiest GPU reads the union. :class:`DPAttentionSelector` gives the batch-aware
policies (``xshare``, ``xshare_ep``) one global view per layer:

1. each rank scores its tokens and computes its per-expert statistics ``[3, E] int64``:
   aggregated gating mass (fixed-point units, :func:`~sglang_xshare.select.common.mass_units`),
   warm-up count (tokens whose top-``k0`` holds ``e``), top-k count;
2. **one** ``all_reduce(SUM)`` of those ``3 * E`` integers (SGLang's LP dispatcher all-reduces
   per-expert counts the same way) -- integer sums are exact, so every rank holds the same
   statistics as a single process summing all tokens;
3. every rank runs the policy's own pick (:func:`~sglang_xshare.select.common.greedy_pick`, or
   ``xshare_ep``'s :func:`~sglang_xshare.select.policies.xshare_ep.pick_partitioned` /
   ``pick_replicated``) on them: the same expert set (and copies) everywhere, deterministically;
4. each rank refines its own tokens inside that set (:func:`~sglang_xshare.select.common.refine`).

The result equals the single-process policy on the concatenation of all ranks' tokens, bit for bit. ``mode="local"`` is the baseline: each rank calls the
:class:`~sglang_xshare.select.Selector` on its own tokens, no collective. Policies that are not
batch-budgeted (``topk``, ``cap``, ``oea*``) always run locally. No host sync; the collective is
CUDA-graph capturable on NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..placement import Placement
from ..select import Selector, SelectionOutput, compute_scores
from ..select.common import greedy_pick, refine, resolve_budget, token_sets
from ..select.policies.xshare_ep import pick as ep_pick
from ..select.policies.xshare_ep import tensor_parallel

__all__ = ["DPAttentionSelector", "GLOBAL_POLICIES"]

#: Policies whose expert set is a batch decision (they get the global view).
GLOBAL_POLICIES = ("xshare", "xshare_ep")


class DPAttentionSelector:
    """Wrap a :class:`Selector` for DP attention.

    Args:
        selector: the configured per-rank selector (policy, budget, placement).
        mode: ``"global"`` (all-reduced statistics, one expert set) or ``"local"`` (per-rank sets).
        group: the process group holding all DP-attention ranks of this EP group (default world).

    Attributes:
        last_stats: ``[3, E] int64`` the all-reduced statistics of the last global call.
    """

    def __init__(self, selector: Selector, mode: str = "global", group: dist.ProcessGroup | None = None) -> None:
        if mode not in ("global", "local"):
            raise ValueError(f"--dp-selection: expected global or local, got {mode!r}")
        self.selector = selector
        self.mode = mode
        self.group = group
        self.policy = selector.config.policy
        self.is_global = mode == "global" and self.policy in GLOBAL_POLICIES
        self.last_stats: torch.Tensor | None = None

    @property
    def placement(self) -> Placement | None:
        return self.selector.placement

    def __call__(self, router_logits: torch.Tensor, layer_id: int | None = None,
                 num_token_non_padded: int | torch.Tensor | None = None, request_ids: torch.Tensor | None = None) -> SelectionOutput:
        """Same signature and contract as :meth:`Selector.__call__`."""
        if not self.is_global:
            return self.selector(router_logits, layer_id=layer_id, num_token_non_padded=num_token_non_padded,
                                 request_ids=request_ids)
        sel = self.selector
        ctx = sel.context(router_logits.shape[0], router_logits.device, layer_id, num_token_non_padded)
        scores = compute_scores(router_logits, sel.routing, sel.correction_bias)
        sets = token_sets(scores, ctx)
        stats = torch.stack([sets.contrib.sum(dim=0), sets.warm.sum(dim=0), sets.topk.sum(dim=0)]).to(torch.int64)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        self.last_stats = stats
        mass, warm, union = stats[0], stats[1] > 0, stats[2] > 0
        assert ctx.budget is not None
        m = resolve_budget(ctx.budget, mass[None], warm[None], union[None])[0]
        if self.policy == "xshare":
            chosen = greedy_pick(mass[None], warm[None], m[None])
            return refine(scores, chosen, ctx)
        placement = sel.placement or tensor_parallel(sel.routing.num_experts)
        chosen, copy = ep_pick(mass, warm, m, placement, ctx.fill_to_peak, ctx.hard_cap)
        out = refine(scores, chosen.unsqueeze(0), ctx)
        ids = out.topk_ids.to(torch.int64)
        phys = torch.where(ids >= 0, copy[ids.clamp(min=0)], torch.full_like(ids, -1)).to(torch.int32)
        return SelectionOutput(out.topk_ids, out.topk_weights, phys)
