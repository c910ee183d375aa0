"""The batch context: which forward SGLang's model runner is running, seen by every routing call.

The patched ``forward_context`` (:mod:`.patches`) declares each forward with :func:`batch_scope`;
a routing call reads it with :func:`current_batch` (decode / target-verify / prefill, draft tokens
per request). Python ints only, no tensor access. When the outermost forward ends, the listener
set by :func:`set_step_end_listener` runs (live metrics, trace recorder, A/B switch poll).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch

__all__ = ["BatchInfo", "DECODE_KINDS", "batch_info_from_forward_batch", "batch_scope", "capturing",
           "clear", "current_batch", "forward_scope", "request_group", "set_step_end_listener"]

#: Batch kinds a policy applies to by default (``--xshare-apply-to-prefill`` adds ``prefill``).
DECODE_KINDS = ("decode", "verify")


@dataclass(frozen=True)
class BatchInfo:
    """What is known about the running forward (from SGLang's ``ForwardBatch``; Python ints only).

    Attributes:
        kind: ``"decode"``, ``"verify"`` (speculative target verify), ``"idle"``, ``"prefill"``
            (extend / mixed / draft extend / anything else).
        num_draft_tokens: tokens per request of a verify batch, else ``None``.
        batch_size: requests in the batch (real, not CUDA-graph padded), if known.
    """

    kind: str
    num_draft_tokens: int | None = None
    batch_size: int | None = None

    @property
    def num_real_tokens(self) -> int | None:
        """Real (non-padded) MoE tokens of the batch, if known."""
        if self.batch_size is None:
            return None
        return self.batch_size * (self.num_draft_tokens or 1)


def batch_info_from_forward_batch(fb: Any) -> BatchInfo:
    """Classify SGLang's ``ForwardBatch`` (no tensor access)."""
    mode = getattr(fb, "forward_mode", None)
    bs = getattr(fb, "batch_size", None)
    bs = bs if isinstance(bs, int) else None
    if mode is None:
        return BatchInfo("prefill", None, bs)
    if mode.is_target_verify():
        spec = getattr(fb, "spec_info", None)
        # tokens per request in the verify layout (padded width), else the draft token count
        ndt = getattr(spec, "num_tokens_per_req", None)
        if not (isinstance(ndt, int) and ndt > 0):
            ndt = getattr(spec, "draft_token_num", None)
        return BatchInfo("verify", ndt if isinstance(ndt, int) and ndt > 0 else None, bs)
    if mode.is_decode():
        return BatchInfo("decode", None, bs)
    if mode.is_idle():
        return BatchInfo("idle", None, bs)
    return BatchInfo("prefill", None, bs)


_batch_stack: list[BatchInfo] = []
_step_end: Callable[[BatchInfo], None] | None = None


def set_step_end_listener(listener: Callable[[BatchInfo], None] | None) -> None:
    """Call ``listener(info)`` when the outermost :func:`batch_scope` ends (``None``: nobody)."""
    global _step_end
    _step_end = listener


def current_batch() -> BatchInfo | None:
    """The innermost forward's :class:`BatchInfo` (``None`` outside SGLang's model runner)."""
    return _batch_stack[-1] if _batch_stack else None


@contextlib.contextmanager
def batch_scope(info: BatchInfo) -> Iterator[BatchInfo]:
    """Declare the running batch (what the patched ``forward_context`` does; tests use it too)."""
    _batch_stack.append(info)
    try:
        yield info
    finally:
        _batch_stack.pop()
        if _step_end is not None and not _batch_stack:
            _step_end(info)


@contextlib.contextmanager
def forward_scope(inner: ContextManager[Any], info: BatchInfo) -> Iterator[None]:
    """SGLang's own ``forward_context`` manager ``inner``, run inside :func:`batch_scope` of ``info``."""
    with batch_scope(info):
        with inner:
            yield


def clear() -> None:
    """Forget every open scope (uninstall)."""
    _batch_stack.clear()


def request_group() -> int | None:
    """Tokens per request of the running batch (target verify: each request's draft tokens are
    consecutive, token ``t`` is in request ``t // num_draft_tokens``), or ``None``."""
    info = current_batch()
    if info is None or info.kind != "verify" or not info.num_draft_tokens:
        return None
    return int(info.num_draft_tokens)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (host-side work must wait then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
