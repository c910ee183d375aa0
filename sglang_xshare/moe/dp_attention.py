"""Selection under DP attention: one global expert set per layer for all EP ranks' tokens.

With SGLang's ``--enable-dp-attention`` every EP rank routes only its own tokens, yet an expert's
load is the union over *all* ranks' tokens: if each rank picks its own budgeted set, the sets
differ and the busiest GPU reads the union. :class:`DPAttentionSelector` gives the batch-aware
policies (``oea``, ``xshare``, ``xshare_ep``) one global view per layer:

1. each rank scores its tokens and computes its per-expert statistics, integers:
   aggregated gating mass (fixed-point units, :func:`~sglang_xshare.select.common.mass_units`),
   warm-up count (tokens whose top-``k0`` holds ``e``), top-k count;
2. **one** ``all_reduce(SUM)`` of those statistics (SGLang's LP dispatcher all-reduces
   per-expert counts the same way) -- integer sums are exact, so every rank holds the statistics
   a single process summing all tokens would;
3. every rank runs the policy's own pick on them: the same expert set (and copies) everywhere,
   deterministically;
4. each rank refines its own tokens inside that set.

This is the policy's own ``stats_reduce`` path (:class:`~sglang_xshare.select.contract.BatchContext`):
the reference sums ``[3, E] int64`` statistics (:func:`~sglang_xshare.select.common.batch_stats`),
the Triton path ``[2, BLOCK_E] int64`` in two launches around the collective. The result equals
the single-process policy on the concatenation of all ranks' tokens, bit for bit. ``mode="local"`` is the baseline: each rank calls the
:class:`~sglang_xshare.select.Selector` on its own tokens, no collective. Policies without batch
statistics (``topk``, ``cap``, ``xshare_spec``) always run locally. No host sync; the collective is
CUDA-graph capturable on NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..placement import Placement
from ..select import Selector, SelectionOutput
from ..select.registry import get_policy

__all__ = ["DPAttentionSelector"]


class DPAttentionSelector:
    """Wrap a :class:`Selector` for DP attention.

    Args:
        selector: the configured per-rank selector (policy, budget, placement).
        mode: ``"global"`` (all-reduced statistics, one expert set) or ``"local"`` (per-rank sets).
        group: the process group holding all DP-attention ranks of this EP group (default world).

    Attributes:
        last_stats: the all-reduced statistics of the last global call (``[3, E] int64`` on the
            reference path, ``[2, BLOCK_E] int64`` on the kernel path).
    """

    def __init__(self, selector: Selector, mode: str = "global", group: dist.ProcessGroup | None = None) -> None:
        if mode not in ("global", "local"):
            raise ValueError(f"--dp-selection: expected global or local, got {mode!r}")
        self.selector = selector
        self.mode = mode
        self.group = group
        self.policy = selector.config.policy
        self.is_global = mode == "global" and get_policy(self.policy).ep_global
        self.last_stats: torch.Tensor | None = None

    @property
    def placement(self) -> Placement | None:
        return self.selector.placement

    def _all_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        self.last_stats = stats
        return stats

    def __call__(self, router_logits: torch.Tensor, layer_id: int | None = None,
                 num_token_non_padded: int | torch.Tensor | None = None, request_ids: torch.Tensor | None = None) -> SelectionOutput:
        """Same signature and contract as :meth:`Selector.__call__`."""
        return self.selector(router_logits, layer_id=layer_id, num_token_non_padded=num_token_non_padded,
                             request_ids=request_ids, stats_reduce=self._all_reduce if self.is_global else None)
