"""SwiGLU experts of one EP rank: bf16 weights and a grouped GEMM (Triton on GPU, torch on CPU).

Weights of the ``L`` local physical slots:

* ``w13 [L, 2 * I, H] bf16`` -- rows ``[0, I)`` the gate projection, rows ``[I, 2I)`` the up projection;
* ``w2 [L, H, I] bf16`` -- the down projection.

``expert_e(x) = w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x))`` in float32 accumulation; the
intermediate activation is rounded to bf16 (as every fused MoE kernel does).

Two inputs (see :mod:`sglang_xshare.dispatch.base`):

* STANDARD rows ``x [N, H]`` with ``local_ids [N, k] int32`` (``-1`` = not here) and
  ``weights [N, k] float32`` -> ``[N, H] bf16`` = ``sum_j weights[:, j] * expert_{ids[:, j]}(x)``.
* BATCHED ``x [L, M, H]`` with ``counts [L] int32`` -> ``[L, M, H] bf16`` unweighted (rows
  ``>= counts[e]`` are left unwritten).

The Triton path is a grouped GEMM in the style of SGLang/vLLM ``fused_moe``: (token, slot) pairs are
sorted by expert on device, cut into ``BLOCK_M`` tiles, and one program computes one tile x one
``BLOCK_N`` column block, so an expert nobody selected costs nothing (its weights are never read).
Static shapes, no host sync: CUDA-graph capturable. The torch path loops over local experts (not
tokens) and syncs with the host; it is the CPU path and a second implementation for tests.
"""

from __future__ import annotations

import math
import os

import torch

from ..dispatch.base import DispatchedTokens, ExpertsFormat

try:  # Triton is optional (CPU CI has it, but kernels run only on CUDA tensors or TRITON_INTERPRET=1)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

#: Triton's CPU interpreter (``TRITON_INTERPRET=1``): kernels upcast bf16 tiles before ``tl.dot``.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["SwiGLUExperts", "make_expert_weights", "expert_forward_dense", "HAS_TRITON"]


