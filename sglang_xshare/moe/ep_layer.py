"""The standalone expert-parallel MoE layer: select -> dispatch -> experts -> combine.

Run by the EP benchmark (``bench/ep_moe.py``) and its tests; SGLang serving uses SGLang's own MoE layer.

One instance per EP rank and layer. The select stage is :class:`sglang_xshare.select.Selector`
(or any callable with its signature); this module only maps its output to physical slots:

* ``xshare_ep`` returns ``physical_ids`` (the copy it chose, balancing the busiest rank): used as is;
* every other policy returns logical ids; they go to a physical copy by ``replica_mode``:
  ``"primary"`` (:meth:`Placement.logical_to_primary_physical`, the lowest slot) or
  ``"round_robin"`` (token ``t`` uses copy ``t % copies(e)``, SGLang-like static spreading).

Hot path: no host sync when the dispatcher and experts are the graph-capturable ones
(``nccl-padded`` or DeepEP low-latency, Triton experts).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..dispatch.base import DispatchedTokens, Dispatcher, ExpertsFormat
from ..placement import Placement
from ..select.registry import get_policy
from .experts import SwiGLUExperts

__all__ = ["EPMoELayer", "ReplicaMap", "Selection"]

logger = logging.getLogger(__name__)

#: ``router_logits [T, E] -> SelectionOutput``-like object with ``topk_ids``, ``topk_weights``, ``physical_ids``.
Selection = Any


class ReplicaMap:
    """Logical -> physical slot mapping for policies that return logical ids.

    Args:
        placement: the EP placement. mode: ``"primary"`` or ``"round_robin"``.
        device: where the lookup tables live.
    """

    def __init__(self, placement: Placement, mode: str = "primary", device: torch.device | str = "cpu") -> None:
        if mode not in ("primary", "round_robin"):
            raise ValueError(f"--replica-mode: expected primary or round_robin, got {mode!r}")
        self.mode = mode
        E, P = placement.num_experts, placement.num_physical
        p2l = placement.physical_to_logical
        copies = torch.bincount(p2l, minlength=E)
        maxc = int(copies.max())
        table = torch.full((E, maxc), -1, dtype=torch.int64)
        fill = torch.zeros(E, dtype=torch.int64)
        for p in range(P):  # config time, once
            e = int(p2l[p])
            table[e, fill[e]] = p
            fill[e] += 1
        self.table = table.to(device)
        self.copies = copies.to(device)
        self.primary = placement.logical_to_primary_physical(device)

    def __call__(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[T, k] int32`` logical ids (``-1`` kept) -> ``[T, k] int32`` physical slots."""
        ids = topk_ids.long()
        valid = ids >= 0
        safe = ids.clamp(min=0)
        if self.mode == "primary":
            phys = self.primary[safe]
        else:
            t = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
            phys = self.table[safe, t % self.copies[safe]]
        return torch.where(valid, phys, torch.full_like(phys, -1)).to(torch.int32)


