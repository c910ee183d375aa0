"""The DeepEP dispatcher's buffer cache (one ``deep_ep.Buffer`` per process group and mode).

DeepEP needs CUDA and its own build, so these checks put a stand-in ``deep_ep`` module in
``sys.modules`` (what ``deepep.py`` imports): it has only the ``Buffer`` API the dispatcher calls,
with sizes that grow with the hidden size, a normal-mode dispatch/combine of one rank (rows go
nowhere), and every call on a destroyed buffer or with rows larger than the buffer was sized for
refused. Checked: dispatchers of one group share one buffer; a dispatcher that needs a larger
normal-mode buffer replaces (and destroys) it and an earlier dispatcher then runs on the new
one; a smaller one reuses it; another group gets its own; low-latency buffers are never
replaced (a larger shape is refused, a smaller one cleans the buffer); ``destroy_buffers``
destroys them all.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from sglang_xshare.dispatch import DispatchConfigError
from sglang_xshare.dispatch import deepep

NVL_BYTES_PER_HIDDEN_BYTE = 4096  # stand-in sizing: bytes of NVLink buffer per byte of a hidden row and rank


class _Config:
    """``deep_ep.Config``: only the size hint the dispatcher asks for."""

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return hidden_bytes * num_ranks * NVL_BYTES_PER_HIDDEN_BYTE


class _Buffer:
    """``deep_ep.Buffer`` of one rank: the constructor, size hints, ``destroy``, and a normal-mode
    dispatch / combine that return the rows unchanged. Every buffer built is kept in ``built``."""

    built: list["_Buffer"] = []
    num_sms = 0

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, explicitly_destroy: bool = False) -> None:
        self.group, self.num_nvl_bytes, self.num_rdma_bytes = group, num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.explicitly_destroy = low_latency_mode, explicitly_destroy
        self.destroyed = False
        self.cleaned: list[tuple[int, int, int]] = []
        _Buffer.built.append(self)

    @staticmethod
    def set_num_sms(n: int) -> None:
        _Buffer.num_sms = n

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> _Config:
        return _Config()

    @staticmethod
    def get_combine_config(num_ranks: int) -> _Config:
        return _Config()

    @staticmethod
    def get_low_latency_rdma_size_hint(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        return max_tokens * hidden * 2 * num_ranks * num_experts

    def _check(self, x: torch.Tensor | None = None) -> None:
        if self.destroyed:
            raise RuntimeError("deep_ep.Buffer used after destroy()")
        if x is not None and _Config().get_nvl_buffer_size_hint(x.shape[1] * 2, 1) > self.num_nvl_bytes:
            raise RuntimeError(f"rows of {x.shape[1]} do not fit a buffer of {self.num_nvl_bytes} B")

    def destroy(self) -> None:
        self._check()
        self.destroyed = True

    def clean_low_latency_buffer(self, max_tokens: int, hidden: int, num_experts: int) -> None:
        self._check()
        self.cleaned.append((max_tokens, hidden, num_experts))

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        self._check()
        n_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
        in_rank = (topk_idx >= 0).any(dim=1, keepdim=True)
        return in_rank.sum(0), None, n_expert, in_rank, None

    def dispatch(self, x, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                 num_worst_tokens):
        self._check(x)
        return x, topk_idx, topk_weights, num_tokens_per_expert.tolist(), ("handle", self), None

    def combine(self, x, handle):
        self._check(x)
        assert handle[1] is self, "combine on another buffer than dispatch"
        return x, None, None


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in ``deep_ep`` module, an empty buffer cache, and CUDA reported visible."""
    mod = types.ModuleType("deep_ep")
    mod.Buffer = _Buffer
    mod.topk_idx_t = torch.int64
    monkeypatch.setitem(sys.modules, "deep_ep", mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(deepep, "_BUFFERS", {})
    monkeypatch.setattr(_Buffer, "built", [])
    return mod


def _normal(group, hidden: int) -> deepep.DeepEPDispatcher:
    return deepep.DeepEPDispatcher(0, 1, 8, hidden, 2, max_tokens_per_rank=16, mode="normal", group=group)


def _round_trip(d: deepep.DeepEPDispatcher, T: int = 5) -> None:
    """One dispatch + combine; rows come back unchanged."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, d.hidden, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, d.num_physical, (T, d.top_k), generator=g)
    got, handle = d.dispatch(x, ids, torch.rand(T, d.top_k, generator=g))
    assert torch.equal(got.local_ids, ids.to(torch.int32))
    assert torch.equal(d.combine(got.hidden, handle), x)


def test_normal_buffers_are_shared_grown_and_replaced(stand_in):
    group, other = object(), object()  # the stand-in never looks inside a group
    small = _normal(group, 64)
    second = _normal(group, 64)
    assert len(_Buffer.built) == 1 and small.buffer is second.buffer  # one buffer per group
    first = small.buffer
    assert first.num_nvl_bytes == 64 * 2 * NVL_BYTES_PER_HIDDEN_BYTE and first.explicitly_destroy

    large = _normal(group, 256)  # needs more: replaces and destroys the group's buffer
    assert len(_Buffer.built) == 2 and first.destroyed
    assert large.buffer.num_nvl_bytes == 256 * 2 * NVL_BYTES_PER_HIDDEN_BYTE
    assert small.buffer is large.buffer is second.buffer  # earlier dispatchers follow the new buffer
    _round_trip(small)
    _round_trip(large)

    again = _normal(group, 128)  # fits the larger buffer: reused, nothing destroyed
    assert len(_Buffer.built) == 2 and again.buffer is large.buffer and not large.buffer.destroyed
    _round_trip(again)

    apart = _normal(other, 64)  # another process group: its own buffer
    assert len(_Buffer.built) == 3 and apart.buffer is not large.buffer and apart.buffer.group is other

    deepep.destroy_buffers()
    assert all(b.destroyed for b in _Buffer.built) and deepep._BUFFERS == {}
    with pytest.raises(RuntimeError, match="destroyed"):
        small.buffer


def test_low_latency_buffer_is_never_replaced(stand_in):
    """The NVSHMEM buffer of low-latency mode cannot be rebuilt under live dispatchers: a smaller
    shape cleans and reuses it, a larger one is refused at construction."""
    group = object()

    def ll(max_tokens: int) -> deepep.DeepEPDispatcher:
        return deepep.DeepEPDispatcher(0, 1, 8, 2048, 2, max_tokens_per_rank=max_tokens, mode="low_latency",
                                       group=group)

    big = ll(64)
    assert big.mode == "low_latency" and big.buffer.low_latency_mode
    small = ll(32)
    assert len(_Buffer.built) == 1 and small.buffer is big.buffer
    assert big.buffer.cleaned == [(32, 2048, 8)]
    with pytest.raises(DispatchConfigError, match="largest low-latency dispatcher first"):
        ll(128)
    assert len(_Buffer.built) == 1 and not big.buffer.destroyed
