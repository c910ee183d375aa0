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

from ._metrics import metrics_finish, metrics_mark
from ._pick import ep_pick, ep_replicated_pick, greedy_pick
from ._tile import refine_tile, tile_rows, tile_scan


#: Polls before a waiting program gives up by default (about a second; the ``max_spins`` kernel
#: argument, workspace knob ``"max_spins"``). On a GPU the barrier's grid is
#: launched cooperatively (all programs co-resident, or the launch fails), so a wait that never
#: fills should not happen; if it does (a co-residency assumption broken), the program does NOT
#: go on with partial sums: it routes its tiles by each token's own top-k (a valid, safe routing)
#: and counts the event in the device's fault counter, which the serving hook reports.
MAX_SPINS = 1 << 21


@triton.jit
def grid_arrive_wait(sync_ptr, nb, max_spins):
    """Grid barrier on the ``int64`` counter ``sync[0]`` -> ``(rows, ok)``: the partial rows to
    read (``nb`` when everyone arrived) and whether everyone did.

    The counter only grows: a program's ticket ``old`` says which launch it belongs to
    (``old // nb``: launches that share the buffer run one after another on their stream), and it
    waits until that launch's ``nb`` programs have arrived, ``(old // nb + 1) * nb``. No reset, so
    no departure round trip; 64-bit, so it never wraps. Arrival is a release, the polls are
    acquire loads (no read-modify-write competing with the arrivals). Every program arrives
    exactly once per launch, also one that then gives up, so the tickets of later launches stay aligned.
    """
    tl.debug_barrier()  # this program's partial stores precede its arrival
    old = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    target = (old // nb + 1) * nb
    cnt = old + 1
    spins = 0
    while (cnt < target) & (spins < max_spins):
        cnt = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")  # an ld.acquire
        spins += 1
    tl.debug_barrier()
    return (nb - tl.maximum(target - cnt, 0)).to(tl.int32), cnt >= target  # the reads depend on the acquire


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


@triton.jit(do_not_specialize=["T", "E", "R", "U", "max_spins", "chunks", "gate_arm", "b_count", "b_frac_bits", "b_eps_bits",
                               "b_mass", "b_mass_c", "rb_count", "rb_frac_bits", "rb_eps_bits", "rb_mass", "rb_mass_c"])
def batch_kernel(logits_ptr, stride_t, bias_ptr, valid_ptr, T, E, chunks,
                 part_mass, part_flags, part_tot, tot_mass, tot_flags, tot_tot, sync_ptr, sel_ptr, req_ptr,
                 pk_scr, val_scr, rk_scr, rv_scr,
                 rank_ptr, copy_ptr, slot_expert_ptr, slot_rank_ptr, R,
                 b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                 rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c,
                 ids_ptr, w_ptr, phys_ptr, min_score, out_scale, map_ptr,
                 acc_ptr, mticket_ptr, used_ptr, top_ptr, urank_ptr, lrank_ptr, U, okv_ptr, fault_ptr, max_spins, stats_ptr,
                 gate_ptr, gate_arm,
                 SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                 K: tl.constexpr, K0: tl.constexpr, MASS_FULL: tl.constexpr,
                 PICK: tl.constexpr, ALLOW: tl.constexpr, MODE: tl.constexpr, RMODE: tl.constexpr,
                 FILL: tl.constexpr, HAS_MIN: tl.constexpr, RENORM: tl.constexpr, WANT_PHYS: tl.constexpr,
                 SYNC: tl.constexpr, TWO_STAGE: tl.constexpr, CW: tl.constexpr, RB2: tl.constexpr,
                 ONE_CHUNK: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
                 RB: tl.constexpr, CH: tl.constexpr, BT: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                 VALID: tl.constexpr, OUT: tl.constexpr, SCALE: tl.constexpr, FILL_EMPTY: tl.constexpr,
                 METRICS: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_MR: tl.constexpr, NBP: tl.constexpr,
                 HARD: tl.constexpr = False, GATE: tl.constexpr = False, GUARD_G: tl.constexpr = 0,
                 GUARD_K: tl.constexpr = 0):
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
    ``VALID``: how ``valid`` marks real rows (:func:`~._core.load_valid`); output epilogue ``OUT /
    SCALE / FILL_EMPTY`` (:func:`~._tile.refine_tile`); ``METRICS``: fused live metrics
    (:mod:`._metrics`, ranks padded to ``BLOCK_MR``), added by the refining launch. ``okv [NB]
    int32`` (two-stage barrier: each program's first wait succeeded), ``fault [1] int64`` (barrier
    waits that did not fill: those programs routed by each token's own top-k), ``NBP >= NB``;
    ``stats [2, BLOCK_E] int64`` (``SYNC`` 3 / 4: this rank's, then every rank's masses and flags).
    ``GATE``: every program returns at once unless ``gate [1] int64`` holds ``gate_arm`` (uniform
    over the grid, so no barrier ticket moves; outputs, statistics and metrics are left untouched).
    ``GUARD_G / GUARD_K``: the verify-row guard -- rows ``t % GUARD_G == 0`` warm up with their
    top-``GUARD_K`` (:meth:`sglang_xshare.select.contract.BatchContext.guard`; ``GUARD_G = 0``: off).
    """
    if GATE:
        if tl.load(gate_ptr) != gate_arm:
            return
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
            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL, GROUP, GP, RMODE, VALID,
            GUARD_G, GUARD_K)
    else:
        mass = tl.zeros([BLOCK_E], dtype=tl.int64)
        flags = tl.zeros([BLOCK_E], dtype=tl.int32)
        tot = tl.sum(mass, axis=0)
        for c in range(chunks):
            rows, rmask = tile_rows(pid * chunks + c, T, BT, GROUP, GP)
            _s, _k, _v, _a, _m, _i, m_c, f_c, t_c, _r = tile_scan(
                logits_ptr, stride_t, bias_ptr, valid_ptr, rows, rmask, cols, E,
                rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c, rk, rv,
                SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL, GROUP, GP, RMODE, VALID,
            GUARD_G, GUARD_K)
            mass += m_c
            flags += f_c
            tot += t_c
    # ---- meet
    if SYNC != 0 and SYNC != 4:
        tl.store(part_mass + pid * BLOCK_E + cols, mass)
        tl.store(part_flags + pid * BLOCK_E + cols, flags)
        tl.store(part_tot + pid, tot)
        if SYNC == 2 and GROUP > 0 and ONE_CHUNK:
            roffs = rows[:, None].to(tl.int64) * BLOCK_E + cols[None, :]
            tl.store(req_ptr + roffs, req.to(tl.int8), mask=rmask[:, None])
    ok = pid >= 0
    if SYNC == 1:
        arrived, ok = grid_arrive_wait(sync_ptr, nb, max_spins)
        if TWO_STAGE:  # wide grids: each program reduces a column slice, then all read the totals
            reduce_slice(part_mass, part_flags, part_tot, tot_mass, tot_flags, tot_tot, arrived, pid, BLOCK_E, CW,
                         RB2)
            tl.store(okv_ptr + pid, ok.to(tl.int32))  # a slice summed from missing rows poisons the totals
            _a2, ok2 = grid_arrive_wait(sync_ptr + 1, nb, max_spins)  # the reads below depend on its acquire
            q = tl.arange(0, NBP)
            all_ok = tl.min(tl.load(okv_ptr + q, mask=ok2 & (q < nb), other=1, cache_modifier=".cg"), axis=0) > 0
            ok = ok2 & all_ok
            mass = tl.load(tot_mass + cols, mask=ok & (cols >= 0), other=0, cache_modifier=".cg")
            flags = tl.load(tot_flags + cols, mask=ok & (cols >= 0), other=0, cache_modifier=".cg")
            tot = tl.load(tot_tot, cache_modifier=".cg")
        else:
            mass, flags, tot = reduce_partials(part_mass, part_flags, part_tot, arrived, cols, RB)
        if not ok:
            tl.atomic_add(fault_ptr, 1)
    if SYNC == 3:  # global selection, launch 1: this rank's statistics for an all-reduce
        tl.debug_barrier()
        done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if done % nb == nb - 1:
            m_all, f_all, _t_all = reduce_partials(part_mass, part_flags, part_tot, nb, cols, RB)
            tl.store(stats_ptr + cols, m_all)
            tl.store(stats_ptr + BLOCK_E + cols, f_all.to(tl.int64))
    if SYNC == 4:  # global selection, launch 2: every rank's statistics, summed by the all-reduce
        mass = tl.load(stats_ptr + cols, cache_modifier=".cg")
        flags = tl.load(stats_ptr + BLOCK_E + cols, cache_modifier=".cg").to(tl.int32)
        tot = tl.sum(mass, axis=0) * 0
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
    elif SYNC != 3:
        # ---- pick (every program, identical) and refine this program's tiles
        tot = mass_total(mass, tot, PICK == 5)
        slot = batch_pick(mass, flags, tot, cols, E, pk_scr + pid * BLOCK_E, val_scr + pid * BLOCK_E,
                          rank_ptr, copy_ptr, slot_expert_ptr, slot_rank_ptr, R,
                          b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c, PICK, MODE, FILL, CH,
                          BLOCK_P, BLOCK_R, HARD)
        if SYNC == 1:  # a barrier that did not fill: each token's own top-k (payload: the first copy)
            primary = tl.load(copy_ptr + cols, mask=cmask & (PICK >= 3) & (PICK <= 4), other=0)
            slot = tl.where(ok, slot, tl.where(cmask, primary, -1))
        chosen = slot >= 0
        if ONE_CHUNK:
            allowed = chosen[None, :] & req
            if ALLOW == 2:
                allowed = allowed & in_topk
            disp, short = refine_tile(sel, allowed, v, rows, rmask, cols, E, logits_ptr, stride_t, alive, mx, den,
                                      slot, ids_ptr, w_ptr, phys_ptr, min_score, out_scale, map_ptr,
                                      SIGMOID, K, K0, K, HAS_MIN, RENORM, HAS_BIAS, WANT_PHYS, BLOCK_K,
                                      OUT, SCALE, FILL_EMPTY, GUARD_G, GUARD_K)
            if METRICS:
                n_valid, pairs = metrics_mark(disp, in_topk, v, cols, E, used_ptr, top_ptr)
        else:
            n_valid = tl.zeros([], tl.int32)
            pairs = tl.zeros([], tl.int32)
            short = tl.zeros([], tl.int32)
            for c in range(chunks):
                rows, rmask = tile_rows(pid * chunks + c, T, BT, GROUP, GP)
                sel, in_topk, v, alive, mx, den, _m, _f, _t, req = tile_scan(
                    logits_ptr, stride_t, bias_ptr, valid_ptr, rows, rmask, cols, E,
                    rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c, rk, rv,
                    SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL, GROUP, GP, RMODE,
                    VALID, GUARD_G, GUARD_K)
                allowed = chosen[None, :] & req
                if ALLOW == 2:
                    allowed = allowed & in_topk
                disp, sh = refine_tile(sel, allowed, v, rows, rmask, cols, E, logits_ptr, stride_t, alive, mx, den,
                                       slot, ids_ptr, w_ptr, phys_ptr, min_score, out_scale, map_ptr,
                                       SIGMOID, K, K0, K, HAS_MIN, RENORM, HAS_BIAS, WANT_PHYS, BLOCK_K,
                                       OUT, SCALE, FILL_EMPTY, GUARD_G, GUARD_K)
                short += sh
                if METRICS:
                    nv, pr = metrics_mark(disp, in_topk, v, cols, E, used_ptr, top_ptr)
                    n_valid += nv
                    pairs += pr
        if METRICS:
            metrics_finish(acc_ptr, mticket_ptr, used_ptr, top_ptr, urank_ptr, lrank_ptr, n_valid, pairs, short, U,
                           E, BLOCK_U, BLOCK_E, BLOCK_MR)
