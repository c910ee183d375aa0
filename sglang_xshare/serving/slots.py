"""Empty (``-1``) slots and the MoE backends SGLang may hand them to.

A policy may leave a slot of a token empty (``topk_ids == -1``, weight 0). Which SGLang 0.5.23
backends take that, read from their code paths:

==================================  =========  ==================================================
backend                              ``-1``?    where it is handled
==================================  =========  ==================================================
a2a ``deepep`` (normal, low-latency)  yes        DeepEP's kernels skip ``topk_idx < 0`` (V1
                                                ``csrc/kernels/internode_ll.cu``: sends only
                                                ``if (dst_expert_idx >= 0)``; the normal-mode
                                                layout counts only ids ``>= 0``); SGLang's
                                                ``token_dispatcher/deepep.py``: "DeepEP/Mooncake/
                                                Nixl mark invalid topk slots with -1"
a2a ``mooncake``, ``nixl``            yes        same convention as DeepEP
a2a ``none`` + runner ``triton``      yes        ``moe_align_block_size`` uses ``num_experts + 1``
                                                buckets: ``-1`` lands in the dropped bucket; the
                                                standard dispatcher keeps ``-1`` when mapping
                                                global -> local ids (``_map_topk_ids_to_local_experts``)
a2a ``none`` + runner ``deep_gemm``   yes        "-1 is the drop sentinel both the triton and
                                                deep_gemm runners honor" (``standard.py``)
runner ``aiter`` (ROCm)               **no**     ``topk.py``: "aiter MoE kernels do not handle
                                                topk_ids=-1 safely"
flashinfer cutlass / cutedsl /        **no**     global ids go straight to the kernel
trtllm, cutlass, marlin, mori, others  (unknown)  (``_keeps_global_expert_ids``); not verified
torch-native MoE (CPU, no AMX:        **no**,    ``cnts.scatter_(1, topk_ids, 1)`` fails on ``-1``
``moe_forward_native``)               nor dups   and counts a duplicated id once (shape error);
                                                tested in ``tests/test_sglang_hook.py``
==================================  =========  ==================================================

SGLang itself writes ``-1`` into CUDA-graph padding rows on CUDA (``_mask_topk_ids_padded_region``),
so the ``yes`` rows are exercised by SGLang already. Other GPU backends get
:func:`fill_empty_slots` (mode ``fill``): the slot takes the expert of the token's first kept
slot, with weight 0 -- no new expert is activated, the backend sees only valid ids. (The EPLB
logical -> physical step must then keep the filler on the *same* physical copy: see
:func:`copy_source_physical`.) The torch-native CPU MoE gets :func:`fill_empty_slots_distinct`
(mode ``distinct``): a *different* expert that another token of the batch already activates,
weight 0 (a new expert only when the batch has too few).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["EmptySlotMode", "backend_takes_minus_one", "resolve_empty_slot_mode", "fill_empty_slots",
           "fill_empty_slots_distinct",
           "copy_source_physical", "restore_empty_slots"]

EmptySlotMode = Literal["minus_one", "fill", "distinct"]

_A2A_TAKES_MINUS_ONE = frozenset({"deepep", "mooncake", "nixl"})
_RUNNERS_TAKE_MINUS_ONE = frozenset({"triton", "deep_gemm"})


def backend_takes_minus_one(a2a_backend: str, runner_backend: str | None) -> bool:
    """Whether this (a2a backend, MoE runner) pair drops ``-1`` slots safely (table above).

    Args:
        a2a_backend: SGLang's ``--moe-a2a-backend`` value (``"none"``, ``"deepep"``, ...).
        runner_backend: the resolved ``--moe-runner-backend`` (``"triton"``, ``"deep_gemm"``, ...);
            ``None`` or ``"auto"`` when not resolved (treated as unknown, i.e. not safe).
    """
    if a2a_backend in _A2A_TAKES_MINUS_ONE:
        return True
    if a2a_backend == "none":
        return runner_backend in _RUNNERS_TAKE_MINUS_ONE
    return False


def resolve_empty_slot_mode(requested: str, a2a_backend: str, runner_backend: str | None,
                            device_type: str = "cuda") -> EmptySlotMode:
    """``--xshare-empty-slots`` (``auto`` | ``minus_one`` | ``fill`` | ``distinct``) -> a layer's mode.

    ``auto``: ``minus_one`` where the backend drops ``-1``, ``distinct`` for SGLang's torch-native
    MoE (layers on CPU), ``fill`` otherwise.
    """
    if requested in ("minus_one", "fill", "distinct"):
        return requested  # type: ignore[return-value]
    if backend_takes_minus_one(a2a_backend, runner_backend):
        return "minus_one"
    return "distinct" if device_type == "cpu" else "fill"


def fill_empty_slots(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace every ``-1`` slot by the token's first kept expert, with weight 0.

    A token with no kept slot at all (CUDA-graph padding) gets expert 0 with weight 0 in every
    slot, like SGLang's own HIP padding path. No host sync, static shapes.

    Args:
        topk_ids: ``[T, k]`` int32/int64, ``-1`` = empty slot.
        topk_weights: ``[T, k]`` float32, 0 where the id is ``-1``.

    Returns:
        ``(ids, weights, source)``: ``ids [T, k]`` same dtype with no ``-1``; ``weights [T, k]``
        float32 with 0 on filled slots; ``source [T, k]`` int64, the slot each slot copies
        (itself when it was not empty).
    """
    empty = topk_ids < 0
    k = topk_ids.shape[-1]
    slot = torch.arange(k, device=topk_ids.device).expand_as(topk_ids)
    # first kept slot of each token (k when none): argmax of the first True
    kept = ~empty
    first = torch.where(kept, slot, torch.full_like(slot, k)).amin(dim=-1, keepdim=True)
    has_any = first < k
    first_c = first.clamp_max(k - 1)
    first_id = torch.where(has_any, topk_ids.gather(-1, first_c), torch.zeros_like(first_c, dtype=topk_ids.dtype))
    ids = torch.where(empty, first_id.expand_as(topk_ids), topk_ids)
    weights = torch.where(empty, torch.zeros_like(topk_weights), topk_weights)
    source = torch.where(empty, first_c.expand_as(slot), slot)
    return ids, weights, source


