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

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import XShareConfigError

__all__ = ["Placement"]


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

    def __eq__(self, other: object) -> bool:  # tensors do not compare as dataclass fields
        return (
            isinstance(other, Placement)
            and self.num_experts == other.num_experts
            and self.num_ranks == other.num_ranks
            and torch.equal(self.physical_to_logical, other.physical_to_logical)
        )

    def __hash__(self) -> int:
        return hash((self.num_experts, self.num_ranks, tuple(self.physical_to_logical.tolist())))
