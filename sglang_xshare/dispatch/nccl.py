"""Token all-to-all through ``torch.distributed.all_to_all_single`` (NCCL on GPU, gloo on CPU).

Two modes (:class:`NcclDispatcher`, ``mode=``):

* ``"padded"`` -- every rank sends a fixed ``[T, H]`` block to every rank (``T`` = tokens per
  rank, equal on all ranks, as with SGLang's CUDA-graph padded decode batches); the slots a
  destination does not hold are ``-1`` in the metadata, so it computes nothing for them.
  Static shapes, no host sync: CUDA-graph capturable. Wire bytes are fixed
  (``(R - 1) * T * H * 2`` per rank and direction) whatever the selection; the *useful* rows are
  counted in :class:`~.base.DispatchStats`. With ``capacity=C`` the block is always ``[C, H]``
  (the batch padded with empty rows, as DeepEP's low-latency buffers hold ``max_tokens``), so
  ranks may pass different ``T <= C``, ``0`` included; without it, unequal ``T`` across ranks is a
  caller error the collective cannot report (gloo raises, NCCL may hang or read garbage).
* ``"exact"`` -- each rank sends each destination only the tokens with a kept slot there (once per
  token), after exchanging counts. Tokens whose every slot is local never leave the rank. Needs
  the counts on the host (one sync per dispatch), so it is not graph-capturable; ``T`` may differ
  between ranks.

Both return :attr:`~.base.ExpertsFormat.STANDARD` rows; combine sums the weighted partial outputs.
Dispatch moves each row's hidden state and its metadata (local slot ids, weights) as one byte row
``[2H + 8k] uint8`` in a single all-to-all; combine is one all-to-all of ``[*, H] bf16``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .base import DispatchConfigError, DispatchedTokens, Dispatcher, ExpertsFormat, rank_membership

__all__ = ["NcclDispatcher"]


def _pack_meta(local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[..., k] int32`` ids + ``[..., k] float32`` weights -> ``[..., 2k] int32`` (bit copy)."""
    return torch.cat([local_ids.to(torch.int32), weights.to(torch.float32).view(torch.int32)], dim=-1)