def fill_empty_slots_distinct(topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                              num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace every ``-1`` slot by an expert *not* in the token's row, weight 0 (no duplicates).

    Fillers are taken first from experts that some token of the batch already uses (lowest id
    first), then, only if a row needs more, from unused experts. No host sync, static shapes.

    Args:
        topk_ids: ``[T, k]`` int, ``-1`` = empty slot.
        topk_weights: ``[T, k]`` float32.
        num_experts: ``E`` (ids are in ``[0, E)``; ``k <= E``).

    Returns:
        ``(ids, weights, source)`` like :func:`fill_empty_slots`; ``source`` is each slot itself.
    """
    T, k = topk_ids.shape
    dev = topk_ids.device
    empty = topk_ids < 0
    safe = topk_ids.clamp(min=0).long()
    row = torch.zeros(T, num_experts, dtype=torch.bool, device=dev).scatter_(1, safe, ~empty)
    active = row.any(dim=0, keepdim=True)
    tier = torch.where(row, torch.zeros_like(row, dtype=torch.int64),
                       torch.where(active, torch.full_like(row, 2, dtype=torch.int64), torch.ones_like(row, dtype=torch.int64)))
    cand = torch.sort(tier, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k] best fillers first
    rank = (empty.long().cumsum(dim=-1) - 1).clamp(min=0)
    ids = torch.where(empty, cand.gather(1, rank).to(topk_ids.dtype), topk_ids)
    weights = torch.where(empty, torch.zeros_like(topk_weights), topk_weights)
    source = torch.arange(k, device=dev).expand(T, k)
    return ids, weights, source


def copy_source_physical(physical_ids: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """After the logical -> physical remap, put each filled slot on its source slot's physical copy.

    EPLB's ``dynamic`` dispatch draws a replica per slot at random; a filled slot could otherwise
    land on another copy of the same expert and activate it.

    Args:
        physical_ids: ``[T, k]`` int physical ids (filled slots included).
        source: ``[T, k]`` int64 from :func:`fill_empty_slots`.

    Returns:
        ``[T, k]`` same dtype.
    """
    return physical_ids.gather(-1, source)


def restore_empty_slots(physical_ids: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Put ``-1`` back on the empty slots (mode ``minus_one``, after the remap). ``empty [T, k] bool``."""
    return physical_ids.masked_fill(empty, -1)
