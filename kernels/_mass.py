"""Triton batch pass: scoring, per-token top-k / top-k0, per-expert mass, and the batch pick.

One launch, grid ``(NB,)``. Each program scores ``chunks * BT`` tokens, finds each token's own
top-k and top-k0 and writes one row of block partials (``part_mass [NB, BLOCK_E] fp32``,
``part_flags [NB, BLOCK_E] int32`` = warm count + 65536 * top-k count). The program that
finishes last (an integer ticket; the *reduction* itself never uses float atomics) sums the
``NB`` rows in a fixed order -- so identical inputs give bit-identical mass -- and runs the
policy's pick, writing ``sel_buf [BLOCK_E] int32`` (>= 0 = chosen). It resets the ticket, so
the next launch (or graph replay) starts clean.

``FUSED`` (the batch fits one ``[BT, BLOCK_E]`` tile): the single program scores once, keeps
scores, top-k sets and mass in registers, picks and refines -- one launch in all.

``PICK`` (constexpr): 1 = OEA (chosen = union of the top-k0 sets), 2 = XShare greedy,
3 = xshare_ep without replicas, 4 = xshare_ep with replicas.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._core import load_scores, token_topk
from ._pick import budget_order, ep_partitioned, ep_replicated, greedy_chosen
from ._refine import allowed_tile, refine_tile


@triton.jit
def _tile_contrib(logits_ptr, stride_t, bias_ptr, valid_ptr, rows, cols, T, E,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr,
                  TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                  K: tl.constexpr, K0: tl.constexpr, MASS_FULL: tl.constexpr):
    """One tile's ``contrib [BT, BLOCK_E] fp32``, ``flags [BT, BLOCK_E] int32`` (1 warm, 2 top-k),
    and what the fused refinement reuses: ``sel``, ``in_topk``, ``valid [BT]``, ``alive``, ``mx``, ``inv``."""
    cmask = cols < E
    gate, sel, alive, mx, inv = load_scores(logits_ptr, stride_t, bias_ptr, rows, cols, T, E,
                                            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G)
    v = (tl.load(valid_ptr + rows, mask=rows < T, other=0) != 0) & (rows < T)
    in_topk, in_warm = token_topk(sel, cols, cmask, K, K0)
    tk = in_topk & v[:, None]
    wm = in_warm & v[:, None]
    if MASS_FULL:
        contrib = tl.where(v[:, None] & (sel > float("-inf")) & cmask[None, :], gate, 0.0)
    else:
        contrib = tl.where(tk, gate, 0.0)
    flags = wm.to(tl.int32) + 2 * tk.to(tl.int32)
    return contrib, flags, sel, in_topk, v, alive, mx, inv


@triton.jit
def pick_store(mass, flags, cols, E, sel_buf, order_buf, pk_ptr, val_ptr, rank_ptr, copy_ptr, copies_ptr,
               slot_rank_ptr, R, EPR, b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
               PICK: tl.constexpr, MODE: tl.constexpr, FILL: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, CH: tl.constexpr):
    """Run the policy's pick on the reduced ``mass`` / ``flags`` and write ``sel_buf``."""
    cmask = cols < E
    if PICK == 1:
        chosen = ((flags & 65535) > 0) & cmask
        tl.store(sel_buf + cols, tl.where(chosen, 1, -1))
    else:
        tot = tl.sum(mass, axis=0)
        key, packed, rank, m_eff, n_warm, n_pick = budget_order(mass, flags, cols, E, tot, pk_ptr, val_ptr, MODE,
                                                                b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                                                                CH)
        if PICK == 2:
            chosen = greedy_chosen(key, rank, m_eff, cols, E)
            tl.store(sel_buf + cols, tl.where(chosen, 1, -1))
        elif PICK == 3:
            ep_partitioned(key, packed, cols, E, m_eff, pk_ptr, rank_ptr, copy_ptr, sel_buf, R, EPR, FILL, CH)
        else:
            ep_replicated(rank, cols, E, m_eff, n_warm, n_pick, order_buf, copies_ptr, slot_rank_ptr, sel_buf, R,
                          FILL, BLOCK_C, BLOCK_R)


