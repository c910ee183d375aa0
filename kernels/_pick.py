"""Triton pickers: budget resolution and the budgeted choice of experts, in registers.

Every picker works on one program's ``[BLOCK_E]`` vectors -- the aggregated ``mass`` (int64
fixed-point units, ordered by their fp32 :func:`~._core.mass_key`) and packed counts ``flags``
(``warm_count + 65536 * topk_count`` per expert) -- and mirrors
:mod:`sglang_xshare.select.common` (``priority`` / ``resolve_budget`` / ``greedy_pick``) and
:mod:`sglang_xshare.select.policies.xshare_ep` exactly, ties included. Nothing goes through
memory but the read-only placement tables and one scratch row per program: an expert's
position in the priority order is the number of larger keys, counted by comparing the key
vector with the (compacted) pickable keys in chunks (:func:`pairwise`).

Budget modes (``MODE`` constexpr): 0 = count (``b_count``), 1 = fraction (``ceil(n * f - eps)``
in float64, ``f`` and ``eps`` passed as their IEEE-754 bit patterns so no rounding to fp32
happens), 2 = mass (exact int64 cumulative masses against the float64 threshold
``(tot * X) * (1 - 1e-6)``, :func:`~._core.mass_threshold`; ``X`` and the slack as bit patterns).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._core import SENT, mass_key, mass_threshold, pack, unpack_key, unpack_payload


@triton.jit
def priority_keys(mass, flags, cols, E):
    """The greedy's ordering of one group's experts.

    Args:
        mass: ``[BLOCK_E] int64`` aggregated mass; flags: ``[BLOCK_E] int32`` packed counts.

    Returns:
        ``warm`` / ``union`` / ``pickable`` ``[BLOCK_E] int1`` and ``packed [BLOCK_E] int64``
        (key +inf for warm experts, the mass key for the rest with mass > 0, -inf otherwise).
    """
    cmask = cols < E
    warm = ((flags & 65535) > 0) & cmask
    union = ((flags >> 16) > 0) & cmask
    key = tl.where(warm, float("inf"), tl.where(mass > 0, mass_key(mass), float("-inf")))
    pickable = (key > float("-inf")) & cmask
    return warm, union, pickable, pack(key, cols, cmask)


@triton.jit
def pairwise(packed, pickable, val, grp, pk_ptr, val_ptr, WANT_CUM: tl.constexpr, WANT_GRP: tl.constexpr,
             CH: tl.constexpr):
    """Order statistics of the keys ``packed [BLOCK_E] int64`` (distinct), for every expert ``e``.

    Only the ``pickable [BLOCK_E] int1`` experts are compared against (the others have key
    ``-inf`` or are padding: they outrank nobody), so with ``n`` pickable experts the work is
    ``BLOCK_E x n`` -- small in decode, where ``n`` is at most the union of the tokens' top-k.
    Returns ``[BLOCK_E]`` vectors (exact for pickable ``e``):

    * ``pos[e] = #{f : packed[f] > packed[e]}`` (e's position in the descending order; a
      non-pickable ``e`` gets ``n``);
    * ``cum[e] = sum of val[f] over packed[f] >= packed[e]`` (``WANT_CUM``; int64, exact: the
      reference's cumulative sum at e's position; ``val [BLOCK_E] int64``);
    * ``gpos[e] = #{f : grp[f] == grp[e], packed[f] > packed[e]}`` and ``gwarm[e] = #{f :
      grp[f] == grp[e], f warm}`` (``WANT_GRP``; ``grp [BLOCK_E] int32`` in ``[0, 65536)``, e.g.
      the EP rank; warm = key +inf).

    The pickable keys (carrying ``grp`` in their payload bits) and ``val`` are compacted once
    into this program's scratch row ``pk_ptr [BLOCK_E] int64`` / ``val_ptr [BLOCK_E] int64`` (a
    CTA barrier each side: L1-resident), then compared ``CH`` keys at a time (``[CH, BLOCK_E]``
    per step, a loop the compiler does not unroll), so no thread holds a square matrix.
    """
    BE: tl.constexpr = packed.shape[0]
    n = tl.sum(pickable.to(tl.int32), axis=0)
    slot = tl.cumsum(pickable.to(tl.int32), axis=0) - 1
    tl.debug_barrier()  # earlier readers of the scratch row are done
    if WANT_GRP:
        tl.store(pk_ptr + slot, packed | grp.to(tl.int64), mask=pickable)
    else:
        tl.store(pk_ptr + slot, packed, mask=pickable)
    if WANT_CUM:
        tl.store(val_ptr + slot, val, mask=pickable)
    tl.debug_barrier()
    ch = tl.arange(0, CH)
    pos = tl.zeros([BE], dtype=tl.int32)
    cum = tl.zeros([BE], dtype=tl.int64)
    gpos = tl.zeros([BE], dtype=tl.int32)
    gwarm = tl.zeros([BE], dtype=tl.int32)
    for f0 in range(0, n, CH):  # a runtime trip count: one [CH, BLOCK_E] step live at a time
        fm = f0 + ch < n
        pf = tl.load(pk_ptr + f0 + ch, mask=fm, other=SENT)
        if WANT_GRP:  # compare the keys without their payload
            gf = tl.where(fm, unpack_payload(pf), -1)
            pf = pf & ~65535
        # [CH, BLOCK_E] with the compared chunk on axis 0: each thread reduces its own rows
        gt = pf[:, None] > packed[None, :]
        pos += tl.sum(gt.to(tl.int32), axis=0)
        if WANT_CUM:
            vf = tl.load(val_ptr + f0 + ch, mask=fm, other=0)
            cum += tl.sum(tl.where(gt | (pf[:, None] == packed[None, :]), vf[:, None], 0), axis=0)
        if WANT_GRP:
            same = gf[:, None] == grp[None, :]
            gpos += tl.sum((same & gt).to(tl.int32), axis=0)
            wf = unpack_key(pf) == float("inf")
            gwarm += tl.sum((same & wf[:, None]).to(tl.int32), axis=0)
    return pos, cum, gpos, gwarm


@triton.jit
def resolve_m(MODE: tl.constexpr, union, pickable, cum, cmask, tot, b_count, b_frac_bits, b_eps_bits,
              b_mass, b_mass_c):
    """The budget ``m`` (int32 scalar) of :func:`sglang_xshare.select.common.resolve_budget`.

    ``cum`` is :func:`pairwise`'s exact int64 cumulative mass (read only in mass mode); ``tot``
    the int64 mass the ``mass`` mode is a fraction of (``b_mass`` / ``b_mass_c``: the bit
    patterns of ``X`` and ``1 - 1e-6``).
    """
    if MODE == 0:
        m = tl.sum(pickable.to(tl.int32), axis=0) * 0 + b_count
    elif MODE == 1:
        n_union = tl.sum(union.to(tl.int32), axis=0)
        f = b_frac_bits.to(tl.float64, bitcast=True)
        eps = b_eps_bits.to(tl.float64, bitcast=True)
        m = tl.ceil(n_union.to(tl.float64) * f - eps).to(tl.int32)
    else:
        thr = mass_threshold(tot, b_mass, b_mass_c)
        need = tl.sum((cmask & (cum.to(tl.float64) < thr)).to(tl.int32), axis=0) + 1
        m = tl.minimum(need, tl.sum(pickable.to(tl.int32), axis=0))
    return m


@triton.jit
def greedy_pick(mass, flags, cols, E, tot, pk_ptr, val_ptr, MODE: tl.constexpr, b_count, b_frac_bits, b_eps_bits,
                b_mass, b_mass_c, CH: tl.constexpr):
    """``xshare``: warm experts, then by descending mass up to ``max(m, |warm|)`` -> ``[BLOCK_E] int1``."""
    cmask = cols < E
    warm, union, pickable, packed = priority_keys(mass, flags, cols, E)
    pos, cum, _g, _w = pairwise(packed, pickable, mass, cols, pk_ptr, val_ptr, MODE == 2, False, CH)
    m = resolve_m(MODE, union, pickable, cum, cmask, tot, b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c)
    m_eff = tl.maximum(m, tl.sum(warm.to(tl.int32), axis=0))
    return (pos < m_eff) & pickable


@triton.jit
def ep_pick(mass, flags, cols, E, tot, pk_ptr, val_ptr, rank_ptr, R, MODE: tl.constexpr, FILL: tl.constexpr,
            b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c, CH: tl.constexpr, HARD: tl.constexpr):
    """``xshare_ep`` without replicas: the exact per-rank greedy -> chosen ``[BLOCK_E] int1``.

    ``rank_ptr [E] int32`` is each logical expert's EP rank. Per-rank budget ``b = ceil(m_eff /
    R)``; capacity ``max(b, peak warm load)`` on every rank (``FILL``) or ``max(b, own warm
    load)``; warm experts lead their rank, then by descending mass while the rank has room.
    ``HARD``: of those, only the first ``m_eff - |warm|`` non-warm ones in the global order
    (a second :func:`pairwise` pass counts the ones above each).
    """
    cmask = cols < E
    warm, union, pickable, packed = priority_keys(mass, flags, cols, E)
    rank_e = tl.load(rank_ptr + cols, mask=cmask, other=-1)
    pos, cum, pos_r, wload = pairwise(packed, pickable, mass, tl.maximum(rank_e, 0), pk_ptr, val_ptr, MODE == 2,
                                      True, CH)
    m = resolve_m(MODE, union, pickable, cum, cmask, tot, b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c)
    n_warm = tl.sum(warm.to(tl.int32), axis=0)
    m_eff = tl.maximum(m, n_warm)
    b = (m_eff + R - 1) // R
    if FILL:
        capv = tl.maximum(b, tl.max(tl.where(cmask, wload, 0), axis=0))
    else:
        capv = tl.maximum(b, wload)
    chosen = pickable & (warm | (pos_r < capv))
    if HARD:
        extra = chosen & (warm == 0)
        above, _c, _g, _w = pairwise(packed, extra, mass, cols, pk_ptr, val_ptr, False, False, CH)
        chosen = warm | (extra & (above < m_eff - n_warm))
    return chosen


@triton.jit
def _place(e, load_s, load_r, cap_s, USE_CAP: tl.constexpr, slot_e, ps, srank, arR):
    """Put expert ``e`` (int32 scalar) on its least-loaded copy with room (ties: lower slot).

    Per physical slot (``[BLOCK_P]``): ``slot_e`` its expert (-1 = padding), ``ps`` its index,
    ``srank`` its rank, ``load_s`` the load of its rank, ``cap_s`` its rank's capacity
    (``USE_CAP``); ``load_r [BLOCK_R]`` per-rank loads. Returns ``(load_s, load_r, slot)``;
    ``slot`` is -1 when no copy has room."""
    BP: tl.constexpr = ps.shape[0]
    ok = slot_e == e
    if USE_CAP:
        ok = ok & (load_s < cap_s)
    big = 1 << 30
    best = tl.min(tl.where(ok, load_s * BP + ps, big), axis=0)
    take = best < big
    j = best % BP
    rank_j = tl.sum(tl.where(ps == j, srank, 0), axis=0)
    load_s = load_s + tl.where((srank == rank_j) & take, 1, 0)
    load_r = load_r + tl.where((arR == rank_j) & take, 1, 0)
    return load_s, load_r, tl.where(take, j, -1)


@triton.jit
def ep_replicated_pick(mass, flags, cols, E, tot, pk_ptr, val_ptr, slot_expert_ptr, slot_rank_ptr, R,
                       MODE: tl.constexpr, FILL: tl.constexpr, b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                       CH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, HARD: tl.constexpr):
    """``xshare_ep`` with replicas: the reference's sequential least-loaded greedy.

    Warm experts (they lead the order) are placed on their least-loaded copy without a cap;
    then the per-rank capacity is fixed and the pickable rest are tried in order until every
    rank is full (``HARD``: or ``m_eff`` experts are chosen). ``slot_expert / slot_rank
    [BLOCK_P] int32``: the logical expert (-1 padded) and rank of each physical slot.

    Returns ``slot [BLOCK_E] int32``: the physical slot chosen for each expert, -1 = not chosen.
    """
    cmask = cols < E
    warm, union, pickable, packed = priority_keys(mass, flags, cols, E)
    pos, cum, _g, _w = pairwise(packed, pickable, mass, cols, pk_ptr, val_ptr, MODE == 2, False, CH)
    m = resolve_m(MODE, union, pickable, cum, cmask, tot, b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c)
    n_warm = tl.sum(warm.to(tl.int32), axis=0)
    n_pick = tl.sum(pickable.to(tl.int32), axis=0)
    m_eff = tl.maximum(m, n_warm)
    ps = tl.arange(0, BLOCK_P)
    arR = tl.arange(0, BLOCK_R)
    slot_e = tl.load(slot_expert_ptr + ps)
    srank = tl.load(slot_rank_ptr + ps)
    load_s = tl.zeros([BLOCK_P], dtype=tl.int32)
    load_r = tl.zeros([BLOCK_R], dtype=tl.int32)
    slot_of = tl.full([cols.shape[0]], -1, tl.int32)
    for i in range(0, n_warm):
        hit = pos == i
        e = tl.sum(tl.where(hit, cols, 0), axis=0)
        load_s, load_r, s = _place(e, load_s, load_r, load_s, False, slot_e, ps, srank, arR)
        slot_of = tl.where(hit, s, slot_of)
    b = (m_eff + R - 1) // R
    if FILL:
        c = tl.maximum(tl.max(load_r, axis=0), b)
        cap_s = tl.zeros([BLOCK_P], dtype=tl.int32) + c
        room = tl.sum(tl.where(arR < R, c - load_r, 0), axis=0)
    else:  # a slot's load is its rank's: max(own warm load, b) per rank
        cap_s = tl.maximum(load_s, b)
        room = tl.sum(tl.where(arR < R, tl.maximum(load_r, b) - load_r, 0), axis=0)
    if HARD:
        room = tl.minimum(room, m_eff - n_warm)  # every placement uses one unit of both
    i = n_warm
    while (i < n_pick) & (room > 0):
        hit = pos == i
        e = tl.sum(tl.where(hit, cols, 0), axis=0)
        load_s, load_r, s = _place(e, load_s, load_r, cap_s, True, slot_e, ps, srank, arR)
        slot_of = tl.where(hit, s, slot_of)
        room = room - (s >= 0).to(tl.int32)
        i = i + 1
    return slot_of


@triton.jit
def rows_pick(mass, wcnt, ucnt, cols, E, k_ptr, v_ptr, MODE: tl.constexpr, b_count, b_frac_bits, b_eps_bits,
              b_mass, b_mass_c, CC: tl.constexpr):
    """Greedy pick of many groups at once (one per row): ``[RT, BLOCK_E] int1``.

    For ``mass [RT, BLOCK_E] int64`` and warm / top-k "any" flags ``wcnt`` / ``ucnt [RT, BLOCK_E]``,
    every row keeps its warm experts, then its candidates (non-warm, mass > 0) by descending mass
    while the budget allows: a count (``MODE`` 0 / 1: ``max(m, |warm|)`` experts in all), or in
    mass mode while the mass before the candidate (warm experts first, then the candidates above
    it) is below ``X`` of the row's total -- :func:`greedy_pick` row by row.

    Each row's candidates (at most its tokens' top-k: few) are compacted into this program's
    scratch ``k_ptr [RT, BLOCK_E] int64`` / ``v_ptr [RT, BLOCK_E] int64`` (a CTA barrier each
    side), then every expert is compared with them, ``CC`` at a time (``[RT, CC, BLOCK_E]``):
    its rank among the candidates and the (exact, int64) mass above it.
    """
    RT: tl.constexpr = mass.shape[0]
    BE: tl.constexpr = mass.shape[1]
    cmask = (cols < E)[None, :]
    warm = (wcnt > 0) & cmask
    cand = (mass > 0) & cmask & (warm == 0)
    packed = pack(mass_key(mass), cols[None, :], cmask)
    n_warm = tl.sum(warm.to(tl.int32), axis=1)
    n_cand = tl.sum(cand.to(tl.int32), axis=1)
    if MODE == 2:
        tot = tl.sum(tl.where(cmask, mass, 0), axis=1)
        thr = mass_threshold(tot, b_mass, b_mass_c)
        base = tl.sum(tl.where(warm & (mass > 0), mass, 0), axis=1)
    else:
        if MODE == 0:
            m = n_warm * 0 + b_count
        else:
            n_union = tl.sum(((ucnt > 0) & cmask).to(tl.int32), axis=1)
            f = b_frac_bits.to(tl.float64, bitcast=True)
            eps = b_eps_bits.to(tl.float64, bitcast=True)
            m = tl.ceil(n_union.to(tl.float64) * f - eps).to(tl.int32)
        rem = tl.maximum(m, n_warm) - n_warm
    rr = tl.arange(0, RT)[:, None]
    slot = tl.cumsum(cand.to(tl.int32), axis=1) - 1
    tl.debug_barrier()  # earlier readers of the scratch are done
    tl.store(k_ptr + rr * BE + slot, packed, mask=cand)
    if MODE == 2:
        tl.store(v_ptr + rr * BE + slot, mass, mask=cand)
    tl.debug_barrier()
    cc = tl.arange(0, CC)[None, :]
    pos = tl.zeros([RT, BE], dtype=tl.int32)
    above = tl.zeros([RT, BE], dtype=tl.int64)
    for c0 in range(0, tl.max(n_cand, axis=0), CC):
        ok = (c0 + cc) < n_cand[:, None]
        kc = tl.load(k_ptr + rr * BE + c0 + cc, mask=ok, other=SENT)
        gt = kc[:, :, None] > packed[:, None, :]
        pos += tl.sum(gt.to(tl.int32), axis=1)
        if MODE == 2:
            vc = tl.load(v_ptr + rr * BE + c0 + cc, mask=ok, other=0)
            above += tl.sum(tl.where(gt, vc[:, :, None], 0), axis=1)
    if MODE == 2:
        take = cand & ((base[:, None] + above).to(tl.float64) < thr[:, None])
    else:
        take = cand & (pos < rem[:, None])
    return warm | take
