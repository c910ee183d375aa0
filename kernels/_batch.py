"""The batch policies in one launch: scan -> (grid sync) -> pick -> refine.

Grid ``(NB,)``; program ``p`` owns tiles ``p * chunks .. p * chunks + chunks - 1`` (see
:mod:`._tile`). ``SYNC`` (constexpr) says how the programs meet:

* ``0`` -- one program holds the whole batch: scan, pick and refine from the same registers.
* ``1`` -- grid barrier: each program writes its partial row (``part_mass [NB, BLOCK_E] int64``,
  ``part_flags [NB, BLOCK_E] int32``, ``part_tot [NB] int64``), arrives on the ever-growing
  ``int64`` counter ``sync[0]`` and waits for its launch's ``NB`` arrivals
  (:func:`grid_arrive_wait`); then *every* program sums the ``NB`` rows in the same fixed order
  and runs the same pick (identical inputs, identical results, no second round trip), and
  refines its own tiles (from registers when it owns one). Wide grids (``TWO_STAGE``) reduce in
  two stages instead -- program ``p`` sums a ``CW``-column slice of all rows into ``tot_mass /
  tot_flags [BLOCK_E]`` / ``tot_tot [1]``, a second barrier on ``sync[1]``, then every program
  reads the totals -- so each partial byte crosses L2 once instead of ``NB`` times. Needs every
  program resident at once: the host caps ``NB`` at the multiprocessor count.
* ``2`` -- two launches (the interpreter, which runs programs one after another): the program
  that takes the last ticket of its launch on ``sync[1]`` sums the rows, picks and writes ``sel
  [BLOCK_E] int32`` (payload >= 0 = chosen) and, for request groups, each row's request set to
  ``req [T, BLOCK_E] int8``; :func:`~._refine.refine_kernel` then refines.

No float atomics; masses are int64 sums of fixed-point units (exact): any reduction order gives
the reference's integers, and identical inputs bit-identical outputs. ``PICK`` (constexpr): 1 = OEA (the union of the top-``k0`` sets), 2 = XShare greedy,
3 = ``xshare_ep`` without replicas, 4 = ``xshare_ep`` with replicas, 5 = XShare over request
groups (``xshare_spec``). ``ALLOW``: 1 = the chosen set, 2 = chosen and the token's own top-k.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._pick import ep_pick, ep_replicated_pick, greedy_pick
from ._tile import refine_tile, tile_rows, tile_scan


#: Polls before a waiting program gives up (about a second): a barrier that never fills -- which
#: would be a bug -- then shows as wrong outputs (the benchmark's exactness check) instead of a hang.
MAX_SPINS = tl.constexpr(1 << 21)


@triton.jit
def grid_arrive_wait(sync_ptr, nb):
    """Grid barrier on the ``int64`` counter ``sync[0]``; returns the partial rows to read (``nb``).

    The counter only grows: a program's ticket ``old`` says which launch it belongs to
    (``old // nb``: launches that share the buffer run one after another on their stream), and it
    waits until that launch's ``nb`` programs have arrived, ``(old // nb + 1) * nb``. No reset, so
    no departure round trip; 64-bit, so it never wraps. Arrival is a release, the polls are
    acquire loads (no read-modify-write competing with the arrivals).
    """
    tl.debug_barrier()  # this program's partial stores precede its arrival
    old = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    target = (old // nb + 1) * nb
    cnt = old + 1
    spins = 0
    while (cnt < target) & (spins < MAX_SPINS):
        cnt = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")  # an ld.acquire
        spins += 1
    tl.debug_barrier()
    return (nb - tl.maximum(target - cnt, 0)).to(tl.int32)  # the reads depend on the acquire


@triton.jit
def reduce_partials(part_mass, part_flags, part_tot, nb, cols, RB: tl.constexpr):
    """Sum the ``nb`` partial rows (int64 masses), ``RB`` at a time -> ``(mass, flags, tot)``."""
    rr = tl.arange(0, RB)
    BE: tl.constexpr = cols.shape[0]
    mass = tl.zeros([BE], dtype=tl.int64)
    flags = tl.zeros([BE], dtype=tl.int32)
    tots = tl.zeros([RB], dtype=tl.int64)
    for r0 in range(0, nb, RB):
        r = r0 + rr
        pm = r < nb
        offs = r[:, None] * BE + cols[None, :]
        mass += tl.sum(tl.load(part_mass + offs, mask=pm[:, None], other=0, cache_modifier=".cg"), axis=0)
        flags += tl.sum(tl.load(part_flags + offs, mask=pm[:, None], other=0, cache_modifier=".cg"), axis=0)
        tots += tl.load(part_tot + r, mask=pm, other=0, cache_modifier=".cg")
    return mass, flags, tl.sum(tots, axis=0)


@triton.jit
def reduce_slice(part_mass, part_flags, part_tot, tot_mass, tot_flags, tot_tot, nb, pid, BE: tl.constexpr,
                 CW: tl.constexpr, RB2: tl.constexpr):
    """Stage 1 of the two-stage reduction: program ``pid`` sums columns ``[pid * CW, pid * CW + CW)``
    of the ``nb`` partial rows into ``tot_mass / tot_flags [BE]`` (program 0 also ``tot_tot [1]``),
    so every partial byte is read once, not once per program."""
    c = pid * CW + tl.arange(0, CW)
    cm = c < BE
    rr = tl.arange(0, RB2)
    m = tl.zeros([CW], dtype=tl.int64)
    f = tl.zeros([CW], dtype=tl.int32)
    for r0 in range(0, nb, RB2):
        r = r0 + rr
        msk = (r < nb)[:, None] & cm[None, :]
        offs = r[:, None] * BE + c[None, :]
        m += tl.sum(tl.load(part_mass + offs, mask=msk, other=0, cache_modifier=".cg"), axis=0)
        f += tl.sum(tl.load(part_flags + offs, mask=msk, other=0, cache_modifier=".cg"), axis=0)
    tl.store(tot_mass + c, m, mask=cm)
    tl.store(tot_flags + c, f, mask=cm)
    if pid == 0:
        t = tl.zeros([RB2], dtype=tl.int64)
        for r0 in range(0, nb, RB2):
            r = r0 + rr
            t += tl.load(part_tot + r, mask=r < nb, other=0, cache_modifier=".cg")
        tl.store(tot_tot, tl.sum(t, axis=0))


@triton.jit
def mass_total(mass, tot, HAS_TOT: tl.constexpr):
    """The total the ``mass:X`` budget is a fraction of (int64): the sum of the expert masses,
    or (``HAS_TOT``) the given request total ``tot``."""
    if not HAS_TOT:
        tot = tl.sum(mass, axis=0)
    return tot


@triton.jit
def batch_pick(mass, flags, tot, cols, E, pk_ptr, val_ptr, rank_ptr, copy_ptr, slot_expert_ptr, slot_rank_ptr, R,
               b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
               PICK: tl.constexpr, MODE: tl.constexpr, FILL: tl.constexpr, CH: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, HARD: tl.constexpr):
    """The policy's pick -> ``[BLOCK_E] int32``: the payload (physical slot for ``xshare_ep``,
    else 0) of each chosen expert, -1 for the others."""
    cmask = cols < E
    if PICK == 1:
        slot = tl.where(((flags & 65535) > 0) & cmask, 0, -1)
    elif PICK == 3:
        chosen = ep_pick(mass, flags, cols, E, tot, pk_ptr, val_ptr, rank_ptr, R, MODE, FILL, b_count, b_frac_bits,
                         b_eps_bits, b_mass, b_mass_c, CH, HARD)
        slot = tl.where(chosen, tl.load(copy_ptr + cols, mask=cmask, other=-1), -1)
    elif PICK == 4:
        slot = ep_replicated_pick(mass, flags, cols, E, tot, pk_ptr, val_ptr, slot_expert_ptr, slot_rank_ptr, R, MODE, FILL,
                                  b_count,
                                  b_frac_bits, b_eps_bits, b_mass, b_mass_c, CH, BLOCK_P, BLOCK_R, HARD)
    else:
        chosen = greedy_pick(mass, flags, cols, E, tot, pk_ptr, val_ptr, MODE, b_count, b_frac_bits, b_eps_bits, b_mass,
                             b_mass_c, CH)
        slot = tl.where(chosen, 0, -1)
    return slot


@triton.jit(do_not_specialize=["T", "E", "R", "chunks", "b_count", "b_frac_bits", "b_eps_bits", "b_mass", "b_mass_c",
                               "rb_count", "rb_frac_bits", "rb_eps_bits", "rb_mass", "rb_mass_c"])
def batch_kernel(logits_ptr, stride_t, bias_ptr, valid_ptr, T, E, chunks,
                 part_mass, part_flags, part_tot, tot_mass, tot_flags, tot_tot, sync_ptr, sel_ptr, req_ptr,
                 pk_scr, val_scr, rk_scr, rv_scr,
                 rank_ptr, copy_ptr, slot_expert_ptr, slot_rank_ptr, R,
                 b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                 rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c,
                 ids_ptr, w_ptr, phys_ptr, min_score,
                 SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                 K: tl.constexpr, K0: tl.constexpr, MASS_FULL: tl.constexpr,
                 PICK: tl.constexpr, ALLOW: tl.constexpr, MODE: tl.constexpr, RMODE: tl.constexpr,
                 FILL: tl.constexpr, HAS_MIN: tl.constexpr, RENORM: tl.constexpr, WANT_PHYS: tl.constexpr,
                 SYNC: tl.constexpr, TWO_STAGE: tl.constexpr, CW: tl.constexpr, RB2: tl.constexpr,
                 ONE_CHUNK: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
                 RB: tl.constexpr, CH: tl.constexpr, BT: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, HARD: tl.constexpr = False):
    """Batch policy over ``T`` tokens -- see the module docstring.

    Shapes: ``logits [T, E]`` fp32/bf16/fp16 (row stride ``stride_t``), ``bias [E]``, ``valid [T]
    uint8``; ``part_* [NB, BLOCK_E]`` / ``[NB]``, ``sync [2] int64`` (tickets; only grow), ``sel
    [BLOCK_E] int32``, ``req [T, BLOCK_E] int8``, pick scratch ``pk_scr [NB, BLOCK_E] int64`` /
    ``val_scr [NB, BLOCK_E] int64`` (one row per program), request-pick scratch ``rk_scr / rv_scr
    [NB, BT / GP, BLOCK_E]`` int64 / int64; placement tables
    (:class:`sglang_xshare.placement.PlacementTables`) ``rank / copy [E] int32``, ``slot_expert /
    slot_rank [BLOCK_P] int32``. Budgets: ``*_frac_bits``, ``*_eps_bits``, ``*_mass`` and
    ``*_mass_c`` are float64 bit patterns (:func:`~.workspace.budget_args`). ``HARD``:
    ``xshare_ep``'s hard cap. Outputs ``ids [T, K] int32``, ``w [T, K] fp32``, ``phys [T, K]
    int32`` (``WANT_PHYS``). ``chunks`` tiles per program (``ONE_CHUNK``: exactly 1).
    """
    pid = tl.program_id(0)
    nb = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    rk = rk_scr + pid * (BT // GP) * BLOCK_E  # this program's request-pick scratch
    rv = rv_scr + pid * (BT // GP) * BLOCK_E
    # ---- scan: scores, per-token sets, this program's partials
    if ONE_CHUNK:
        rows, rmask = tile_rows(pid, T, BT, GROUP, GP)
        sel, in_topk, v, alive, mx, den, mass, flags, tot, req = tile_scan(
            logits_ptr, stride_t, bias_ptr, valid_ptr, rows, rmask, cols, E,
            rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c, rk, rv,
            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL, GROUP, GP, RMODE)
    else:
        mass = tl.zeros([BLOCK_E], dtype=tl.int64)
        flags = tl.zeros([BLOCK_E], dtype=tl.int32)
        tot = tl.sum(mass, axis=0)
        for c in range(chunks):
            rows, rmask = tile_rows(pid * chunks + c, T, BT, GROUP, GP)
            _s, _k, _v, _a, _m, _i, m_c, f_c, t_c, _r = tile_scan(
                logits_ptr, stride_t, bias_ptr, valid_ptr, rows, rmask, cols, E,
                rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c, rk, rv,
                SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL, GROUP, GP, RMODE)
            mass += m_c
            flags += f_c
            tot += t_c
    # ---- meet
    if SYNC != 0:
        tl.store(part_mass + pid * BLOCK_E + cols, mass)
        tl.store(part_flags + pid * BLOCK_E + cols, flags)
        tl.store(part_tot + pid, tot)
        if SYNC == 2 and GROUP > 0 and ONE_CHUNK:
            roffs = rows[:, None].to(tl.int64) * BLOCK_E + cols[None, :]
            tl.store(req_ptr + roffs, req.to(tl.int8), mask=rmask[:, None])
    if SYNC == 1:
        arrived = grid_arrive_wait(sync_ptr, nb)
        if TWO_STAGE:  # wide grids: each program reduces a column slice, then all read the totals
            reduce_slice(part_mass, part_flags, part_tot, tot_mass, tot_flags, tot_tot, arrived, pid, BLOCK_E, CW,
                         RB2)
            ok = grid_arrive_wait(sync_ptr + 1, nb) > 0  # the reads below depend on its acquire
            mass = tl.load(tot_mass + cols, mask=ok & (cols >= 0), other=0, cache_modifier=".cg")
            flags = tl.load(tot_flags + cols, mask=ok & (cols >= 0), other=0, cache_modifier=".cg")
            tot = tl.load(tot_tot, cache_modifier=".cg")
        else:
            mass, flags, tot = reduce_partials(part_mass, part_flags, part_tot, arrived, cols, RB)
    if SYNC == 2:
        tl.debug_barrier()
        done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if done % nb == nb - 1:  # the last of this launch's programs (the ticket only grows)
            m_all, f_all, t_all = reduce_partials(part_mass, part_flags, part_tot, nb, cols, RB)
            t_all = mass_total(m_all, t_all, PICK == 5)
            slot = batch_pick(m_all, f_all, t_all, cols, E, pk_scr + pid * BLOCK_E, val_scr + pid * BLOCK_E,
                              rank_ptr, copy_ptr, slot_expert_ptr, slot_rank_ptr, R,
                              b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c, PICK, MODE, FILL, CH,
                              BLOCK_P, BLOCK_R, HARD)
            tl.store(sel_ptr + cols, slot)
    else:
        # ---- pick (every program, identical) and refine this program's tiles
        tot = mass_total(mass, tot, PICK == 5)
        slot = batch_pick(mass, flags, tot, cols, E, pk_scr + pid * BLOCK_E, val_scr + pid * BLOCK_E,
                          rank_ptr, copy_ptr, slot_expert_ptr, slot_rank_ptr, R,
                          b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c, PICK, MODE, FILL, CH,
                          BLOCK_P, BLOCK_R, HARD)
        chosen = slot >= 0
        if ONE_CHUNK:
            allowed = chosen[None, :] & req
            if ALLOW == 2:
                allowed = allowed & in_topk
            refine_tile(sel, allowed, v, rows, rmask, cols, E, logits_ptr, stride_t, alive, mx, den, slot,
                        ids_ptr, w_ptr, phys_ptr, min_score,
                        SIGMOID, K, K0, K, HAS_MIN, RENORM, HAS_BIAS, WANT_PHYS, BLOCK_K)
        else:
            for c in range(chunks):
                rows, rmask = tile_rows(pid * chunks + c, T, BT, GROUP, GP)
                sel, in_topk, v, alive, mx, den, _m, _f, _t, req = tile_scan(
                    logits_ptr, stride_t, bias_ptr, valid_ptr, rows, rmask, cols, E,
                    rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c, rk, rv,
                    SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL, GROUP, GP, RMODE)
                allowed = chosen[None, :] & req
                if ALLOW == 2:
                    allowed = allowed & in_topk
                refine_tile(sel, allowed, v, rows, rmask, cols, E, logits_ptr, stride_t, alive, mx, den, slot,
                            ids_ptr, w_ptr, phys_ptr, min_score,
                            SIGMOID, K, K0, K, HAS_MIN, RENORM, HAS_BIAS, WANT_PHYS, BLOCK_K)
