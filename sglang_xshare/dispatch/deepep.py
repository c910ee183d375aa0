"""Token all-to-all through DeepEP (``deep_ep.Buffer``), when the ``deep_ep`` package is installed.

The project depends on ``deep_ep`` as an installed package (build it from DeepEP's repository for
your torch/CUDA; no wheel is vendored here). Two modes:

* ``"normal"`` -- DeepEP's high-throughput intranode kernels (NVLink): one row per
  (token, destination rank), :attr:`~.base.ExpertsFormat.STANDARD`; combine adds the weighted
  partial sums. With ``cuda_graph=True`` the receive side is sized to the worst case
  (``num_worst_tokens = R * max_tokens_per_rank``), which removes DeepEP's host sync; the
  dispatcher still reports ``graph_capturable = False`` (run eagerly, as SGLang does).
* ``"low_latency"`` -- DeepEP's low-latency kernels (NVSHMEM; NVLink P2P inside a node):
  expert-major :attr:`~.base.ExpertsFormat.BATCHED` receive buffers
  ``[L, R * max_tokens_per_rank, H]``; combine applies the weights. No host sync; graph-capturable.
  DeepEP V1 compiles these kernels for ``hidden`` in :data:`LL_SUPPORTED_HIDDEN` only (all
  multiples of 128) and ``top_k <= 11``; other shapes are refused at configuration time.

``mode="auto"`` picks low-latency for decode-sized batches (``max_tokens_per_rank <= 256``) when the
shape allows it, normal mode otherwise; :attr:`DeepEPDispatcher.reason` says which and why.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import torch
import torch.distributed as dist

from .base import DispatchConfigError, DispatchedTokens, Dispatcher, ExpertsFormat

__all__ = ["DeepEPDispatcher", "deepep_available", "LL_SUPPORTED_HIDDEN", "low_latency_refusal"]

#: Hidden sizes DeepEP V1's low-latency kernels are compiled for (``SWITCH_HIDDEN`` in its launch.cuh).
LL_SUPPORTED_HIDDEN: tuple[int, ...] = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
#: Largest top-k of DeepEP V1's low-latency dispatch.
LL_MAX_TOPK = 11
#: Decode-sized batches: above this many tokens per rank ``auto`` prefers normal mode.
LL_MAX_TOKENS_AUTO = 256

_BUFFERS: dict[tuple[int, bool], Any] = {}


def deepep_available() -> tuple[bool, str]:
    """``(importable, one-line reason)`` for the ``deep_ep`` package."""
    try:
        mod = importlib.import_module("deep_ep")
    except Exception as exc:  # ImportError, or an undefined symbol from a wheel built for another torch
        return False, f"deep_ep is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    if not torch.cuda.is_available():
        return False, "deep_ep imports but no CUDA device is visible"
    return True, f"deep_ep importable from {getattr(mod, '__file__', '?')}"


def low_latency_refusal(hidden: int, top_k: int, max_tokens_per_rank: int) -> str | None:
    """Why DeepEP's low-latency mode cannot serve this shape (``None`` if it can)."""
    if hidden % 128:
        return f"hidden {hidden} % 128 != 0"
    if hidden not in LL_SUPPORTED_HIDDEN:
        return f"hidden {hidden} is not one of the compiled low-latency sizes {LL_SUPPORTED_HIDDEN}"
    if top_k > LL_MAX_TOPK:
        return f"top_k {top_k} > {LL_MAX_TOPK}"
    if max_tokens_per_rank > 511:
        return f"max tokens per rank {max_tokens_per_rank} > 511 (NVSHMEM QP depth 1024)"
    return None


def _group_key(group: dist.ProcessGroup | None) -> int:
    return id(group) if group is not None else 0


