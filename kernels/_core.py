"""Triton building blocks shared by every selection kernel: keys, scoring, per-token top-k.

Ordering trick used everywhere: an fp32 score is mapped to an order-preserving ``int32``
(:func:`orderable`) and packed into one ``int64`` key (:func:`pack`)::

    bits 63..32  orderable(score)      (signed: the order of the float)
    bits 31..16  65535 - expert id     (equal scores: the lower id is the larger key)
    bits 15..0   payload               (a physical slot for ``xshare_ep``, else 0)

A ``max`` over keys then returns the best score, the lowest id among equal scores -- exactly
the reference's stable descending sort -- and the payload, in one reduction. Keys of real
columns are distinct (they carry the id); padded / removed entries hold :data:`SENT`, below
every real key (``-inf`` scores included).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .workspace import interpreting

#: Key of a padded / removed entry: int64 min, below the key of any real score (even -inf).
SENT = tl.constexpr(-9223372036854775808)
#: Largest finite float32 (what +inf logits become).
FLT_MAX = tl.constexpr(3.4028234663852886e38)
#: Smallest normal float32 (``torch.finfo(torch.float32).tiny``), the renormalisation floor.
FLT_TINY = tl.constexpr(1.1754943508222875e-38)
#: ``2**40``: a gate contributes ``floor(gate * MASS_SCALE)`` int64 units to a mass
#: (:data:`sglang_xshare.select.common.MASS_BITS`; exact in float32).
MASS_SCALE = tl.constexpr(1099511627776.0)


if interpreting():
    @triton.jit
    def expf(x):
        """``exp`` of fp32: numpy's under the interpreter (which has no libdevice)."""
        return tl.exp(x)
else:
    @triton.jit
    def expf(x):
        """``exp`` of fp32: CUDA's accurate ``expf`` (libdevice), as torch's kernels use -- not
        Triton's ``tl.exp`` (``ex2.approx``), whose last-bit differences would reorder near-equal
        experts against torch."""
        return libdevice.exp(x)


@triton.jit
def runtime(n: tl.constexpr):
    """``n`` as a value the compiler cannot see through (``n + program_id(2)``, and axis 2 of
    every grid here is 1): a loop bounded by it stays a loop instead of being unrolled."""
    return n + tl.program_id(2)


@triton.jit
def mass_units(gate):
    """fp32 gates in ``[0, 1]`` -> int64 fixed-point units ``floor(gate * 2**40)``, as
    :func:`sglang_xshare.select.common.mass_units` (exact scaling, truncating cast)."""
    return (gate * MASS_SCALE).to(tl.int64)


@triton.jit
def mass_key(mass):
    """int64 masses -> the fp32 keys experts are ordered by, ``float32(float64(mass))``
    (:func:`sglang_xshare.select.common.mass_key`)."""
    return mass.to(tl.float64).to(tl.float32)


@triton.jit
def mass_threshold(tot, mass_bits, slack_bits):
    """``(float64(tot) * X) * (1 - 1e-6)`` (fp64; ``X`` and the slack as IEEE-754 bit patterns):
    :func:`sglang_xshare.select.common.mass_threshold`."""
    return (tot.to(tl.float64) * mass_bits.to(tl.float64, bitcast=True)) * slack_bits.to(tl.float64, bitcast=True)


