"""How a selection is handed to an MoE backend, and what it is counted as (the select stage's epilogue).

A policy's plain output (:class:`~.contract.SelectionOutput`) holds logical ids with ``-1`` for
empty slots. Serving needs the ids *as the backend dispatches them*; :class:`OutputSpec` says how,
and the Triton kernels do it in the same launch (no extra kernel per MoE layer):

* ``ids``: ``"logical"`` (as selected), ``"physical"`` (``xshare_ep``'s chosen copies) or
  ``"mapped"`` (logical ids through ``dispatch_map [E]``, e.g. SGLang's static EPLB
  ``logical_to_rank_dispatch_physical_map`` of the layer, a live view);
* ``empty``: ``"minus_one"`` (DeepEP and the triton / deep_gemm runners drop ``-1``) or
  ``"fill"`` (an empty slot of a real token repeats the token's first id with weight 0; padded
  tokens keep ``-1``, as SGLang writes them on CUDA);
* ``scale``: the routed scaling factor when SGLang folds it into the weights.
* ``metrics``: a :class:`MetricsSink` -- add the call's counts to a layer's accumulator row.

:func:`apply_output` and :func:`metrics_counts` are the reference (plain PyTorch, the test
oracle and the CPU path) of that epilogue; the kernels' is in ``kernels/_tile.py`` and
``kernels/_metrics.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..placement import Placement
from .contract import SelectionOutput

__all__ = ["OutputSpec", "MetricsSink", "METRIC_FIELDS", "apply_output", "metrics_counts"]

#: Columns of a metrics accumulator row (``int64``); every field is a sum over calls.
METRIC_FIELDS: tuple[str, ...] = (
    "calls",          # layer calls counted
    "valid_tokens",   # real (non-padded) tokens
    "distinct",       # distinct dispatched ids (weights read under TP; physical slots when mapped)
    "topk_distinct",  # distinct experts of the tokens' own top-k (what plain routing would read)
    "peak",           # dispatched ids on the busiest EP rank
    "topk_peak",      # top-k experts on the busiest rank (each expert on its first copy)
    "pairs",          # kept (token, expert) slots
    "short_tokens",   # real tokens with fewer than k kept slots
)


@dataclass(frozen=True, eq=False)
class MetricsSink:
    """Where one layer's fused metrics go, and the rank tables to count them with.

    Attributes:
        acc: ``[len(METRIC_FIELDS)] int64`` accumulator row (a view of the server's table).
        unit_rank: ``[U] int32`` EP rank of each dispatchable id (``U = E`` for logical ids, ``P``
            physical slots otherwise).
        logical_rank: ``[E] int32`` rank of each logical expert's first copy (top-k peaks).
        num_ranks: ``R``.
    """

    acc: torch.Tensor
    unit_rank: torch.Tensor
    logical_rank: torch.Tensor
    num_ranks: int

    @staticmethod
    def for_placement(acc: torch.Tensor, placement: Placement, ids: str, device: torch.device) -> "MetricsSink":
        """Tables for ``placement`` when ``ids`` (``OutputSpec.ids``) are dispatched."""
        prank = placement.physical_rank(device).to(torch.int32)
        lrank = prank[placement.logical_to_primary_physical(device)].to(torch.int32)
        unit = lrank if ids == "logical" else prank
        return MetricsSink(acc, unit.contiguous(), lrank.contiguous(), placement.num_ranks)


@dataclass(frozen=True, eq=False)
class OutputSpec:
    """How the select stage writes its output for a backend (see the module docstring).

    Attributes:
        ids: ``"logical"``, ``"physical"`` (``xshare_ep`` only) or ``"mapped"`` (needs ``dispatch_map``).
        empty: ``"minus_one"`` or ``"fill"``.
        scale: multiply kept weights by this (after renormalisation), or ``None``.
        dispatch_map: ``[E] int32/int64`` logical -> dispatched id (``ids="mapped"``).
        metrics: fused metrics sink, or ``None``.
    """

    ids: Literal["logical", "physical", "mapped"] = "logical"
    empty: Literal["minus_one", "fill"] = "minus_one"
    scale: float | None = None
    dispatch_map: torch.Tensor | None = None
    metrics: MetricsSink | None = None

    def __post_init__(self) -> None:
        if self.ids not in ("logical", "physical", "mapped"):
            raise ValueError(f"OutputSpec.ids must be logical, physical or mapped, got {self.ids!r}")
        if self.empty not in ("minus_one", "fill"):
            raise ValueError(f"OutputSpec.empty must be minus_one or fill, got {self.empty!r}")
        if (self.ids == "mapped") != (self.dispatch_map is not None):
            raise ValueError("OutputSpec: ids='mapped' needs dispatch_map, and only it")


def apply_output(out: SelectionOutput, spec: OutputSpec, valid: torch.Tensor) -> SelectionOutput:
    """Reference epilogue: ``out`` (a policy's plain output) as ``spec`` hands it to a backend.

    Args:
        out: ``[T, k]`` int32 logical ids (-1 empty), float32 weights, optional physical ids.
        spec: the :class:`OutputSpec`.
        valid: ``[T] bool`` real tokens.

    Returns:
        :class:`SelectionOutput` whose ``topk_ids [T, k] int32`` are the dispatched ids and whose
        ``topk_weights [T, k] float32`` carry the scale; ``physical_ids`` is ``None``.
    """
    ids = out.topk_ids
    if spec.ids == "physical":
        if out.physical_ids is None:
            raise ValueError("OutputSpec(ids='physical') needs a policy that chooses physical copies (xshare_ep)")
        disp = out.physical_ids
    elif spec.ids == "mapped":
        m = spec.dispatch_map.to(ids.device)
        disp = torch.where(ids >= 0, m[ids.clamp(min=0).long()].to(torch.int32), torch.full_like(ids, -1))
    else:
        disp = ids
    disp = disp.to(torch.int32)
    if spec.empty == "fill":
        first = disp[:, :1].expand_as(disp)
        disp = torch.where((disp < 0) & valid[:, None], first, disp)
    w = out.topk_weights if spec.scale is None else out.topk_weights * spec.scale
    return SelectionOutput(disp, w, None)


def _rank_peak(flags: torch.Tensor, rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    cnt = torch.zeros(num_ranks, dtype=torch.int64, device=flags.device)
    cnt.index_add_(0, rank.long(), flags.long())
    return cnt.max()


def metrics_counts(disp: torch.Tensor, in_topk: torch.Tensor, valid: torch.Tensor, sink: MetricsSink) -> torch.Tensor:
    """Reference of the fused metrics: one call's ``[len(METRIC_FIELDS)] int64`` counts.

    Args:
        disp: ``[T, k] int`` dispatched ids, ``-1`` = none (before any ``fill``).
        in_topk: ``[T, E] bool`` each token's own top-k set.
        valid: ``[T] bool`` real tokens.
        sink: rank tables (its ``acc`` is not touched).
    """
    U = sink.unit_rank.numel()
    E = sink.logical_rank.numel()
    dev = disp.device
    kept = disp >= 0
    used = torch.zeros(U, dtype=torch.bool, device=dev)
    used[disp[kept].long()] = True
    top = (in_topk & valid[:, None]).any(dim=0) if in_topk.shape[0] else torch.zeros(E, dtype=torch.bool, device=dev)
    k = disp.shape[1]
    short = (kept.sum(dim=1) < k) & valid
    return torch.stack([
        torch.ones((), dtype=torch.int64, device=dev),
        valid.sum().to(torch.int64),
        used.sum().to(torch.int64),
        top.sum().to(torch.int64),
        _rank_peak(used, sink.unit_rank.to(dev), sink.num_ranks),
        _rank_peak(top, sink.logical_rank.to(dev), sink.num_ranks),
        kept.sum().to(torch.int64),
        short.sum().to(torch.int64),
    ])