class DeepEPDispatcher(Dispatcher):
    """EP dispatch/combine through one ``deep_ep.Buffer`` per process group and mode.

    Args:
        rank / num_ranks / num_physical / hidden / top_k: see :class:`~.base.Dispatcher`.
        max_tokens_per_rank: the largest ``T`` any rank passes (sizes buffers; same on all ranks).
        mode: ``"auto"``, ``"normal"`` or ``"low_latency"``.
        group: EP process group (NCCL); default the world group.
        cuda_graph: normal mode: receive the worst case (``num_worst_tokens``: no host sync).
        num_sms: SMs DeepEP's normal-mode kernels use (``deep_ep.Buffer.set_num_sms``).

    A shape low-latency mode refuses (``hidden % 128 != 0``, ...) runs in normal mode, with a
    warning when low-latency was requested explicitly; :attr:`reason` says so.

    Raises:
        DispatchConfigError: ``deep_ep`` missing or no CUDA device.
    """

    def __init__(self, rank: int, num_ranks: int, num_physical: int, hidden: int, top_k: int,
                 max_tokens_per_rank: int, mode: str = "auto", group: dist.ProcessGroup | None = None,
                 cuda_graph: bool = True, num_sms: int = 20) -> None:
        super().__init__(rank, num_ranks, num_physical, hidden, top_k)
        ok, why = deepep_available()
        if not ok:
            raise DispatchConfigError(f"--dispatch-backend deepep: {why}")
        if mode not in ("auto", "normal", "low_latency"):
            raise DispatchConfigError(f"--deepep-mode: expected auto, normal or low_latency, got {mode!r}")
        import deep_ep

        self._deep_ep = deep_ep
        self.group = group if group is not None else dist.group.WORLD
        self.max_tokens = int(max_tokens_per_rank)
        refusal = low_latency_refusal(hidden, top_k, self.max_tokens)
        if mode == "low_latency" and refusal:
            why_mode = f"low-latency mode was requested but DeepEP refuses this shape ({refusal}): normal mode runs"
            warnings.warn(f"--deepep-mode low_latency: {why_mode}", stacklevel=2)
            self.fallback = f"DeepEP low_latency -> normal: {refusal}"
            mode = "normal"
        elif mode == "auto":
            if refusal is None and self.max_tokens <= LL_MAX_TOKENS_AUTO:
                mode, why_mode = "low_latency", f"decode-sized batch ({self.max_tokens} tokens/rank <= {LL_MAX_TOKENS_AUTO})"
            else:
                why_mode = (f"low-latency mode refused ({refusal})" if refusal
                            else f"prefill-sized batch ({self.max_tokens} tokens/rank > {LL_MAX_TOKENS_AUTO})")
                if refusal:
                    self.fallback = f"DeepEP low_latency -> normal: {refusal}"
                mode = "normal"
        else:
            why_mode = f"requested {mode}"
        self.mode = mode
        self.name = f"deepep-{'ll' if mode == 'low_latency' else 'normal'}"
        if mode == "low_latency":
            self.format = ExpertsFormat.BATCHED
            self.graph_capturable = True
            self._buffer_key = self._ll_buffer()
        else:
            self.format = ExpertsFormat.STANDARD
            deep_ep.Buffer.set_num_sms(num_sms)
            # worst-case receive size: no host sync in dispatch. Not captured in CUDA graphs: SGLang
            # runs normal mode eagerly (prefill) and low-latency mode in graphs (decode).
            self.num_worst = num_ranks * self.max_tokens if cuda_graph else 0
            self.graph_capturable = False
            self._buffer_key = self._normal_buffer()
        self.reason = f"DeepEP {mode} mode: {why_mode}"

    # ------------------------------------------------------------------ buffers (cached per group)
    @property
    def buffer(self) -> Any:
        """This group's cached ``deep_ep.Buffer`` of this mode, looked up on every use: a later
        dispatcher of the group that needs a larger normal-mode buffer replaces (and destroys) the
        cached one, and every dispatcher of the group then uses the new one."""
        buf = _BUFFERS.get(self._buffer_key)
        if buf is None:
            raise RuntimeError("the DeepEP buffers were destroyed (destroy_buffers()); build a new dispatcher")
        return buf

    def _normal_buffer(self) -> tuple:
        B = self._deep_ep.Buffer
        nbytes = 0
        for cfg in (B.get_dispatch_config(self.num_ranks), B.get_combine_config(self.num_ranks)):
            nbytes = max(nbytes, cfg.get_nvl_buffer_size_hint(self.hidden * 2, self.num_ranks))
        key = (_group_key(self.group), False)
        buf = _BUFFERS.get(key)
        if buf is None or buf.num_nvl_bytes < nbytes:
            if buf is not None:
                buf.destroy()
            buf = B(self.group, num_nvl_bytes=nbytes, num_rdma_bytes=0, low_latency_mode=False, explicitly_destroy=True)
            _BUFFERS[key] = buf
        return key

    def _ll_buffer(self) -> tuple:
        B = self._deep_ep.Buffer
        nbytes = B.get_low_latency_rdma_size_hint(self.max_tokens, self.hidden, self.num_ranks, self.num_physical)
        key = (_group_key(self.group), True)
        buf = _BUFFERS.get(key)
        if buf is None:
            buf = B(self.group, num_nvl_bytes=0, num_rdma_bytes=nbytes, low_latency_mode=True,
                    num_qps_per_rank=self.slots_per_rank, explicitly_destroy=True)
            _BUFFERS[key] = buf
            self._ll_shape = (self.max_tokens, self.hidden, self.num_physical)
        elif buf.num_rdma_bytes < nbytes:
            raise DispatchConfigError(
                f"--deepep-mode low_latency: the process's NVSHMEM buffer ({buf.num_rdma_bytes} B) is smaller than this "
                f"shape needs ({nbytes} B); build the largest low-latency dispatcher first")
        else:
            buf.clean_low_latency_buffer(self.max_tokens, self.hidden, self.num_physical)
        return key

    # ------------------------------------------------------------------ dispatch / combine
    def dispatch(self, hidden: torch.Tensor, physical_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> tuple[DispatchedTokens, Any]:
        T = hidden.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"{T} tokens > max_tokens_per_rank={self.max_tokens} this dispatcher was built for")
        topk_idx = physical_ids.to(self._deep_ep.topk_idx_t).contiguous()
        w = topk_weights.float().contiguous()
        self._record_stats(physical_ids)
        if self.mode == "low_latency":
            recv_x, recv_count, handle, _, _ = self.buffer.low_latency_dispatch(
                hidden.contiguous(), topk_idx, self.max_tokens, self.num_physical, use_fp8=False)
            bound = self.num_ranks * self.max_tokens * min(self.top_k, self.slots_per_rank)
            return (DispatchedTokens(ExpertsFormat.BATCHED, recv_x, expert_counts=recv_count, max_pairs=bound),
                    ("ll", handle, topk_idx, w))
        n_rank, _, n_expert, in_rank, _ = self.buffer.get_dispatch_layout(topk_idx, self.num_physical)
        recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(
            hidden.contiguous(), topk_idx=topk_idx, topk_weights=w, num_tokens_per_rank=n_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=n_expert, num_worst_tokens=self.num_worst)
        return (DispatchedTokens(ExpertsFormat.STANDARD, recv_x, recv_idx.to(torch.int32), recv_w),
                ("normal", handle))

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        if handle[0] == "ll":
            _, h, topk_idx, w = handle
            out, _, _ = self.buffer.low_latency_combine(expert_out.contiguous(), topk_idx, w, h)
            return out
        out, _, _ = self.buffer.combine(expert_out.contiguous(), handle[1])
        return out


def destroy_buffers() -> None:
    """Destroy every cached ``deep_ep.Buffer`` (call before ``dist.destroy_process_group``)."""
    for key in list(_BUFFERS):
        _BUFFERS.pop(key).destroy()
