"""``xshare_ep``: GPU-aware XShare -- keep the busiest EP rank's load low.

Under expert parallelism a decode MoE layer waits for its busiest rank, which reads the weights
of every distinct expert it activates. Given the placement (``R`` ranks, physical copies):

1. aggregate mass and the warm-up set as in ``xshare``; ``m_eff = max(m_l, |warm|)``;
2. per-rank budget ``b = ceil(m_eff / R)``; place every warm expert (on its rank, or -- for a
   replicated expert -- on the least-loaded rank holding a copy); the per-rank capacity is
   ``c = max(b, peak warm load)`` for every rank (``fill_to_peak``: ranks below the unavoidable
   peak fill up to it for free) or ``c_r = max(b, warm load of r)`` otherwise;
3. add experts by descending mass, each onto a copy on the least-loaded rank with room.
   ``hard_cap``: stop once ``m_eff`` distinct experts are chosen -- then the count is a hard cap
   (without it ``R * b`` and filling to the peak may exceed ``m_eff``).

**Optimality.** Without replicas each expert lives on one rank, so the feasible sets
``{S : warm <= S, |S & rank r| <= c_r}`` (and with ``hard_cap`` also ``|S| <= m_eff``: a
truncation) form a matroid and the objective ``sum_{e in S} mass[e]`` is modular: the greedy by
mass is exact (computed vectorised here). With replicas the copy choice makes it a
matroid-intersection problem; the sequential least-loaded greedy below is a heuristic whose gap
to an exact ILP ``bench/ilp_gap.py`` measures and ``tests/test_ilp_oracle.py`` bounds.

Output adds ``physical_ids``: the copy chosen for each kept slot (one copy per chosen expert,
so every chosen expert's weights are read on exactly one rank).

The placement is read through its device tables (:func:`~sglang_xshare.placement.placement_tables`):
built once per placement with device ops, refreshed in place by
:func:`~sglang_xshare.placement.refresh_tables_` after an EPLB rebalance -- the same tables the
Triton kernel reads, so both follow the same map. No host sync anywhere on this path.
"""

from __future__ import annotations

import torch

from ...placement import Placement, placement_tables
from ..common import batch_stats, priority, refine, resolve_budget, token_sets
from ..contract import BatchContext, Scores, SelectionOutput
from ..scoring import descending_order

__all__ = ["reference", "pick", "pick_partitioned", "pick_replicated", "tensor_parallel"]

_NEG_INF = float("-inf")
_TP: dict[int, Placement] = {}


def tensor_parallel(num_experts: int) -> Placement:
    """The pure-TP placement of ``num_experts`` (one shared object per ``E``, so its device tables
    are built once), used when a call has no placement."""
    if num_experts not in _TP:
        _TP[num_experts] = Placement.tensor_parallel(num_experts)
    return _TP[num_experts]


