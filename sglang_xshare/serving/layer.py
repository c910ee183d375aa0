"""One SGLang MoE layer under xshare: its policy, and which path a batch of ``T`` tokens takes.

Built once per SGLang ``TopK`` (at its first routing call) from SGLang's own ``TopKConfig`` and
the server's placement. Per call :func:`~.route.decide` picks which of four paths a batch takes
-- a pure function of the batch *shape* and configuration (Python ints), so under CUDA graphs it
is decided once per captured batch size, at capture time:

``"sglang"``   SGLang routes, untouched (policy ``off`` / ``topk``, draft or prefill layers,
               batches too small to share experts, per-token dynamic bias, routing simulation).
``"fast"``     the policy *replaces* SGLang's routing: one kernel launch writes the final
               ``topk_ids`` / ``topk_weights`` (dispatched ids, ``-1`` or filled empty slots,
               routed scale, EPLB static map or the policy's own physical copies, fused metrics); SGLang's
               own top-k does not run.
``"general"``  the policy replaces SGLang's router, then SGLang's own post-processing runs on its
               output (EPLB dynamic / LP dispatch, a torch-native CPU MoE): empty slots are filled
               before and put back after (:mod:`.slots`).
``"legacy"``   SGLang's router runs and the policy is applied at its post-processing seam
               (``_post_process_topk_ids``): fused shared-expert columns written by the router,
               ROCm, and routing paths that do not go through ``select_experts``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Budget, RoutingSpec, XShareConfigError
from ..placement import Placement
from ..select import Selector
from ..select.output import MetricsSink, OutputSpec
from .slots import resolve_empty_slot_mode

__all__ = ["LayerPolicy", "build_layer", "routing_from_topk_config", "DRAFT_ATTR"]

logger = logging.getLogger("sglang_xshare.serving")

#: Attribute set on ``TopKConfig`` by the patched ``TopK.__init__``.
DRAFT_ATTR = "_xshare_is_draft"

#: Environment variable forcing the selection backend of every layer (``auto`` | ``reference`` |
#: ``kernel``): ``kernel`` with ``TRITON_INTERPRET=1`` runs the GPU path on a CPU (tests).
BACKEND_ENV = "SGLANG_XSHARE_SELECT_BACKEND"


def routing_from_topk_config(tc: Any, num_experts: int) -> tuple[RoutingSpec | None, str | None]:
    """``TopKConfig`` -> :class:`RoutingSpec`, or a reason why the policy cannot reproduce it."""
    if tc.custom_routing_function is not None:
        return None, "the model uses a custom_routing_function"
    if tc.scoring_func not in ("softmax", "sigmoid"):
        return None, f"scoring_func={tc.scoring_func!r} is not supported (softmax, sigmoid)"
    if getattr(tc, "sqrtsoftplus_log1p", False):
        return None, "sqrtsoftplus routing is not supported"
    top_k = tc.top_k - tc.num_shared_topk_slots
    grouped = bool(tc.use_grouped_topk)
    try:
        spec = RoutingSpec(
            num_experts=num_experts,
            top_k=top_k,
            scoring=tc.scoring_func,
            renormalize=bool(tc.renormalize),
            num_expert_group=tc.num_expert_group if grouped else None,
            topk_group=tc.topk_group if grouped else None,
            has_correction_bias=tc.correction_bias is not None,
        )
    except XShareConfigError as e:
        return None, f"routing not representable: {e}"
    return spec, None


def _backend_names(tc: Any, is_draft: bool) -> tuple[str, str | None]:
    """``(a2a backend, runner backend)`` names for this layer, ``("none", None)`` when unknown."""
    a2a = "none"
    try:
        from sglang.srt.layers.moe import utils as moe_utils

        backend = moe_utils.get_speculative_moe_a2a_backend() if is_draft else moe_utils.get_moe_a2a_backend()
        a2a = str(getattr(backend, "value", backend))
    except Exception:  # moe config not initialised (unit tests, CPU): plain "none"
        a2a = "none"
    rb = getattr(tc, "runner_backend", None)
    runner = None if rb is None else str(getattr(rb, "value", rb))
    return a2a, runner


def _sglang_placement(num_experts: int, layer_id: int, device: torch.device, is_draft: bool,
                      strict: bool = False) -> tuple[Placement, bool]:
    """The layer's placement and whether it is SGLang's EPLB map (physical ids != logical ids).

    With EPLB metadata the placement's ``physical_to_logical`` is a view of SGLang's device
    tensor (updated in place on rebalance); otherwise plain EP over ``moe_ep_size`` ranks. Experts
    not divisible by the EP size (and no EPLB map): :class:`XShareConfigError` when ``strict``
    (the policy balances ranks: ``uses_placement``), else one balance group and a warning (only the
    live metrics' busiest-rank column reads the placement then).
    """
    md = None
    if not is_draft:
        try:
            from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

            md = get_global_expert_location_metadata()
        except Exception:
            md = None
    if md is not None and md.num_logical_experts == num_experts and layer_id < md.num_layers:
        p2l_cpu = md.physical_to_logical_map_cpu[layer_id]
        placement = Placement.from_map(num_experts, md.ep_size, p2l_cpu)
        view = md.physical_to_logical_map[layer_id]
        if view.dtype == torch.int64 and view.device == device:
            placement = dataclasses.replace(placement, physical_to_logical=view)
        else:
            logger.warning("xshare: layer %d: EPLB map is %s on %s; using a copy (a rebalance will not reach it)",
                           layer_id, view.dtype, view.device)
            placement = dataclasses.replace(placement, physical_to_logical=p2l_cpu.to(device=device, dtype=torch.int64))
        return placement, True
    ep = 1
    try:
        from sglang.srt.runtime_context import get_parallel

        ep = int(get_parallel().moe_ep_size)
    except Exception:
        ep = 1
    if ep > 1 and num_experts % ep:
        if strict:
            Placement.expert_parallel(num_experts, ep)  # raises the configuration error (--ep-size)
        logger.warning("xshare: layer %d: %d experts are not divisible by the MoE EP size %d and there is no EPLB "
                       "map; the busiest-rank metric counts one group", layer_id, num_experts, ep)
    placement = Placement.expert_parallel(num_experts, ep) if ep >= 1 and num_experts % ep == 0 \
        else Placement.tensor_parallel(num_experts)
    return dataclasses.replace(placement, physical_to_logical=placement.physical_to_logical.to(device)), False


@dataclass
class LayerPolicy:
    """How one SGLang ``TopK`` layer is routed under xshare (built once, at its first call).

    Attributes:
        layer_id: SGLang's layer index.
        is_draft: a draft-model layer (speculative decoding).
        num_experts: logical routed experts ``E``.
        routing: the model's routing spec as SGLang configured it, or ``None`` on fallback.
        selector: the policy, or ``None`` when this layer keeps SGLang's routing.
        reason: why the layer keeps SGLang's routing (``None`` when it is selected).
        scale: routed scaling factor SGLang folds into the weights, or ``None``.
        placement: expert placement of the layer (device-resident; SGLang's EPLB map when present).
        empty_mode: ``"minus_one"``, ``"fill"`` or ``"distinct"`` (see :mod:`.slots`).
        min_tokens: smallest batch (tokens) the policy is applied to; smaller ones take SGLang's path.
        metrics_row: ``[8] int64`` row of the live metrics table (fused into the kernel) or ``None``.
        stats_reduce: ``--xshare-ep-global``: the all-reduce (sum over the MoE EP group) of the batch
            statistics, or ``None``; every call of the layer then joins it exactly once (a rank
            with no MoE tokens joins in ``TopK.empty_topk_output``, :meth:`.runtime.Runtime.join_ep_global`).
        idle_stats: zeros of the statistics' shape, all-reduced by calls that do not select (so that
            every rank joins the collective on every call, whatever its batch).
        topk_config: SGLang's ``TopKConfig`` (kept alive: the cache is keyed by its id).
        paths: the path taken per batch size so far (``T -> path``; logged once per size).
    """

    layer_id: int
    is_draft: bool
    num_experts: int
    routing: RoutingSpec | None
    selector: Selector | None
    reason: str | None
    scale: float | None
    placement: Placement | None
    empty_mode: str
    min_tokens: int = 1
    metrics_row: torch.Tensor | None = None
    stats_reduce: Any = None
    idle_stats: torch.Tensor | None = None
    topk_config: Any = field(repr=False, default=None)
    paths: dict[int, str] = field(default_factory=dict, repr=False)
    _specs: dict[tuple, OutputSpec] = field(default_factory=dict, repr=False)

    @property
    def chooses_copies(self) -> bool:
        """Whether the layer's policy picks physical expert copies itself (``uses_placement``)."""
        return self.selector is not None and self.selector.entry.uses_placement

    def reduce_idle(self) -> None:
        """``--xshare-ep-global``: join the layer's all-reduce with zeros (a call that does not select,
        or a rank without tokens), so that every rank runs the same collectives; nothing otherwise."""
        if self.stats_reduce is not None:
            self.stats_reduce(self.idle_stats.zero_())

    # ---- output specs (built once per dispatch mode) -----------------------------------------
    def output_spec(self, ids: str, dispatch_map: torch.Tensor | None = None, empty: str | None = None) -> OutputSpec:
        """The :class:`OutputSpec` for dispatching ``ids`` (``logical`` / ``physical`` / ``mapped``)."""
        mode = empty or ("fill" if self.empty_mode == "fill" else "minus_one")
        key = (ids, None if dispatch_map is None else (dispatch_map.data_ptr(), dispatch_map.numel()), mode)
        spec = self._specs.get(key)
        if spec is None:
            sink = None
            if self.metrics_row is not None and self.placement is not None:
                # dispatched units: logical experts, or the placement's physical slots (mapped / physical)
                sink = MetricsSink.for_placement(self.metrics_row, self.placement, ids, self.metrics_row.device)
            spec = OutputSpec(ids, mode, self.scale, dispatch_map if ids == "mapped" else None, sink)
            self._specs[key] = spec
        return spec


def _min_tokens(cfg: Any, layer_id: int, top_k: int | None) -> int:
    """``--xshare-min-tokens``: the given number, or ``auto``:

    * 1 for per-token policies (``cap``);
    * 2 for batch policies (one token has nothing to share: the policy would only cut the token's
      own experts);
    * for a *count* budget ``m`` of ``xshare`` / ``xshare_spec`` without a request budget (no
      placement to balance), at least ``m // top_k + 1``: a batch of ``T`` tokens activates at
      most ``T * top_k`` distinct experts, so while ``T * top_k <= m`` the budget cannot bind and
      the batch keeps SGLang's routing without paying for a selection that changes nothing
      (``xshare@24`` at top-4: batches of up to 6 tokens); with ``--xshare-verify-budget`` the
      smaller of the two count budgets (both must be counts).

    Decided per layer from flags and shapes (per captured batch size under CUDA graphs): no
    run-time cost.
    """
    if cfg.min_tokens != "auto":
        return int(cfg.min_tokens)
    entry = cfg.entry
    if entry is None or not entry.batch_aware:
        return 1
    n = 2
    if entry.budgeted and not entry.uses_placement and cfg.request_budget is None and top_k:
        sched = cfg.budget_schedule()
        budgets = [sched.for_layer(layer_id) if sched is not None else None]
        if cfg.verify_budget is not None:  # a verify batch of T tokens takes this one
            budgets.append(Budget.parse(cfg.verify_budget, "--xshare-verify-budget"))
        if all(b is not None and b.mode == "count" for b in budgets):
            n = max(n, int(min(b.value for b in budgets)) // int(top_k) + 1)
    return n


def _setup_ep_global(lp: LayerPolicy, tc: Any, device: torch.device) -> None:
    """``--xshare-ep-global``: all-reduce the statistics over SGLang's MoE EP group, when the MoE
    input of this rank is only part of the batch. Every call of the layer then joins the collective
    (the path a batch takes must not depend on this rank's own batch size: ``min_tokens = 1``)."""
    if tc.num_shared_topk_slots > 0:
        logger.warning("xshare: layer %d has fused shared-expert columns; --xshare-ep-global is not applied there",
                       lp.layer_id)
        return
    try:
        from sglang.srt.layers.moe.utils import is_moe_input_scattered_across_dp_ranks
        from sglang.srt.runtime_context import get_parallel

        scattered = bool(is_moe_input_scattered_across_dp_ranks())
        group = get_parallel().moe_ep_group
        size = int(getattr(group, "world_size", 1))
    except Exception as e:  # no SGLang parallel state (tests on one process)
        logger.warning("xshare: --xshare-ep-global: no MoE EP group (%s); selecting per rank", e)
        return
    if not scattered or size <= 1:
        logger.info("xshare: --xshare-ep-global: every rank routes the whole batch here (scattered=%s, EP group %d); "
                    "nothing to share", scattered, size)
        return
    lp.stats_reduce = group.all_reduce
    lp.min_tokens = 1
    # an idle call's zeros must match what a selecting call reduces, shape and dtype (the collective
    # of one rank meets another rank's): the kernel's [2, BLOCK_E] int64, the reference's [3, E] int64.
    # Gated on the backend the layer's calls run (on a GPU: the kernel; SGLANG_XSHARE_SELECT_BACKEND=kernel
    # runs the same branch on a CPU), not on the device type.
    if lp.selector.uses_kernel(torch.empty(0, device=device)):
        from ..kernels.workspace import idle_stats

        lp.idle_stats = idle_stats(lp.num_experts, device)
    else:
        lp.idle_stats = torch.zeros(3, lp.num_experts, dtype=torch.int64, device=device)
    logger.info("xshare: layer %d: EP-global selection over %d ranks", lp.layer_id, size)


def build_layer(cfg: Any, tc: Any, layer_id: int, router_logits: torch.Tensor, metrics: Any = None) -> LayerPolicy:
    """Build the :class:`LayerPolicy` of one ``TopK`` from SGLang's ``TopKConfig`` (model load).

    Raises :class:`XShareConfigError` naming the flag (budget > E, k0 > top_k, ...).
    """
    E = int(router_logits.shape[-1])
    is_draft = bool(getattr(tc, DRAFT_ATTR, False))
    routing, reason = routing_from_topk_config(tc, E)
    strict = cfg.selects and cfg.entry.uses_placement and (not is_draft or cfg.apply_to_draft)
    placement = _sglang_placement(E, layer_id, router_logits.device, is_draft, strict)[0] if routing is not None else None
    a2a, runner = _backend_names(tc, is_draft)
    empty_mode = resolve_empty_slot_mode(cfg.empty_slots, a2a, runner, router_logits.device.type)
    scale = None
    if routing is not None and tc.routed_scaling_factor:
        from sglang.srt.layers.moe.topk import is_routed_scaling_factor_fused_in_topk

        if is_routed_scaling_factor_fused_in_topk(tc):
            scale = float(tc.routed_scaling_factor)
    selector = None
    if not cfg.selects:
        reason = reason or "policy off"
    elif cfg.entry.plain_topk:
        reason = reason or f"policy {cfg.policy} is SGLang's own routing"
    elif is_draft and not cfg.apply_to_draft:
        reason = "draft-model layer (use --xshare-apply-to-draft)"
    elif routing is not None:
        selector = Selector(routing, cfg.selection_config(routing), placement=placement, correction_bias=tc.correction_bias,
                            backend=os.environ.get(BACKEND_ENV, "auto"))  # type: ignore[arg-type]
    row = None
    if metrics is not None and selector is not None and not is_draft:
        row = metrics.row(layer_id, router_logits.device)
    lp = LayerPolicy(layer_id, is_draft, E, routing, selector, None if selector is not None else reason, scale,
                     placement, empty_mode, _min_tokens(cfg, layer_id, routing.top_k if routing is not None else None), row,
                     topk_config=tc)
    if cfg.ep_global and selector is not None and not is_draft:
        _setup_ep_global(lp, tc, router_logits.device)
    if selector is not None:
        logger.info("xshare: %s layer %d: policy %s (E=%d, top_k=%d, shared slots=%d, empty slots=%s, a2a=%s, "
                    "runner=%s, min tokens=%d)", "draft" if is_draft else "target", layer_id, cfg.policy, E,
                    routing.top_k, tc.num_shared_topk_slots, empty_mode, a2a, runner, lp.min_tokens)
    elif cfg.selects and reason and not cfg.entry.plain_topk:
        logger.log(logging.INFO if "draft" in reason else logging.WARNING,
                   "xshare: %s layer %d keeps SGLang's routing: %s", "draft" if is_draft else "target", layer_id, reason)
    return lp