# ----------------------------------------------------------------------------- weights
def make_expert_weights(logical_ids: torch.Tensor | list[int], hidden: int, intermediate: int,
                        seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic bf16 weights for the given logical experts (replicas of one expert are equal).

    Expert ``e``'s weights depend only on ``(seed, e, hidden, intermediate, device type)``, so every
    rank (and the single-process reference) rebuilds the same tensors without communication.

    Returns:
        ``w13 [n, 2I, H] bf16`` (std ``1/sqrt(H)``) and ``w2 [n, H, I] bf16`` (std ``1/sqrt(I)``).
    """
    ids = [int(e) for e in (logical_ids.tolist() if isinstance(logical_ids, torch.Tensor) else logical_ids)]
    dev = torch.device(device)
    w13 = torch.empty(len(ids), 2 * intermediate, hidden, dtype=torch.bfloat16, device=dev)
    w2 = torch.empty(len(ids), hidden, intermediate, dtype=torch.bfloat16, device=dev)
    for i, e in enumerate(ids):
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + e)
        w13[i] = (torch.randn(2 * intermediate, hidden, generator=g, device=dev) / math.sqrt(hidden)).to(torch.bfloat16)
        w2[i] = (torch.randn(hidden, intermediate, generator=g, device=dev) / math.sqrt(intermediate)).to(torch.bfloat16)
    return w13, w2


def expert_forward_dense(x: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """One expert on rows ``x [n, H]`` (any float) -> ``[n, H] float32`` (fp32 math, bf16-rounded intermediate)."""
    I = w2_e.shape[1]
    h = x.float() @ w13_e.float().t()
    act = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]).to(torch.bfloat16).float()
    return act @ w2_e.float().t()


# ----------------------------------------------------------------------------- tiles
def build_tiles(counts: torch.Tensor, starts: torch.Tensor, block_m: int, max_tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each expert's contiguous run of positions into ``block_m`` tiles (static ``max_tiles``).

    Args:
        counts: ``[L] int64`` positions per expert. starts: ``[L] int64`` first position of each expert.
        block_m: tile height. max_tiles: upper bound on ``sum(ceil(counts / block_m))``.

    Returns:
        ``tile_expert [max_tiles] int32`` (``-1`` = unused tile), ``tile_start``/``tile_end``
        ``[max_tiles] int32`` position range ``[start, end)`` each tile covers (clipped by ``end``).
    """
    L = counts.numel()
    tiles_e = (counts + block_m - 1) // block_m
    cum = tiles_e.cumsum(0)
    first = cum - tiles_e
    t = torch.arange(max_tiles, device=counts.device, dtype=cum.dtype)
    e = torch.searchsorted(cum, t, right=True)
    valid = e < L
    ec = e.clamp(max=L - 1)
    start = starts[ec] + (t - first[ec]) * block_m
    end = starts[ec] + counts[ec]
    expert = torch.where(valid, ec, torch.full_like(ec, -1))
    return expert.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


if HAS_TRITON:

    @triton.jit
    def _gate_up_kernel(x_ptr, w13_ptr, inter_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, in_row_ptr,
                        H, I, stride_xm, stride_we, stride_wn, stride_im,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(tile_expert_ptr + t)
        if e < 0:
            return
        start = tl.load(tile_start_ptr + t)
        end = tl.load(tile_end_ptr + t)
        pos = start + tl.arange(0, BLOCK_M)
        pmask = pos < end
        rows = tl.load(in_row_ptr + pos, mask=pmask, other=0).to(tl.int64)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        wbase = w13_ptr + e.to(tl.int64) * stride_we
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < H
            a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=pmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wg = tl.load(wbase + offs_n[None, :].to(tl.int64) * stride_wn + kk[:, None], mask=wmask, other=0.0)
            wu = tl.load(wbase + (offs_n[None, :] + I).to(tl.int64) * stride_wn + kk[:, None], mask=wmask, other=0.0)
            if UPCAST:  # Triton's CPU interpreter mis-computes bf16 dots: test the indexing in fp32
                a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(inter_ptr + pos[:, None].to(tl.int64) * stride_im + offs_n[None, :], h.to(tl.bfloat16),
                 mask=pmask[:, None] & nmask[None, :])

    @triton.jit
    def _down_kernel(inter_ptr, w2_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, out_row_ptr, row_w_ptr,
                     H, I, stride_im, stride_we, stride_wn, stride_om,
                     HAS_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(tile_expert_ptr + t)
        if e < 0:
            return
        start = tl.load(tile_start_ptr + t)
        end = tl.load(tile_end_ptr + t)
        pos = start + tl.arange(0, BLOCK_M)
        pmask = pos < end
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        wbase = w2_ptr + e.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < I
            a = tl.load(inter_ptr + pos[:, None].to(tl.int64) * stride_im + kk[None, :], mask=pmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(wbase + offs_n[None, :].to(tl.int64) * stride_wn + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc)
        if HAS_WEIGHT:
            rw = tl.load(row_w_ptr + pos, mask=pmask, other=0.0)
            acc = acc * rw[:, None]
        orow = tl.load(out_row_ptr + pos, mask=pmask, other=0).to(tl.int64)
        optr = out_ptr + orow[:, None] * stride_om + offs_n[None, :]
        omask = pmask[:, None] & nmask[None, :]
        if ATOMIC:
            tl.atomic_add(optr, acc, mask=omask, sem="relaxed")
        else:
            tl.store(optr, acc.to(tl.bfloat16), mask=omask)


def _block_m(avg_rows: float) -> int:
    """Tile height from the mean rows per active expert (a static, shape-only choice)."""
    if avg_rows <= 16:
        return 16
    if avg_rows <= 32:
        return 32
    return 64


# ----------------------------------------------------------------------------- module
class SwiGLUExperts(torch.nn.Module):
    """The local experts of one EP rank.

    Args:
        w13: ``[L, 2I, H] bf16``; w2: ``[L, H, I] bf16`` (see the module docstring).
        impl: ``"triton"`` (CUDA tensors, or CPU with ``TRITON_INTERPRET=1``), ``"torch"``, or
            ``"auto"`` (Triton on CUDA when importable, torch otherwise).
        block_n / block_k / num_warps / num_stages: Triton tile shape (weight streaming at decode).
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, impl: str = "auto",
                 block_n: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 3) -> None:
        super().__init__()
        if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
            raise ValueError(f"w13 must be [L, 2I, H] and w2 [L, H, I]; got {tuple(w13.shape)} and {tuple(w2.shape)}")
        L, twoI, H = w13.shape
        if twoI % 2 or w2.shape[1] != H or w2.shape[2] != twoI // 2:
            raise ValueError(f"inconsistent expert shapes {tuple(w13.shape)} / {tuple(w2.shape)}")
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"--experts-impl: expected auto, triton or torch, got {impl!r}")
        if impl == "triton" and not HAS_TRITON:
            raise ValueError("--experts-impl triton: triton is not importable")
        self.w13 = w13.contiguous()
        self.w2 = w2.contiguous()
        self.num_local, self.hidden, self.intermediate = L, H, twoI // 2
        self.impl = impl
        self.block_n, self.block_k, self.num_warps, self.num_stages = block_n, block_k, num_warps, num_stages

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.impl == "torch":
            return False
        if self.impl == "triton":
            return True
        return HAS_TRITON and x.is_cuda

    def forward(self, tokens: DispatchedTokens, max_pairs: int | None = None) -> torch.Tensor:
        """Run the local experts on what dispatch delivered.

        Args:
            tokens: STANDARD or BATCHED :class:`DispatchedTokens`.
            max_pairs: BATCHED only: an upper bound on ``sum(expert_counts)`` (e.g. ``R * T * k``)
                that bounds the tile grid; default ``L * M``.

        Returns:
            STANDARD ``[N, H] bf16`` weighted sums; BATCHED ``[L, M, H] bf16`` unweighted outputs.
        """
        if tokens.format is ExpertsFormat.STANDARD:
            assert tokens.local_ids is not None and tokens.weights is not None
            if self._use_triton(tokens.hidden):
                return self._standard_triton(tokens.hidden, tokens.local_ids, tokens.weights)
            return self._standard_torch(tokens.hidden, tokens.local_ids, tokens.weights)
        assert tokens.expert_counts is not None
        if self._use_triton(tokens.hidden):
            return self._batched_triton(tokens.hidden, tokens.expert_counts, max_pairs)
        return self._batched_torch(tokens.hidden, tokens.expert_counts)

    # ------------------------------------------------------------------ torch (CPU) path
    def _standard_torch(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        ids = ids.long()
        for e in range(self.num_local):
            coef = torch.where(ids == e, w.float(), torch.zeros((), device=w.device)).sum(dim=1)   # [N]
            rows = torch.nonzero((ids == e).any(dim=1)).flatten()
            if rows.numel() == 0:
                continue
            y = expert_forward_dense(x.index_select(0, rows), self.w13[e], self.w2[e])
            out.index_add_(0, rows, y * coef.index_select(0, rows).unsqueeze(1))
        return out.to(torch.bfloat16)

    def _batched_torch(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, c in enumerate(counts.tolist()):
            if c > 0:
                out[e, :c] = expert_forward_dense(x[e, :c], self.w13[e], self.w2[e]).to(x.dtype)
        return out

    # ------------------------------------------------------------------ Triton path
    def _run(self, x2d: torch.Tensor, in_row: torch.Tensor, out: torch.Tensor, out_row: torch.Tensor,
             row_w: torch.Tensor | None, tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             npos: int, block_m: int) -> None:
        tile_expert, tile_start, tile_end = tiles
        H, I = self.hidden, self.intermediate
        inter = torch.empty(max(npos, 1), I, dtype=torch.bfloat16, device=x2d.device)
        nt = tile_expert.numel()
        _gate_up_kernel[(nt, triton.cdiv(I, self.block_n))](
            x2d, self.w13, inter, tile_expert, tile_start, tile_end, in_row,
            H, I, x2d.stride(0), self.w13.stride(0), self.w13.stride(1), inter.stride(0),
            UPCAST=_INTERPRET, BLOCK_M=block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
            num_warps=self.num_warps, num_stages=self.num_stages)
        _down_kernel[(nt, triton.cdiv(H, self.block_n))](
            inter, self.w2, out, tile_expert, tile_start, tile_end, out_row,
            row_w if row_w is not None else out_row,
            H, I, inter.stride(0), self.w2.stride(0), self.w2.stride(1), out.stride(0),
            HAS_WEIGHT=row_w is not None, ATOMIC=out.dtype == torch.float32, UPCAST=_INTERPRET,
            BLOCK_M=block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
            num_warps=self.num_warps, num_stages=self.num_stages)

    def _standard_triton(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, k = ids.shape
        L = self.num_local
        npos = N * k
        flat = ids.reshape(-1).long()
        flat = torch.where(flat < 0, torch.full_like(flat, L), flat)
        order = torch.sort(flat, stable=True).indices                                     # position -> pair
        counts = torch.zeros(L + 1, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))[:L]
        starts = counts.cumsum(0) - counts
        block_m = _block_m(npos / max(1, min(L, npos)))
        tiles = build_tiles(counts, starts, block_m, triton.cdiv(max(npos, 1), block_m) + min(L, max(npos, 1)))
        in_row = (order // k).to(torch.int32)
        row_w = w.reshape(-1).float().index_select(0, order).contiguous()
        out = torch.zeros(N, self.hidden, dtype=torch.float32, device=x.device)
        self._run(x.contiguous(), in_row, out, in_row, row_w, tiles, npos, block_m)
        return out.to(torch.bfloat16)

    def _batched_triton(self, x: torch.Tensor, counts: torch.Tensor, max_pairs: int | None) -> torch.Tensor:
        L, M, H = x.shape
        counts = counts.long().clamp(max=M)
        starts = torch.arange(L, device=x.device, dtype=torch.int64) * M
        bound = L * M if max_pairs is None else min(L * M, max_pairs)
        block_m = _block_m(bound / max(1, L))
        max_tiles = min(L * triton.cdiv(M, block_m), triton.cdiv(max(bound, 1), block_m) + L)
        tiles = build_tiles(counts, starts, block_m, max_tiles)
        rows = torch.arange(L * M, device=x.device, dtype=torch.int32)
        out = torch.empty_like(x)
        self._run(x.reshape(L * M, H), rows, out.view(L * M, H), rows, None, tiles, L * M, block_m)
        return out
