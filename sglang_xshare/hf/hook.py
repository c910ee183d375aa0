"""Routing hook: let a :class:`~sglang_xshare.select.Selector` choose the experts of a real
transformers MoE block, with the tokens of a teacher-forced batch grouped into decode batches.

transformers >= 5 MoE blocks (``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock``, ...) run::

    hidden [B, S, H] -> view [B*S, H] -> gate(hidden) -> (logits [B*S, E], weights [B*S, k], ids [B*S, k])
                     -> experts(hidden, ids, weights) -> [B*S, H]

The hook uses PyTorch module hooks only (nothing of the block is copied):

* a forward pre-hook on the block records ``(B, S)`` of the call;
* a forward hook on ``block.gate`` replaces ``(weights, ids)`` by the policy's choice. The
  ``B*S`` tokens are regrouped into decode steps: with ``tokens_per_request = g`` (1, or
  1 + drafts for speculative decoding) step ``j`` holds positions ``j*g .. j*g+g-1`` of every
  sequence, i.e. ``T = B*g`` tokens, and the ``g`` tokens of one sequence form one request
  (``request_ids``). Each step is one ``Selector`` call (layer id = block index); its ``-1``
  slots repeat the token's first kept expert with weight 0 (an exact no-op in the weighted sum);
* a forward hook on ``block.experts`` measures, when asked, the MoE-output relative error of the
  policy's routing against plain top-k routing of the same hidden states.

Teacher forcing is exact for decoding: position ``t`` only sees positions ``<= t``, and those
were computed under the same policy, as they would have been in a real decode loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ..config import RoutingSpec
from ..select import Selector
from .model import moe_blocks, routing_spec_of

__all__ = ["StepLayout", "LayerStats", "RoutingHook", "to_decode_steps", "from_decode_steps"]


@dataclass(frozen=True)
class StepLayout:
    """How the ``[B, S]`` tokens of a batch map to decode steps.

    Attributes:
        tokens_per_request: ``g`` consecutive positions of one sequence form one request of one
            step (1 = plain decoding, ``1 + num_draft`` = speculative verification).
        requests: how the ``B*g`` tokens of a step form requests. ``"consecutive"``: request ``b``
            is the ``g`` positions of sequence ``b`` (the correlation of a target + draft row
            block). ``"shuffled"`` (the uncorrelated control): the row at offset ``i`` of sequence
            ``b`` belongs to request ``(b + i) % B`` -- every request still has one row of each
            offset, but from ``min(B, g)`` different sequences (with ``B = 1`` it is
            ``"consecutive"``). The decode steps, hence the batch-level union, are unchanged.
    """

    tokens_per_request: int = 1
    requests: Literal["consecutive", "shuffled"] = "consecutive"

    def __post_init__(self) -> None:
        if self.tokens_per_request < 1:
            raise ValueError(f"tokens_per_request must be >= 1, got {self.tokens_per_request}")
        if self.requests not in ("consecutive", "shuffled"):
            raise ValueError(f"requests must be 'consecutive' or 'shuffled', got {self.requests!r}")

    def request_ids(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Request of each token of one decode step: ``[batch * g] int64`` (token ``b*g + i``)."""
        g = self.tokens_per_request
        b = torch.arange(batch, device=device).repeat_interleave(g)
        if self.requests == "consecutive":
            return b
        return (b + torch.arange(g, device=device).repeat(batch)) % batch


