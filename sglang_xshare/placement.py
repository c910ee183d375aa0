"""Where experts live: logical experts, their physical copies, and the EP ranks that hold them.

SGLang lays physical experts out contiguously: with ``P`` physical slots over ``R`` EP ranks,
physical slot ``p`` lives on rank ``p // (P // R)``. EPLB with redundant experts makes
``P = E + num_redundant`` and maps each physical slot to a logical expert
(``physical_to_logical_map``); a logical expert may then have copies on several ranks.

Pure tensor parallelism (every rank holds a slice of every expert) is ``R = 1``: every rank
reads every activated expert, so the per-rank load *is* the number of distinct experts.
A TP x EP hybrid (SGLang ``--tp-size T --ep-size R``) balances over the ``R`` EP groups;
the ``T / R`` TP ranks inside a group share that group's load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import XShareConfigError

__all__ = ["Placement", "PlacementTables", "placement_tables", "refresh_tables_"]


@dataclass(frozen=True)
class Placement:
    """Expert placement over EP ranks.

    Attributes:
        num_experts: logical experts ``E``.
        num_ranks: EP ranks (or EP groups of a TP x EP hybrid) ``R``.
        physical_to_logical: ``[P] int64`` logical expert of each physical slot; ``P % R == 0``
            and every logical expert has at least one copy.
    """

    num_experts: int
    num_ranks: int
    physical_to_logical: torch.Tensor
    #: device tables per device (:func:`placement_tables`); not a field of the placement's value
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- constructors -------------------------------------------------------------------
    @staticmethod
    def expert_parallel(num_experts: int, ep_size: int) -> "Placement":
        """Pure EP: ``E / R`` experts per rank, expert ``e`` on rank ``e // (E / R)``."""
        if ep_size < 1:
            raise XShareConfigError("--ep-size", f"must be >= 1, got {ep_size}")
        if num_experts % ep_size:
            raise XShareConfigError(
                "--ep-size",
                f"{num_experts} experts are not divisible by EP size {ep_size}; pass a placement map "
                "(physical_to_logical) with redundant experts instead",
            )
        return Placement(num_experts, ep_size, torch.arange(num_experts, dtype=torch.int64))

    @staticmethod
    def tensor_parallel(num_experts: int) -> "Placement":
        """Pure TP: one balance group; the load is the number of distinct experts."""
        return Placement.expert_parallel(num_experts, 1)

    @staticmethod
    def from_sglang(num_experts: int, tp_size: int, ep_size: int,
                    physical_to_logical: Sequence[int] | torch.Tensor | None = None) -> "Placement":
        """The placement SGLang configures for ``--tp-size`` / ``--ep-size`` (and EPLB's map).

        ``ep_size`` must divide ``tp_size`` (SGLang's rule: ``moe_tp_size = tp_size // ep_size``).
        """
        if ep_size < 1 or tp_size < 1 or tp_size % ep_size:
            raise XShareConfigError("--ep-size", f"EP size {ep_size} must divide TP size {tp_size}")
        if physical_to_logical is None:
            return Placement.expert_parallel(num_experts, ep_size)
        return Placement.from_map(num_experts, ep_size, physical_to_logical)

    @staticmethod
    def from_map(num_experts: int, num_ranks: int, physical_to_logical: Sequence[int] | torch.Tensor) -> "Placement":
        """A placement with redundant experts, from a physical-slot -> logical-expert map."""
        p2l = torch.as_tensor(physical_to_logical, dtype=torch.int64).flatten().cpu()
        P = p2l.numel()
        if num_ranks < 1 or P % num_ranks:
            raise XShareConfigError("--ep-size", f"{P} physical experts are not divisible by EP size {num_ranks}")
        if P and (p2l.min() < 0 or p2l.max() >= num_experts):
            raise XShareConfigError("physical_to_logical", f"entries must be logical experts in [0, {num_experts})")
        missing = torch.ones(num_experts, dtype=torch.bool)
        missing[p2l] = False
        if missing.any():
            raise XShareConfigError(
                "physical_to_logical", f"logical experts without a physical copy: {torch.nonzero(missing).flatten()[:8].tolist()}"
            )
        return Placement(num_experts, num_ranks, p2l)

    # ---- derived views ------------------------------------------------------------------
    @property
    def num_physical(self) -> int:
        """Physical expert slots ``P``."""
        return int(self.physical_to_logical.numel())

    @property
    def experts_per_rank(self) -> int:
        """Physical slots per rank ``P // R``."""
        return self.num_physical // self.num_ranks

    @property
    def has_replicas(self) -> bool:
        """Whether some logical expert has more than one physical copy."""
        return self.num_physical > self.num_experts

    def physical_rank(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[P] int64``: the EP rank of each physical slot."""
        return torch.arange(self.num_physical, device=device) // self.experts_per_rank

    def logical_to_rank_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[E, R] bool``: whether logical expert ``e`` has a copy on rank ``r``."""
        m = torch.zeros(self.num_experts, self.num_ranks, dtype=torch.bool, device=device)
        m[self.physical_to_logical.to(device), self.physical_rank(device)] = True
        return m

    def logical_to_primary_physical(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[E] int64``: the lowest physical slot of each logical expert."""
        P = self.num_physical
        out = torch.full((self.num_experts,), P, dtype=torch.int64, device=device)
        out.scatter_reduce_(0, self.physical_to_logical.to(device), torch.arange(P, device=device), "amin")
        return out

    def refresh_tables_(self) -> None:
        """Recompute every device table of this placement (:func:`refresh_tables_`) from the
        current ``physical_to_logical`` -- call after EPLB rewrote that tensor in place."""
        for tables in self._tables.values():
            refresh_tables_(tables)

    def __eq__(self, other: object) -> bool:  # tensors do not compare as dataclass fields
        return (
            isinstance(other, Placement)
            and self.num_experts == other.num_experts
            and self.num_ranks == other.num_ranks
            and torch.equal(self.physical_to_logical, other.physical_to_logical)
        )

    def __hash__(self) -> int:
        return hash((self.num_experts, self.num_ranks, tuple(self.physical_to_logical.tolist())))


def _pow2(n: int) -> int:
    return 1 << max(1, (int(n) - 1).bit_length())


@dataclass(eq=False)
class PlacementTables:
    """Device tables of a placement, shared by the ``xshare_ep`` reference and its Triton kernel.

    Built once per placement and device by :func:`placement_tables` with device ops only (no
    host sync, static shapes), and refreshed *in place* by :func:`refresh_tables_` (the tensors
    keep their storage, so CUDA graphs and compiled graphs that captured them read the new map).

    Attributes:
        placement: the placement (its ``physical_to_logical`` is what a refresh reads).
        slot_expert: ``[block_p] int32`` logical expert of each physical slot, ``-1`` past ``P``
            (a snapshot of ``physical_to_logical``).
        slot_rank: ``[block_p] int32`` EP rank of each slot (``slot // (P / R)``; 0 past ``P``; fixed).
        copy: ``[E] int32`` lowest physical slot of each logical expert (its only one without replicas).
        rank: ``[E] int32`` rank of ``copy``.
    """

    placement: Placement
    slot_expert: torch.Tensor
    slot_rank: torch.Tensor
    copy: torch.Tensor
    rank: torch.Tensor

    @property
    def num_ranks(self) -> int:
        return self.placement.num_ranks

    @property
    def replicated(self) -> bool:
        return self.placement.has_replicas

    @property
    def block_p(self) -> int:
        """Physical slots padded to a power of two (>= 2): the kernel's slot vector."""
        return int(self.slot_expert.numel())

    @property
    def block_r(self) -> int:
        """Ranks padded to a power of two (>= 2)."""
        return _pow2(self.placement.num_ranks)


def placement_tables(placement: Placement, device: torch.device | str) -> PlacementTables:
    """The :class:`PlacementTables` of ``placement`` on ``device``, built on first use (cached on
    the placement object) with device ops only: no ``.cpu()`` / ``.tolist()`` / ``.item()``."""
    device = torch.device(device)
    key = str(device)
    tables = placement._tables.get(key)
    if tables is None:
        P, E = placement.num_physical, placement.num_experts
        bp = _pow2(P)
        slot_rank = torch.zeros(bp, dtype=torch.int32, device=device)
        slot_rank[:P] = (torch.arange(P, device=device) // placement.experts_per_rank).to(torch.int32)
        tables = PlacementTables(
            placement=placement,
            slot_expert=torch.full((bp,), -1, dtype=torch.int32, device=device),
            slot_rank=slot_rank,
            copy=torch.zeros(E, dtype=torch.int32, device=device),
            rank=torch.zeros(E, dtype=torch.int32, device=device),
        )
        refresh_tables_(tables)
        placement._tables[key] = tables
    return tables


def refresh_tables_(tables: PlacementTables) -> PlacementTables:
    """Recompute ``tables`` in place from ``tables.placement.physical_to_logical`` (its current
    contents: EPLB rewrites SGLang's map in place on a rebalance).

    Device ops only, static shapes, no allocation of persistent memory: safe inside a CUDA graph
    capture and cheap enough to run once per decode step. No host sync when the map lives on the
    tables' device (SGLang's ``physical_to_logical_map`` does). Every logical expert must keep at
    least one physical copy (EPLB guarantees it). Returns ``tables``.
    """
    pl = tables.placement
    P, E, L = pl.num_physical, pl.num_experts, pl.experts_per_rank
    dev = tables.slot_expert.device
    p2l = pl.physical_to_logical.to(device=dev, dtype=torch.int64, non_blocking=True)
    tables.slot_expert[:P].copy_(p2l)
    slots = torch.arange(P, device=dev)
    primary = torch.full((E,), P, dtype=torch.int64, device=dev).scatter_reduce_(0, p2l, slots, "amin")
    tables.copy.copy_(primary)
    tables.rank.copy_(primary // L)
    return tables
