"""Live per-layer metrics of a running SGLang server, cheap enough to leave on.

Per MoE layer call (target layers of decode / target-verify batches) the core's
:func:`sglang_xshare.metrics.selection_metrics` is evaluated on device and *added* to a device
accumulator ``[max_layers, M + 1]`` (the last column counts calls): no host sync, static shapes,
so it is captured into SGLang's CUDA graphs like the rest of the layer. Every
``--xshare-metrics-interval`` decode steps the accumulator is read once (one device -> host copy),
logged as one line per flush, exported as Prometheus gauges (``sglang_xshare_<metric>{layer}``;
SGLang's ``/metrics`` shows them with ``--enable-metrics``, which sets up prometheus_client's
multi-process directory) and zeroed.

Charged ranks: the physical ids SGLang actually dispatches (after EPLB) when an EPLB map is
active, else each logical expert's copy in plain EP over ``--ep-size`` ranks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..metrics import METRIC_NAMES, selection_metrics
from ..select import SelectionOutput, compute_scores, valid_mask

__all__ = ["LiveMetrics", "MAX_LAYERS"]

logger = logging.getLogger("sglang_xshare.serving")

#: Rows of the accumulator (layer ids beyond it are not tracked; logged once).
MAX_LAYERS = 512


class LiveMetrics:
    """Device accumulator of per-layer selection metrics, flushed every ``interval`` steps.

    Args:
        interval: decode steps between two flushes (host reads).
    """

    def __init__(self, interval: int) -> None:
        self.interval = int(interval)
        self.sums: torch.Tensor | None = None  # [MAX_LAYERS, len(METRIC_NAMES) + 1] float32
        self.steps = 0
        self.flushes = 0
        self.last: dict[int, dict[str, float]] = {}
        self._gauges: dict[str, Any] | None = None
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def observe(self, lp: Any, router_logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                physical_ids: torch.Tensor | None, num_token_non_padded: Any) -> None:
        """Add one layer call's metrics to the accumulator (device ops only).

        Args:
            lp: the :class:`~.hook.LayerPolicy` (routing, placement, layer id).
            router_logits: ``[T, E]``.
            topk_ids: ``[T, k]`` logical ids (``-1`` = empty), routed columns only.
            topk_weights: ``[T, k]`` float.
            physical_ids: ``[T, k]`` physical ids SGLang dispatches (``-1`` empty) or ``None``.
            num_token_non_padded: int / 0-d tensor / ``None``.
        """
        if lp.routing is None or lp.placement is None:
            return
        layer = lp.layer_id
        if not (0 <= layer < MAX_LAYERS):
            self._warn_once(f"l{layer}", "xshare metrics: layer id %d outside [0, %d); not tracked", layer, MAX_LAYERS)
            return
        dev = router_logits.device
        if self.sums is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                self._warn_once("capture", "xshare metrics: first MoE call is inside CUDA-graph capture; "
                                "metrics start with the next eager forward")
                return
            self.sums = torch.zeros(MAX_LAYERS, len(METRIC_NAMES) + 1, dtype=torch.float32, device=dev)
        valid = valid_mask(router_logits.shape[0], num_token_non_padded, dev)
        scores = compute_scores(router_logits, lp.routing, lp.topk_config.correction_bias if lp.routing.has_correction_bias else None)
        ids = topk_ids.to(torch.int32).masked_fill(~valid.unsqueeze(1), -1)
        phys = None
        if physical_ids is not None and lp.placement.num_physical > 0:
            phys = physical_ids.to(torch.int32).masked_fill(~valid.unsqueeze(1), -1)
            phys = torch.where(phys < lp.placement.num_physical, phys, torch.full_like(phys, -1))
        out = SelectionOutput(ids, topk_weights.float(), phys)
        m = selection_metrics(out, scores, valid, lp.routing.top_k, lp.placement)
        vec = torch.stack([m[n].reshape(()).float() for n in METRIC_NAMES] + [torch.ones((), device=dev)])
        self.sums[layer].add_(vec)

    def on_step_end(self) -> None:
        """Count a decode step; flush every ``interval`` steps."""
        self.steps += 1
        if self.steps % self.interval == 0:
            self.flush()

    def flush(self) -> dict[int, dict[str, float]]:
        """Read, log, export and zero the accumulator; returns ``{layer: {metric: mean}}``."""
        if self.sums is None:
            return {}
        host = self.sums.to("cpu", copy=True)
        self.sums.zero_()
        self.flushes += 1
        out: dict[int, dict[str, float]] = {}
        for layer in torch.nonzero(host[:, -1] > 0).flatten().tolist():
            n = float(host[layer, -1])
            out[layer] = {name: float(host[layer, j]) / n for j, name in enumerate(METRIC_NAMES)}
            out[layer]["calls"] = n
        self.last = out
        if out:
            self._log(out)
            self._export(out)
        return out

    def _log(self, out: dict[int, dict[str, float]]) -> None:
        layers = sorted(out)
        mean = {name: sum(out[l][name] for l in layers) / len(layers) for name in METRIC_NAMES}
        logger.info(
            "xshare metrics (%d steps, %d layers): distinct experts %.2f, peak/mean rank experts %.2f/%.2f "
            "(ratio %.3f), retained top-k mass %.4f, short tokens %.2f of %.2f",
            self.steps, len(layers), mean["distinct"], mean["peak_experts"], mean["mean_experts"],
            mean["peak_over_mean"], mean["retained_mass"], mean["short_tokens"], mean["valid_tokens"],
        )
        logger.debug("xshare metrics per layer: %s", {l: {k: round(v, 4) for k, v in out[l].items()} for l in layers})

    def _export(self, out: dict[int, dict[str, float]]) -> None:
        try:
            from prometheus_client import Gauge
        except ImportError:
            return
        if self._gauges is None:
            self._gauges = {}
            for name in METRIC_NAMES:
                try:
                    self._gauges[name] = Gauge(f"sglang_xshare_{name}", f"xshare per-layer mean of {name} since the last flush",
                                               labelnames=["layer"], multiprocess_mode="mostrecent")
                except ValueError:  # already registered in this process
                    self._gauges = {}
                    return
        for layer, vals in out.items():
            for name, g in self._gauges.items():
                g.labels(layer=str(layer)).set(vals[name])
