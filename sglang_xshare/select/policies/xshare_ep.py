"""``xshare_ep``: GPU-aware XShare -- keep the busiest EP rank's load low.

Under expert parallelism a decode MoE layer waits for its busiest rank, which reads the weights
of every distinct expert it activates. Given the placement (``R`` ranks, physical copies):

1. aggregate mass and the warm-up set as in ``xshare``; ``m_eff = max(m_l, |warm|)``;
2. per-rank budget ``b = ceil(m_eff / R)``; place every warm expert (on its rank, or -- for a
   replicated expert -- on the least-loaded rank holding a copy); the per-rank capacity is
   ``c = max(b, peak warm load)`` for every rank (``fill_to_peak``: ranks below the unavoidable
   peak fill up to it for free) or ``c_r = max(b, warm load of r)`` otherwise;
3. add experts by descending mass, each onto a copy on the least-loaded rank with room.

**Optimality.** Without replicas each expert lives on one rank, so the feasible sets
``{S : warm <= S, |S & rank r| <= c_r}`` form a partition matroid and the objective
``sum_{e in S} mass[e]`` is modular: per-rank greedy by mass is exact (it is computed vectorised
here). With replicas the copy choice makes it a transversal-matroid problem; the sequential
least-loaded greedy below is a heuristic, and ``bench/ilp_gap.py`` measures its gap to an exact
ILP (``tests/test_ilp_oracle.py`` checks the replica-free case has gap 0).

Output adds ``physical_ids``: the copy chosen for each kept slot (one copy per chosen expert,
so every chosen expert's weights are read on exactly one rank).
"""

from __future__ import annotations

import torch

from ...placement import Placement
from ..common import batch_stats, priority, refine, resolve_budget, token_sets
from ..contract import BatchContext, Scores, SelectionOutput
from ..scoring import descending_order

__all__ = ["reference", "pick_partitioned", "pick_replicated", "copies_table"]

_NEG_INF = float("-inf")


def reference(scores: Scores, ctx: BatchContext) -> SelectionOutput:
    """GPU-aware XShare under ``ctx.placement`` (pure TP when ``None``)."""
    assert ctx.budget is not None, "xshare_ep needs ctx.budget"
    E = scores.sel.shape[1]
    placement = ctx.placement or Placement.tensor_parallel(E)
    sets = token_sets(scores, ctx)
    mass1, warm1, union1 = batch_stats(sets, ctx)
    mass, warm = mass1[0], warm1[0]
    m = resolve_budget(ctx.budget, mass1, warm1, union1)[0]
    m_eff = torch.maximum(m, warm.sum())
    per_rank = torch.div(m_eff + placement.num_ranks - 1, placement.num_ranks, rounding_mode="floor")
    pick = pick_replicated if placement.has_replicas else pick_partitioned
    chosen, copy = pick(mass, warm, per_rank, placement, ctx.fill_to_peak)
    out = refine(scores, chosen.unsqueeze(0), ctx)
    ids = out.topk_ids.to(torch.int64)
    phys = torch.where(ids >= 0, copy[ids.clamp(min=0)], torch.full_like(ids, -1)).to(torch.int32)
    return SelectionOutput(out.topk_ids, out.topk_weights, phys)


def _capacity(warm_load: torch.Tensor, per_rank: torch.Tensor, fill_to_peak: bool) -> torch.Tensor:
    """``[R] int64`` per-rank capacity from the warm loads and the per-rank budget ``b``."""
    if fill_to_peak:
        return torch.maximum(per_rank, warm_load.max()).expand_as(warm_load)
    return torch.maximum(warm_load, per_rank)


def pick_partitioned(mass: torch.Tensor, warm: torch.Tensor, per_rank: torch.Tensor, placement: Placement,
                     fill_to_peak: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-rank greedy for a placement without replicas (vectorised).

    Args:
        mass: ``[E] float32``; warm: ``[E] bool``; per_rank: 0-d int64 ``b``.

    Returns:
        ``chosen [E] bool`` and ``copy [E] int64`` (the physical slot of each logical expert).
    """
    dev = mass.device
    E, R = mass.shape[0], placement.num_ranks
    p2l = placement.physical_to_logical.to(dev)
    rank_e = torch.empty(E, dtype=torch.int64, device=dev).scatter_(0, p2l, placement.physical_rank(dev))
    copy = torch.empty(E, dtype=torch.int64, device=dev).scatter_(0, p2l, torch.arange(E, device=dev))
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
    return chosen, copy


def copies_table(placement: Placement, device: torch.device | str | None = None) -> torch.Tensor:
    """``[E, C] int64``: each logical expert's physical slots, ascending, padded with -1 (config time)."""
    p2l = placement.physical_to_logical.cpu()
    per = [[] for _ in range(placement.num_experts)]
    for p, e in enumerate(p2l.tolist()):
        per[e].append(p)
    C = max(len(x) for x in per)
    table = torch.full((placement.num_experts, C), -1, dtype=torch.int64)
    for e, slots in enumerate(per):
        table[e, : len(slots)] = torch.tensor(slots, dtype=torch.int64)
    return table.to(device)


def pick_replicated(mass: torch.Tensor, warm: torch.Tensor, per_rank: torch.Tensor, placement: Placement,
                    fill_to_peak: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential greedy with replicas: least-loaded copy first (ties: lower slot). No host sync.

    A loop over experts (not tokens): ``E`` iterations of small tensor ops. Same signature and
    result type as :func:`pick_partitioned`, which it equals on replica-free placements.
    """
    dev = mass.device
    E, R = mass.shape[0], placement.num_ranks
    table = copies_table(placement, dev)
    has = table >= 0
    slot_rank = torch.where(has, table.clamp(min=0) // placement.experts_per_rank, torch.zeros_like(table))
    key = priority(mass, warm)
    order = descending_order(key)
    load = torch.zeros(R, dtype=torch.int64, device=dev)
    copy = torch.full((E,), -1, dtype=torch.int64, device=dev)
    big = torch.iinfo(torch.int64).max

    def place(e: torch.Tensor, want: torch.Tensor, room: torch.Tensor | None) -> None:
        ranks = slot_rank[e]
        ok = has[e] if room is None else has[e] & (load[ranks] < room[ranks])
        cost = torch.where(ok, load[ranks], torch.full_like(ranks, big))
        j = torch.argmin(cost)
        take = want & ok[j]
        copy[e] = torch.where(take, table[e, j], copy[e])
        load.index_add_(0, ranks[j].view(1), take.to(torch.int64).view(1))

    for i in range(E):  # warm-up experts first (they lead the order)
        e = order[i]
        place(e, warm[e], None)
    cap = _capacity(load.clone(), per_rank, fill_to_peak)
    for i in range(E):
        e = order[i]
        place(e, (~warm[e]) & (key[e] > _NEG_INF), cap)
    return copy >= 0, copy
