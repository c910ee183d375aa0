"""Triton kernels of ``xshare_spec``: per-token contributions, then the two-level pick.

1. :func:`spec_token_kernel`, grid ``(cdiv(T, BT),)``: scoring, each token's top-k / top-k0,
   ``contrib [T, BLOCK_E] fp32`` and ``tflags [T, BLOCK_E] int8`` (1 warm, 2 top-k).
2. :func:`group_kernel`, grid ``(T,)``: program ``r`` sums the contributions of the tokens of
   request ``r`` in token order (fixed-order, no float atomics), picks ``S_r`` with the request
   budget and writes ``chosen_r[r]``, the masked mass ``gmass[r] = mass_r * S_r``, the counts
   ``gflags[r]`` and ``gtot[r] = sum(mass_r)``. The last program (integer ticket) sums those
   rows in request order and picks the batch set with the batch budget into ``sel_buf``.
3. :func:`~._refine.refine_kernel` with ``ALLOW = 3``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._mass import _tile_contrib
from ._pick import budget_order, greedy_chosen


@triton.jit(do_not_specialize=["T", "E"])
def spec_token_kernel(logits_ptr, stride_t, bias_ptr, valid_ptr, T, E, contrib_ptr, tflags_ptr,
                      SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr,
                      TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                      K: tl.constexpr, K0: tl.constexpr, MASS_FULL: tl.constexpr,
                      BT: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per-token ``contrib [T, BLOCK_E] fp32`` and ``tflags [T, BLOCK_E] int8``."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BLOCK_E)
    contrib, flags, _s, _k, _v, _a, _m, _i = _tile_contrib(logits_ptr, stride_t, bias_ptr, valid_ptr, rows, cols, T, E,
                                   SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL)
    offs = rows[:, None].to(tl.int64) * BLOCK_E + cols[None, :]
    m = (rows < T)[:, None]
    tl.store(contrib_ptr + offs, contrib, mask=m)
    tl.store(tflags_ptr + offs, flags.to(tl.int8), mask=m)


@triton.jit(do_not_specialize=["T", "E", "rb_count", "rb_frac_bits", "rb_eps_bits", "b_count", "b_frac_bits", "b_eps_bits"])
def group_kernel(contrib_ptr, tflags_ptr, rid_ptr, T, E,
                 chosen_r_ptr, gmass_ptr, gflags_ptr, gtot_ptr, gne_ptr, glist_ptr, gpk_ptr, gval_ptr, ticket, sel_buf,
                 rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c,
                 b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                 HAS_RID: tl.constexpr, RMODE: tl.constexpr, MODE: tl.constexpr,
                 SCAN: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr, BLOCK_E: tl.constexpr):
    """Request-level picks (one program per request id) and the batch-level pick (last program).

    ``rid [T] int64`` (clamped to ``[0, T)``; ``HAS_RID=False``: token ``t`` is request ``t``).
    Program ``r`` finds its tokens with one vector compare per ``SCAN`` ids and adds their rows
    one by one in token order. Outputs ``chosen_r [T, BLOCK_E] int8``, ``gmass [T, BLOCK_E]
    fp32``, ``gflags [T, BLOCK_E] int32``, ``gtot [T] fp32``, ``gne [T] int32`` (request has a
    valid token), ``sel_buf``; scratch: ``glist [T] int32`` (the non-empty requests, in order),
    ``gpk [T, BLOCK_E] int64`` / ``gval [T, BLOCK_E] fp32`` (one row per program, for the picks).
    """
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    ar = tl.arange(0, SCAN)
    acc_m = tl.zeros([BLOCK_E], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_E], dtype=tl.int32)
    if HAS_RID:
        for s0 in range(0, T, SCAN):
            idx = s0 + ar
            sr = tl.load(rid_ptr + idx, mask=idx < T, other=0)
            hit = (tl.minimum(tl.maximum(sr, 0), T - 1) == r) & (idx < T)
            cnt = tl.sum(hit.to(tl.int32), axis=0)
            while cnt > 0:
                t = tl.min(tl.where(hit, idx, 2147483647), axis=0)
                row = t.to(tl.int64) * BLOCK_E + cols
                acc_m += tl.load(contrib_ptr + row, mask=cmask, other=0.0)
                f = tl.load(tflags_ptr + row, mask=cmask, other=0).to(tl.int32)
                acc_f += (f & 1) + 65536 * (f >> 1)
                hit = hit & (idx != t)
                cnt -= 1
    else:
        offs = r.to(tl.int64) * BLOCK_E + cols
        acc_m = tl.load(contrib_ptr + offs, mask=cmask, other=0.0)
        f = tl.load(tflags_ptr + offs, mask=cmask, other=0).to(tl.int32)
        acc_f = (f & 1) + 65536 * (f >> 1)
    tot_r = tl.sum(acc_m, axis=0)
    nonempty = tl.sum(acc_f & 65535, axis=0) > 0
    chosen = cols < 0
    pk_row = gpk_ptr + r.to(tl.int64) * BLOCK_E
    val_row = gval_ptr + r.to(tl.int64) * BLOCK_E
    if nonempty:
        key, packed, rank, m_eff, n_warm, n_pick = budget_order(acc_m, acc_f, cols, E, tot_r, pk_row, val_row, RMODE,
                                                                rb_count, rb_frac_bits, rb_eps_bits, rb_mass,
                                                                rb_mass_c, CH)
        chosen = greedy_chosen(key, rank, m_eff, cols, E)
    row = r.to(tl.int64) * BLOCK_E + cols
    tl.store(chosen_r_ptr + row, chosen.to(tl.int8))
    tl.store(gmass_ptr + row, tl.where(chosen, acc_m, 0.0))
    tl.store(gflags_ptr + row, acc_f)
    tl.store(gtot_ptr + r, tot_r)
    tl.store(gne_ptr + r, nonempty.to(tl.int32))
    tl.debug_barrier()
    done = tl.atomic_add(ticket, 1, sem="acq_rel")
    if done == T - 1:
        # list the non-empty requests in order, then sum their rows RB at a time (fixed order)
        n_list = tl.sum(tl.zeros([SCAN], dtype=tl.int32), axis=0)
        tot = tl.sum(tl.zeros([SCAN], dtype=tl.float32), axis=0)
        for c0 in range(0, T, SCAN):
            g = c0 + ar
            gm = g < T
            ne = tl.load(gne_ptr + g, mask=gm, other=0, cache_modifier=".cg")
            tot += tl.sum(tl.load(gtot_ptr + g, mask=gm & (ne > 0), other=0.0, cache_modifier=".cg"), axis=0)
            pos = n_list + tl.cumsum(ne, axis=0) - 1
            tl.store(glist_ptr + pos, g, mask=ne > 0)
            n_list += tl.sum(ne, axis=0)
        tl.debug_barrier()
        rr = tl.arange(0, RB)
        mb = tl.zeros([BLOCK_E], dtype=tl.float32)
        fb = tl.zeros([BLOCK_E], dtype=tl.int32)
        for l0 in range(0, n_list, RB):
            li = l0 + rr
            lm = li < n_list
            g = tl.load(glist_ptr + li, mask=lm, other=0, cache_modifier=".cg")
            offs = g[:, None].to(tl.int64) * BLOCK_E + cols[None, :]
            mb += tl.sum(tl.load(gmass_ptr + offs, mask=lm[:, None], other=0.0, cache_modifier=".cg"), axis=0)
            fb += tl.sum(tl.load(gflags_ptr + offs, mask=lm[:, None], other=0, cache_modifier=".cg"), axis=0)
        key, packed, rank, m_eff, n_warm, n_pick = budget_order(mb, fb, cols, E, tot, pk_row, val_row, MODE,
                                                                b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                                                                CH)
        chosen_b = greedy_chosen(key, rank, m_eff, cols, E)
        tl.store(sel_buf + cols, tl.where(chosen_b, 1, -1))
        tl.atomic_xchg(ticket, 0)
