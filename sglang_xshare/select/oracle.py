"""Exact ILP oracle for ``xshare_ep`` (scipy ``milp``; tests and ``bench/ilp_gap.py`` only).

Problem (placement with ``R`` ranks, physical slots ``p`` of logical experts ``l(p)``):

* stage 1 -- the least possible peak of the warm-up experts alone:
  ``min z  s.t.  sum_{p: l(p)=e} y_p = 1 (e warm),  y_p = 0 (e not warm),  sum_{p on r} y_p <= z``;
* stage 2 -- with capacity ``c = max(b, z*)`` per rank (``fill_to_peak``), the most mass:
  ``max sum_p mass[l(p)] y_p  s.t.  sum_{p: l(p)=e} y_p = 1 (warm), <= 1 (others),
  sum_{p on r} y_p <= c,  y binary`` -- and with ``max_experts`` (``xshare_ep``'s hard cap)
  also ``sum_p y_p <= max_experts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..placement import Placement

__all__ = ["EpOptimum", "solve_xshare_ep", "least_peak"]


@dataclass(frozen=True)
class EpOptimum:
    """The ILP's answer: warm-up peak ``z*``, capacity used, optimal mass and chosen experts."""

    warm_peak: int
    capacity: int
    mass: float
    chosen: frozenset[int]


def _incidence(placement: Placement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``p2l [P]``, ``owner [E, P]`` (slot p holds expert e) and ``on_rank [R, P]`` (slot p is on rank r)."""
    p2l = placement.physical_to_logical.numpy()
    P = p2l.size
    owner = np.zeros((placement.num_experts, P))
    owner[p2l, np.arange(P)] = 1.0
    on_rank = np.zeros((placement.num_ranks, P))
    on_rank[np.arange(P) // placement.experts_per_rank, np.arange(P)] = 1.0
    return p2l, owner, on_rank


def _min_peak(owner: np.ndarray, on_rank: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              extra: list[tuple[np.ndarray, float, float]] = ()) -> int:
    """``min z`` over binary slot choices ``y``: ``lo <= owner y <= hi`` (copies per expert),
    ``on_rank y <= z``, and each ``(row, low, high)`` of ``extra`` as ``low <= row . y <= high``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    P = owner.shape[1]
    c = np.zeros(P + 1)
    c[-1] = 1.0
    cons = [LinearConstraint(np.hstack([owner, np.zeros((owner.shape[0], 1))]), lo, hi),
            LinearConstraint(np.hstack([on_rank, -np.ones((on_rank.shape[0], 1))]), -np.inf, 0.0)]
    cons += [LinearConstraint(np.append(row, 0.0)[None, :], low, high) for row, low, high in extra]
    r = milp(c, constraints=cons, integrality=np.ones(P + 1), bounds=Bounds(0, np.append(np.ones(P), P)))
    if not r.success:
        raise RuntimeError(f"least-peak ILP failed: {r.message}")
    return int(round(r.x[-1]))


def solve_xshare_ep(mass: np.ndarray, warm: np.ndarray, per_rank: int, placement: Placement,
                    max_experts: int | None = None) -> EpOptimum:
    """Solve both stages exactly. ``mass [E] float``, ``warm [E] bool``, ``per_rank`` = ``b``,
    ``max_experts``: at most this many chosen experts (``>= |warm|``) or ``None``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    p2l, owner, on_rank = _incidence(placement)
    P = p2l.size
    warm = np.asarray(warm, dtype=bool)
    lo = np.where(warm, 1.0, 0.0)
    z = _min_peak(owner, on_rank, lo, lo)  # stage 1: the warm experts alone
    cap = max(per_rank, z)

    # stage 2: maximise mass under capacity
    c2 = -np.asarray(mass, dtype=float)[p2l]
    ub_e = np.where(warm | (np.asarray(mass) > 0), 1.0, 0.0)
    cons = [LinearConstraint(owner, lo, ub_e), LinearConstraint(on_rank, -np.inf, float(cap))]
    if max_experts is not None:
        cons.append(LinearConstraint(np.ones((1, P)), -np.inf, float(max_experts)))
    r2 = milp(c2, constraints=cons, integrality=np.ones(P), bounds=Bounds(0, 1))
    if not r2.success:
        raise RuntimeError(f"stage-2 ILP failed: {r2.message}")
    y = np.round(r2.x).astype(bool)
    chosen = frozenset(int(e) for e in np.unique(p2l[y]))
    return EpOptimum(warm_peak=z, capacity=cap, mass=float(-r2.fun), chosen=chosen)


def least_peak(mass: np.ndarray, warm: np.ndarray, placement: Placement, max_experts: int,
               min_mass: float) -> int:
    """The least busiest-rank load of any feasible choice with every warm expert, at most
    ``max_experts`` experts (each on one of its copies) and at least ``min_mass`` mass -- a
    greedy answer with a larger peak is *dominated* (no more experts, no less mass, lower peak)."""
    p2l, owner, on_rank = _incidence(placement)
    warm = np.asarray(warm, dtype=bool)
    wanted = warm | (np.asarray(mass) > 0)
    # a hair below min_mass: the greedy's own set must stay feasible despite float rounding
    extra = [(np.ones(p2l.size), -np.inf, float(max_experts)),
             (np.asarray(mass, dtype=float)[p2l], min_mass * (1 - 1e-9), np.inf)]
    return _min_peak(owner, on_rank, np.where(warm, 1.0, 0.0), np.where(wanted, 1.0, 0.0), extra)
