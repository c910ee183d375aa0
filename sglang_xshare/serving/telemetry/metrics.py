"""Live per-layer metrics of a running SGLang server: counted inside the selection kernel.

Every selecting MoE layer owns a row of one device table ``[MAX_LAYERS, len(METRIC_FIELDS)]
int64`` (:data:`sglang_xshare.select.output.METRIC_FIELDS`); the policy's kernel adds its counts
to that row in the same launch (:mod:`sglang_xshare.kernels._metrics`): no extra kernel, no host
sync, captured into SGLang's CUDA graphs with the layer.

At decode-step ends (host side, every step also under graph replay) the table is copied to
pinned host memory *asynchronously* every ``--xshare-metrics-interval`` steps or once a second,
and the copy made the time before is read -- the step never waits for the GPU. Each read is
logged (one line) and exported as Prometheus gauges: cumulative sums
``sglang_xshare_<field>{layer, rank}``, plus ``sglang_xshare_decode_steps{rank}`` and the path
counters ``sglang_xshare_path_steps{path, rank}`` (decode steps whose batch took the policy vs
SGLang's own routing). SGLang's ``/metrics`` shows them with ``--enable-metrics`` (its
multi-process registry), so a client can difference two scrapes. The grid-barrier fault counter
of the kernels is read the same way; when it grows a warning names it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from ...select.output import METRIC_FIELDS

__all__ = ["LiveMetrics", "MAX_LAYERS", "parse_prometheus", "process_rank"]

logger = logging.getLogger("sglang_xshare.serving")

#: Rows of the table (layer ids beyond it are not tracked; logged once).
MAX_LAYERS = 512


class LiveMetrics:
    """Device table of per-layer counts, read asynchronously every ``interval`` steps (or 1 s).

    Args:
        interval: decode steps between two reads.
        rank: label of this process's series (EP/TP rank; ``"R/armN"`` for an extra A/B arm's counts).
        export: publish Prometheus gauges (needs ``prometheus_client``).
    """

    def __init__(self, interval: int, rank: int | str = 0, export: bool = True) -> None:
        self.interval = int(interval)
        self.rank = rank
        self.export = export
        self.table: torch.Tensor | None = None
        self.steps = 0
        self.path_steps: dict[str, int] = {}
        self.totals: dict[int, dict[str, int]] = {}
        self.faults = 0
        self._pending: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        self._bufs: list[tuple[torch.Tensor, torch.Tensor]] = []  # two pinned (table, faults) copies, alternating
        self._flip = 0
        self._last_read = time.monotonic()
        self._warned: set[str] = set()

    # ---- device side ---------------------------------------------------------------------
    def row(self, layer: int, device: torch.device) -> torch.Tensor | None:
        """The ``[len(METRIC_FIELDS)] int64`` row of ``layer`` (allocating the table on first use)."""
        if not (0 <= layer < MAX_LAYERS):
            self._warn_once(f"l{layer}", "xshare metrics: layer id %d outside [0, %d); not tracked", layer, MAX_LAYERS)
            return None
        if self.table is None:
            self.table = torch.zeros(MAX_LAYERS, len(METRIC_FIELDS), dtype=torch.int64, device=device)
        return self.table[layer]

    # ---- host side -----------------------------------------------------------------------
    def on_step_end(self, path: str | None = None) -> None:
        """Count a decode step (``path``: which routing path its batch took); read now and then."""
        self.steps += 1
        if path is not None:
            self.path_steps[path] = self.path_steps.get(path, 0) + 1
        now = time.monotonic()
        if self.steps % self.interval == 0 or now - self._last_read >= 1.0:
            self._last_read = now
            self.poll()

    def poll(self) -> dict[int, dict[str, int]] | None:
        """Read the copy started at the previous poll (complete by now) and start a new one."""
        done = None
        if self._pending is not None:
            host, faults, event = self._pending
            if event is not None:
                event.synchronize()  # normally long complete: it was issued a poll ago
            done = self._absorb(host, int(faults[0]))
        self._pending = self._start_copy()
        return done

    def flush(self) -> dict[int, dict[str, int]]:
        """Read the table now (synchronous; tests and shutdown): ``{layer: cumulative counts}``."""
        self._pending = None
        pending = self._start_copy()
        if pending is None:
            return {}
        host, faults, event = pending
        if event is not None:
            event.synchronize()
        return self._absorb(host, int(faults[0]))

    def _start_copy(self):
        if self.table is None:
            return None
        dev = self.table.device
        pin = dev.type == "cuda"
        if not self._bufs:
            self._bufs = [(torch.empty(self.table.shape, dtype=torch.int64, pin_memory=pin),
                           torch.zeros(1, dtype=torch.int64, pin_memory=pin)) for _ in range(2)]
        self._flip ^= 1
        host, faults = self._bufs[self._flip]
        host.copy_(self.table, non_blocking=pin)
        from ...kernels.workspace import fault_counter  # the selection kernels' counter (any device)

        faults.copy_(fault_counter(dev), non_blocking=pin)
        if not pin:
            return host, faults, None
        event = torch.cuda.Event()
        event.record()
        return host, faults, event

    def _absorb(self, host: torch.Tensor, faults: int) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for layer in torch.nonzero(host[:, 0] > 0).flatten().tolist():
            out[layer] = {name: int(host[layer, j]) for j, name in enumerate(METRIC_FIELDS)}
        self.totals = out
        if faults > self.faults:
            logger.warning("xshare: %d selection-kernel grid barrier wait(s) did not fill (now %d in total); "
                           "those tokens were routed by their own top-k. Programs were not co-resident: "
                           "report this with the GPU, batch size and MoE backend.", faults - self.faults, faults)
        self.faults = faults
        if out:
            self._log(out)
            if self.export:
                self._export(out)
        return out

    def _log(self, out: dict[int, dict[str, int]]) -> None:
        calls = sum(v["calls"] for v in out.values())
        if not calls:
            return
        mean = {f: sum(v[f] for v in out.values()) / calls for f in METRIC_FIELDS if f != "calls"}
        logger.info("xshare metrics (%d decode steps, paths %s, %d layers): experts %.2f vs top-k %.2f, busiest rank "
                    "%.2f vs %.2f, tokens %.1f, short tokens %.2f", self.steps, self.path_steps, len(out),
                    mean["distinct"], mean["topk_distinct"], mean["peak"], mean["topk_peak"], mean["valid_tokens"],
                    mean["short_tokens"])

    def _export(self, out: dict[int, dict[str, int]]) -> None:
        gauges = _process_gauges()
        if not gauges:
            return
        r = str(self.rank)
        for layer, vals in out.items():
            for name in METRIC_FIELDS:
                gauges[name].labels(layer=str(layer), rank=r).set(vals[name])
        gauges["_steps"].labels(rank=r).set(self.steps)
        for path, n in self.path_steps.items():
            gauges["_paths"].labels(path=path, rank=r).set(n)
        gauges["_faults"].labels(rank=r).set(self.faults)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)


_GAUGES: dict[str, Any] | None = None


def _process_gauges() -> dict[str, Any]:
    """The Prometheus gauges, registered once per process (a re-installed hook's new
    :class:`LiveMetrics` reuses them); empty without ``prometheus_client``."""
    global _GAUGES
    if _GAUGES is None:
        try:
            from prometheus_client import Gauge
        except ImportError:
            _GAUGES = {}
            return _GAUGES
        g: dict[str, Any] = {}
        for name in METRIC_FIELDS:
            g[name] = Gauge(f"sglang_xshare_{name}", f"xshare: cumulative per-layer {name}",
                            labelnames=["layer", "rank"], multiprocess_mode="all")
        g["_steps"] = Gauge("sglang_xshare_decode_steps", "xshare: decode steps seen", labelnames=["rank"],
                            multiprocess_mode="all")
        g["_paths"] = Gauge("sglang_xshare_path_steps", "xshare: decode steps per routing path",
                            labelnames=["path", "rank"], multiprocess_mode="all")
        g["_faults"] = Gauge("sglang_xshare_barrier_faults", "xshare: grid-barrier waits that did not fill",
                             labelnames=["rank"], multiprocess_mode="all")
        _GAUGES = g
    return _GAUGES


def parse_prometheus(text: str, prefix: str = "sglang_xshare_") -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition whose name starts with ``prefix``:
    ``[(name, labels, value)]`` (what :func:`bench/serve.py` reads from SGLang's ``/metrics``)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: dict[str, str] = {}
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"')
        try:
            out.append((name, labels, float(value)))
        except ValueError:
            continue
    return out


def process_rank() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(getattr(get_parallel(), "tp_rank", 0) or 0)
    except Exception:
        return int(os.environ.get("RANK", "0") or 0)