def _unpack_meta(meta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return meta[..., :k].contiguous(), meta[..., k:].contiguous().view(torch.float32)


def _pack_rows(hidden: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``[n, H] bf16`` + ``[n, 2k] int32`` -> ``[n, 2H + 8k] uint8``: one all-to-all moves both."""
    return torch.cat([hidden.contiguous().view(torch.uint8), meta.contiguous().view(torch.uint8)], dim=1)


def _unpack_rows(rows: torch.Tensor, hidden: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_pack_rows`: ``(hidden [n, H] bf16, local_ids [n, k] int32, weights [n, k] float32)``."""
    h = rows[:, : 2 * hidden].contiguous().view(torch.bfloat16)
    ids, w = _unpack_meta(rows[:, 2 * hidden:].contiguous().view(torch.int32), k)
    return h, ids, w


class NcclDispatcher(Dispatcher):
    """EP dispatch/combine with ``all_to_all_single`` on a process group.

    Args:
        rank / num_ranks: position in and size of ``group``.
        num_physical: physical expert slots ``P`` (``P % R == 0``).
        hidden: hidden size ``H``. top_k: slots per token ``k``.
        mode: ``"padded"`` (graph-capturable) or ``"exact"`` (only useful rows travel).
        group: the EP process group (default: the world group).
        capacity: padded mode: rows per rank pair on every call (``T <= capacity`` on each rank,
            any mix across ranks); ``None``: ``T`` rows, equal on every rank.
    """

    format = ExpertsFormat.STANDARD

    def __init__(self, rank: int, num_ranks: int, num_physical: int, hidden: int, top_k: int,
                 mode: str = "padded", group: dist.ProcessGroup | None = None, capacity: int | None = None) -> None:
        super().__init__(rank, num_ranks, num_physical, hidden, top_k)
        if mode not in ("padded", "exact"):
            raise DispatchConfigError(f"--nccl-mode: expected 'padded' or 'exact', got {mode!r}")
        if capacity is not None and capacity < 1:
            raise DispatchConfigError(f"max tokens per rank must be >= 1, got {capacity}")
        self.mode = mode
        self.capacity = capacity if mode == "padded" else None
        self.group = group
        self.name = f"nccl-{mode}"
        self.graph_capturable = mode == "padded"
        backend = dist.get_backend(group) if dist.is_initialized() else "none"
        self.reason = (f"torch.distributed all_to_all_single ({backend}), {mode} mode: "
                       + (f"fixed [{self.capacity or 'T'}, H] block per rank pair, CUDA-graph capturable"
                          if mode == "padded" else "only rows with a slot on the destination travel; one host sync per call"))

    # ------------------------------------------------------------------ helpers
    def _local_ids_for(self, ids: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        """``ids [..., k]`` physical, ``dest [...]`` destination rank -> local slot index or -1."""
        L = self.slots_per_rank
        ids = ids.long()
        lo = (dest.long() * L).unsqueeze(-1)
        here = (ids >= lo) & (ids < lo + L)
        return torch.where(here, ids - lo, torch.full_like(ids, -1)).to(torch.int32)

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
             in_splits: list[int] | None = None) -> torch.Tensor:
        dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.group)
        return out

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, hidden: torch.Tensor, physical_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> tuple[DispatchedTokens, Any]:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden:
            raise ValueError(f"hidden must be [T, {self.hidden}], got {tuple(hidden.shape)}")
        if hidden.dtype != torch.bfloat16:  # rows travel as bytes: another dtype would be cut at 2H bytes
            raise ValueError(f"hidden must be bfloat16, got {hidden.dtype}")
        if physical_ids.shape != (hidden.shape[0], self.top_k):
            raise ValueError(f"physical_ids must be [T, {self.top_k}], got {tuple(physical_ids.shape)}")
        if self.mode == "padded":
            return self._dispatch_padded(hidden, physical_ids, topk_weights)
        return self._dispatch_exact(hidden, physical_ids, topk_weights)

    def _dispatch_padded(self, hidden, ids, w):
        n = hidden.shape[0]
        if self.capacity is not None:  # pad to the fixed block: empty rows (-1 slots) compute nothing
            C = self.capacity
            if n > C:
                raise ValueError(f"{n} tokens > max_tokens_per_rank={C} this dispatcher was built for")
            if n < C:
                hidden = torch.cat([hidden, hidden.new_zeros(C - n, hidden.shape[1])])
                ids = torch.cat([ids, ids.new_full((C - n, ids.shape[1]), -1)])
                w = torch.cat([w, w.new_zeros(C - n, w.shape[1])])
        R, T, H, k = self.num_ranks, hidden.shape[0], self.hidden, self.top_k
        dest = torch.arange(R, device=ids.device).view(R, 1).expand(R, T)
        local = self._local_ids_for(ids.unsqueeze(0).expand(R, T, k), dest)          # [R, T, k]
        wts = torch.where(local >= 0, w.float().unsqueeze(0), torch.zeros((), device=w.device))
        meta = _pack_meta(local, wts).reshape(R * T, 2 * k)
        send = _pack_rows(hidden.repeat(R, 1), meta)                                  # [R * T, 2H + 8k] bytes
        recv = self._a2a(torch.empty_like(send), send)
        rh, rids, rw = _unpack_rows(recv, H, k)
        wire = torch.full((R,), T, dtype=torch.int64, device=ids.device)
        self._record_stats(ids, wire)
        return DispatchedTokens(ExpertsFormat.STANDARD, rh, rids, rw), ("padded", T, n)

    def _dispatch_exact(self, hidden, ids, w):
        R, k = self.num_ranks, self.top_k
        member = rank_membership(ids, R, self.slots_per_rank)                        # [T, R]
        pairs = member.t().nonzero()                                                 # [n, 2] (dest, token), dest-major
        dest, tok = pairs[:, 0], pairs[:, 1]
        send_counts = member.sum(dim=0).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        self._a2a(recv_counts, send_counts)
        counts = torch.stack([send_counts, recv_counts]).cpu()                       # the one host sync
        in_splits, out_splits = counts[0].tolist(), counts[1].tolist()
        local = self._local_ids_for(ids.index_select(0, tok), dest)
        wts = torch.where(local >= 0, w.float().index_select(0, tok), torch.zeros((), device=w.device))
        send = _pack_rows(hidden.index_select(0, tok), _pack_meta(local, wts))
        recv = self._a2a(send.new_empty((sum(out_splits), send.shape[1])), send, out_splits, in_splits)
        rh, rids, rw = _unpack_rows(recv, self.hidden, k)
        self._record_stats(ids, send_counts)
        handle = ("exact", hidden.shape[0], tok, in_splits, out_splits)
        return DispatchedTokens(ExpertsFormat.STANDARD, rh, rids, rw), handle

    # ------------------------------------------------------------------ combine
    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        if handle[0] == "padded":
            _, T, n = handle
            back = torch.empty_like(expert_out)
            self._a2a(back, expert_out.contiguous())
            return back.view(self.num_ranks, T, self.hidden)[:, :n].float().sum(dim=0).to(expert_out.dtype)
        _, T, tok, in_splits, out_splits = handle
        back = expert_out.new_empty((tok.numel(), self.hidden))
        self._a2a(back, expert_out.contiguous(), in_splits, out_splits)
        out = torch.zeros(T, self.hidden, dtype=torch.float32, device=expert_out.device)
        out.index_add_(0, tok, back.float())
        return out.to(expert_out.dtype)
