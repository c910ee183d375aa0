"""Live selection metrics fused into the selection kernels' epilogue (no extra launch).

Per call, every program marks the ids its tile dispatched and its rows' own top-k experts in
two scratch sets (plain stores of 1: concurrent writers agree), adds its real-token and slot
counts to the layer's accumulator, and takes a ticket on an ever-growing ``int64`` counter; the
program that takes the launch's last ticket counts the sets -- distinct ids, and the busiest
rank's ids through the rank tables -- adds them, and clears the sets for the next call. No
spinning, any number of programs, nothing read by the host on the hot path.

Accumulator row (``int64 [8]``, :data:`sglang_xshare.select.output.METRIC_FIELDS`):
``calls, valid_tokens, distinct, topk_distinct, peak, topk_peak, pairs, short_tokens``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def metrics_mark(disp, in_topk, valid_row, cols, E, used_ptr, top_ptr):
    """Mark one tile: its dispatched ids ``disp [BT, BLOCK_K]`` (-1 = none) in ``used [U]`` and
    the union of its real rows' top-k sets ``in_topk [BT, BLOCK_E]`` in ``top [E]``; returns the
    tile's ``(real rows, kept slots)`` as int32 scalars."""
    tl.store(used_ptr + tl.maximum(disp, 0), tl.full(disp.shape, 1, tl.int32), mask=disp >= 0)
    tk = tl.max((in_topk & valid_row[:, None]).to(tl.int32), axis=0)
    tl.store(top_ptr + cols, tk, mask=(tk > 0) & (cols < E))
    return tl.sum(valid_row.to(tl.int32), axis=0), tl.sum(tl.sum((disp >= 0).to(tl.int32), axis=1), axis=0)


@triton.jit
def _rank_peak(flag, rank, BLOCK_R: tl.constexpr):
    """Largest number of flagged entries on one rank (``rank [N] int32``, -1 = none)."""
    rr = tl.arange(0, BLOCK_R)
    cnt = tl.sum(((rank[None, :] == rr[:, None]) & flag[None, :]).to(tl.int32), axis=1)
    return tl.max(cnt, axis=0)


@triton.jit
def metrics_finish(acc_ptr, ticket_ptr, used_ptr, top_ptr, urank_ptr, lrank_ptr, n_valid, pairs, short, U, E,
                   BLOCK_U: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """Add this program's counts to ``acc [8] int64``; the launch's last program adds the set
    counts (``urank [U]`` / ``lrank [E]`` int32: rank of each dispatched id / of each logical
    expert's first copy) and clears ``used`` / ``top``."""
    tl.atomic_add(acc_ptr + 1, n_valid.to(tl.int64))
    tl.atomic_add(acc_ptr + 6, pairs.to(tl.int64))
    tl.atomic_add(acc_ptr + 7, short.to(tl.int64))
    tl.debug_barrier()  # this program's marks precede its ticket (released by the atomic)
    done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    nb = tl.num_programs(0)
    if done % nb == nb - 1:  # the last of this launch's programs (the ticket only grows)
        u = tl.arange(0, BLOCK_U)
        um = u < U
        used = (tl.load(used_ptr + u, mask=um, other=0, cache_modifier=".cg") > 0) & um
        ur = tl.load(urank_ptr + u, mask=um, other=-1)
        c = tl.arange(0, BLOCK_E)
        cm = c < E
        top = (tl.load(top_ptr + c, mask=cm, other=0, cache_modifier=".cg") > 0) & cm
        lr = tl.load(lrank_ptr + c, mask=cm, other=-1)
        tl.atomic_add(acc_ptr + 0, tl.full([], 1, tl.int64))
        tl.atomic_add(acc_ptr + 2, tl.sum(used.to(tl.int64), axis=0))
        tl.atomic_add(acc_ptr + 3, tl.sum(top.to(tl.int64), axis=0))
        tl.atomic_add(acc_ptr + 4, _rank_peak(used, ur, BLOCK_R).to(tl.int64))
        tl.atomic_add(acc_ptr + 5, _rank_peak(top, lr, BLOCK_R).to(tl.int64))
        tl.store(used_ptr + u, tl.zeros([BLOCK_U], tl.int32), mask=um)
        tl.store(top_ptr + c, tl.zeros([BLOCK_E], tl.int32), mask=cm)
