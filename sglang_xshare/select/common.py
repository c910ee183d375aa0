"""The building blocks every reference policy is made of (vectorised PyTorch, no host sync).

Notation: ``T`` tokens, ``E`` logical experts, ``G`` selection groups (1 for a plain batch,
``T`` for per-request sets of speculative decoding), ``k`` the model's top-k.

* :func:`token_order` / :func:`membership` -- each token's ranking and its top-j sets;
  :func:`warmup_width` -- each token's warm-up width (``k0``, or the verify-row guard's width on
  the target rows of a verify batch).
* :func:`mass_units` / :func:`group_mass` / :func:`group_any` / :func:`exact_sum` -- masses are
  *fixed-point* integers: a gate ``g`` in ``[0, 1]`` contributes ``floor(g * 2**MASS_BITS)``
  units (``int64``; gates below ``2**-40`` contribute 0), and every mass is an ``int64`` sum of
  units -- exact, so the same integer for any token order and any (parallel) reduction order;
  equal masses stay exactly equal. :func:`mass_key` turns a mass into the ``float32`` the experts
  are *ordered* by (``float32(float64(mass))``: a fixed function of the exact integer, the same
  conversion in the kernels); the ``mass:X`` budget compares exact cumulative sums with a
  float64 threshold (:func:`mass_threshold`).
* :func:`resolve_budget` -- a :class:`~sglang_xshare.config.Budget` -> ``m [G] int64`` on device.
* :func:`greedy_pick` -- warm-up set first, then descending mass, up to ``max(m, |warm|)``.
  The objective (sum of the chosen experts' mass) is modular, so this greedy is exact.
* :func:`refine` -- each token routes to its best ``<= k`` experts inside its allowed set.
"""

from __future__ import annotations

import torch

from ..config import Budget
from .contract import BatchContext, Scores, SelectionOutput
from .scoring import descending_order

__all__ = [
    "MASS_BITS",
    "MASS_SCALE",
    "mass_units",
    "mass_key",
    "mass_threshold",
    "token_order",
    "membership",
    "warmup_width",
    "group_mass",
    "exact_sum",
    "group_any",
    "batch_stats",
    "resolve_budget",
    "greedy_pick",
    "priority",
    "refine",
    "renormalize",
    "TokenSets",
    "token_sets",
    "nucleus",
]

_NEG_INF = float("-inf")

#: Resolution of the fixed-point masses: one unit is ``2**-MASS_BITS`` of gate weight. A mass of
#: ``T`` tokens' gates in ``[0, 1]`` is at most ``T * 2**40``: exact in ``int64`` while the summed
#: gates stay below ``2**23`` (e.g. ``T * E <= 2**23`` even for ``mass_source="full"``).
MASS_BITS = 40
#: ``2**MASS_BITS`` as a float (exact in float32: scaling a gate by it is exact).
MASS_SCALE = float(2**MASS_BITS)
#: ``1 - 1e-6``: the ``mass:X`` budget's slack, ``threshold = (total * X) * MASS_SLACK`` in float64.
MASS_SLACK = 1.0 - 1e-6


def token_order(sel: torch.Tensor) -> torch.Tensor:
    """``[T, E] int64``: each token's experts by descending score, ties by lower id."""
    return descending_order(sel)


