"""The select-stage contract: what every policy takes and returns (one place).

Pipeline: router logits -> **select** -> dispatch (DeepEP | NCCL) -> experts -> combine.

Input of a policy (built once per layer call by :class:`~sglang_xshare.select.Selector`):

* :class:`Scores` -- ``sel [T, E] float32`` (the score experts are *chosen* by: probabilities,
  plus DeepSeek's correction bias, ``-inf`` for experts outside the token's allowed groups) and
  ``gate [T, E] float32`` (the weight an expert gets: softmax or sigmoid probabilities).
* :class:`BatchContext` -- ``valid [T] bool`` (False for CUDA-graph padding: tokens at index
  ``>= num_token_non_padded``), the requests of ``xshare_spec`` -- ``request_group = g``
  (requests are runs of ``g`` consecutive tokens, as in SGLang's verify batches) or
  ``request_ids [T] int64`` in ``[0, T)`` (any grouping) -- the :class:`~sglang_xshare.placement.Placement`
  (``xshare_ep``) and the resolved per-layer knobs, among them the verify-row guard ``guard_k``
  (speculative verify batches: the target row of every request warms up with its top-``guard_k``).

Output (:class:`SelectionOutput`):

* ``topk_ids [T, k] int32`` -- logical expert ids, best first; a slot that selects nothing is
  ``-1`` (DeepEP skips it); padded tokens are all ``-1``.
* ``topk_weights [T, k] float32`` -- the gate weight of each kept slot, 0 where the id is ``-1``;
  divided by the kept sum when the model renormalises -- and when that sum is 0 (sigmoid gates
  that all underflow to 0), ``1 / n`` on each of the token's ``n`` kept slots.
* ``physical_ids [T, k] int32`` or ``None`` -- for ``xshare_ep``: the physical copy (EPLB slot)
  chosen for each kept slot, ``-1`` where the id is ``-1``.

Guarantees (tested for every policy):

1. every valid token keeps its own top-``k0`` experts (``k0 >= 1``; ``k`` for ``topk``, ``k'`` for ``cap``);
   with the verify-row guard, each request's target row its top-``max(k0, guard_k)``
   (:meth:`BatchContext.guard`);
2. padded tokens activate nothing;
3. identical inputs give identical outputs. **Tie-breaking**: wherever experts are ordered by a
   score (a token's ranking, the batch's aggregated mass), equal scores are ordered by the lower
   expert index first (a stable descending sort); among the physical copies of one expert, the
   least-loaded rank wins, then the lower physical slot. **Masses** are fixed-point sums at
   ``2**-40`` resolution: each gate ``g`` in ``[0, 1]`` counts ``floor(g * 2**40)`` (gates below
   ``2**-40`` count 0) and a mass is the ``int64`` sum -- exact (while the summed gates stay
   below ``2**23``, e.g. ``T * E <= 2**23``) and therefore the same integer for any order of the
   tokens, of the requests, or of a parallel reduction; equal masses stay equal. Experts are
   ordered by ``float32(float64(mass))`` (a fixed function of that integer); the ``mass:X``
   budget compares exact cumulative masses with ``(float64(total) * X) * (1 - 1e-6)``. The
   reference and the kernels compute the same integers and the same comparisons.
4. NaN logits count as ``-inf``; ``+inf`` as the largest finite float; a token whose logits are
   all non-finite routes as if its logits were all equal (uniformly, lowest ids first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..config import Budget
from ..placement import Placement

__all__ = ["Scores", "BatchContext", "SelectionOutput"]


class Scores(NamedTuple):
    """Per-token expert scores, computed from router logits by :func:`~.scoring.compute_scores`.

    Attributes:
        sel: ``[T, E] float32`` ranking score (finite for every allowed expert, ``-inf`` for an
            expert the model's grouped top-k forbids for this token).
        gate: ``[T, E] float32`` gate probability in ``[0, 1]`` (softmax or sigmoid).
    """

    sel: torch.Tensor
    gate: torch.Tensor


@dataclass(frozen=True)
class BatchContext:
    """Everything about the batch and layer a policy needs besides the scores.

    Attributes:
        top_k: the model's ``k``.
        k0: warm-up floor (every valid token keeps its top-``k0``).
        renormalize: divide kept weights by their sum.
        valid: ``[T] bool``, False for padded tokens; ``None`` when ``num_valid`` says it instead
            (the kernel path reads the count on the device: no mask is materialised).
        budget: the layer's batch budget ``m_l`` (budgeted policies) or ``None``.
        request_budget: per-request budget ``m_r`` (``xshare_spec``) or ``None``.
        request_ids: ``[T] int64`` in ``[0, T)`` -- request of each token (``xshare_spec``) or ``None``.
        request_group: tokens per request when requests are runs of consecutive tokens (token
            ``t`` belongs to request ``t // request_group``; ``xshare_spec``) or ``None``. At
            most one of ``request_ids`` / ``request_group`` is set; neither: each token is its
            own request.
        placement: expert placement (``xshare_ep``) or ``None``.
        cap: per-token cap ``k'`` (``cap``) or ``None``.
        min_score: refinement floor on the gate weight of slots beyond ``k0``.
        mass_source: ``"topk"`` or ``"full"`` (see :class:`~sglang_xshare.config.SelectionConfig`).
        fill_to_peak: ``xshare_ep``: let every rank fill up to the busiest rank's load.
        num_valid: 0-d ``int32`` / ``int64`` device tensor -- tokens ``< num_valid`` are real
            (SGLang's ``num_token_non_padded``) -- used when ``valid`` is ``None``; both ``None``:
            every token is real.
        stats_reduce: the batch spans several ranks (DP attention, DeepEP's scattered layout):
            ``stats -> sum of every rank's stats`` (an all-reduce, same shape). The batch policies
            (``oea``, ``xshare``, ``xshare_ep``) then choose from all ranks' tokens -- the same set on
            every rank -- and refine their own tokens. ``None``: the batch is this rank's tokens.
        hard_cap: ``xshare_ep``: never more than ``max(m_l, |warm|)`` distinct experts.
        warmup_p: nucleus warm-up (0 = off): each valid token keeps its best experts until they
            hold this fraction of its top-k gate weight (at least ``k0``, at most ``k``).
        guard_k: verify-row guard (``1 <= guard_k <= k``) or ``None``: in a verify batch
            (``request_group = g >= 2``) the first row of every request -- the target row, rows
            ``t % g == 0`` -- warms up with its own top-``max(k0, guard_k)`` instead of its
            top-``k0``; the other rows keep ``k0``. Warm-up experts are always chosen, so those
            rows keep exactly their top-``guard_k``; the budget applies on top (the warm-up floor
            may exceed it, as always). A no-op without ``request_group`` or with ``g = 1`` (no
            verify batch: every row would be a target row). Policies with a warm-up floor only
            (``oea``, ``oea_simple``, the xshare policies; refused at configuration time otherwise).
    """

    top_k: int
    k0: int
    renormalize: bool
    valid: torch.Tensor | None
    budget: Budget | None = None
    request_budget: Budget | None = None
    request_ids: torch.Tensor | None = None
    request_group: int | None = None
    placement: Placement | None = None
    cap: int | None = None
    min_score: float = 0.0
    mass_source: str = "topk"
    fill_to_peak: bool = True
    num_valid: torch.Tensor | None = None
    stats_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    hard_cap: bool = False
    warmup_p: float = 0.0
    guard_k: int | None = None

    def __post_init__(self) -> None:
        if self.guard_k is not None and not (1 <= int(self.guard_k) <= self.top_k):
            raise ValueError(f"guard_k must be in [1, top_k={self.top_k}], got {self.guard_k}")

    def guard(self) -> tuple[int, int]:
        """``(G, width)``: rows ``t`` with ``t % G == 0`` warm up with their top-``width``
        (``width = max(k0, guard_k)``), the other rows with their top-``k0``; ``(0, k0)`` when
        there is no guard (``guard_k`` unset, no request groups, ``g = 1``, or ``guard_k <= k0``).
        One definition for the reference (:func:`~.common.warmup_width`) and the kernels (the
        ``GUARD_G`` / ``GUARD_K`` constexprs)."""
        g = self.request_group
        if self.guard_k is None or g is None or int(g) < 2 or int(self.guard_k) <= self.k0:
            return 0, self.k0
        return int(g), int(self.guard_k)


class SelectionOutput(NamedTuple):
    """The select stage's result; see the module docstring for the exact contract.

    Attributes:
        topk_ids: ``[T, k] int32``, ``-1`` for empty slots.
        topk_weights: ``[T, k] float32``, 0 for empty slots.
        physical_ids: ``[T, k] int32`` physical copies (``xshare_ep``) or ``None``.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    physical_ids: torch.Tensor | None = None