@triton.jit
def orderable(x):
    """fp32 ``[...]`` -> int32 ``[...]`` with the same order (``-0.0`` is folded into ``+0.0``)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def from_orderable(o):
    """Inverse of :func:`orderable`: int32 ``[...]`` -> fp32 ``[...]``."""
    b = tl.where(o < 0, o ^ 0x7FFFFFFF, o)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def pack(key, cols, cmask):
    """``key`` fp32, ``cols`` int32 expert ids, ``cmask`` real column -> int64 key (payload 0).

    Larger key = larger score, ties -> lower id. Padded columns get :data:`SENT`.
    """
    o = orderable(key).to(tl.int64)
    p = (o << 32) | ((65535 - cols).to(tl.int64) << 16)
    return tl.where(cmask, p, SENT)


@triton.jit
def unpack_col(p):
    """Expert id (int32) of a key."""
    return (65535 - ((p >> 16) & 65535)).to(tl.int32)


@triton.jit
def unpack_payload(p):
    """Payload (int32, 0..65535) of a key."""
    return (p & 65535).to(tl.int32)


@triton.jit
def unpack_key(p):
    """fp32 score of a key."""
    return from_orderable((p >> 32).to(tl.int32))


@triton.jit
def load_valid(valid_ptr, rows, rmask, VALID: tl.constexpr):
    """``[BT] int1``: which rows are real (non-padded) tokens.

    ``VALID`` (constexpr): 0 = ``valid_ptr`` is a ``[T] uint8`` mask; 1 = it points to the
    number of non-padded tokens (a 0-d ``int32`` / ``int64`` tensor, SGLang's
    ``num_token_non_padded``: rows below it are real), read on the device; 2 = every row is real.
    """
    if VALID == 0:
        v = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
    elif VALID == 1:
        v = rows < tl.load(valid_ptr)
    else:
        v = rows >= 0
    return v & rmask


@triton.jit
def load_scores(logits_ptr, stride_t, bias_ptr, rows, rmask, cols, E,
                SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
                BLOCK_G: tl.constexpr):
    """Router logits of ``rows [BT]`` (``rmask``: row exists) -> ``(gate, sel, alive, mx, den)``.

    ``gate`` and ``sel`` are ``[BT, BLOCK_E] float32``; ``alive [BT]`` (the row has a finite
    logit), ``mx`` / ``den [BT] float32`` (softmax max and sum) let :func:`gate_at` recompute
    any single gate bit-identically.

    Mirrors :func:`sglang_xshare.select.scoring.compute_scores`: NaN -> -inf, +inf -> FLT_MAX,
    a row without a finite logit -> all zeros; softmax (``exp(x - max) / sum``) or sigmoid
    (``1 / (1 + exp(-x))``), with the accurate ``expf``, IEEE division (``div_rn``) and the
    formulas of torch's CUDA kernels -- not Triton's approximate ``exp`` and ``/`` -- so each
    token's scores, hence its expert order, are torch's bit for bit;
    ``sel = gate + bias``; DeepSeek grouped top-k masks the experts outside the ``TOPK_GROUP``
    best groups to ``-inf`` (group score: max, or sum of the two best when biased). Padded
    columns carry ``gate = 0`` and ``sel = -inf`` and must be masked by the caller.
    """
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    x = tl.load(ptrs, mask=m2, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == float("inf"), FLT_MAX, x)
    alive = tl.max((x > float("-inf")).to(tl.int32), axis=1) > 0
    x = tl.where(alive[:, None] | (cmask[None, :] == 0), x, 0.0)
    if SIGMOID:
        gate = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + expf(-x))
        mx = tl.zeros([x.shape[0]], dtype=tl.float32)
        den = mx
    else:
        mx = tl.max(x, axis=1)
        ex = expf(x - mx[:, None])
        den = tl.sum(ex, axis=1)
        gate = tl.math.div_rn(ex, tl.broadcast_to(den[:, None], ex.shape))
    gate = tl.where(cmask[None, :], gate, 0.0)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        sel = gate + b[None, :]
    else:
        sel = gate
    sel = tl.where(cmask[None, :], sel, float("-inf"))
    if N_GROUP > 0:
        sel = _mask_groups(sel, cols, cmask, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G)
    return gate, sel, alive, mx, den


@triton.jit
def gate_at(logits_ptr, stride_t, rows, ids, mask, alive, mx, den, SIGMOID: tl.constexpr):
    """``[BT, N] float32`` gate of expert ``ids [BT, N]`` of each row, recomputed from the logits
    with exactly the operations of :func:`load_scores` (so bit-identical to its ``gate``)."""
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + tl.maximum(ids, 0), mask=mask,
                other=0.0).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == float("inf"), FLT_MAX, x)
    x = tl.where(alive[:, None], x, 0.0)
    if SIGMOID:
        g = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + expf(-x))
    else:
        ex = expf(x - mx[:, None])
        g = tl.math.div_rn(ex, tl.broadcast_to(den[:, None], ex.shape))
    return g


@triton.jit
def _mask_groups(sel, cols, cmask, BIASED: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr):
    """Keep the ``TOPK_GROUP`` best groups of each row (ties: lower group), ``-inf`` elsewhere."""
    gidx = tl.arange(0, BLOCK_G)
    if N_GROUP * GROUP_SIZE == sel.shape[1] and N_GROUP == BLOCK_G:
        # groups tile the row exactly (e.g. DeepSeek-V3, 8 x 32): one reduction per step
        s3 = tl.reshape(sel, [sel.shape[0], N_GROUP, GROUP_SIZE])
        m1 = tl.max(s3, axis=2)
        if BIASED and GROUP_SIZE >= 2:
            j = tl.arange(0, GROUP_SIZE)[None, None, :]
            p1 = tl.min(tl.where(s3 == m1[:, :, None], j, GROUP_SIZE), axis=2)
            m2 = tl.max(tl.where(j == p1[:, :, None], float("-inf"), s3), axis=2)
            gsc = m1 + m2
        else:
            gsc = m1
        keep = _best_groups(gsc, gidx, N_GROUP, TOPK_GROUP)
        k3 = tl.broadcast_to(keep[:, :, None], [sel.shape[0], N_GROUP, GROUP_SIZE])
        allowed = tl.reshape(k3, [sel.shape[0], sel.shape[1]])
    else:
        allowed = _group_allowed_loop(sel, cols, cmask, BIASED, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G)
    return tl.where(allowed, sel, float("-inf"))


@triton.jit
def _best_groups(gsc, gidx, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """``[BT, BLOCK_G] int1``: each row's ``TOPK_GROUP`` best group scores (ties: lower group)."""
    gp = pack(gsc, gidx[None, :], (gidx < N_GROUP)[None, :])
    best = tl.max(gp, axis=1)
    for _j in tl.static_range(TOPK_GROUP - 1):
        best = tl.max(tl.where(gp < best[:, None], gp, SENT), axis=1)
    return gp >= best[:, None]