def membership(order: torch.Tensor, j: int | torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E] bool``: True for each token's first ``j`` experts of ``order`` (``j`` an int, or
    ``[T, 1] int64`` -- one width per token, :func:`warmup_width`)."""
    T = order.shape[0]
    out = torch.zeros(T, num_experts, dtype=torch.bool, device=order.device)
    if isinstance(j, torch.Tensor):
        rank = torch.arange(order.shape[1], device=order.device).unsqueeze(0)
        return out.scatter(1, order, (rank < j).expand_as(order))  # out of place: torch.func.vmap-able
    idx = order[:, :j]
    return out.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))  # out of place: torch.func.vmap-able


def warmup_width(ctx: BatchContext, num_tokens: int, device: torch.device) -> int | torch.Tensor:
    """How many of its own best experts each token warms up with: ``ctx.k0`` (an int) or, with the
    verify-row guard (:meth:`~.contract.BatchContext.guard`), ``[T, 1] int64`` -- the guard's width
    on the target rows ``t % g == 0``, ``k0`` elsewhere. Static shapes, no host sync."""
    g, width = ctx.guard()
    if g == 0:
        return ctx.k0
    target = (torch.arange(num_tokens, device=device) % g == 0).unsqueeze(1)
    return ctx.k0 + (width - ctx.k0) * target.to(torch.int64)


class TokenSets:
    """Per-token sets shared by the policies (computed once per call).

    Attributes:
        order: ``[T, E] int64`` ranking of each token.
        topk: ``[T, E] bool`` each valid token's own top-k (False for padded tokens).
        warm: ``[T, E] bool`` each valid token's warm-up set: its own top-k0 (top-``guard_k`` on
            the target rows of a guarded verify batch, :func:`warmup_width`), or with
            ``ctx.warmup_p > 0`` its nucleus (:func:`nucleus`, a superset of that); False for
            padded tokens.
        contrib: ``[T, E] int64`` each valid token's contribution to the aggregated mass, in
            fixed-point units (:func:`mass_units`).
    """

    __slots__ = ("order", "topk", "warm", "contrib")

    def __init__(self, order: torch.Tensor, topk: torch.Tensor, warm: torch.Tensor, contrib: torch.Tensor) -> None:
        self.order, self.topk, self.warm, self.contrib = order, topk, warm, contrib


def token_sets(scores: Scores, ctx: BatchContext) -> TokenSets:
    """Rank every token once and derive its top-k / top-k0 sets and mass contribution."""
    T, E = scores.sel.shape
    order = token_order(scores.sel)
    v = ctx.valid.unsqueeze(1)
    topk = membership(order, ctx.top_k, E) & v
    width = warmup_width(ctx, T, order.device)
    warm = (membership(order, width, E) if ctx.warmup_p <= 0 else nucleus(scores, order, ctx, width)) & v
    if ctx.mass_source == "topk":
        gate = torch.where(topk, scores.gate, torch.zeros_like(scores.gate))
    else:
        gate = torch.where(v & torch.isfinite(scores.sel), scores.gate, torch.zeros_like(scores.gate))
    return TokenSets(order, topk, warm, mass_units(gate))


def mass_units(gate: torch.Tensor) -> torch.Tensor:
    """``[...] float32`` gates in ``[0, 1]`` -> ``[...] int64`` fixed-point units
    ``floor(gate * 2**MASS_BITS)`` (the scaling is exact in float32; the cast truncates, = floor)."""
    return (gate.float() * MASS_SCALE).to(torch.int64)


def mass_key(mass: torch.Tensor) -> torch.Tensor:
    """``[...] int64`` masses -> ``[...] float32`` ordering keys, ``float32(float64(mass))`` (both
    conversions round to nearest; a float input passes through unchanged)."""
    return mass.double().float()


def mass_threshold(total: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[G] int64`` total masses -> ``[G] float64`` ``(total * fraction) * (1 - 1e-6)``: the
    ``mass:X`` budget keeps experts while the exact cumulative mass before them is below it."""
    return (total.double() * float(fraction)) * MASS_SLACK