class EPMoELayer(torch.nn.Module):
    """One EP rank's share of a MoE layer.

    Args:
        placement: physical slots over ranks (this rank holds slots ``[rank * L, (rank + 1) * L)``).
        dispatcher: a :class:`~sglang_xshare.dispatch.base.Dispatcher` over the EP group.
        experts: this rank's :class:`SwiGLUExperts` (``L`` slots).
        selector: ``router_logits [T, E] -> SelectionOutput`` (e.g. :class:`sglang_xshare.select.Selector`);
            optional when callers pass a selection to :meth:`forward_selected`.
        replica_mode: see :class:`ReplicaMap`.
        layer_id: passed to the selector (per-layer budgets).
    """

    def __init__(self, placement: Placement, dispatcher: Dispatcher, experts: SwiGLUExperts,
                 selector: Callable[..., Selection] | None = None, replica_mode: str = "primary",
                 layer_id: int = 0) -> None:
        super().__init__()
        if dispatcher.num_ranks != placement.num_ranks or dispatcher.num_physical != placement.num_physical:
            raise ValueError(f"dispatcher ({dispatcher.num_ranks} ranks, {dispatcher.num_physical} slots) does not match "
                             f"placement ({placement.num_ranks} ranks, {placement.num_physical} slots)")
        if experts.num_local != placement.experts_per_rank:
            raise ValueError(f"experts hold {experts.num_local} slots, placement puts {placement.experts_per_rank} per rank")
        self.placement = placement
        self.dispatcher = dispatcher
        self.experts = experts
        self._selector = None
        self.selector = selector
        self.layer_id = layer_id
        self.replicas = ReplicaMap(placement, replica_mode, experts.w13.device)
        if dispatcher.fallback:  # a WARNING: printed even where logging is not configured
            logger.warning("EP MoE layer %s, rank %d/%d: dispatch falls back (%s) -- %s", layer_id, dispatcher.rank,
                           dispatcher.num_ranks, dispatcher.fallback, dispatcher.reason)
        else:
            logger.info("EP MoE layer %s, rank %d/%d: dispatch %s -- %s", layer_id, dispatcher.rank,
                        dispatcher.num_ranks, dispatcher.name, dispatcher.reason)

    @property
    def selector(self) -> Callable[..., Selection] | None:
        """The select stage (set at construction or later; checked against the layer's placement)."""
        return self._selector

    @selector.setter
    def selector(self, selector: Callable[..., Selection] | None) -> None:
        policy = getattr(selector, "policy", None) or getattr(getattr(selector, "config", None), "policy", None)
        if policy is not None and get_policy(policy).uses_placement:  # its physical ids name slots of *its* placement: it must be this layer's
            sp = getattr(selector, "placement", None)
            if sp is None or sp.num_ranks != self.placement.num_ranks or not torch.equal(
                    sp.physical_to_logical.cpu(), self.placement.physical_to_logical.cpu()):
                mine = f"({self.placement.num_ranks} ranks, {self.placement.num_physical} slots)"
                raise ValueError(
                    (f"the xshare_ep selector has no placement, the layer has {mine}" if sp is None else
                     f"the xshare_ep selector's placement ({sp.num_ranks} ranks, {sp.num_physical} slots) is not the "
                     f"layer's {mine}")
                    + ": its physical ids would name other experts; build the Selector with the layer's placement")
        self._selector = selector

    # ------------------------------------------------------------------ stages
    def physical_ids(self, sel: Selection) -> torch.Tensor:
        """``[T, k] int32`` physical slots of a selection (its own for xshare_ep, mapped otherwise)."""
        if getattr(sel, "physical_ids", None) is not None:
            return sel.physical_ids.to(torch.int32)
        return self.replicas(sel.topk_ids)

    def select(self, router_logits: torch.Tensor, num_token_non_padded: Any = None) -> Selection:
        if self.selector is None:
            raise RuntimeError("EPMoELayer has no selector; call forward_selected")
        return self.selector(router_logits, layer_id=self.layer_id, num_token_non_padded=num_token_non_padded)

    def dispatch(self, hidden: torch.Tensor, physical_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[DispatchedTokens, Any]:
        return self.dispatcher.dispatch(hidden, physical_ids, topk_weights.float())

    def compute(self, tokens: DispatchedTokens) -> torch.Tensor:
        return self.experts(tokens, tokens.max_pairs)

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.dispatcher.combine(expert_out, handle)

    # ------------------------------------------------------------------ whole layer
    def forward_selected(self, hidden: torch.Tensor, sel: Selection) -> torch.Tensor:
        """``hidden [T, H] bf16`` + a selection -> ``[T, H] bf16``."""
        tokens, handle = self.dispatch(hidden, self.physical_ids(sel), sel.topk_weights)
        return self.combine(self.compute(tokens), handle)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor, num_token_non_padded: Any = None) -> torch.Tensor:
        """``hidden [T, H] bf16``, ``router_logits [T, E]`` -> ``[T, H] bf16``."""
        return self.forward_selected(hidden, self.select(router_logits, num_token_non_padded))

    @property
    def format(self) -> ExpertsFormat:
        return self.dispatcher.format