@triton.jit
def _group_allowed_loop(sel, cols, cmask, BIASED: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                        GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr):
    """``[BT, BLOCK_E] int1`` allowed mask, any group size (one pass per group)."""
    gidx = tl.arange(0, BLOCK_G)
    grp = cols // GROUP_SIZE
    gs = tl.zeros([sel.shape[0], BLOCK_G], dtype=tl.float32)
    for g in tl.static_range(N_GROUP):
        inside = ((grp == g) & cmask)[None, :]
        v = tl.where(inside, sel, float("-inf"))
        m1 = tl.max(v, axis=1)
        if BIASED and GROUP_SIZE >= 2:
            p1 = tl.min(tl.where(inside & (v == m1[:, None]), cols[None, :], 1 << 30), axis=1)
            m2 = tl.max(tl.where(cols[None, :] == p1[:, None], float("-inf"), v), axis=1)
            score = m1 + m2
        else:
            score = m1
        gs = tl.where(gidx[None, :] == g, score[:, None], gs)
    keep = _best_groups(gs, gidx, N_GROUP, TOPK_GROUP).to(tl.int32)
    allowed = tl.zeros(sel.shape, dtype=tl.int32)
    for g in tl.static_range(N_GROUP):
        kg = tl.max(tl.where(gidx[None, :] == g, keep, 0), axis=1)
        allowed = tl.where((grp == g)[None, :] & (kg[:, None] > 0), 1, allowed)
    return allowed > 0


@triton.jit
def warm_width(rows, K0: tl.constexpr, GUARD_G: tl.constexpr, GUARD_K: tl.constexpr):
    """``[BT] int32``: each row's warm-up width under the verify-row guard (``GUARD_G > 0``):
    ``GUARD_K`` on the target rows ``rows % GUARD_G == 0`` (``rows``: token indices), ``K0`` on
    the others -- :func:`sglang_xshare.select.common.warmup_width`, the constexprs from
    :meth:`sglang_xshare.select.contract.BatchContext.guard`."""
    return tl.where(rows % GUARD_G == 0, GUARD_K, K0)


@triton.jit
def kth_keys(packed, rows, K: tl.constexpr, K0: tl.constexpr, GUARD_G: tl.constexpr, GUARD_K: tl.constexpr):
    """Each row's ``K``-th and warm-up-th largest key (``[BT] int64`` each) of ``packed [BT, N]``:
    the ``K0``-th, or with the verify-row guard (``GUARD_G > 0``) the :func:`warm_width`-th of its
    row (``rows [BT]`` token indices; ``GUARD_K <= K``).

    ``packed >= kth[:, None]`` is then the row's top-``K`` set (keys are distinct). One max
    per rank, each over the keys below the previous one (nothing is rewritten). The ranks are a
    rolled loop (:func:`runtime`): unrolled, ``K`` copies of a tile-wide pass overflow the
    instruction cache, which measured slower than the loop.
    """
    best = tl.max(packed, axis=1)
    b0 = best
    if GUARD_G > 0:
        w0 = warm_width(rows, K0, GUARD_G, GUARD_K)
    for j in range(1, runtime(K)):
        best = tl.max(tl.where(packed < best[:, None], packed, SENT), axis=1)
        if GUARD_G > 0:
            b0 = tl.where(j == w0 - 1, best, b0)
        else:
            b0 = tl.where(j == K0 - 1, best, b0)
    return best, b0


@triton.jit
def token_topk(sel, cols, cmask, rows, K: tl.constexpr, K0: tl.constexpr, GUARD_G: tl.constexpr,
               GUARD_K: tl.constexpr):
    """Each row's own top-``K`` and warm-up sets (top-``K0``; with the verify-row guard the target
    rows' top-``GUARD_K``, :func:`kth_keys`): ``(in_topk, in_warm)`` ``[BT, BLOCK_E] int1``."""
    packed = pack(sel, cols[None, :], cmask[None, :])
    kth, kth0 = kth_keys(packed, rows, K, K0, GUARD_G, GUARD_K)
    return packed >= kth[:, None], packed >= kth0[:, None]