def nucleus(scores: Scores, order: torch.Tensor, ctx: BatchContext,
            width: int | torch.Tensor | None = None) -> torch.Tensor:
    """``[T, E] bool``: each token's *nucleus warm-up* -- its best experts, in its own order, until
    their gate weights reach ``ctx.warmup_p`` of the weight of its whole top-k (at least ``width``
    -- default ``k0``; :func:`warmup_width` -- at most ``k`` experts). A token whose top-k is
    peaked keeps few, a flat one keeps many.

    Vectorised: ``n_t = #{j < k : sum_{i<j} w_i < p * sum_{i<k} w_i}`` from an exclusive cumulative
    sum over the token's top-k gate weights (float64, exact for these k terms), then the top-``n_t``.
    """
    k = ctx.top_k
    idx = order[:, :k]
    w = scores.gate.gather(1, idx).double()                      # [T, k], best first
    before = torch.cumsum(w, dim=-1) - w                          # exclusive prefix sums
    target = ctx.warmup_p * w.sum(dim=-1, keepdim=True) * (1.0 - 1e-9)
    n = (before < target).sum(dim=-1, keepdim=True).clamp(min=ctx.k0 if width is None else width)  # [T, 1]
    slot = torch.arange(k, device=idx.device).unsqueeze(0)
    out = torch.zeros(order.shape[0], order.shape[1], dtype=torch.bool, device=order.device)
    return out.scatter(1, idx, slot < n)


def exact_sum(x: torch.Tensor, dim: int | tuple[int, ...], keepdim: bool = False) -> torch.Tensor:
    """``x.sum(dim)`` of ``int64`` fixed-point masses: exact, so independent of the summation
    order (see the module docstring)."""
    return x.sum(dim=dim, keepdim=keepdim, dtype=torch.int64)


def group_mass(contrib: torch.Tensor, group_index: torch.Tensor | None, num_groups: int) -> torch.Tensor:
    """``[G, E] int64``: per-group sum of ``contrib [T, E] int64`` (``group_index [T] int64`` or
    None = one group), exact (:func:`exact_sum`)."""
    if group_index is None:
        return exact_sum(contrib, 0, keepdim=True)
    out = torch.zeros(num_groups, contrib.shape[1], dtype=torch.int64, device=contrib.device)
    return out.index_add(0, group_index, contrib.to(torch.int64))  # out of place: vmap-able