def reference(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """GPU-aware XShare under ``ctx.placement`` (pure TP when ``None``)."""
    assert ctx.budget is not None, "xshare_ep needs ctx.budget"
    E = scores.sel.shape[1]
    placement = ctx.placement or tensor_parallel(E)
    sets = token_sets(scores, ctx)
    mass1, warm1, union1 = batch_stats(sets, ctx)
    mass, warm = mass1[0], warm1[0]
    m = resolve_budget(ctx.budget, mass1, warm1, union1)[0]
    chosen, copy = pick(mass, warm, m, placement, ctx.fill_to_peak, ctx.hard_cap)
    out = refine(scores, chosen.unsqueeze(0), ctx)
    ids = out.topk_ids.to(torch.int64)
    phys = torch.where(ids >= 0, copy[ids.clamp(min=0)], torch.full_like(ids, -1)).to(torch.int32)
    return SelectionOutput(out.topk_ids, out.topk_weights, phys)


def pick(mass: torch.Tensor, warm: torch.Tensor, m: torch.Tensor, placement: Placement, fill_to_peak: bool,
         hard_cap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 from the budget ``m`` (0-d int64): ``m_eff``, ``b = ceil(m_eff / R)``, then
    :func:`pick_partitioned` or :func:`pick_replicated` -> ``(chosen [E] bool, copy [E] int64)``."""
    m_eff = torch.maximum(m, warm.sum())
    per_rank = torch.div(m_eff + placement.num_ranks - 1, placement.num_ranks, rounding_mode="floor")
    fn = pick_replicated if placement.has_replicas else pick_partitioned
    return fn(mass, warm, per_rank, placement, fill_to_peak, m_eff if hard_cap else None)


def _capacity(warm_load: torch.Tensor, per_rank: torch.Tensor, fill_to_peak: bool) -> torch.Tensor:
    """``[R] int64`` per-rank capacity from the warm loads and the per-rank budget ``b``."""
    if fill_to_peak:
        return torch.maximum(per_rank, warm_load.max()).expand_as(warm_load)
    return torch.maximum(warm_load, per_rank)


def pick_partitioned(mass: torch.Tensor, warm: torch.Tensor, per_rank: torch.Tensor, placement: Placement,
                     fill_to_peak: bool, limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-rank greedy for a placement without replicas (vectorised).

    Args:
        mass: ``[E] int64`` fixed-point masses (or float: only their order matters); warm:
            ``[E] bool``; per_rank: 0-d int64 ``b``; limit: 0-d int64 hard cap on the number of
            chosen experts (``>= |warm|``) or ``None``.

    Returns:
        ``chosen [E] bool`` and ``copy [E] int64`` (the physical slot of each logical expert).
    """
    dev = mass.device
    E, R = mass.shape[0], placement.num_ranks
    tab = placement_tables(placement, dev)
    rank_e, copy = tab.rank.long(), tab.copy.long()
    key = priority(mass, warm)
    warm_load = torch.zeros(R, dtype=torch.int64, device=dev).index_add_(0, rank_e, warm.to(torch.int64))
    cap = _capacity(warm_load, per_rank, fill_to_peak)
    by_key = descending_order(key)
    order = by_key[torch.sort(rank_e[by_key], stable=True).indices]  # by rank, then key desc
    count = torch.zeros(R, dtype=torch.int64, device=dev).index_add_(0, rank_e, torch.ones_like(rank_e))
    start = torch.cumsum(count, 0) - count
    r_sorted = rank_e[order]
    pos = torch.arange(E, device=dev) - start[r_sorted]
    take = (pos < cap[r_sorted]) & (key[order] > _NEG_INF)
    chosen = torch.zeros(E, dtype=torch.bool, device=dev).scatter_(0, order, take)
    if limit is not None:  # the first `limit - |warm|` non-warm ones in the global order
        extra = (chosen & ~warm)[by_key]
        keep = ~extra | (torch.cumsum(extra.to(torch.int64), 0) <= limit - warm.sum())
        chosen = chosen & torch.zeros(E, dtype=torch.bool, device=dev).scatter_(0, by_key, keep)
    return chosen, copy


def pick_replicated(mass: torch.Tensor, warm: torch.Tensor, per_rank: torch.Tensor, placement: Placement,
                    fill_to_peak: bool, limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential greedy with replicas: least-loaded copy first (ties: lower slot). No host sync.

    A loop over experts (not tokens): ``E`` iterations of small tensor ops over the ``P``
    physical slots. Same arguments and result as :func:`pick_partitioned`, which it equals on
    replica-free placements.
    """
    dev = mass.device
    E, R, P = mass.shape[0], placement.num_ranks, placement.num_physical
    tab = placement_tables(placement, dev)
    slot_expert, slot_rank = tab.slot_expert[:P].long(), tab.slot_rank[:P].long()
    cost_base = torch.arange(P, device=dev)
    key = priority(mass, warm)
    order = descending_order(key)
    load = torch.zeros(R, dtype=torch.int64, device=dev)
    copy = torch.full((E,), -1, dtype=torch.int64, device=dev)
    big = torch.iinfo(torch.int64).max

    def place(e: torch.Tensor, want: torch.Tensor, room: torch.Tensor | None) -> torch.Tensor:
        """Expert ``e [1]`` onto its least-loaded slot with room if ``want [1]``; returns taken [1]."""
        slot_load = load[slot_rank]
        ok = slot_expert == e
        if room is not None:
            ok = ok & (slot_load < room[slot_rank])
        j = torch.argmin(torch.where(ok, slot_load * P + cost_base, torch.full_like(slot_load, big))).view(1)
        take = want & ok.gather(0, j)
        copy.scatter_(0, e, torch.where(take, j, copy.gather(0, e)))
        load.index_add_(0, slot_rank.gather(0, j), take.to(torch.int64))
        return take

    # 1-element index tensors throughout (never a 0-d tensor as an index: that would be a
    # host read under torch.compile)
    for i in range(E):  # warm-up experts first (they lead the order)
        e = order[i:i + 1]
        place(e, warm.gather(0, e), None)
    cap = _capacity(load.clone(), per_rank, fill_to_peak)
    left = None if limit is None else (limit - warm.sum()).view(1)
    for i in range(E):
        e = order[i:i + 1]
        want = (~warm.gather(0, e)) & (key.gather(0, e) > _NEG_INF)
        if left is not None:
            want = want & (left > 0)
        took = place(e, want, cap)
        if left is not None:
            left = left - took.to(torch.int64)
    return copy >= 0, copy
