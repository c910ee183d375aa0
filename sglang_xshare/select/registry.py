"""One registry: policy name -> (reference implementation, fast kernel).

The reference (plain PyTorch, :mod:`.policies`) is the oracle and the CPU path; the kernel
(Triton, :mod:`sglang_xshare.kernels`) is the CUDA path. A kernel is looked up lazily, so
importing the registry never needs Triton or a GPU.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..config import POLICY_NAMES, RoutingSpec
from .output import OutputSpec  # noqa: F401  (type of KernelFn's output)
from .contract import BatchContext, Scores, SelectionOutput
from .policies import cap, oea, topk, xshare, xshare_ep, xshare_spec

__all__ = ["PolicyEntry", "KernelFn", "get_policy", "register_kernel"]

ReferenceFn = Callable[[Scores, BatchContext], SelectionOutput]


class KernelFn(Protocol):
    """A fast policy: same contract as the reference, but from raw logits (fused scoring).

    Args:
        router_logits: ``[T, E]`` fp32/bf16/fp16 CUDA tensor.
        routing: the model's routing spec.
        ctx: the batch context.
        correction_bias: ``[E]`` float or ``None``.
        workspace: a dict owned by the calling :class:`~.selector.Selector` that persists
            across calls; the kernel keeps its preallocated buffers there (keyed by shape and
            device) so that a CUDA-graph-captured call allocates nothing.
        output: :class:`~.output.OutputSpec` epilogue (dispatched ids, empty slots, scale,
            fused metrics) or ``None`` (the plain contract).
    """

    def __call__(self, router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                 correction_bias: torch.Tensor | None, workspace: dict,
                 output: "OutputSpec | None" = None) -> SelectionOutput: ...


@dataclass(frozen=True)
class PolicyEntry:
    """A policy's two implementations and what it needs.

    Attributes:
        name: registry name.
        reference: the PyTorch oracle ``(Scores, BatchContext) -> SelectionOutput``.
        kernel_path: ``"module:function"`` of the Triton path, imported on first use, or ``None``.
        budgeted: whether it takes a batch budget ``m_l``.
        uses_requests: whether it reads ``request_ids``.
        uses_placement: whether it reads the placement (and returns ``physical_ids``).
    """

    name: str
    reference: ReferenceFn
    kernel_path: str | None = None
    budgeted: bool = False
    uses_requests: bool = False
    uses_placement: bool = False

    def kernel(self) -> KernelFn | None:
        """The fast path, or ``None`` when it is not registered or cannot be imported (no Triton)."""
        path = _KERNELS.get(self.name, self.kernel_path)
        if path is None:
            return None
        mod, _, fn = path.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)
        except ImportError as e:
            if torch.cuda.is_available():  # a GPU without its fast path would silently run the reference
                logging.getLogger("sglang_xshare").warning(
                    "xshare: the Triton kernel of policy %s cannot be imported (%s); the PyTorch reference runs "
                    "instead", self.name, e)
            return None


_KERNELS: dict[str, str | None] = {}

_REGISTRY: dict[str, PolicyEntry] = {
    e.name: e
    for e in (
        PolicyEntry("topk", topk.reference, "sglang_xshare.kernels.select:topk_kernel"),
        PolicyEntry("cap", cap.reference, "sglang_xshare.kernels.select:cap_kernel"),
        PolicyEntry("oea", oea.reference, "sglang_xshare.kernels.select:oea_kernel"),
        PolicyEntry("oea_simple", oea.reference_simple, "sglang_xshare.kernels.select:oea_simple_kernel"),
        PolicyEntry("xshare", xshare.reference, "sglang_xshare.kernels.select:xshare_kernel", budgeted=True),
        PolicyEntry("xshare_ep", xshare_ep.reference, "sglang_xshare.kernels.select:xshare_ep_kernel",
                    budgeted=True, uses_placement=True),
        PolicyEntry("xshare_spec", xshare_spec.reference, "sglang_xshare.kernels.select:xshare_spec_kernel",
                    budgeted=True, uses_requests=True),
    )
}
assert tuple(_REGISTRY) == POLICY_NAMES


def get_policy(name: str) -> PolicyEntry:
    """The registry entry of ``name``; ``KeyError`` lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(_REGISTRY)}") from None


def register_kernel(name: str, path: str | None) -> None:
    """Point ``name``'s fast path at ``"module:function"`` (``None`` disables it)."""
    get_policy(name)
    _KERNELS[name] = path