def batch_stats(sets: "TokenSets", ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's ``(mass [1, E] int64, warm [1, E] bool, union [1, E] bool)``: aggregated mass,
    the union of the top-``k0`` sets and of the top-k sets.

    With ``ctx.stats_reduce`` (a batch spread over ranks) the statistics of every rank are summed
    first -- ``[3, E] int64``: fixed-point mass sums, warm-up and top-k counts -- exactly, so the
    result is the single-process one.
    """
    if ctx.stats_reduce is None:
        return group_mass(sets.contrib, None, 1), group_any(sets.warm, None, 1), group_any(sets.topk, None, 1)
    st = torch.stack([exact_sum(sets.contrib, 0), sets.warm.sum(0, dtype=torch.int64),
                      sets.topk.sum(0, dtype=torch.int64)])
    st = ctx.stats_reduce(st)
    return st[0:1], st[1:2] > 0, st[2:3] > 0


def group_any(mask: torch.Tensor, group_index: torch.Tensor | None, num_groups: int) -> torch.Tensor:
    """``[G, E] bool``: per-group union of ``mask [T, E] bool``."""
    return group_mass(mask.to(torch.int64), group_index, num_groups) > 0


def priority(mass: torch.Tensor, warm: torch.Tensor) -> torch.Tensor:
    """``[G, E] float32`` ordering key of :func:`greedy_pick`: warm experts first (+inf), then
    :func:`mass_key`; -inf = never (not warm and zero mass)."""
    key = mass_key(mass)
    key = torch.where(mass > 0, key, torch.full_like(key, _NEG_INF))
    return torch.where(warm, torch.full_like(key, float("inf")), key)


def resolve_budget(budget: Budget, mass: torch.Tensor, warm: torch.Tensor, union: torch.Tensor,
                   total: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a budget into an expert count per group, on device.

    Args:
        budget: count, fraction or mass budget.
        mass: ``[G, E] int64`` aggregated fixed-point mass (the greedy's ordering).
        warm: ``[G, E] bool`` warm-up experts.
        union: ``[G, E] bool`` what plain top-k would activate (``fraction`` mode).
        total: ``[G] int64`` mass the ``mass`` mode's fraction is of (default: the sum of
            ``mass``).

    Returns:
        ``[G] int64`` the budget ``m`` (before the warm-up floor is applied).
    """
    G = mass.shape[0]
    if budget.mode == "count":
        return torch.full((G,), int(budget.value), dtype=torch.int64, device=mass.device)
    if budget.mode == "fraction":
        n = union.sum(dim=-1).to(torch.float64)
        return torch.ceil(n * budget.value - 1e-6).to(torch.int64)
    key = priority(mass, warm)
    order = descending_order(key)
    pickable = key.gather(1, order) > _NEG_INF
    cum = torch.where(pickable, mass.gather(1, order), torch.zeros_like(mass)).cumsum(dim=-1)  # int64: exact
    tot = exact_sum(mass, -1) if total is None else total
    need = (cum.double() < mass_threshold(tot, budget.value).unsqueeze(-1)).sum(dim=-1) + 1
    return torch.minimum(need, pickable.sum(dim=-1)).to(torch.int64)


def greedy_pick(mass: torch.Tensor, warm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Choose each group's experts: all warm ones, then by descending mass up to ``max(m, |warm|)``.

    Experts with zero mass that are not warm are never chosen (no token wants them).

    Args:
        mass: ``[G, E] int64``; warm: ``[G, E] bool``; m: ``[G] int64``.

    Returns:
        ``[G, E] bool`` chosen experts.
    """
    key = priority(mass, warm)
    order = descending_order(key)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    position = torch.empty_like(order).scatter(1, order, ranks)  # out of place: vmap-able
    m_eff = torch.maximum(m, warm.sum(dim=-1))
    return (position < m_eff.unsqueeze(-1)) & (key > _NEG_INF)


def renormalize(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Divide each row of ``weights [T, k] float32`` by its sum; a row whose kept gates sum to 0
    (sigmoid gates that all underflow) gets ``1 / n`` on each of its ``n`` kept slots (``keep
    [T, k] bool``) instead of all zeros. Padded / empty rows stay 0."""
    s = weights.sum(dim=-1, keepdim=True)
    n = keep.sum(dim=-1, keepdim=True).to(weights.dtype)
    uniform = torch.where(keep, 1.0 / n.clamp_min(1.0), torch.zeros_like(weights))
    return torch.where(s > 0, weights / s.clamp_min(torch.finfo(torch.float32).tiny), uniform)


def refine(scores: Scores, allowed: torch.Tensor, ctx: BatchContext, limit: int | None = None) -> SelectionOutput:
    """Route each token to its best experts inside ``allowed``.

    Args:
        scores: the token scores.
        allowed: ``[T, E] bool`` (or broadcastable ``[1, E]``) experts the token may use; must
            contain the token's top-``k0`` for the warm-up guarantee to hold.
        ctx: batch context (``top_k``, ``k0``, ``valid``, ``renormalize``, ``min_score``; the
            ``min_score`` floor spares each token's first :func:`warmup_width` slots).
        limit: keep at most this many slots (default ``k``); the rest of the ``k`` slots are ``-1``.

    Returns:
        :class:`SelectionOutput` with ``[T, k]`` int32 ids (best first) and float32 weights.
    """
    k = ctx.top_k
    keep_n = k if limit is None else limit
    T, E = scores.sel.shape
    masked = torch.where(allowed, scores.sel, torch.full_like(scores.sel, _NEG_INF))
    top = torch.sort(masked, dim=-1, descending=True, stable=True)
    ids = top.indices[:, :k]
    slot = torch.arange(k, device=ids.device).unsqueeze(0)
    weights = scores.gate.gather(1, ids)
    keep = (top.values[:, :k] > _NEG_INF) & ctx.valid.unsqueeze(1) & (slot < keep_n)
    if ctx.min_score > 0:
        keep &= (slot < warmup_width(ctx, T, ids.device)) | (weights >= ctx.min_score)
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    if ctx.renormalize:
        weights = renormalize(weights, keep)
    ids = torch.where(keep, ids, torch.full_like(ids, -1)).to(torch.int32)
    return SelectionOutput(ids, weights)
