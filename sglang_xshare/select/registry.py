"""One registry: policy name -> (reference implementation, fast kernel).

The reference (plain PyTorch, :mod:`.policies`) is the oracle and the CPU path; the kernel
(Triton, :mod:`sglang_xshare.kernels`) is the CUDA path. A kernel is looked up lazily, so
importing the registry never needs Triton or a GPU.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, fields
from typing import Callable, Protocol

import torch

from ..config import POLICY_NAMES, RoutingSpec
from .output import OutputSpec  # noqa: F401  (type of KernelFn's output)
from .contract import BatchContext, Scores, SelectionOutput
from .policies import cap, oea, topk, xshare, xshare_ep, xshare_spec
from .traits import TRAITS, PolicyTraits

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
        gate: launch condition ``(flag [1] int64, arm)``: the launches return at once unless
            ``flag[0] == arm`` (read on the device, so a captured CUDA graph follows the flag; the
            outputs are then unwritten memory and fused metrics do not count the call), or ``None``.
    """

    def __call__(self, router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                 correction_bias: torch.Tensor | None, workspace: dict,
                 output: "OutputSpec | None" = None,
                 gate: "tuple[torch.Tensor, int] | None" = None) -> SelectionOutput: ...


@dataclass(frozen=True)
class PolicyEntry(PolicyTraits):
    """A policy's capabilities (:class:`~.traits.PolicyTraits`) and its two implementations.

    Attributes:
        reference: the PyTorch oracle ``(Scores, BatchContext) -> SelectionOutput``.
        kernel_path: ``"module:function"`` of the Triton path, imported on first use, or ``None``.
    """

    reference: ReferenceFn | None = None
    kernel_path: str | None = None

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

_IMPLEMENTATIONS: dict[str, ReferenceFn] = {
    "topk": topk.reference, "cap": cap.reference, "oea": oea.reference, "oea_simple": oea.reference_simple,
    "xshare": xshare.reference, "xshare_ep": xshare_ep.reference, "xshare_spec": xshare_spec.reference,
}

_REGISTRY: dict[str, PolicyEntry] = {
    name: PolicyEntry(**{f.name: getattr(t, f.name) for f in fields(PolicyTraits)}, reference=_IMPLEMENTATIONS[name],
                      kernel_path=f"sglang_xshare.kernels.select:{name}_kernel")
    for name, t in TRAITS.items()
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
