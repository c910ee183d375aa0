"""Triton refinement as its own launch: ``topk`` / ``cap``, and the second launch of the
two-launch mode (:mod:`._batch` with ``SYNC = 2``, :mod:`._spec`).

``ALLOW`` (constexpr) says where each token's allowed set comes from: 0 = every expert
(``topk``, ``cap``), 1 = ``sel[e] >= 0`` (the batch's chosen set, ``sel [BLOCK_E] int32`` =
payload of each chosen expert, -1 otherwise), 2 = chosen and the token's own top-k
(``oea_simple``), 3 = chosen and ``req[t, e] != 0`` (the token's request set, ``xshare_spec``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._core import load_scores, load_valid, token_topk
from ._metrics import metrics_finish, metrics_mark
from ._tile import refine_tile


@triton.jit(do_not_specialize=["T", "E", "U", "gate_arm"])
def refine_kernel(logits_ptr, stride_t, bias_ptr, valid_ptr, T, E, sel_ptr, req_ptr,
                  ids_ptr, w_ptr, phys_ptr, min_score, out_scale, map_ptr,
                  acc_ptr, mticket_ptr, used_ptr, top_ptr, urank_ptr, lrank_ptr, U, gate_ptr, gate_arm,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                  ALLOW: tl.constexpr, K: tl.constexpr, K0: tl.constexpr, KEEP_N: tl.constexpr,
                  HAS_MIN: tl.constexpr, RENORM: tl.constexpr, WANT_PHYS: tl.constexpr,
                  BT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                  VALID: tl.constexpr, OUT: tl.constexpr, SCALE: tl.constexpr, FILL_EMPTY: tl.constexpr,
                  METRICS: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_MR: tl.constexpr, GATE: tl.constexpr = False,
                  GUARD_G: tl.constexpr = 0, GUARD_K: tl.constexpr = 0):
    """Grid ``(cdiv(T, BT),)``: scoring + refinement of ``BT`` tokens per program.

    Inputs: ``logits [T, E]`` (row stride ``stride_t``), ``valid`` (see
    :func:`~._core.load_valid`), ``sel [BLOCK_E] int32``, ``req [T, BLOCK_E] int8``. Outputs
    ``[T, K]`` int32 ids, float32 weights, int32 physical slots (``WANT_PHYS``); output epilogue
    ``OUT / SCALE / FILL_EMPTY`` as in :func:`~._tile.refine_tile`. ``METRICS``: add this call to
    the accumulator row ``acc [8] int64`` (:mod:`._metrics`; scratch ``used [U]`` / ``top [E]``
    int32, ticket ``[1] int64``, rank tables ``urank [U]`` / ``lrank [E]`` int32). ``GATE``: return at
    once unless ``gate [1] int64`` holds ``gate_arm`` (nothing written). ``GUARD_G / GUARD_K``: the
    verify-row guard (the ``min_score`` floor spares the target rows' first ``GUARD_K`` slots).
    """
    if GATE:
        if tl.load(gate_ptr) != gate_arm:
            return
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    gate, sel, alive, mx, den = load_scores(logits_ptr, stride_t, bias_ptr, rows, rmask, cols, E,
                                            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G)
    v = load_valid(valid_ptr, rows, rmask, VALID)
    if ALLOW == 0:
        slot = tl.zeros([BLOCK_E], dtype=tl.int32)
        allowed = sel == sel
    else:
        slot = tl.load(sel_ptr + cols, mask=cmask, other=-1, cache_modifier=".cg")
        allowed = (slot >= 0)[None, :] & (sel == sel)
        if ALLOW == 2:
            in_topk, _w = token_topk(sel, cols, cmask, rows, K, 1, 0, 0)
            allowed = allowed & in_topk
        if ALLOW == 3:
            req = tl.load(req_ptr + rows[:, None].to(tl.int64) * BLOCK_E + cols[None, :],
                          mask=rmask[:, None] & cmask[None, :], other=0, cache_modifier=".cg")
            allowed = allowed & (req != 0)
    disp, short = refine_tile(sel, allowed, v, rows, rmask, cols, E, logits_ptr, stride_t, alive, mx, den, slot,
                              ids_ptr, w_ptr, phys_ptr, min_score, out_scale, map_ptr,
                              SIGMOID, K, K0, KEEP_N, HAS_MIN, RENORM, HAS_BIAS, WANT_PHYS, BLOCK_K,
                              OUT, SCALE, FILL_EMPTY, GUARD_G, GUARD_K)
    if METRICS:
        in_top, _w0 = token_topk(sel, cols, cmask, rows, K, 1, 0, 0)
        n_valid, pairs = metrics_mark(disp, in_top, v, cols, E, used_ptr, top_ptr)
        metrics_finish(acc_ptr, mticket_ptr, used_ptr, top_ptr, urank_ptr, lrank_ptr, n_valid, pairs, short, U, E,
                       BLOCK_U, BLOCK_E, BLOCK_MR)
