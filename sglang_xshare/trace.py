"""Routing traces: recorded router logits of real decode batches, replayed through every policy.

**Format** (one ``.npz`` file, ``numpy.savez_compressed``):

=================  ======================  ==============================================
key                shape / dtype           meaning
=================  ======================  ==============================================
``logits``         ``[S, L, T, E]`` f16    router logits of step ``s``, MoE layer ``l``,
                                           batch slot ``t`` (``float16`` to keep files small)
``request_ids``    ``[S, T]`` int32        request of each slot; ``-1`` marks padding, which
                                           is always trailing (slots ``>= n_valid``)
``dataset_ids``    ``[S, T]`` int32        optional: index into ``meta["datasets"]`` (-1 pad)
``meta``           0-d ``str`` (JSON)      ``num_experts``, ``top_k``, ``scoring``,
                                           ``renormalize``, ``layer_ids`` (length ``L``),
                                           optional ``model``, ``source``, ``datasets``,
                                           ``tokens_per_request`` (speculative: 1 + drafts)
=================  ======================  ==============================================

A step is one decode batch (``T`` slots, the same at every step so shapes stay static);
tokens with the same request id at one step are one request's target + draft tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ._checkout import DATA_DIR
from .config import RoutingSpec

__all__ = ["Trace", "TraceStep", "default_trace_path", "dense_request_ids", "contiguous_group", "step_groups"]

_REQUIRED_META = ("num_experts", "top_k", "scoring", "renormalize", "layer_ids")


@dataclass(frozen=True)
class TraceStep:
    """One decode step of a trace.

    Attributes:
        step: step index ``s``.
        logits: ``[L, T, E] float32`` router logits of every layer.
        num_valid: non-padded slots ``n`` (slots ``>= n`` are padding).
        request_ids: ``[T] int64`` dense request ids in ``[0, T)`` (padding gets its own ids).
        request_group: ``g`` when the requests are runs of ``g`` consecutive slots (``request_ids[:n]
            == arange(n) // g``; the padding slots after them are masked by ``num_valid``), else
            ``None`` -- pass it instead of ``request_ids`` for the fused ``xshare_spec`` kernel
            (:meth:`requests`); ``g >= 2`` makes the step a speculative verify batch.
    """

    step: int
    logits: torch.Tensor
    num_valid: int
    request_ids: torch.Tensor
    request_group: int | None = None

    def requests(self) -> dict:
        """Keyword arguments of a :class:`~sglang_xshare.select.Selector` call for this step's
        requests: ``{"request_group": g}`` when the grouping is contiguous, else ``{"request_ids": ...}``."""
        if self.request_group is not None:
            return {"request_group": self.request_group}
        return {"request_ids": self.request_ids}


@dataclass
class Trace:
    """A recorded routing trace (see the module docstring for the file format).

    Attributes:
        logits: ``[S, L, T, E] float16``.
        request_ids: ``[S, T] int32`` (-1 = padding, trailing).
        meta: JSON-able metadata with at least ``num_experts, top_k, scoring, renormalize, layer_ids``.
        dataset_ids: optional ``[S, T] int32``.
    """

    logits: np.ndarray
    request_ids: np.ndarray
    meta: dict[str, Any]
    dataset_ids: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    # ---- shape ----------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.logits.shape[1])

    @property
    def batch_slots(self) -> int:
        return int(self.logits.shape[2])

    @property
    def routing(self) -> RoutingSpec:
        """The recorded model's routing spec."""
        m = self.meta
        return RoutingSpec(
            num_experts=int(m["num_experts"]),
            top_k=int(m["top_k"]),
            scoring=m["scoring"],
            renormalize=bool(m["renormalize"]),
            num_expert_group=m.get("num_expert_group"),
            topk_group=m.get("topk_group"),
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming what is wrong with the arrays or metadata."""
        if self.logits.ndim != 4:
            raise ValueError(f"trace logits must be [S, L, T, E], got shape {self.logits.shape}")
        S, L, T, E = self.logits.shape
        missing = [k for k in _REQUIRED_META if k not in self.meta]
        if missing:
            raise ValueError(f"trace meta lacks {missing}")
        if int(self.meta["num_experts"]) != E:
            raise ValueError(f"meta num_experts={self.meta['num_experts']} but logits have E={E}")
        if len(self.meta["layer_ids"]) != L:
            raise ValueError(f"meta layer_ids has {len(self.meta['layer_ids'])} entries, logits {L} layers")
        if self.request_ids.shape != (S, T):
            raise ValueError(f"request_ids must be [S, T]=({S}, {T}), got {self.request_ids.shape}")
        pad = self.request_ids < 0
        if (pad[:, :-1] & ~pad[:, 1:]).any():
            raise ValueError("padding slots (request id -1) must be trailing in every step")
        if self.dataset_ids is not None and self.dataset_ids.shape != (S, T):
            raise ValueError(f"dataset_ids must be [S, T]=({S}, {T}), got {self.dataset_ids.shape}")

    # ---- io -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` file (compressed); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "logits": self.logits.astype(np.float16),
            "request_ids": self.request_ids.astype(np.int32),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        if self.dataset_ids is not None:
            arrays["dataset_ids"] = self.dataset_ids.astype(np.int32)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @staticmethod
    def load(path: str | Path) -> "Trace":
        """Read a trace written by :meth:`save` (or by any recorder following the format)."""
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return Trace(
                logits=z["logits"],
                request_ids=z["request_ids"],
                meta=meta,
                dataset_ids=z["dataset_ids"] if "dataset_ids" in z.files else None,
            )

    # ---- iteration ------------------------------------------------------------------------
    def steps(self, device: torch.device | str = "cpu") -> Iterator[TraceStep]:
        """Yield every step with float32 logits and dense request ids (host-side, offline)."""
        for s in range(self.num_steps):
            n, dense, group = _requests(self.request_ids[s])
            yield TraceStep(
                step=s,
                logits=torch.from_numpy(self.logits[s].astype(np.float32)).to(device),
                num_valid=n,
                request_ids=dense.to(device),
                request_group=group,
            )


def dense_request_ids(request_ids: np.ndarray) -> torch.Tensor:
    """``[T]`` arbitrary ids (-1 = padding) -> ``[T] int64`` in ``[0, T)``, first-seen order;
    every padding slot gets an id of its own (so it never joins a real request)."""
    T = request_ids.shape[0]
    out = np.empty(T, dtype=np.int64)
    seen: dict[int, int] = {}
    for t, r in enumerate(request_ids.tolist()):
        if r < 0:
            out[t] = -1
        else:
            out[t] = seen.setdefault(r, len(seen))
    pads = np.nonzero(out < 0)[0]
    out[pads] = len(seen) + np.arange(pads.size)
    return torch.from_numpy(out)


def contiguous_group(dense_ids: np.ndarray) -> int | None:
    """``g`` if ``dense_ids == arange(T) // g`` (requests are runs of ``g`` consecutive slots, the
    last one possibly shorter), else ``None``. Host-side, offline."""
    T = dense_ids.shape[0]
    if T == 0:
        return None
    g = int((dense_ids == dense_ids[0]).sum())
    if g < 1 or not np.array_equal(dense_ids, np.arange(T) // g):
        return None
    return g


def step_groups(trace: Trace) -> list[int | None]:
    """Each step's :attr:`TraceStep.request_group` (``None`` where its requests are not runs of
    consecutive slots), without materialising the logits. Host-side, offline."""
    return [_requests(rid)[2] for rid in trace.request_ids]


def _requests(request_ids: np.ndarray) -> tuple[int, torch.Tensor, int | None]:
    """One step's ``(num_valid, dense ids, request_group)``: the group from the valid slots only
    (the trailing padding is masked by ``num_valid``)."""
    n = int((request_ids >= 0).sum())
    dense = dense_request_ids(request_ids)
    return n, dense, contiguous_group(dense[:n].numpy())


def default_trace_path() -> Path:
    """The repository's default trace: 16 mixed-dataset sequences decoding on the project's trained MoE.

    It is in the checkout (``bench/data/model``), not in the wheel; the path may not exist in an install.
    """
    return DATA_DIR / "model" / "trace_mixed_b16.npz"
