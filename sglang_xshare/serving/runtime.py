"""The installed plugin's process state: the config, the built layers, telemetry, re-entrancy flags.

One :class:`Runtime` per process, created by :func:`~.install.install` (:func:`start`) and read by
every patched SGLang function through :func:`current` (``None``: the plugin is not installed and
the patches pass SGLang's calls through).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from .config import XShareServerConfig
from .context import DECODE_KINDS, BatchInfo, capturing, current_batch
from .layer import LayerPolicy, build_layer

__all__ = ["FORCE_PATH_ENV", "Runtime", "current", "start", "stop"]

logger = logging.getLogger("sglang_xshare.serving")

#: Environment variable forcing the ``general`` or ``legacy`` path where ``fast`` would run (benchmarks).
FORCE_PATH_ENV = "SGLANG_XSHARE_FORCE_PATH"


class Runtime:
    """Everything the installed plugin needs in one process.

    Attributes:
        cfg: the validated server config.
        layers: ``id(TopKConfig) -> LayerPolicy`` (built at each layer's first routing call).
        in_select: inside the plugin's own routing: SGLang's post-processing seam passes through.
        seam_selected: the ``legacy`` path: the post-processing seam selected (ran the collectives).
        dynamic_bias_call: SGLang routes a per-token dynamic bias: the seam passes through.
        min_tokens: the target layers' smallest selected batch (the live metrics' path label).
        force_path: ``SGLANG_XSHARE_FORCE_PATH`` (``general`` / ``legacy``) or ``None``.
        metrics: :class:`~.telemetry.metrics.LiveMetrics` (``--xshare-metrics``) or ``None``.
        recorder: :class:`~.telemetry.recorder.TraceRecorder` (``--xshare-record-trace``) or ``None``.
        ab: the in-server A/B measurement (:class:`~.measure.ab.Measurement`, ``--xshare-ab-switch``)
            or ``None``; its modules are imported only then.
    """

    def __init__(self, cfg: XShareServerConfig) -> None:
        self.cfg = cfg
        self.layers: dict[int, LayerPolicy] = {}
        self.logged: set[str] = set()
        self.lock = threading.Lock()
        self.dynamic_bias_call = False
        self.in_select = False
        self.seam_selected = False
        self.min_tokens: int | None = None
        self.force_path = os.environ.get(FORCE_PATH_ENV) or None
        self.metrics = None
        self.recorder = None
        self.ab = None
        if cfg.metrics:
            from .telemetry.metrics import LiveMetrics, process_rank

            self.metrics = LiveMetrics(cfg.metrics_interval, rank=process_rank())
        if cfg.record_trace is not None:
            from .telemetry.recorder import TraceRecorder

            self.recorder = TraceRecorder(cfg.record_trace, cfg.record_trace_steps)
        if cfg.measures:
            from .measure.ab import Measurement

            self.ab = Measurement(cfg)

    def log_once(self, key: str, msg: str, *args: Any, level: int = logging.INFO) -> None:
        """Log ``msg`` the first time ``key`` is seen in this process."""
        if key not in self.logged:
            self.logged.add(key)
            logger.log(level, msg, *args)

    def layer(self, tc: Any, layer_id: int | None, router_logits: torch.Tensor) -> LayerPolicy:
        """The :class:`LayerPolicy` of SGLang's ``TopKConfig`` ``tc`` (built at its first call)."""
        lp = self.layers.get(id(tc))
        if lp is not None and lp.num_experts == router_logits.shape[-1]:
            return lp
        with self.lock:
            lid = -1 if layer_id is None else int(layer_id)
            lp = build_layer(self.cfg, tc, lid, router_logits, self.metrics)
            if self.ab is not None:
                self.ab.build_arms(lp, tc, lid, router_logits)
            self.layers[id(tc)] = lp
            if lp.selector is not None and not lp.is_draft:
                self.min_tokens = lp.min_tokens
        return lp

    def family(self, lp: LayerPolicy) -> list[LayerPolicy]:
        """``lp`` and, under the A/B measurement, its arms' layers: everything whose collectives a
        call of the layer runs (every rank joins each, in this order)."""
        return [lp] if self.ab is None else [lp, *self.ab.arms_of(lp)]

    def reduce_idle(self, lp: LayerPolicy) -> None:
        """``--xshare-ep-global``: the layer (and its arms) join their all-reduce with zeros."""
        for a in self.family(lp):
            a.reduce_idle()

    def join_ep_global(self, tc: Any, layer_id: int | None, device: torch.device) -> None:
        """``--xshare-ep-global`` on a rank whose MoE input is empty this forward (DP attention or
        DeepEP with no tokens here: SGLang's model calls ``TopK.empty_topk_output`` instead of the
        router): join the layer's all-reduce with zeros, as a call that does not select does, so
        that every rank of the EP group runs the same collectives (a rank left out hangs the others).
        A layer not built yet on this rank is built here; its expert count comes from another layer
        or SGLang's expert-location metadata."""
        lp = self.layers.get(id(tc))
        if lp is None:
            E = self._num_experts_hint()
            if E is None:
                self.log_once("ep_global_unknown_e", "xshare: --xshare-ep-global: layer %s has no tokens on this rank "
                              "before its first routing call and the expert count is unknown; this rank skips its "
                              "all-reduce (the other ranks may wait)", layer_id, level=logging.WARNING)
                return
            lp = self.layer(tc, layer_id, torch.empty(0, E, device=device))
        self.reduce_idle(lp)

    def _num_experts_hint(self) -> int | None:
        """Logical experts of the model: a built target layer's, else SGLang's expert-location metadata's."""
        for lp in self.layers.values():
            if not lp.is_draft:
                return lp.num_experts
        try:
            from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

            md = get_global_expert_location_metadata()
        except Exception:
            md = None
        return None if md is None else int(md.num_logical_experts)

    def applies_to_batch(self) -> bool:
        """Whether the running batch's kind is one the policy applies to."""
        info = current_batch()
        if info is None:
            return True  # direct calls (no model runner): treat as a decode batch
        if info.kind in DECODE_KINDS:
            return True
        return info.kind == "prefill" and self.cfg.apply_to_prefill

    def on_step_end(self, info: BatchInfo) -> None:
        """The outermost forward ended: count the step, record it, poll the A/B switch (outside
        CUDA graphs). Idle steps (a DP rank without requests) only poll the switch, so that all
        ranks change arm together."""
        if capturing() or info.kind not in (*DECODE_KINDS, "idle"):
            return
        if info.kind != "idle":
            path = None
            n = info.num_real_tokens
            if self.min_tokens is not None and n is not None:
                path = "policy" if n >= self.min_tokens else "sglang"
            if self.ab is not None:
                self.ab.count_step(self.metrics, path)
            elif self.metrics is not None:
                self.metrics.on_step_end(path)
            if self.recorder is not None:
                self.recorder.on_step_end(info)
        if self.ab is not None:
            self.ab.switch.poll()  # the next step (and graph replay) reads the new arm

    def metric_tables(self) -> list[Any]:
        """Every live-metrics table of the process (the policy's, then the A/B arms')."""
        if self.metrics is None:
            return []
        return [self.metrics, *(self.ab.arm_metrics if self.ab is not None else [])]

    def close(self) -> None:
        """Write the trace (if recording)."""
        if self.recorder is not None:
            self.recorder.close()


_RUNTIME: Runtime | None = None


def current() -> Runtime | None:
    """The installed plugin's :class:`Runtime`, or ``None``."""
    return _RUNTIME


def start(cfg: XShareServerConfig) -> Runtime:
    """Replace the process's runtime by a fresh one for ``cfg``."""
    global _RUNTIME
    stop()
    _RUNTIME = Runtime(cfg)
    return _RUNTIME


def stop() -> None:
    """Close and forget the runtime."""
    global _RUNTIME
    if _RUNTIME is not None:
        _RUNTIME.close()
    _RUNTIME = None
