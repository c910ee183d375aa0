"""The dispatch stage's interface: move each token to the EP ranks that hold its experts, and back.

Pipeline of one MoE layer on one EP rank (``R`` ranks, ``P`` physical expert slots,
``L = P // R`` slots per rank; slot ``p`` lives on rank ``p // L``)::

    select     router logits [T, E]      -> topk ids (physical) [T, k] int32, weights [T, k] float32
    dispatch   hidden [T, H] bf16 + ids  -> DispatchedTokens (rows this rank must compute) + handle
    experts    DispatchedTokens          -> expert output (format below)
    combine    expert output + handle    -> [T, H] bf16, sum over the token's kept slots of w * expert(x)

Two activation formats, as in vLLM's ``modular_kernel`` (``FusedMoEActivationFormat``):

* :attr:`ExpertsFormat.STANDARD` -- one received row per (source token, destination rank):
  ``hidden [N, H] bf16``, ``local_ids [N, k] int32`` (the token's slots on *this* rank, as local
  slot indices in ``[0, L)``, ``-1`` for slots elsewhere or empty) and ``weights [N, k] float32``.
  The experts stage applies the weights and sums the token's local slots: output ``[N, H] bf16``.
  Combine only *adds* the partial sums coming back from every rank (DeepEP normal mode; the
  NCCL all-to-all).
* :attr:`ExpertsFormat.BATCHED` -- expert-major: ``hidden [L, M, H] bf16`` with
  ``expert_counts [L] int32`` valid rows per local expert (rows ``>= count`` are garbage).
  The experts stage returns ``[L, M, H] bf16`` unweighted; combine applies the weights
  (DeepEP low-latency mode).

A token whose every kept slot lives on its own rank is never sent to another rank; a slot with
id ``-1`` goes nowhere; a token with several slots on one rank is sent there once.

Every dispatcher keeps, per call, :class:`DispatchStats` (rows to each destination rank) computed
on device from the ids alone, so tests and benchmarks can count what crosses the network.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ExpertsFormat",
    "DispatchedTokens",
    "DispatchStats",
    "Dispatcher",
    "DispatchConfigError",
    "rank_membership",
    "local_slot_ids",
]


class DispatchConfigError(ValueError):
    """A dispatch backend cannot serve the requested configuration (message names the flag)."""


class ExpertsFormat(enum.Enum):
    """Layout of the rows the experts stage receives (see the module docstring)."""

    STANDARD = "standard"
    BATCHED = "batched"


@dataclass
class DispatchedTokens:
    """What one rank received from all ranks (the experts stage's input).

    Attributes:
        format: :class:`ExpertsFormat` of ``hidden``.
        hidden: ``[N, H] bf16`` (STANDARD) or ``[L, M, H] bf16`` (BATCHED).
        local_ids: ``[N, k] int32`` local slot index in ``[0, L)`` or ``-1`` (STANDARD); ``None`` (BATCHED).
        weights: ``[N, k] float32`` gate weight of each local slot, 0 where ``local_ids == -1``
            (STANDARD); ``None`` (BATCHED: combine applies them).
        expert_counts: ``[L] int32`` valid rows per local expert (BATCHED); ``None`` (STANDARD).
        max_pairs: BATCHED: a static upper bound on ``sum(expert_counts)`` (bounds the experts'
            tile grid; e.g. ``R * max_tokens_per_rank * k``); ``None`` = ``L * M``.
    """

    format: ExpertsFormat
    hidden: torch.Tensor
    local_ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None
    max_pairs: int | None = None


@dataclass
class DispatchStats:
    """Device-side counters of the last dispatch (no host sync to produce them).

    Attributes:
        rows_to_rank: ``[R] int64`` distinct tokens this rank sent to each destination rank
            (its own entry is a local copy, never on the network).
        wire_rows_to_rank: ``[R] int64`` rows the backend actually moved per destination
            (equal to ``rows_to_rank`` for exact-size backends; the fixed capacity for padded ones).
        hidden_bytes_per_row: bytes of one hidden row (``H * 2`` for bf16).
    """

    rows_to_rank: torch.Tensor
    wire_rows_to_rank: torch.Tensor
    hidden_bytes_per_row: int

    def remote_rows(self, rank: int) -> torch.Tensor:
        """0-d int64: rows sent to other ranks (the network traffic of dispatch, in tokens)."""
        mask = torch.ones_like(self.rows_to_rank, dtype=torch.bool)
        mask[rank] = False
        return self.rows_to_rank[mask].sum()

    def remote_wire_rows(self, rank: int) -> torch.Tensor:
        """0-d int64: rows the backend moved to other ranks (padding included)."""
        mask = torch.ones_like(self.wire_rows_to_rank, dtype=torch.bool)
        mask[rank] = False
        return self.wire_rows_to_rank[mask].sum()


def rank_membership(physical_ids: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """``[T, R] bool``: whether token ``t`` has at least one kept slot on rank ``r``.

    Args:
        physical_ids: ``[T, k]`` int physical slot ids, ``-1`` = empty slot.
        num_ranks: ``R``. slots_per_rank: ``L = P // R``.
    """
    T = physical_ids.shape[0]
    ids = physical_ids.long()
    valid = ids >= 0
    dest = torch.where(valid, ids // slots_per_rank, torch.full_like(ids, num_ranks))
    member = torch.zeros(T, num_ranks + 1, dtype=torch.bool, device=ids.device)
    member.scatter_(1, dest, True)
    return member[:, :num_ranks]


def local_slot_ids(physical_ids: torch.Tensor, rank: int, slots_per_rank: int) -> torch.Tensor:
    """``[T, k] int32``: each slot's local index on ``rank`` (``p - rank * L``), ``-1`` elsewhere/empty."""
    ids = physical_ids.long()
    lo = rank * slots_per_rank
    here = (ids >= lo) & (ids < lo + slots_per_rank)
    return torch.where(here, ids - lo, torch.full_like(ids, -1)).to(torch.int32)


class Dispatcher(ABC):
    """A token all-to-all for one EP group and one layer shape.

    Subclasses are built once (buffers, communicators) and then called per layer and step.

    Attributes:
        name: backend name printed in reports (``"nccl-padded"``, ``"deepep-normal"``, ...).
        format: the :class:`ExpertsFormat` ``dispatch`` returns.
        rank / num_ranks / slots_per_rank: this rank, ``R`` and ``L``.
        graph_capturable: whether dispatch + combine can be captured in a CUDA graph.
        last_stats: :class:`DispatchStats` of the last dispatch (or None before the first).
        reason: one line: why this backend runs (printed once by the layer).
        fallback: ``None``, or one line saying which backend / mode was asked for (or preferred)
            and why another one runs (the layer logs it as a warning).
    """

    name: str = "abstract"
    format: ExpertsFormat = ExpertsFormat.STANDARD
    graph_capturable: bool = False

    def __init__(self, rank: int, num_ranks: int, num_physical: int, hidden: int, top_k: int) -> None:
        if num_physical % num_ranks:
            raise DispatchConfigError(f"--ep-size: {num_physical} physical experts do not split over {num_ranks} ranks")
        self.rank = rank
        self.num_ranks = num_ranks
        self.num_physical = num_physical
        self.slots_per_rank = num_physical // num_ranks
        self.hidden = hidden
        self.top_k = top_k
        self.last_stats: DispatchStats | None = None
        self.reason: str = ""
        self.fallback: str | None = None

    @abstractmethod
    def dispatch(self, hidden: torch.Tensor, physical_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> tuple[DispatchedTokens, Any]:
        """Send each token to the ranks that hold its kept experts.

        Args:
            hidden: ``[T, H] bf16`` this rank's tokens (``T`` may differ between ranks unless the
                backend says otherwise; padded tokens carry all ``-1`` ids).
            physical_ids: ``[T, k] int32`` physical slot per kept slot, ``-1`` = nothing.
            topk_weights: ``[T, k] float32``, 0 where the id is ``-1``.

        Returns:
            ``(DispatchedTokens, handle)``; the handle is opaque and goes to :meth:`combine`.
        """

    @abstractmethod
    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        """Bring the expert outputs back to the tokens' ranks and reduce them.

        Args:
            expert_out: STANDARD ``[N, H] bf16`` (already weighted and summed over local slots) or
                BATCHED ``[L, M, H] bf16`` (unweighted).
            handle: what :meth:`dispatch` returned.

        Returns:
            ``[T, H] bf16``: ``sum_j w[t, j] * expert_{id[t, j]}(hidden[t])`` for this rank's tokens.
        """

    def _record_stats(self, physical_ids: torch.Tensor, wire_rows: torch.Tensor | None = None) -> None:
        member = rank_membership(physical_ids, self.num_ranks, self.slots_per_rank)
        rows = member.sum(dim=0).to(torch.int64)
        self.last_stats = DispatchStats(rows, rows if wire_rows is None else wire_rows, self.hidden * 2)

    def close(self) -> None:
        """Release communication buffers (no-op by default)."""
