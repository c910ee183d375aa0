"""Triton path of ``xshare_spec`` for arbitrary request ids (the contiguous-group case -- what
SGLang's target-verify batches are -- runs fused in :mod:`._batch`).

1. :func:`spec_token_kernel`, grid ``(cdiv(T, BT),)``: scoring, each token's top-k / top-k0,
   ``contrib [T, BLOCK_E] int64`` (fixed-point mass units) and ``tflags [T, BLOCK_E] int32``
   (1 warm + 65536 top-k).
2. :func:`group_kernel`, grid ``(T,)``: program ``r`` sums the rows of the tokens of request
   ``r`` (int64, exact), picks ``S_r`` with the request budget
   (:func:`~._pick.greedy_pick`), writes ``S_r`` to the ``req`` row of each of its tokens and
   its partials (mass on ``S_r``, flags, total) to row ``r``. The program that takes the last
   ticket of the launch (an ever-growing ``int64`` counter) sums the ``T`` rows and picks the
   batch set into ``sel``.
3. :func:`~._refine.refine_kernel` with ``ALLOW = 3``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._batch import reduce_partials
from ._pick import greedy_pick
from ._tile import tile_scan


@triton.jit(do_not_specialize=["T", "E"])
def spec_token_kernel(logits_ptr, stride_t, bias_ptr, valid_ptr, T, E, contrib_ptr, tflags_ptr,
                      SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr,
                      TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                      K: tl.constexpr, K0: tl.constexpr, MASS_FULL: tl.constexpr, BLOCK_E: tl.constexpr,
                      VALID: tl.constexpr, GUARD_G: tl.constexpr = 0, GUARD_K: tl.constexpr = 0):
    """One token per program: its ``contrib [BLOCK_E] int64`` and ``tflags [BLOCK_E] int32`` rows
    (``GUARD_G / GUARD_K``: the verify-row guard, :func:`~._core.kth_keys`)."""
    t = tl.program_id(0)
    rows = t + tl.arange(0, 1)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_E)
    # one token, no request stage (GROUP = 0): the request budget and its scratch are not read
    _s, _k, _v, _a, _m, _i, mass, flags, _t, _r = tile_scan(
        logits_ptr, stride_t, bias_ptr, valid_ptr, rows, rmask, cols, E, 0, 0, 0, 0, 0, contrib_ptr, contrib_ptr,
        SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL, 0, 1, 0, VALID, GUARD_G, GUARD_K)
    offs = t.to(tl.int64) * BLOCK_E + cols
    tl.store(contrib_ptr + offs, mass)
    tl.store(tflags_ptr + offs, flags)


@triton.jit(do_not_specialize=["T", "E", "rb_count", "rb_frac_bits", "rb_eps_bits", "rb_mass", "rb_mass_c",
                               "b_count", "b_frac_bits", "b_eps_bits", "b_mass", "b_mass_c"])
def group_kernel(contrib_ptr, tflags_ptr, rid_ptr, T, E,
                 part_mass, part_flags, part_tot, req_ptr, ticket, sel_ptr, pk_scr, val_scr,
                 rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c,
                 b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                 RMODE: tl.constexpr, MODE: tl.constexpr, SCAN: tl.constexpr, RB: tl.constexpr,
                 CH: tl.constexpr, BLOCK_E: tl.constexpr):
    """Request-level picks (one program per request id) and the batch-level pick (last program).

    ``rid [T] int64`` (clamped to ``[0, T)``). Program ``r`` finds its tokens with one vector
    compare per ``SCAN`` ids and adds their rows one by one. Writes ``part_*``
    row ``r`` (``[T, BLOCK_E]`` / ``[T]``), ``req [T, BLOCK_E] int8`` rows of its tokens, and
    (last program) ``sel [BLOCK_E] int32``; pick scratch ``pk_scr [T, BLOCK_E] int64`` /
    ``val_scr [T, BLOCK_E] int64``, one row per program; budgets as in :mod:`._batch`.
    """
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    ar = tl.arange(0, SCAN)
    acc_m = tl.zeros([BLOCK_E], dtype=tl.int64)
    acc_f = tl.zeros([BLOCK_E], dtype=tl.int32)
    for s0 in range(0, T, SCAN):
        idx = s0 + ar
        sr = tl.load(rid_ptr + idx, mask=idx < T, other=0)
        hit = (tl.minimum(tl.maximum(sr, 0), T - 1) == r) & (idx < T)
        cnt = tl.sum(hit.to(tl.int32), axis=0)
        while cnt > 0:
            t = tl.min(tl.where(hit, idx, 2147483647), axis=0)
            row = t.to(tl.int64) * BLOCK_E + cols
            acc_m += tl.load(contrib_ptr + row)
            acc_f = tl.maximum(acc_f, tl.load(tflags_ptr + row))
            hit = hit & (idx != t)
            cnt -= 1
    mass_r = acc_m
    tot_r = tl.sum(mass_r, axis=0)
    pk_row = pk_scr + r.to(tl.int64) * BLOCK_E
    val_row = val_scr + r.to(tl.int64) * BLOCK_E
    chosen = greedy_pick(mass_r, acc_f, cols, E, tot_r, pk_row, val_row, RMODE, rb_count,
                         rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c, CH)
    # the request set, on the row of each of its tokens
    for s0 in range(0, T, SCAN):
        idx = s0 + ar
        sr = tl.load(rid_ptr + idx, mask=idx < T, other=0)
        hit = (tl.minimum(tl.maximum(sr, 0), T - 1) == r) & (idx < T)
        offs = idx[:, None].to(tl.int64) * BLOCK_E + cols[None, :]
        tl.store(req_ptr + offs, tl.broadcast_to(chosen[None, :], [SCAN, BLOCK_E]).to(tl.int8), mask=hit[:, None])
    row = r.to(tl.int64) * BLOCK_E + cols
    tl.store(part_mass + row, tl.where(chosen, mass_r, 0))
    tl.store(part_flags + row, acc_f)
    tl.store(part_tot + r, tot_r)
    tl.debug_barrier()
    done = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu")
    if done % T == T - 1:  # the last program of this launch (the int64 ticket only grows)
        mb, fb, tot = reduce_partials(part_mass, part_flags, part_tot, T, cols, RB)
        chosen_b = greedy_pick(mb, fb, cols, E, tot, pk_row, val_row, MODE, b_count, b_frac_bits, b_eps_bits, b_mass,
                               b_mass_c, CH)
        tl.store(sel_ptr + cols, tl.where(chosen_b, 0, -1))