@triton.jit(do_not_specialize=["T", "E", "chunks", "b_count", "b_frac_bits", "b_eps_bits"])
def mass_kernel(logits_ptr, stride_t, bias_ptr, valid_ptr, T, E, chunks,
                part_mass, part_flags, ticket, sel_buf, order_buf, pk_ptr, val_ptr,
                rank_ptr, copy_ptr, copies_ptr, slot_rank_ptr, R, EPR,
                b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c,
                ids_ptr, w_ptr, phys_ptr, min_score,
                SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                K: tl.constexpr, K0: tl.constexpr, MASS_FULL: tl.constexpr,
                PICK: tl.constexpr, MODE: tl.constexpr, FILL: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                FUSED: tl.constexpr, ALLOW: tl.constexpr, HAS_MIN: tl.constexpr, RENORM: tl.constexpr,
                WANT_PHYS: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
                BT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Batch pass (and, when ``FUSED``, the whole policy) -- see the module docstring.

    Shapes: ``logits [T, E]`` fp32/bf16/fp16, ``bias [E]``, ``valid [T] uint8``; ``part_* [NB,
    BLOCK_E]``, ``ticket [1] int32`` (0 between launches), ``sel_buf / order_buf [BLOCK_E] int32``, scratch
    ``pk [BLOCK_E] int64`` / ``val [BLOCK_E] fp32``;
    placement tables ``rank / copy [E] int32``, ``copies / slot_rank [E, BLOCK_C] int32``.
    """
    pid = tl.program_id(0)
    nb = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    if FUSED:
        # one tile holds the whole batch: score once, pick, refine from the same registers
        rows = tl.arange(0, BT)
        contrib, flags, sel, in_topk, v, alive, mx, inv = _tile_contrib(
            logits_ptr, stride_t, bias_ptr, valid_ptr, rows, cols, T, E,
            SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL)
        mass = tl.sum(contrib, axis=0)
        fl = tl.sum(flags & 1, axis=0) + 65536 * tl.sum(flags >> 1, axis=0)
        pick_store(mass, fl, cols, E, sel_buf, order_buf, pk_ptr, val_ptr, rank_ptr, copy_ptr, copies_ptr,
                   slot_rank_ptr, R, EPR, b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c, PICK, MODE, FILL,
                   BLOCK_C, BLOCK_R, CH)
        tl.debug_barrier()
        allowed = allowed_tile(sel, in_topk, rows, cols, T, E, sel_buf, sel_buf, sel_buf, 0, ALLOW, False)
        refine_tile(sel, allowed, v, rows, cols, T, E, logits_ptr, stride_t, alive, mx, inv,
                    ids_ptr, w_ptr, phys_ptr, sel_buf, min_score,
                    SIGMOID, K, K0, K, HAS_MIN, RENORM, HAS_BIAS, WANT_PHYS, BLOCK_K)
    else:
        acc_mass = tl.zeros([BLOCK_E], dtype=tl.float32)
        acc_flags = tl.zeros([BLOCK_E], dtype=tl.int32)
        for c in range(chunks):
            rows = (pid * chunks + c) * BT + tl.arange(0, BT)
            contrib, flags, _s, _k, _v, _a, _m, _i = _tile_contrib(
                logits_ptr, stride_t, bias_ptr, valid_ptr, rows, cols, T, E,
                SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, K, K0, MASS_FULL)
            acc_mass += tl.sum(contrib, axis=0)
            acc_flags += tl.sum(flags & 1, axis=0) + 65536 * tl.sum(flags >> 1, axis=0)
        tl.store(part_mass + pid * BLOCK_E + cols, acc_mass)
        tl.store(part_flags + pid * BLOCK_E + cols, acc_flags)
        tl.debug_barrier()
        done = tl.atomic_add(ticket, 1, sem="acq_rel")
        if done == nb - 1:
            rr = tl.arange(0, RB)
            tot_m = tl.zeros([BLOCK_E], dtype=tl.float32)
            tot_f = tl.zeros([BLOCK_E], dtype=tl.int32)
            for r0 in range(0, nb, RB):
                r = r0 + rr
                offs = r[:, None] * BLOCK_E + cols[None, :]
                pm = r[:, None] < nb
                tot_m += tl.sum(tl.load(part_mass + offs, mask=pm, other=0.0, cache_modifier=".cg"), axis=0)
                tot_f += tl.sum(tl.load(part_flags + offs, mask=pm, other=0, cache_modifier=".cg"), axis=0)
            pick_store(tot_m, tot_f, cols, E, sel_buf, order_buf, pk_ptr, val_ptr, rank_ptr, copy_ptr, copies_ptr,
                       slot_rank_ptr, R, EPR, b_count, b_frac_bits, b_eps_bits, b_mass, b_mass_c, PICK, MODE, FILL,
                       BLOCK_C, BLOCK_R, CH)
            tl.atomic_xchg(ticket, 0)