def to_decode_steps(x: torch.Tensor, batch: int, seq: int, g: int) -> torch.Tensor:
    """``[B*S, ...]`` (row-major ``b, s``) -> ``[S//g, B*g, ...]`` decode steps (tokens ``b, offset``)."""
    rest = x.shape[1:]
    return x.reshape(batch, seq // g, g, *rest).transpose(0, 1).reshape(seq // g, batch * g, *rest)


def from_decode_steps(x: torch.Tensor, batch: int, seq: int, g: int) -> torch.Tensor:
    """Inverse of :func:`to_decode_steps`: ``[S//g, B*g, ...]`` -> ``[B*S, ...]``."""
    rest = x.shape[2:]
    return x.reshape(seq // g, batch, g, *rest).transpose(0, 1).reshape(batch * seq, *rest)


@dataclass
class LayerStats:
    """Per-layer accumulators (sums over decode steps / tokens of every call).

    Attributes:
        steps: decode steps seen.
        distinct: sum over steps of distinct experts activated by the policy.
        distinct_topk: same for plain top-k of the same logits.
        kept_mass: sum over tokens of the gate probability mass kept by the policy.
        topk_mass: sum over tokens of the mass of their own top-k.
        tokens: tokens seen.
        err_sq / ref_sq: sums of ``||y_policy - y_topk||^2`` and ``||y_topk||^2`` (MoE output).
    """

    steps: int = 0
    distinct: float = 0.0
    distinct_topk: float = 0.0
    kept_mass: float = 0.0
    topk_mass: float = 0.0
    tokens: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0

    def summary(self) -> dict[str, float]:
        """Means: distinct experts per step, retained mass fraction, MoE-output relative error."""
        s = max(self.steps, 1)
        return {
            "distinct": self.distinct / s,
            "distinct_topk": self.distinct_topk / s,
            "retained_mass": self.kept_mass / max(self.topk_mass, 1e-30),
            "moe_rel_err": (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else 0.0,
        }


RecordFn = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class _State:
    shape: tuple[int, int] = (0, 0)
    topk_ids: torch.Tensor | None = None
    topk_w: torch.Tensor | None = None
    stats: list[LayerStats] = field(default_factory=list)


class RoutingHook:
    """Install ``selector`` into every MoE block of ``model`` (a context manager).

    Args:
        model: a transformers >= 5 MoE causal LM (see :func:`~.model.moe_blocks`).
        selector: the policy; ``None`` keeps the model's own routing (metrics still recorded).
        layout: decode-step grouping (:class:`StepLayout`).
        measure_output_error: also run the experts on plain top-k routing per layer to measure
            the MoE-output relative error (costs one extra experts call per layer).
        recorder: ``fn(layer, logits [S//g, B*g, E] float32, request_ids [B*g] int64)`` called
            per layer and forward (the trace recorder).
        vectorize: select every decode step of a forward in one ``torch.func.vmap``-ed call of the
            reference policy (tested bit-identical to one call per step; 1 call instead of ``S``).

    After ``with RoutingHook(...) as h: model(...)``, ``h.stats`` holds per-layer
    :class:`LayerStats` accumulated over every forward inside the block.
    """

    def __init__(self, model: torch.nn.Module, selector: Selector | None, layout: StepLayout = StepLayout(),
                 *, measure_output_error: bool = False, recorder: RecordFn | None = None,
                 vectorize: bool = True) -> None:
        self.model = model
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("model has no MoE blocks (module with .gate and .experts)")
        self.routing: RoutingSpec = routing_spec_of(model.config)
        if selector is not None and (selector.routing.num_experts != self.routing.num_experts
                                     or selector.routing.top_k != self.routing.top_k):
            raise ValueError(f"selector routing {selector.routing} does not match the model's {self.routing}")
        self.selector = selector
        self.layout = layout
        self.measure_output_error = measure_output_error
        self.recorder = recorder
        self.vectorize = vectorize
        self._state = [_State() for _ in self.blocks]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def stats(self) -> list[LayerStats]:
        return [s.stats[0] if s.stats else LayerStats() for s in self._state]

    def reset_stats(self) -> None:
        for s in self._state:
            s.stats = [LayerStats()]

    # ---- install / remove -------------------------------------------------------------------
    def __enter__(self) -> "RoutingHook":
        self.reset_stats()
        for layer, block in enumerate(self.blocks):
            st = self._state[layer]
            self._handles.append(block.register_forward_pre_hook(self._make_pre(st)))
            self._handles.append(block.gate.register_forward_hook(self._make_gate(layer, st)))
            self._handles.append(block.experts.register_forward_hook(self._make_experts(block, st)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- hooks ------------------------------------------------------------------------------
    @staticmethod
    def _make_pre(st: _State):
        def pre(module: torch.nn.Module, args: tuple) -> None:
            hs = args[0]
            if hs.dim() != 3:
                raise ValueError(f"MoE block input must be [B, S, H], got {tuple(hs.shape)}")
            st.shape = (int(hs.shape[0]), int(hs.shape[1]))
        return pre

    def _make_gate(self, layer: int, st: _State):
        k = self.routing.top_k

        def gate_hook(module: torch.nn.Module, args: tuple, output: tuple) -> tuple:
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError("expected the router to return (logits, weights, ids) (transformers >= 5)")
            logits, weights, ids = output
            B, S = st.shape
            g = self.layout.tokens_per_request
            if S % g:
                raise ValueError(f"sequence length {S} is not a multiple of tokens_per_request={g}")
            steps = to_decode_steps(logits.float(), B, S, g)          # [S//g, B*g, E]
            rid = self.layout.request_ids(B, logits.device)              # [B*g]
            # consecutive requests take the fused request_group path; others pass their ids
            grouping = ({"request_group": g} if self.layout.requests == "consecutive"
                        else {"request_ids": rid})
            if self.recorder is not None:
                self.recorder(layer, steps, rid)
            probs = torch.softmax(steps, dim=-1)
            top_p, top_i = probs.topk(k, dim=-1)                       # [S//g, B*g, k]
            if self.selector is None:
                new_ids = top_i.to(torch.int64)
                new_w = top_p / top_p.sum(-1, keepdim=True) if self.routing.renormalize else top_p
            elif self._vectorize(steps):  # every decode step in one call (bit-identical to the loop below)
                sel = self.selector
                ids_w = torch.func.vmap(lambda x: tuple(sel(x, layer_id=layer, **grouping)[:2]))(steps)
                new_ids, new_w = ids_w[0].to(torch.int64), ids_w[1]
            else:
                outs = [self.selector(steps[j], layer_id=layer, **grouping) for j in range(steps.shape[0])]
                new_ids = torch.stack([o.topk_ids for o in outs]).to(torch.int64)   # [S//g, B*g, k], -1 = none
                new_w = torch.stack([o.topk_weights for o in outs])
            self._account(st, probs, top_p, top_i, new_ids)
            if self.measure_output_error:
                ref_w = top_p / top_p.sum(-1, keepdim=True) if self.routing.renormalize else top_p
                st.topk_ids = from_decode_steps(top_i, B, S, g)
                st.topk_w = from_decode_steps(ref_w, B, S, g).to(weights.dtype)
            flat_ids = from_decode_steps(new_ids, B, S, g)
            flat_w = from_decode_steps(new_w, B, S, g)
            # An empty slot (-1) repeats the token's first kept expert with weight 0: it adds an exact
            # 0 to the output, with every experts implementation of every transformers 5.x
            # (5.17's eager loop has no "skip" sentinel id E; grouped_mm / batched_mm do).
            skip = flat_ids < 0
            first = flat_ids[:, :1].clamp(min=0)
            flat_ids = torch.where(skip, first.expand_as(flat_ids), flat_ids)
            flat_w = torch.where(skip, torch.zeros_like(flat_w), flat_w)
            return logits, flat_w.to(weights.dtype), flat_ids.to(ids.dtype)
        return gate_hook

    def _vectorize(self, steps: torch.Tensor) -> bool:
        """Select all decode steps of a forward with one ``torch.func.vmap``-ed reference call: when
        asked, and the selector runs its reference (kernels are called per step) of a policy whose
        reference is vmap-able (all but ``xshare_ep``'s placement greedy)."""
        sel = self.selector
        return (self.vectorize and sel is not None and not sel.entry.uses_placement
                and (sel._kernel is None or (sel.backend == "auto" and not steps.is_cuda)))

    def _account(self, st: _State, probs: torch.Tensor, top_p: torch.Tensor, top_i: torch.Tensor,
                 new_ids: torch.Tensor) -> None:
        E = self.routing.num_experts
        n_steps = probs.shape[0]
        act = torch.zeros(n_steps, E + 1, dtype=torch.bool, device=probs.device)
        act.scatter_(1, torch.where(new_ids < 0, E, new_ids).reshape(n_steps, -1), True)
        act_topk = torch.zeros(n_steps, E, dtype=torch.bool, device=probs.device)
        act_topk.scatter_(1, top_i.reshape(n_steps, -1), True)
        kept = probs.gather(-1, new_ids.clamp(min=0)) * (new_ids >= 0)
        s = st.stats[0]
        s.steps += n_steps
        s.distinct += float(act[:, :E].sum())
        s.distinct_topk += float(act_topk.sum())
        s.kept_mass += float(kept.sum())
        s.topk_mass += float(top_p.sum())
        s.tokens += int(probs.shape[0] * probs.shape[1])

    def _make_experts(self, block: torch.nn.Module, st: _State):
        def experts_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.measure_output_error or st.topk_ids is None:
                return
            hidden = args[0]
            ref = module.forward(hidden, st.topk_ids.to(args[1].dtype), st.topk_w)  # hooks bypassed
            s = st.stats[0]
            s.err_sq += float((output.float() - ref.float()).pow(2).sum())
            s.ref_sq += float(ref.float().pow(2).sum())
            st.topk_ids = st.topk_w = None
        return experts_hook
