"""The dispatch stage of the standalone EP MoE layer (:mod:`sglang_xshare.moe`): DeepEP or torch.distributed.

Not the serving path: under SGLang, SGLang's own ``--moe-a2a-backend`` dispatches the experts xshare
chose. This token all-to-all serves :class:`~sglang_xshare.moe.EPMoELayer` only, i.e. ``bench/ep_moe.py``
(``bench/torchrun_ep_bench.sh``), ``tests/test_ep_layer.py`` and ``tests/test_deepep_buffers.py``.

:func:`make_dispatcher` builds the backend a flag names and says which path runs and why:

* ``"nccl"`` / ``"nccl-exact"`` -- :class:`~.nccl.NcclDispatcher` (``all_to_all_single``; NCCL on
  GPU, gloo on CPU) in padded (graph-capturable) or exact (only useful rows travel) mode;
* ``"deepep"`` / ``"deepep-normal"`` / ``"deepep-ll"`` -- :class:`~.deepep.DeepEPDispatcher`
  (auto / normal / low-latency); ``deep_ep`` must import;
* ``"auto"`` -- DeepEP when it imports and the group is NCCL on CUDA, else NCCL/gloo padded to
  ``max_tokens_per_rank`` rows (like DeepEP, any ``T <= max`` per rank, ranks may differ).
  A DeepEP low-latency refusal (e.g. ``hidden % 128 != 0``) falls back to DeepEP normal mode.
  Every such fallback is also in :attr:`Dispatcher.fallback`, which the EP layer logs as a warning.
"""

from __future__ import annotations

import torch.distributed as dist

from .base import (DispatchConfigError, DispatchedTokens, Dispatcher, DispatchStats, ExpertsFormat,
                   local_slot_ids, rank_membership)
from .nccl import NcclDispatcher

__all__ = [
    "DispatchConfigError", "DispatchedTokens", "Dispatcher", "DispatchStats", "ExpertsFormat",
    "NcclDispatcher", "make_dispatcher", "rank_membership", "local_slot_ids", "BACKENDS",
]

BACKENDS = ("auto", "nccl", "nccl-exact", "deepep", "deepep-normal", "deepep-ll")


def make_dispatcher(backend: str, *, num_physical: int, hidden: int, top_k: int, max_tokens_per_rank: int,
                    group: dist.ProcessGroup | None = None, cuda_graph: bool = True) -> Dispatcher:
    """Build the dispatcher ``backend`` names for this process's rank in ``group``.

    Args:
        backend: one of :data:`BACKENDS` (flag ``--dispatch-backend``).
        num_physical: physical expert slots ``P``. hidden: ``H``. top_k: ``k``.
        max_tokens_per_rank: largest ``T`` a rank passes (DeepEP buffer sizing; the block of the
            ``auto`` fallback to padded NCCL; explicit ``nccl`` sends ``T`` rows, equal on every rank).
        group: EP process group (default world). cuda_graph: DeepEP normal mode without host sync.

    Returns:
        A :class:`Dispatcher`; its ``reason`` says which path runs and why.
    """
    if backend not in BACKENDS:
        raise DispatchConfigError(f"--dispatch-backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if backend.startswith("nccl"):
        return NcclDispatcher(rank, size, num_physical, hidden, top_k, "exact" if backend == "nccl-exact" else "padded", group)
    from .deepep import DeepEPDispatcher, deepep_available

    mode = {"deepep": "auto", "deepep-normal": "normal", "deepep-ll": "low_latency", "auto": "auto"}[backend]
    if backend == "auto":
        ok, why = deepep_available()
        if not ok or dist.get_backend(group) != "nccl":
            d = NcclDispatcher(rank, size, num_physical, hidden, top_k, "padded", group, max_tokens_per_rank)
            why_not = why if not ok else f"process group is {dist.get_backend(group)}, not NCCL"
            d.reason = f"auto -> {d.reason} (DeepEP not used: {why_not})"
            d.fallback = f"DeepEP -> {d.name}: {why_not}"
            return d
    if backend != "auto":
        return DeepEPDispatcher(rank, size, num_physical, hidden, top_k, max_tokens_per_rank, mode, group, cuda_graph)
    try:
        d = DeepEPDispatcher(rank, size, num_physical, hidden, top_k, max_tokens_per_rank, mode, group, cuda_graph)
    except Exception as exc:  # noqa: BLE001 - e.g. NVSHMEM cannot start: NCCL carries the layer
        d = NcclDispatcher(rank, size, num_physical, hidden, top_k, "padded", group, max_tokens_per_rank)
        failed = f"DeepEP failed to start: {type(exc).__name__}: {str(exc)[:200]}"
        d.reason = f"auto -> {d.reason} ({failed})"
        d.fallback = f"DeepEP -> {d.name}: {failed}"
        return d
    d.reason = f"auto -> {d.reason}"
    return d
