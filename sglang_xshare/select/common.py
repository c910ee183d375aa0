"""The building blocks every reference policy is made of (vectorised PyTorch, no host sync).

Notation: ``T`` tokens, ``E`` logical experts, ``G`` selection groups (1 for a plain batch,
``T`` for per-request sets of speculative decoding), ``k`` the model's top-k.

* :func:`token_order` / :func:`membership` -- each token's ranking and its top-j sets.
* :func:`group_mass` / :func:`group_any` -- aggregate per-token quantities per group;
  :func:`exact_sum` -- every sum of masses is *correctly rounded*: accumulated in float64 (exact
  for these sums) and rounded once to float32, so it does not depend on the summation order --
  the kernels' parallel reductions give the same bits, and equal masses stay exactly equal.
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
    "token_order",
    "membership",
    "group_mass",
    "exact_sum",
    "group_any",
    "resolve_budget",
    "greedy_pick",
    "priority",
    "refine",
    "TokenSets",
    "token_sets",
    "nucleus",
]

_NEG_INF = float("-inf")


def token_order(sel: torch.Tensor) -> torch.Tensor:
    """``[T, E] int64``: each token's experts by descending score, ties by lower id."""
    return descending_order(sel)


def membership(order: torch.Tensor, j: int, num_experts: int) -> torch.Tensor:
    """``[T, E] bool``: True for each token's first ``j`` experts of ``order``."""
    T = order.shape[0]
    out = torch.zeros(T, num_experts, dtype=torch.bool, device=order.device)
    idx = order[:, :j]
    return out.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))  # out of place: torch.func.vmap-able


