"""Triton tile stages: what one program does to its ``[BT, BLOCK_E]`` tile of tokens.

* :func:`tile_rows` -- which tokens the tile holds (plain runs of ``BT`` tokens, or ``BT / GP``
  whole requests of ``GROUP`` consecutive tokens each, row ``r`` = request ``r // GP``, draft
  ``r % GP``; rows with ``r % GP >= GROUP`` are empty);
* :func:`tile_scan` -- scoring, each token's top-``k`` / top-``k0`` sets, the tile's mass and
  flag partials, and for request groups (``GROUP > 0``) each request's own budgeted pick;
* :func:`refine_tile` -- each token's best ``<= k`` experts inside its allowed set, weights,
  physical slots, stores.

Flags pack two "any" bits per expert as ``warm + 65536 * topk`` (0/1 each per tile); summed
over tiles they count tiles, so only ``> 0`` is ever read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._core import (FLT_TINY, SENT, gate_at, load_scores, load_valid, mass_units, pack, runtime, token_topk, unpack_col,
                    unpack_key, unpack_payload, warm_width)
from ._pick import rows_pick


@triton.jit
def tile_rows(tile, T, BT: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr):
    """``(rows, rmask)`` ``[BT]``: token index of each row of tile ``tile`` and whether it exists."""
    r = tl.arange(0, BT)
    if GROUP == 0:
        rows = tile * BT + r
        rmask = rows < T
    else:
        RT: tl.constexpr = BT // GP
        i = r % GP
        rows = (tile * RT + r // GP) * GROUP + i
        rmask = (i < GROUP) & (rows < T)
    return rows, rmask


@triton.jit
def tile_scan(logits_ptr, stride_t, bias_ptr, valid_ptr, rows, rmask, cols, E,
              rb_count, rb_frac_bits, rb_eps_bits, rb_mass, rb_mass_c, rk_ptr, rv_ptr,
              SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
              GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
              MASS_FULL: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, RMODE: tl.constexpr,
              VALID: tl.constexpr, GUARD_G: tl.constexpr, GUARD_K: tl.constexpr):
    """Score a tile and aggregate it (``VALID``: how ``valid_ptr`` marks real rows, see
    :func:`~._core.load_valid`; ``GUARD_G / GUARD_K``: the verify-row guard, see
    :func:`~._core.kth_keys`).

    Returns ``(sel, in_topk, v, alive, mx, den, mass, flags, tot, req)``: ``sel [BT, BLOCK_E]``
    ranking scores, ``in_topk`` each row's own top-k, ``v [BT]`` valid rows, ``alive / mx / den``
    for :func:`~._core.gate_at`; the tile partials ``mass [BLOCK_E] int64`` (for request groups:
    each request's mass on its own chosen set, summed), ``flags [BLOCK_E] int32`` and ``tot``
    (int64 scalar, the tile's whole request mass; request groups only); ``req [BT, BLOCK_E] int1``
    each row's request set (``GROUP > 0``; all True otherwise; ``rk_ptr / rv_ptr`` this program's
    ``[BT / GP, BLOCK_E]`` int64 / int64 scratch for the request picks). Masses are int64 sums of
    fixed-point units (:func:`~._core.mass_units`), exact: the same integers as the reference
    (:func:`sglang_xshare.select.common.exact_sum`) in any summation order.
    """
    cmask = cols < E
    gate, sel, alive, mx, den = load_scores(logits_ptr, stride_t, bias_ptr, rows, rmask, cols, E,
                                            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G)
    v = load_valid(valid_ptr, rows, rmask, VALID)
    in_topk, in_warm = token_topk(sel, cols, cmask, rows, K, K0, GUARD_G, GUARD_K)
    tk = in_topk & v[:, None]
    wm = in_warm & v[:, None]
    if MASS_FULL:
        contrib = mass_units(tl.where(v[:, None] & (sel > float("-inf")) & cmask[None, :], gate, 0.0))
    else:
        contrib = mass_units(tl.where(tk, gate, 0.0))
    if GROUP == 0:
        mass = tl.sum(contrib, axis=0)
        flags = tl.max(wm.to(tl.int32), axis=0) + 65536 * tl.max(tk.to(tl.int32), axis=0)
        tot = tl.sum(mass, axis=0) * 0
        req = sel == sel
    else:
        BT: tl.constexpr = sel.shape[0]
        BE: tl.constexpr = sel.shape[1]
        RT: tl.constexpr = BT // GP
        mass_r = tl.sum(tl.reshape(contrib, [RT, GP, BE]), axis=1)
        wcnt = tl.max(tl.reshape(wm.to(tl.int32), [RT, GP, BE]), axis=1)
        ucnt = tl.max(tl.reshape(tk.to(tl.int32), [RT, GP, BE]), axis=1)
        chosen_r = rows_pick(mass_r, wcnt, ucnt, cols, E, rk_ptr, rv_ptr, RMODE, rb_count, rb_frac_bits,
                             rb_eps_bits, rb_mass, rb_mass_c, 32)
        mass = tl.sum(tl.where(chosen_r, mass_r, 0), axis=0)
        flags = tl.max(wcnt, axis=0) + 65536 * tl.max(ucnt, axis=0)
        tot = tl.sum(tl.sum(mass_r, axis=1), axis=0)
        req = tl.reshape(tl.broadcast_to(chosen_r[:, None, :], [RT, GP, BE]), [BT, BE])
    return sel, in_topk, v, alive, mx, den, mass, flags, tot, req


@triton.jit
def refine_tile(sel, allowed, valid_row, rows, rmask, cols, E, logits_ptr, stride_t, alive, mx, den, payload,
                ids_ptr, w_ptr, phys_ptr, min_score, out_scale, map_ptr,
                SIGMOID: tl.constexpr, K: tl.constexpr, K0: tl.constexpr, KEEP_N: tl.constexpr, HAS_MIN: tl.constexpr,
                RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_PHYS: tl.constexpr, BLOCK_K: tl.constexpr,
                OUT: tl.constexpr, SCALE: tl.constexpr, FILL_EMPTY: tl.constexpr, GUARD_G: tl.constexpr,
                GUARD_K: tl.constexpr):
    """Refine one tile and write its ``[BT, K]`` ids / weights (/ physical slots).

    Mirrors :func:`sglang_xshare.select.common.refine`: the ``KEEP_N`` best keys of
    ``where(allowed, sel, -inf)`` (maxima, each below the previous one), kept when the score is finite,
    the row valid and the slot below ``KEEP_N``; beyond ``K0`` (``HAS_MIN``; with the verify-row
    guard beyond the row's :func:`~._core.warm_width`) the gate weight must reach ``min_score``.
    Without a correction bias ``sel`` *is* the gate, so a slot's weight is decoded from its key;
    with one, the weights are gathered from the logits (:func:`~._core.gate_at`). ``payload [BLOCK_E] int32`` (``WANT_PHYS``) rides in the keys:
    the physical slot of each expert.

    Output epilogue (:class:`sglang_xshare.select.contract.OutputSpec`, mirrored by
    :func:`sglang_xshare.select.output.apply_output`): ``OUT`` 0 = logical ids (and physical slots
    to ``phys_ptr`` with ``WANT_PHYS``); 1 = the chosen physical slots go to ``ids_ptr``; 2 = the
    logical ids mapped through ``map_ptr [E]`` (EPLB's static logical -> physical dispatch map);
    ``SCALE``: weights times ``out_scale`` (after renormalisation); ``FILL_EMPTY``: an empty slot of
    a real token repeats the token's first id with weight 0 (backends that cannot take ``-1``;
    padded rows stay ``-1``).

    Returns ``(disp, short)``: ``disp [BT, BLOCK_K] int32`` the ids as written (-1 = none, also
    beyond ``K``) and the number of real rows with fewer than ``K`` kept slots (int32 scalar).
    """
    cmask = cols < E
    masked = tl.where(allowed, sel, float("-inf"))
    packed = pack(masked, cols[None, :], cmask[None, :])
    if WANT_PHYS:
        packed = tl.where(cmask[None, :], packed | tl.maximum(payload, 0).to(tl.int64)[None, :], SENT)
    kk = tl.arange(0, BLOCK_K)
    out_ids = tl.full([sel.shape[0], BLOCK_K], -1, dtype=tl.int32)
    out_w = tl.zeros([sel.shape[0], BLOCK_K], dtype=tl.float32)
    out_ph = tl.full([sel.shape[0], BLOCK_K], -1, dtype=tl.int32)
    best = tl.max(packed, axis=1)
    for j in range(0, runtime(KEEP_N)):  # a rolled loop (see _core.kth_keys)
        if j > 0:
            best = tl.max(tl.where(packed < best[:, None], packed, SENT), axis=1)
        val = unpack_key(best)
        keep = (val > float("-inf")) & valid_row
        out_ids = tl.where(kk[None, :] == j, tl.where(keep, unpack_col(best), -1)[:, None], out_ids)
        if not HAS_BIAS:
            out_w = tl.where(kk[None, :] == j, tl.where(keep, val, 0.0)[:, None], out_w)
        if WANT_PHYS:
            out_ph = tl.where(kk[None, :] == j, tl.where(keep, unpack_payload(best), -1)[:, None], out_ph)
    omask = rmask[:, None] & (kk < K)[None, :]
    if HAS_BIAS:
        g = gate_at(logits_ptr, stride_t, rows, out_ids, omask & (out_ids >= 0), alive, mx, den, SIGMOID)
        out_w = tl.where(out_ids >= 0, g, 0.0)
    if HAS_MIN:
        if GUARD_G > 0:
            beyond = kk[None, :] >= warm_width(rows, K0, GUARD_G, GUARD_K)[:, None]
        else:
            beyond = kk[None, :] >= K0
        drop = beyond & (out_w < min_score)
        out_ids = tl.where(drop, -1, out_ids)
        out_w = tl.where(drop, 0.0, out_w)
        out_ph = tl.where(drop, -1, out_ph)
    if RENORM:  # :func:`sglang_xshare.select.common.renormalize`: uniform when the kept gates sum to 0
        s = tl.sum(out_w, axis=1)
        kept = out_ids >= 0
        n = tl.sum(kept.to(tl.float32), axis=1)
        uni = tl.math.div_rn(tl.full(out_w.shape, 1.0, tl.float32), tl.broadcast_to(tl.maximum(n, 1.0)[:, None], out_w.shape))
        div = tl.math.div_rn(out_w, tl.broadcast_to(tl.maximum(s, FLT_TINY)[:, None], out_w.shape))
        out_w = tl.where((s > 0.0)[:, None], div, tl.where(kept, uni, 0.0))
    if SCALE:
        out_w = out_w * out_scale
    if OUT == 1:
        disp = out_ph
    elif OUT == 2:
        disp = tl.where(out_ids >= 0, tl.load(map_ptr + tl.maximum(out_ids, 0), mask=omask & (out_ids >= 0),
                                                other=-1).to(tl.int32), -1)
    else:
        disp = out_ids
    short = tl.sum((tl.sum(((disp >= 0) & omask).to(tl.int32), axis=1) < K) & valid_row & rmask, axis=0)
    stored = disp
    if FILL_EMPTY:
        first = tl.sum(tl.where(kk[None, :] == 0, disp, 0), axis=1)
        stored = tl.where((disp < 0) & valid_row[:, None], first[:, None], disp)
    offs = rows[:, None].to(tl.int64) * K + kk[None, :]
    tl.store(ids_ptr + offs, stored, mask=omask)
    tl.store(w_ptr + offs, out_w, mask=omask)
    if WANT_PHYS and OUT == 0:
        tl.store(phys_ptr + offs, out_ph, mask=omask)
    return tl.where(omask, disp, -1), short.to(tl.int32)
