"""The in-server A/B measurement's routing: SGLang's routing and every policy arm's, the switch picks.

:class:`Measurement` is the runtime's ``ab`` (``--xshare-ab-switch``). For a target layer it runs
the same route steps as the production path (:mod:`..route`) once per arm: SGLang's router
(arm 0), the server's policy (arm 1) and each ``--xshare-ab-arm`` policy (arms 2, ...; each its own
:class:`~..layer.LayerPolicy` and path), then :meth:`~.switch.ABSwitch.choose` picks on the device
which routing the experts get. Under ``--xshare-ab-idle-arms skip`` a fast-path arm runs through
:class:`GatedSelector`: its kernel launch reads the switch's device flag and returns at once
unless the switch routes by that arm.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from ..config import XShareServerConfig
from ..layer import LayerPolicy, build_layer
from ..route import SELECTING, decide, emit, run_sglang, select_on
from ..route_general import general
from ..sglang_surface import TOPK_MODULE
from .arms import arm_configs
from .switch import ABSwitch

__all__ = ["GatedSelector", "Measurement"]


class GatedSelector:
    """A :class:`~sglang_xshare.select.Selector` whose kernel launches run only while
    ``flag[0] == arm`` (``flag``: ``[1] int64`` on the logits' device, read by the kernel, so a
    captured CUDA graph follows it); otherwise its outputs are unwritten memory and its fused
    metrics do not count the call. The reference path computes regardless."""

    def __init__(self, selector: Any, flag: torch.Tensor, arm: int) -> None:
        self.selector, self.gate = selector, (flag, int(arm))

    def __call__(self, router_logits: torch.Tensor, **kwargs: Any) -> Any:
        return self.selector(router_logits, launch={"gate": self.gate}, **kwargs)


class Measurement:
    """The A/B switch, the arms' configs and metrics, and each target layer's arm layers.

    Attributes:
        switch: the :class:`~.switch.ABSwitch` (arm 0 = SGLang's routing, 1 = the policy, 2.. the arms).
        arm_cfgs: the ``--xshare-ab-arm`` configs (switch arms 2, 3, ...).
        arm_metrics: each arm's live metrics (rank label ``"R/armN"``), or ``[]`` without ``--xshare-metrics``.
        skip_idle: ``--xshare-ab-idle-arms skip``: a fast-path arm the switch does not route by
            costs an empty launch (:class:`GatedSelector`).
    """

    def __init__(self, cfg: XShareServerConfig) -> None:
        self.arm_cfgs = arm_configs(cfg)[1:]
        self.switch = ABSwitch(cfg.ab_switch, 1 + len(self.arm_cfgs))
        self.skip_idle = cfg.ab_idle_arms == "skip"
        self.arm_metrics: list[Any] = []
        if cfg.metrics:
            from ..telemetry.metrics import LiveMetrics, process_rank

            self.arm_metrics = [LiveMetrics(cfg.metrics_interval, rank=f"{process_rank()}/arm{i + 2}")
                                for i in range(len(self.arm_cfgs))]
        self._arms: dict[int, list[LayerPolicy]] = {}

    # ---- layers ----------------------------------------------------------------------------
    def build_arms(self, lp: LayerPolicy, tc: Any, layer_id: int, router_logits: torch.Tensor) -> None:
        """Build the arms' layers of a selecting target layer ``lp`` (SGLang's ``TopKConfig`` ``tc``)."""
        if not self.arm_cfgs or lp.selector is None or lp.is_draft:
            self._arms.pop(id(tc), None)
            return
        metrics = self.arm_metrics or [None] * len(self.arm_cfgs)
        self._arms[id(tc)] = [build_layer(a, tc, layer_id, router_logits, m) for a, m in zip(self.arm_cfgs, metrics)]

    def arms_of(self, lp: LayerPolicy) -> list[LayerPolicy]:
        """The arms' layers of ``lp`` (``[]`` for draft or non-selecting layers)."""
        return [] if lp.is_draft else self._arms.get(id(lp.topk_config), [])

    def _selector(self, lp: LayerPolicy, idx: int, device: torch.device) -> Any:
        """What runs arm ``idx``'s fast-path selection: gated by the switch under ``skip``."""
        if not self.skip_idle:
            return None
        return GatedSelector(lp.selector, self.switch.flag(device), idx)

    # ---- steps -----------------------------------------------------------------------------
    def count_step(self, metrics: Any, path: str | None) -> None:
        """Count a decode step in the policy's and every arm's metrics, labelled by what routed the
        experts: ``policy`` when the switch gives them that arm's routing, ``ab_sglang`` when
        SGLang's, ``ab_armN`` another arm's (``sglang``: the batch is below the policies' size)."""
        if metrics is None:
            return
        for idx, m in enumerate([metrics, *self.arm_metrics], start=1):
            label = path
            if path == "policy" and self.switch.arm != idx:
                label = "ab_sglang" if self.switch.arm == 0 else f"ab_arm{self.switch.arm}"
            m.on_step_end(label)

    # ---- the routing seams -----------------------------------------------------------------
    def select_experts(self, rt: Any, lp: LayerPolicy, path: str, orig: Callable, args: tuple, kwargs: dict) -> Any:
        """``select_experts`` of a target layer under the switch: SGLang's routing (arm 0) and each
        policy arm's on its own path, the switch picks. Collectives are never skipped: under
        ``--xshare-ep-global`` every arm joins its all-reduce on every rank, in arm order."""
        hidden_states, router_logits, tc = args
        layer_id, ntnp = kwargs["layer_id"], kwargs["num_token_non_padded"]
        info = kwargs["expert_location_dispatch_info"]
        extra = {k: v for k, v in kwargs.items() if k not in ("layer_id", "num_token_non_padded",
                                                              "expert_location_dispatch_info")}
        topk_mod = sys.modules[TOPK_MODULE]
        T = int(router_logits.shape[0])
        arms = self.arms_of(lp)
        arm_paths = [decide(rt, a, topk_mod, T, tc, info, extra) for a in arms]
        if path == "legacy" or (path == "sglang" and not any(pa in SELECTING for pa in arm_paths)):
            return run_sglang(rt, lp, path, orig, args, kwargs)
        rt.in_select = True  # SGLang's post-processing seam passes SGLang's routing through
        try:
            base = orig(*args, **kwargs)
        finally:
            rt.in_select = False
        outs = []
        for idx, (a, pa) in enumerate(zip((lp, *arms), (path, *arm_paths)), start=1):
            if pa in SELECTING:
                outs.append(select_on(rt, a, pa, topk_mod, tc, router_logits, layer_id, ntnp, info,
                                      selector=self._selector(a, idx, router_logits.device)))
            else:  # this batch is below the arm's min tokens: SGLang's routing (another arm selects)
                a.reduce_idle()
                outs.append((base.topk_ids, base.topk_weights, None))
        rec = outs[0][2]
        ids, weights = self.switch.choose(base.topk_ids, base.topk_weights, [o[:2] for o in outs])
        return emit(topk_mod, lp, path, ids, weights, rec, router_logits, tc, layer_id, info)

    def post_process(self, rt: Any, lp: LayerPolicy, orig: Callable, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, args: tuple, padded_rows_masked: bool) -> Any:
        """The ``legacy`` seam under the switch (fused shared-expert columns, ...): SGLang's
        post-processing of its own routing, each arm's policy, and the switch picks; EPLB's
        recorder sees the policy's ids."""
        ids, weights, rec = general(rt, lp, orig, topk_ids, topk_weights, *args)
        outs = [(ids, weights)] + [general(rt, a, orig, topk_ids, topk_weights, *args)[:2] for a in self.arms_of(lp)]
        b_ids, b_w, _ = orig(topk_ids.clone(), topk_weights.clone(), *args, padded_rows_masked)
        ids, weights = self.switch.choose(b_ids, b_w, outs)
        return ids, weights, rec
