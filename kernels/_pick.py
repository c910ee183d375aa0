"""Triton single-program pickers: budget resolution and the budgeted choice of experts.

No sort: an expert's position in an order is counted by comparing its packed key against the
program's keys re-read in chunks from a scratch row. All of them work on one ``[BLOCK_E]`` vector of aggregated mass and packed warm/union counts
(``flags = warm_count + 65536 * topk_count`` per expert) held by one program, and mirror
:mod:`sglang_xshare.select.common` (``priority`` / ``resolve_budget`` / ``greedy_pick``) and
:mod:`sglang_xshare.select.policies.xshare_ep` exactly, ties included.

Budget modes (``MODE`` constexpr): 0 = count (``b_count``), 1 = fraction (``ceil(n * f - eps)``
in float64, ``f`` and ``eps`` passed as their IEEE-754 bit patterns so no rounding to fp32
happens), 2 = mass (``thr = (tot * X) * (1 - 1e-6)`` in fp32, as the reference's tensor ops).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._core import pack, unpack_key


@triton.jit
def order_rank(packed, val, cols, pk_ptr, val_ptr, WANT_CUM: tl.constexpr, CH: tl.constexpr):
    """Position of every expert in the descending order of ``packed`` (no sort).

    ``rank[e] = #{f : packed[f] > packed[e]}`` by comparing against ``CH``-wide chunks of the
    keys re-read from the program's scratch row ``pk_ptr [BLOCK_E] int64``; with ``WANT_CUM``
    also ``cum[e] = sum of val[f] over packed[f] >= packed[e]`` (the reference's cumulative sum
    at e's position; ``val_ptr [BLOCK_E] fp32`` scratch). Keys are distinct (they carry the id),
    so ``rank`` is a permutation of ``0..BLOCK_E-1``.
    """
    tl.debug_barrier()  # earlier readers of the scratch row are done
    tl.store(pk_ptr + cols, packed)
    if WANT_CUM:
        tl.store(val_ptr + cols, val)
    tl.debug_barrier()
    ch = tl.arange(0, CH)
    rank = tl.zeros(cols.shape, dtype=tl.int32)
    cum = tl.zeros(cols.shape, dtype=tl.float32)
    for f0 in tl.static_range(0, cols.shape[0], CH):
        pf = tl.load(pk_ptr + f0 + ch, cache_modifier=".cg")
        gt = pf[None, :] > packed[:, None]
        rank += tl.sum(gt.to(tl.int32), axis=1)
        if WANT_CUM:
            vf = tl.load(val_ptr + f0 + ch, cache_modifier=".cg")
            cum += tl.sum(tl.where(gt | (pf[None, :] == packed[:, None]), vf[None, :], 0.0), axis=1)
    return rank, cum


@triton.jit
def budget_order(mass, flags, cols, E, tot, pk_ptr, val_ptr, MODE: tl.constexpr, b_count, b_frac_bits,
                 b_eps_bits, b_mass, b_mass_c, CH: tl.constexpr):
    """Priority keys, each expert's position in their stable descending order, and the budget.

    Args:
        mass: ``[BLOCK_E] float32`` aggregated mass; flags: ``[BLOCK_E] int32`` packed counts;
        cols: ``arange(BLOCK_E)``; tot: fp32 mass the ``mass`` mode is a fraction of;
        pk_ptr / val_ptr: this program's ``[BLOCK_E]`` int64 / fp32 scratch rows.

    Returns:
        ``key [BLOCK_E] fp32`` (+inf warm, mass, -inf never), ``packed [BLOCK_E] int64``
        (also left in ``pk_ptr``), ``rank [BLOCK_E] int32`` (position in the order),
        ``m_eff`` (int32 scalar, ``max(m, |warm|)``), ``n_warm``, ``n_pick``.
    """
    cmask = cols < E
    warm = ((flags & 65535) > 0) & cmask
    union = ((flags >> 16) > 0) & cmask
    key = tl.where(warm, float("inf"), tl.where(mass > 0.0, mass, float("-inf")))
    pickable = (key > float("-inf")) & cmask
    packed = pack(key, cols, cmask)
    rank, cum = order_rank(packed, tl.where(pickable, mass, 0.0), cols, pk_ptr, val_ptr, MODE == 2, CH)
    n_warm = tl.sum(warm.to(tl.int32), axis=0)
    n_pick = tl.sum(pickable.to(tl.int32), axis=0)
    if MODE == 0:
        m = n_warm * 0 + b_count
    elif MODE == 1:
        n_union = tl.sum(union.to(tl.int32), axis=0)
        f = b_frac_bits.to(tl.float64, bitcast=True)
        eps = b_eps_bits.to(tl.float64, bitcast=True)
        m = tl.ceil(n_union.to(tl.float64) * f - eps).to(tl.int32)
    else:
        thr = (tot * b_mass) * b_mass_c
        need = tl.sum((cmask & (cum < thr)).to(tl.int32), axis=0) + 1
        m = tl.minimum(need, n_pick)
    m_eff = tl.maximum(m, n_warm)
    return key, packed, rank, m_eff, n_warm, n_pick


@triton.jit
def greedy_chosen(key, rank, m_eff, cols, E):
    """``[BLOCK_E] int1``: the first ``m_eff`` experts of the order that have a finite key."""
    return (rank < m_eff) & (key > float("-inf")) & (cols < E)


@triton.jit
def ep_partitioned(key, packed, cols, E, m_eff, pk_ptr, rank_ptr, copy_ptr, out_ptr, R, EPR,
                   FILL: tl.constexpr, CH: tl.constexpr):
    """Exact per-rank greedy without replicas; writes ``out[e]`` = physical slot or -1.

    An expert's position inside its EP rank is the number of same-rank experts with a larger
    packed key (read back in chunks from ``pk_ptr``, left there by :func:`budget_order`); warm
    experts lead each rank, so a rank's warm load is its count of warm experts.
    """
    cmask = cols < E
    rank_e = tl.load(rank_ptr + cols, mask=cmask, other=-2)
    ch = tl.arange(0, CH)
    pos_r = tl.zeros(cols.shape, dtype=tl.int32)
    wload = tl.zeros(cols.shape, dtype=tl.int32)
    for f0 in tl.static_range(0, cols.shape[0], CH):
        fi = f0 + ch
        pf = tl.load(pk_ptr + fi, cache_modifier=".cg")
        rf = tl.load(rank_ptr + fi, mask=fi < E, other=-1)
        same = rf[None, :] == rank_e[:, None]
        pos_r += tl.sum((same & (pf[None, :] > packed[:, None])).to(tl.int32), axis=1)
        wf = (unpack_key(pf) == float("inf")) & (fi < E)
        wload += tl.sum((same & wf[None, :]).to(tl.int32), axis=1)
    warm = key == float("inf")
    b = (m_eff + R - 1) // R
    if FILL:
        capv = tl.maximum(b, tl.max(tl.where(cmask, wload, 0), axis=0))
    else:
        capv = b
    take = cmask & (key > float("-inf")) & (warm | (pos_r < capv))
    cp = tl.load(copy_ptr + cols, mask=cmask, other=-1)
    tl.store(out_ptr + cols, tl.where(take, cp, -1), mask=cmask)


@triton.jit
def _place(e, load, cap, USE_CAP: tl.constexpr, copies_ptr, slot_rank_ptr, out_ptr,
           BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Put expert ``e`` on its least-loaded copy (ties: lower slot) with room; returns (load, took)."""
    arC = tl.arange(0, BLOCK_C)
    arR = tl.arange(0, BLOCK_R)
    slots = tl.load(copies_ptr + e * BLOCK_C + arC)
    ranks = tl.load(slot_rank_ptr + e * BLOCK_C + arC)
    onehot = ranks[:, None] == arR[None, :]
    lr = tl.sum(tl.where(onehot, load[None, :], 0), axis=1)
    ok = slots >= 0
    if USE_CAP:
        cr = tl.sum(tl.where(onehot, cap[None, :], 0), axis=1)
        ok = ok & (lr < cr)
    big = 1 << 30
    cost = tl.where(ok, lr * BLOCK_C + arC, big)
    best = tl.min(cost, axis=0)
    take = best < big
    j = best % BLOCK_C
    slot_j = tl.sum(tl.where(arC == j, slots, 0), axis=0)
    rank_j = tl.sum(tl.where(arC == j, ranks, 0), axis=0)
    load = load + tl.where((arR == rank_j) & take, 1, 0)
    tl.store(out_ptr + e, slot_j, mask=take)
    return load, take.to(tl.int32)


@triton.jit
def ep_replicated(rank, cols, E, m_eff, n_warm, n_pick, order_ptr, copies_ptr, slot_rank_ptr, out_ptr, R,
                  FILL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sequential least-loaded greedy with replicas (the reference's ``pick_replicated``).

    Warm experts (the first ``n_warm`` of the order) are placed without a cap; then the
    per-rank capacity is fixed and the pickable rest are tried in order until every rank is
    full. ``rank [BLOCK_E]`` is each expert's position in the order (:func:`budget_order`).
    Writes ``out[e]`` = chosen physical slot or -1.
    """
    cmask = cols < E
    tl.store(order_ptr + rank, cols, mask=cmask)
    tl.store(out_ptr + cols, tl.full(cols.shape, -1, tl.int32), mask=cmask)
    tl.debug_barrier()
    arR = tl.arange(0, BLOCK_R)
    load = tl.zeros([BLOCK_R], dtype=tl.int32)
    for i in range(0, n_warm):
        e = tl.load(order_ptr + i)
        load, _t = _place(e, load, load, False, copies_ptr, slot_rank_ptr, out_ptr, BLOCK_C, BLOCK_R)
    b = (m_eff + R - 1) // R
    if FILL:
        cap = tl.zeros([BLOCK_R], dtype=tl.int32) + tl.maximum(tl.max(load, axis=0), b)
    else:
        cap = tl.maximum(load, b)
    room = tl.sum(tl.where(arR < R, cap - load, 0), axis=0)
    i = n_warm
    while (i < n_pick) & (room > 0):
        e = tl.load(order_ptr + i)
        load, took = _place(e, load, cap, True, copies_ptr, slot_rank_ptr, out_ptr, BLOCK_C, BLOCK_R)
        room = room - took
        i = i + 1
