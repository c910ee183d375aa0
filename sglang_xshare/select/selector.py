"""The select stage as one configured object: validate once, then call per layer.

>>> routing = RoutingSpec(num_experts=64, top_k=8)
>>> cfg = SelectionConfig(policy="xshare", k0=2, budget=BudgetSchedule.parse("0.6"))
>>> select = Selector(routing, cfg)
>>> out = select(router_logits, layer_id=3)          # out.topk_ids [T, 8] int32
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch

from ..config import RoutingSpec, SelectionConfig, XShareConfigError
from ..placement import Placement
from .common import membership, token_order
from .contract import BatchContext, SelectionOutput
from .output import OutputSpec, apply_output, metrics_counts
from .registry import get_policy
from .scoring import compute_scores

__all__ = ["Selector", "valid_mask", "reference_only_knobs"]


Backend = Literal["auto", "reference", "kernel"]


def valid_mask(num_tokens: int, num_token_non_padded: int | torch.Tensor | None,
               device: torch.device | str) -> torch.Tensor:
    """``[T] bool``: True for tokens ``< num_token_non_padded`` (all when ``None``); no host sync."""
    if num_token_non_padded is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    idx = torch.arange(num_tokens, device=device)
    if isinstance(num_token_non_padded, torch.Tensor):
        return idx < num_token_non_padded.to(device).reshape(())
    return idx < int(num_token_non_padded)


def reference_only_knobs(config: SelectionConfig) -> list[str]:
    """Knobs set in ``config`` that only the reference implements (the kernels would ignore them):
    with any, ``backend="auto"`` runs the reference (vectorised, no host sync, graph-capturable)."""
    return ["--xshare-warmup-p"] if config.warmup_p > 0 else []


class Selector:
    """A policy bound to a model's routing, a placement and a backend.

    Args:
        routing: the model's :class:`RoutingSpec`.
        config: the :class:`SelectionConfig` (validated here; raises :class:`XShareConfigError`).
        placement: expert placement; required to mean anything for ``xshare_ep`` (default: pure
            TP, i.e. one balance group) and used by metrics for every policy.
        backend: ``"auto"`` (Triton kernel for CUDA inputs when available, else the reference),
            ``"reference"`` or ``"kernel"`` (raise if no kernel can run).
        correction_bias: ``[E]`` float DeepSeek-V3 ``e_score_correction_bias`` (choice only).
    """

    def __init__(self, routing: RoutingSpec, config: SelectionConfig, placement: Placement | None = None,
                 *, backend: Backend = "auto", correction_bias: torch.Tensor | None = None) -> None:
        self.routing = routing
        self.config = config.validate(routing)
        self.entry = get_policy(config.policy)
        if placement is not None and placement.num_experts != routing.num_experts:
            raise XShareConfigError(
                "--ep-size", f"placement has {placement.num_experts} logical experts, the model {routing.num_experts}"
            )
        if correction_bias is not None and correction_bias.shape != (routing.num_experts,):
            raise XShareConfigError("correction_bias", f"expected shape ({routing.num_experts},), got {tuple(correction_bias.shape)}")
        if correction_bias is not None and not routing.has_correction_bias:
            raise XShareConfigError("correction_bias", "routing.has_correction_bias is False")
        self.placement = placement
        self.correction_bias = correction_bias
        if backend not in ("auto", "reference", "kernel"):
            raise XShareConfigError("backend", f"must be auto, reference or kernel, got {backend!r}")
        self.backend = backend
        unsupported = reference_only_knobs(self.config)
        if backend == "kernel" and unsupported:
            raise XShareConfigError("backend", f"the kernels do not implement {', '.join(unsupported)}; use the reference")
        self._kernel = self.entry.kernel() if backend != "reference" and not unsupported else None
        if backend == "kernel" and self._kernel is None:
            raise XShareConfigError("backend", f"no kernel can be loaded for policy {config.policy!r} (is Triton installed?)")
        self.workspace: dict = {}

    def refresh_placement_(self) -> None:
        """Re-read the placement's ``physical_to_logical`` into its device tables, in place
        (:func:`sglang_xshare.placement.refresh_tables_`): call after EPLB rewrote the map (or once
        per decode step). Device ops only, no host sync, CUDA-graph capturable; a no-op without a
        placement."""
        if self.placement is not None:
            self.placement.refresh_tables_()

    def context(self, num_tokens: int, device: torch.device, layer_id: int | None = None,
                num_token_non_padded: int | torch.Tensor | None = None,
                request_ids: torch.Tensor | None = None, request_group: int | None = None,
                mask: bool = True, stats_reduce=None) -> BatchContext:
        """The :class:`BatchContext` of one call (no host sync: ``valid`` is computed on device).

        ``mask=False`` (the kernel path) leaves a tensor ``num_token_non_padded`` as
        ``num_valid`` for the kernel to read instead of materialising ``valid``. The verify-row
        guard (``config.verify_guard``) and the verify budget (``config.verify_budget``, in place
        of the layer's budget) reach the context only for verify batches (``request_group >= 2``);
        the guard with ``request_ids`` is an error (they do not say which row of a request is its
        target row).
        """
        cfg = self.config
        if request_ids is not None and request_group is not None:
            raise ValueError("pass request_ids or request_group, not both")
        if request_group is not None and int(request_group) < 1:
            raise ValueError(f"request_group must be >= 1, got {request_group}")
        if cfg.verify_guard and request_ids is not None:
            raise ValueError("the verify-row guard needs request_group (each request's first row is its target row), "
                             "not request_ids")
        verifying = request_group is not None and int(request_group) >= 2
        guarded = bool(cfg.verify_guard) and verifying
        if verifying and cfg.verify_budget is not None:
            budget = cfg.verify_budget
        else:
            budget = cfg.budget.for_layer(layer_id) if cfg.budget is not None else None
        num_valid = None
        if not mask and (num_token_non_padded is None or isinstance(num_token_non_padded, torch.Tensor)):
            valid = None
            if num_token_non_padded is not None:
                num_valid = num_token_non_padded.reshape(())
        else:
            valid = valid_mask(num_tokens, num_token_non_padded, device)
        return BatchContext(
            top_k=self.routing.top_k,
            k0=cfg.k0 if self.entry.warmup else (self.routing.top_k if self.entry.plain_topk else cfg.cap or 1),
            renormalize=self.routing.renormalize,
            valid=valid,
            budget=budget,
            request_budget=cfg.request_budget,
            request_ids=None if request_ids is None else request_ids.to(device=device, dtype=torch.int64),
            request_group=None if request_group is None else int(request_group),
            placement=self.placement,
            cap=cfg.cap,
            min_score=cfg.min_score,
            mass_source=cfg.mass_source,
            fill_to_peak=cfg.fill_to_peak,
            num_valid=num_valid,
            stats_reduce=stats_reduce,
            hard_cap=cfg.hard_cap,
            warmup_p=cfg.warmup_p,
            guard_k=cfg.verify_guard if guarded else None,
        )

    def uses_kernel(self, router_logits: torch.Tensor) -> bool:
        """Whether a call with these logits runs the Triton kernel (else the reference)."""
        return self._kernel is not None and (self.backend == "kernel" or router_logits.is_cuda)

    def __call__(self, router_logits: torch.Tensor, layer_id: int | None = None,
                 num_token_non_padded: int | torch.Tensor | None = None,
                 request_ids: torch.Tensor | None = None, request_group: int | None = None,
                 output: OutputSpec | None = None, stats_reduce=None,
                 launch: Mapping[str, Any] | None = None) -> SelectionOutput:
        """Select experts for one layer of one batch.

        Args:
            router_logits: ``[T, E]`` fp32/bf16/fp16 router output (``T`` may be 0).
            layer_id: picks the layer's budget override, if any.
            num_token_non_padded: tokens ``>= n`` are CUDA-graph padding (int or 0-d int tensor).
            request_ids: ``[T] int`` in ``[0, T)``, tokens of one request (``xshare_spec``).
            request_group: requests are runs of this many consecutive tokens (``xshare_spec``;
                SGLang's verify batches): the fused one-launch kernel path. Not with ``request_ids``.
            output: hand the result to a backend (:class:`~.output.OutputSpec`: dispatched ids,
                empty-slot encoding, scale, fused metrics), in the same kernel launch.
            stats_reduce: the batch spans several ranks: an all-reduce (sum) of the batch
                statistics, so that ``oea`` / ``xshare`` / ``xshare_ep`` choose from every rank's
                tokens (see :class:`~.contract.BatchContext`); the kernel path is then two launches
                around the collective.
            launch: extra keywords of the kernel launch (e.g. the launch condition ``gate``, see
                :mod:`sglang_xshare.kernels.select`); the reference path ignores them.

        Returns:
            :class:`SelectionOutput` (``[T, k]`` int32 ids with -1, float32 weights, physical ids
            for ``xshare_ep``); with ``output``: the dispatched ids and scaled weights, no
            physical ids.
        """
        if router_logits.dim() != 2 or router_logits.shape[1] != self.routing.num_experts:
            raise ValueError(f"router_logits must be [T, {self.routing.num_experts}], got {tuple(router_logits.shape)}")
        if output is not None and output.ids == "physical" and not self.entry.uses_placement:
            raise ValueError(f"OutputSpec(ids='physical') needs a policy that chooses physical copies (xshare_ep), "
                             f"not {self.config.policy}")
        if stats_reduce is not None and not self.entry.ep_global:
            raise ValueError(f"policy {self.config.policy} has no batch statistics to reduce over ranks")
        kernel = self.uses_kernel(router_logits)
        ctx = self.context(router_logits.shape[0], router_logits.device, layer_id, num_token_non_padded, request_ids,
                           request_group, mask=not kernel, stats_reduce=stats_reduce)
        if kernel:
            return self._kernel(router_logits, self.routing, ctx, self.correction_bias, self.workspace, output,
                                **(launch or {}))
        scores = compute_scores(router_logits, self.routing, self.correction_bias)
        out = self.entry.reference(scores, ctx)
        if output is None:
            return out
        if output.metrics is not None:
            in_topk = membership(token_order(scores.sel), self.routing.top_k, self.routing.num_experts)
            disp = apply_output(out, OutputSpec(output.ids, "minus_one", None, output.dispatch_map), ctx.valid)
            output.metrics.acc.add_(metrics_counts(disp.topk_ids, in_topk, ctx.valid, output.metrics))
        return apply_output(out, output, ctx.valid)