class TokenSets:
    """Per-token sets shared by the policies (computed once per call).

    Attributes:
        order: ``[T, E] int64`` ranking of each token.
        topk: ``[T, E] bool`` each valid token's own top-k (False for padded tokens).
        warm: ``[T, E] bool`` each valid token's warm-up set: its own top-k0, or with
            ``ctx.warmup_p > 0`` its nucleus (:func:`nucleus`, a superset of its top-k0); False for
            padded tokens.
        contrib: ``[T, E] float32`` each valid token's contribution to the aggregated mass.
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
    warm = (membership(order, ctx.k0, E) if ctx.warmup_p <= 0 else nucleus(scores, order, ctx)) & v
    if ctx.mass_source == "topk":
        contrib = torch.where(topk, scores.gate, torch.zeros_like(scores.gate))
    else:
        contrib = torch.where(v & torch.isfinite(scores.sel), scores.gate, torch.zeros_like(scores.gate))
    return TokenSets(order, topk, warm, contrib)


def nucleus(scores: Scores, order: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """``[T, E] bool``: each token's *nucleus warm-up* -- its best experts, in its own order, until
    their gate weights reach ``ctx.warmup_p`` of the weight of its whole top-k (at least ``k0``,
    at most ``k`` experts). A token whose top-k is peaked keeps few, a flat one keeps many.

    Vectorised: ``n_t = #{j < k : sum_{i<j} w_i < p * sum_{i<k} w_i}`` from an exclusive cumulative
    sum over the token's top-k gate weights (float64, exact for these k terms), then the top-``n_t``.
    """
    k = ctx.top_k
    idx = order[:, :k]
    w = scores.gate.gather(1, idx).double()                      # [T, k], best first
    before = torch.cumsum(w, dim=-1) - w                          # exclusive prefix sums
    target = ctx.warmup_p * w.sum(dim=-1, keepdim=True) * (1.0 - 1e-9)
    n = (before < target).sum(dim=-1, keepdim=True).clamp(min=ctx.k0)  # [T, 1]
    slot = torch.arange(k, device=idx.device).unsqueeze(0)
    out = torch.zeros(order.shape[0], order.shape[1], dtype=torch.bool, device=order.device)
    return out.scatter(1, idx, slot < n)


def exact_sum(x: torch.Tensor, dim: int | tuple[int, ...], keepdim: bool = False) -> torch.Tensor:
    """``x.sum(dim)`` of float32 masses, correctly rounded: accumulated in float64, then one
    rounding to float32 (order-independent; see the module docstring)."""
    return x.double().sum(dim=dim, keepdim=keepdim).float()


def group_mass(contrib: torch.Tensor, group_index: torch.Tensor | None, num_groups: int) -> torch.Tensor:
    """``[G, E] float32``: per-group sum of ``contrib [T, E]`` (``group_index [T] int64`` or None
    = one group), correctly rounded (:func:`exact_sum`)."""
    if group_index is None:
        return exact_sum(contrib, 0, keepdim=True)
    out = torch.zeros(num_groups, contrib.shape[1], dtype=torch.float64, device=contrib.device)
    return out.index_add(0, group_index, contrib.double()).float()  # out of place: vmap-able


def group_any(mask: torch.Tensor, group_index: torch.Tensor | None, num_groups: int) -> torch.Tensor:
    """``[G, E] bool``: per-group union of ``mask [T, E] bool``."""
    return group_mass(mask.to(torch.float32), group_index, num_groups) > 0


def priority(mass: torch.Tensor, warm: torch.Tensor) -> torch.Tensor:
    """Ordering key of :func:`greedy_pick`: warm experts first (+inf), then mass; -inf = never."""
    key = torch.where(mass > 0, mass, torch.full_like(mass, _NEG_INF))
    return torch.where(warm, torch.full_like(mass, float("inf")), key)


def resolve_budget(budget: Budget, mass: torch.Tensor, warm: torch.Tensor, union: torch.Tensor,
                   total: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a budget into an expert count per group, on device.

    Args:
        budget: count, fraction or mass budget.
        mass: ``[G, E] float32`` aggregated mass (the greedy's ordering).
        warm: ``[G, E] bool`` warm-up experts.
        union: ``[G, E] bool`` what plain top-k would activate (``fraction`` mode).
        total: ``[G] float32`` mass the ``mass`` mode's fraction is of (default: the sum of
            ``mass``, correctly rounded).

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
    cum = torch.where(pickable, mass.gather(1, order), torch.zeros_like(mass)).double().cumsum(dim=-1)  # exact
    tot = exact_sum(mass, -1) if total is None else total
    need = (cum < (budget.value * tot * (1.0 - 1e-6)).double().unsqueeze(-1)).sum(dim=-1) + 1
    return torch.minimum(need, pickable.sum(dim=-1)).to(torch.int64)


def greedy_pick(mass: torch.Tensor, warm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Choose each group's experts: all warm ones, then by descending mass up to ``max(m, |warm|)``.

    Experts with zero mass that are not warm are never chosen (no token wants them).

    Args:
        mass: ``[G, E] float32``; warm: ``[G, E] bool``; m: ``[G] int64``.

    Returns:
        ``[G, E] bool`` chosen experts.
    """
    key = priority(mass, warm)
    order = descending_order(key)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    position = torch.empty_like(order).scatter(1, order, ranks)  # out of place: vmap-able
    m_eff = torch.maximum(m, warm.sum(dim=-1))
    return (position < m_eff.unsqueeze(-1)) & (key > _NEG_INF)


def refine(scores: Scores, allowed: torch.Tensor, ctx: BatchContext, limit: int | None = None) -> SelectionOutput:
    """Route each token to its best experts inside ``allowed``.

    Args:
        scores: the token scores.
        allowed: ``[T, E] bool`` (or broadcastable ``[1, E]``) experts the token may use; must
            contain the token's top-``k0`` for the warm-up guarantee to hold.
        ctx: batch context (``top_k``, ``k0``, ``valid``, ``renormalize``, ``min_score``).
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
        keep &= (slot < ctx.k0) | (weights >= ctx.min_score)
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    if ctx.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    ids = torch.where(keep, ids, torch.full_like(ids, -1)).to(torch.int32)
    return SelectionOutput(ids, weights)
