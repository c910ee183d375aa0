"""xshare_ep's greedy against an exact ILP (scipy milp) and against its definition written out
in plain Python: gap 0 without replicas (with and without the hard cap), a bounded gap with
replicas, the exact sequential greedy (copies included) with replicas, and the hard cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang_xshare.placement import Placement
from sglang_xshare.select.oracle import solve_xshare_ep
from sglang_xshare.select.policies.xshare_ep import pick, pick_partitioned, pick_replicated


def instance(seed: int, E: int, warm_frac: float = 0.25):
    rng = np.random.default_rng(seed)
    mass = rng.gamma(0.6, size=E) * (rng.random(E) < 0.8)
    warm = rng.random(E) < warm_frac
    return torch.tensor(mass, dtype=torch.float32), torch.tensor(warm)


def peak(chosen: torch.Tensor, copy: torch.Tensor, placement: Placement) -> int:
    ranks = copy[chosen] // placement.experts_per_rank
    return int(torch.bincount(ranks, minlength=placement.num_ranks).max()) if ranks.numel() else 0


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("R,b", [(2, 3), (4, 2), (4, 1)])
@pytest.mark.parametrize("fill", [True, False])
def test_partitioned_greedy_is_optimal(seed, R, b, fill):
    E = 16
    mass, warm = instance(seed, E)
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(seed))  # EPLB-style permuted map
    placement = Placement.from_map(E, R, perm)
    chosen, copy = pick_partitioned(mass, warm, torch.tensor(b), placement, fill)
    assert torch.all(chosen[warm])
    got = float(mass[chosen].sum())
    if fill:
        opt = solve_xshare_ep(mass.numpy(), warm.numpy(), b, placement)
        assert peak(chosen, copy, placement) <= opt.capacity
        assert got == pytest.approx(opt.mass, abs=1e-5)
    # the sequential (replica) path agrees with the vectorised one on replica-free placements
    c2, cp2 = pick_replicated(mass, warm, torch.tensor(b), placement, fill)
    assert torch.equal(c2, chosen) and torch.equal(cp2[c2], copy[chosen])


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("R,m", [(2, 5), (4, 6), (4, 3)])
def test_partitioned_hard_cap_is_optimal(seed, R, m):
    """With the hard cap the feasible sets are a truncated partition matroid: still exact."""
    E = 16
    mass, warm = instance(seed, E)
    placement = Placement.from_map(E, R, torch.randperm(E, generator=torch.Generator().manual_seed(seed)))
    chosen, copy = pick(mass, warm, torch.tensor(m), placement, True, True)
    m_eff = max(m, int(warm.sum()))
    assert int(chosen.sum()) <= m_eff and torch.all(chosen[warm])
    opt = solve_xshare_ep(mass.numpy(), warm.numpy(), -(-m_eff // R), placement, max_experts=m_eff)
    assert peak(chosen, copy, placement) <= opt.capacity
    assert float(mass[chosen].sum()) == pytest.approx(opt.mass, abs=1e-5)


def replica_instance(seed: int, E: int, R: int, redundant: int):
    """bench/ilp_gap.py's instances: gamma masses (20 % zero), 25 % warm, a permuted map plus
    ``redundant`` extra copies of distinct experts."""
    rng = np.random.default_rng(seed)
    mass = rng.gamma(0.6, size=E) * (rng.random(E) < 0.8)
    warm = rng.random(E) < 0.25
    p2l = np.concatenate([rng.permutation(E), rng.choice(E, redundant, replace=False)])
    return mass, warm, Placement.from_map(E, R, torch.tensor(p2l))


# (E, R, redundant, m): what the current greedy measures on seeds 0..39 (fill_to_peak) --
# mean gap (positive part) 0.020-0.034, max 0.12-0.30, ILP optimum on 10-22 of 40 (hard cap:
# mean 0.002-0.014, max 0.08-0.26, optimum on 22-35); a greedy that keeps only the warm-up
# experts has mean gap ~0.7. The bounds sit just above the measured values.
FAMILIES = [(16, 4, 4, 6), (32, 8, 8, 20), (24, 4, 8, 10)]
GAP_BOUNDS = {False: (0.04, 0.31, 10), True: (0.02, 0.27, 22)}  # mean gap, max gap, optimal instances


@pytest.mark.parametrize("hard", [False, True], ids=["fill", "hard_cap"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: "E{}_R{}_red{}_m{}".format(*f))
def test_replicated_greedy_gap_is_bounded(family, hard):
    """The replica greedy against the ILP at the ILP's capacity ``max(b, least warm peak)`` (and,
    with the hard cap, at most ``m_eff`` experts), over all 40 instances: its peak is at most one
    above the ILP's, and its mass gap ``(opt - got) / opt`` is bounded on average and at worst."""
    E, R, red, m = family
    gaps, optimal = [], 0
    for seed in range(40):
        mass, warm, placement = replica_instance(seed, E, R, red)
        chosen, copy = pick(torch.tensor(mass, dtype=torch.float32), torch.tensor(warm), torch.tensor(m), placement,
                            True, hard)
        m_eff = max(m, int(warm.sum()))
        assert torch.all(chosen[torch.tensor(warm)]), "a warm expert was dropped"
        assert torch.all(placement.physical_to_logical[copy[chosen]] == torch.nonzero(chosen).flatten())
        if hard:
            assert int(chosen.sum()) <= m_eff
        opt = solve_xshare_ep(mass, warm, -(-m_eff // R), placement, m_eff if hard else None)
        excess = peak(chosen, copy, placement) - opt.capacity
        assert excess <= 1, f"seed {seed}: peak {excess} above the ILP's"
        gap = (opt.mass - float(mass[chosen.numpy()].sum())) / opt.mass
        gaps.append(max(gap, 0.0))
        optimal += gap < 1e-6 and excess <= 0
    mean_bound, max_bound, min_optimal = GAP_BOUNDS[hard]
    assert np.mean(gaps) <= mean_bound and max(gaps) <= max_bound, (np.mean(gaps), max(gaps))
    assert optimal >= min_optimal


def greedy_by_definition(mass: list[int], warm: list[bool], m: int, p2l: list[int], R: int, fill: bool,
                         hard: bool) -> list[int]:
    """xshare_ep's replica greedy written out with Python loops (module docstring of
    ``xshare_ep``): the copy slot of each chosen expert, -1 for the others."""
    E, P = len(mass), len(p2l)
    L = P // R
    key = {e: (float("inf") if warm[e] else float(mass[e]) if mass[e] > 0 else float("-inf")) for e in range(E)}
    order = sorted(range(E), key=lambda e: (-key[e], e))
    n_warm = sum(warm)
    m_eff = max(m, n_warm)
    b = -(-m_eff // R)
    load, copy = [0] * R, [-1] * E

    def place(e: int, cap: list[int] | None) -> bool:
        options = [(load[p // L], p) for p in range(P) if p2l[p] == e and (cap is None or load[p // L] < cap[p // L])]
        if not options:
            return False
        _, p = min(options)
        copy[e] = p
        load[p // L] += 1
        return True

    for e in order:
        if warm[e]:
            place(e, None)
    cap = [max(b, max(load))] * R if fill else [max(b, x) for x in load]
    left = m_eff - n_warm if hard else E
    for e in order:
        if not warm[e] and key[e] > float("-inf") and left > 0:
            left -= place(e, cap)
    return copy


@pytest.mark.parametrize("seed", range(30))
def test_replicated_greedy_matches_its_definition(seed):
    """Chosen experts *and* copies equal the loop-by-loop definition, ties included (few mass
    levels), for random maps with replicas, both capacity rules and the hard cap."""
    rng = np.random.default_rng(100 + seed)
    E, R = int(rng.choice([8, 12, 16])), int(rng.choice([2, 4]))
    red = int(rng.integers(1, 3)) * R
    mass = (rng.integers(0, 4, size=E) * (1 << 36)).astype(np.int64)  # fixed-point masses, many ties
    warm = rng.random(E) < 0.3
    p2l = np.concatenate([rng.permutation(E), rng.integers(0, E, size=red)])
    rng.shuffle(p2l)
    placement = Placement.from_map(E, R, torch.tensor(p2l))
    for fill in (True, False):
        for hard in (False, True):
            m = int(rng.integers(1, E))
            chosen, copy = pick(torch.tensor(mass), torch.tensor(warm), torch.tensor(m), placement, fill, hard)
            want = greedy_by_definition(mass.tolist(), warm.tolist(), m, p2l.tolist(), R, fill, hard)
            got = torch.where(chosen, copy, torch.full_like(copy, -1)).tolist()
            assert got == want, (fill, hard, m)
