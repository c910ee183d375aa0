"""Triton refinement: each token routes to its best ``<= k`` experts inside its allowed set.

Mirrors :func:`sglang_xshare.select.common.refine`: a stable descending order of
``where(allowed, sel, -inf)``, the first ``K`` ids, kept when the score is finite, the token is
valid, the slot is below ``KEEP_N`` and (beyond ``K0``, when ``HAS_MIN``) the gate weight is at
least ``min_score``; weights are the gate probabilities, renormalised over the kept slots.

``ALLOW`` (constexpr) says where the allowed set comes from: 0 = every expert (``topk``,
``cap``), 1 = ``sel_buf[e] >= 0`` (the batch's chosen set), 2 = chosen and the token's own
top-k (``oea_simple``), 3 = ``chosen_r[request(t), e] & sel_buf[e] >= 0`` (``xshare_spec``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._core import FLT_TINY, SENT, gate_at, load_scores, pack, token_topk, unpack_col, unpack_key


@triton.jit
def refine_tile(sel, allowed, valid_row, rows, cols, T, E, logits_ptr, stride_t, alive, mx, inv,
                ids_ptr, w_ptr, phys_ptr, copy_ptr, min_score,
                SIGMOID: tl.constexpr, K: tl.constexpr, K0: tl.constexpr, KEEP_N: tl.constexpr, HAS_MIN: tl.constexpr,
                RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_PHYS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Refine one tile of ``[BT, BLOCK_E]`` scores and write ``[BT, K]`` ids / weights (/ physical ids).

    Without a correction bias ``sel`` *is* the gate, so a slot's weight is decoded from its key;
    with one, the ``K`` weights are recomputed from the logits at the end (:func:`gate_at`), one
    gather instead of one reduction per slot. ``min_score`` drops slots ``>= K0`` afterwards
    (the reference's rule is per slot, so the order does not matter).
    """
    cmask = cols < E
    masked = tl.where(allowed, sel, float("-inf"))
    packed = pack(masked, cols[None, :], cmask[None, :])
    kk = tl.arange(0, BLOCK_K)
    out_ids = tl.full([sel.shape[0], BLOCK_K], -1, dtype=tl.int32)
    out_w = tl.zeros([sel.shape[0], BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(K):
        if j < KEEP_N:
            best = tl.max(packed, axis=1)
            col = unpack_col(best)
            val = unpack_key(best)
            keep = (val > float("-inf")) & valid_row
            out_ids = tl.where(kk[None, :] == j, tl.where(keep, col, -1)[:, None], out_ids)
            if not HAS_BIAS:
                out_w = tl.where(kk[None, :] == j, tl.where(keep, val, 0.0)[:, None], out_w)
            packed = tl.where(packed == best[:, None], SENT, packed)
    omask = (rows < T)[:, None] & (kk < K)[None, :]
    if HAS_BIAS:
        g = gate_at(logits_ptr, stride_t, rows, out_ids, omask & (out_ids >= 0), alive, mx, inv, SIGMOID)
        out_w = tl.where(out_ids >= 0, g, 0.0)
    if HAS_MIN:
        drop = (kk[None, :] >= K0) & (out_w < min_score)
        out_ids = tl.where(drop, -1, out_ids)
        out_w = tl.where(drop, 0.0, out_w)
    if RENORM:
        s = tl.sum(out_w, axis=1)
        out_w = out_w / tl.maximum(s, FLT_TINY)[:, None]
    offs = rows[:, None].to(tl.int64) * K + kk[None, :]
    tl.store(ids_ptr + offs, out_ids, mask=omask)
    tl.store(w_ptr + offs, out_w, mask=omask)
    if WANT_PHYS:
        ph = tl.load(copy_ptr + tl.maximum(out_ids, 0), mask=omask, other=-1)
        tl.store(phys_ptr + offs, tl.where(out_ids >= 0, ph, -1), mask=omask)


@triton.jit
def allowed_tile(sel, in_topk, rows, cols, T, E, sel_buf, chosen_r_ptr, rid_ptr, stride_cr,
                 ALLOW: tl.constexpr, HAS_RID: tl.constexpr):
    """``[BT, BLOCK_E] int1`` allowed set of a tile (see the module docstring for ``ALLOW``);
    ``in_topk`` is the tile's own top-k (read only when ``ALLOW == 2``)."""
    cmask = cols < E
    if ALLOW == 0:
        allowed = (sel == sel) | (sel != sel)
    else:
        chosen = tl.load(sel_buf + cols, mask=cmask, other=-1, cache_modifier=".cg") >= 0
        allowed = (sel == sel) & chosen[None, :]
        if ALLOW == 2:
            allowed = allowed & in_topk
        if ALLOW == 3:
            rmask = rows < T
            if HAS_RID:
                rid = tl.load(rid_ptr + rows, mask=rmask, other=0)
                rid = tl.minimum(tl.maximum(rid, 0), T - 1)
            else:
                rid = rows
            cr = tl.load(chosen_r_ptr + rid[:, None].to(tl.int64) * stride_cr + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0, cache_modifier=".cg")
            allowed = allowed & (cr != 0)
    return allowed


@triton.jit(do_not_specialize=["T", "E"])
def refine_kernel(logits_ptr, stride_t, bias_ptr, valid_ptr, T, E,
                  sel_buf, chosen_r_ptr, rid_ptr, stride_cr, copy_ptr,
                  ids_ptr, w_ptr, phys_ptr, min_score,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                  ALLOW: tl.constexpr, HAS_RID: tl.constexpr,
                  K: tl.constexpr, K0: tl.constexpr, KEEP_N: tl.constexpr, HAS_MIN: tl.constexpr,
                  RENORM: tl.constexpr, WANT_PHYS: tl.constexpr,
                  BT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid ``(cdiv(T, BT),)``: scoring + refinement of ``BT`` tokens per program.

    Inputs: ``logits [T, E]`` (row stride ``stride_t``), ``valid [T] uint8``, ``sel_buf [BLOCK_E]
    int32`` chosen set (>= 0 = chosen; the physical slot for ``xshare_ep``), ``chosen_r [T,
    stride_cr] int8`` per-request sets, ``request_ids [T] int64``. Outputs ``[T, K]`` int32 ids,
    float32 weights, int32 physical ids (``WANT_PHYS``).
    """
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BLOCK_E)
    gate, sel, alive, mx, inv = load_scores(logits_ptr, stride_t, bias_ptr, rows, cols, T, E,
                                            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G)
    valid_row = (tl.load(valid_ptr + rows, mask=rows < T, other=0) != 0) & (rows < T)
    if ALLOW == 2:
        in_topk, _w = token_topk(sel, cols, cols < E, K, 1)
    else:
        in_topk = sel == sel
    allowed = allowed_tile(sel, in_topk, rows, cols, T, E, sel_buf, chosen_r_ptr, rid_ptr, stride_cr, ALLOW, HAS_RID)
    refine_tile(sel, allowed, valid_row, rows, cols, T, E, logits_ptr, stride_t, alive, mx, inv,
                ids_ptr, w_ptr, phys_ptr, copy_ptr, min_score,
                SIGMOID, K, K0, KEEP_N, HAS_MIN, RENORM, HAS_BIAS, WANT_PHYS, BLOCK_K)
