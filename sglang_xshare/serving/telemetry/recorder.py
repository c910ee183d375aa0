"""``--xshare-record-trace PATH``: write router logits of a running server as a :mod:`sglang_xshare.trace`.

Each target MoE layer call of a decode / target-verify batch copies its ``router_logits [T, E]``
into a static device buffer ``[layers, max_tokens, E]`` fp16 (one captured copy kernel, so it also
runs inside SGLang's CUDA graphs). At the end of each step the real (non-padded) rows are copied
to the host -- one sync per decode step: this is a recording mode, not for production serving.
After ``--xshare-record-trace-steps`` steps (or at exit) the trace is written in the format of
:class:`sglang_xshare.trace.Trace` (``request_ids``: token ``t`` of the step belongs to request
``t`` in decode batches, ``t // num_draft_tokens`` in target-verify batches; ``-1`` pads).

Why not SGLang's routed-experts capturer (``state_capturer/routed_experts.py``) or its expert
distribution recorder (``eplb/expert_distribution.py``): both see only ``topk_ids`` (chosen
experts), never the logits a policy needs to be replayed; they stay usable next to this one.

Ranks: under plain TP every rank routes the same tokens, so only TP rank 0 writes ``PATH``;
when MoE inputs are scattered over ranks (DP attention / a2a backends) every rank writes
``PATH`` with ``.rank<r>`` before the suffix.
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...trace import Trace

__all__ = ["TraceRecorder", "rank_path"]

logger = logging.getLogger("sglang_xshare.serving")

_DEFAULT_MAX_TOKENS = 1024


def rank_path(path: str | Path, rank: int, per_rank: bool) -> Path:
    """``PATH`` for rank 0 (or shared inputs), ``PATH.rank<r>.npz`` when every rank records its own."""
    p = Path(path)
    if not per_rank:
        return p
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.npz'}")


def _rank_layout() -> tuple[int, bool]:
    """``(tp rank, whether MoE inputs differ per rank)`` (``(0, False)`` outside SGLang)."""
    try:
        from sglang.srt.layers.moe.utils import is_moe_input_scattered_across_dp_ranks
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_rank), bool(is_moe_input_scattered_across_dp_ranks())
    except Exception:
        return 0, False


class TraceRecorder:
    """Records router logits of target MoE layers, step by step, and writes one trace file.

    Args:
        path: output ``.npz`` path.
        steps: decode steps to record, then write and stop.
        max_tokens: rows of the device buffer (larger batches are skipped, logged once).
    """

    def __init__(self, path: str | Path, steps: int, max_tokens: int = _DEFAULT_MAX_TOKENS) -> None:
        self.path = Path(path).expanduser()
        self.steps = int(steps)
        self.max_tokens = int(max_tokens)
        self.buf: torch.Tensor | None = None  # [layers, max_tokens, E] fp16
        self.slots: dict[int, int] = {}  # layer id -> buffer row
        self.routing: Any = None
        self.host_steps: list[np.ndarray] = []  # each [L, n, E] fp16
        self.host_requests: list[np.ndarray] = []  # each [n] int32
        self.tokens_per_request: int | None = None
        self.done = False
        self.written: Path | None = None
        self._warned: set[str] = set()
        self._max_layers = 256
        atexit.register(self.close)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def record(self, lp: Any, router_logits: torch.Tensor) -> None:
        """Copy one target layer's ``router_logits [T, E]`` into the step buffer (device only)."""
        if self.done or lp.routing is None:
            return
        T, E = router_logits.shape
        if T > self.max_tokens:
            self._warn_once("big", "xshare trace: batch of %d tokens exceeds %d buffer rows; not recorded", T, self.max_tokens)
            return
        if self.buf is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                self._warn_once("capture", "xshare trace: first MoE call inside CUDA-graph capture; recording starts "
                                "with the next eager forward")
                return
            self.buf = torch.zeros(self._max_layers, self.max_tokens, E, dtype=torch.float16, device=router_logits.device)
            self.routing = lp.routing
        if E != self.buf.shape[-1]:
            self._warn_once(f"E{E}", "xshare trace: layer %d has %d experts, the trace %d; not recorded", lp.layer_id, E, self.buf.shape[-1])
            return
        row = self.slots.get(lp.layer_id)
        if row is None:
            if len(self.slots) >= self._max_layers:
                self._warn_once("layers", "xshare trace: more than %d MoE layers; extra layers not recorded", self._max_layers)
                return
            row = self.slots[lp.layer_id] = len(self.slots)
        self.buf[row, :T].copy_(router_logits)

    def on_step_end(self, info: Any) -> None:
        """Move the step's real rows to the host (one sync); write the file after ``steps`` steps."""
        if self.done or self.buf is None or not self.slots:
            return
        n = info.num_real_tokens
        if n is None or n <= 0 or n > self.max_tokens:
            return
        order = [self.slots[l] for l in sorted(self.slots)]
        self.host_steps.append(self.buf[order, :n].cpu().numpy())
        ndt = info.num_draft_tokens if info.kind == "verify" else None
        if ndt:
            self.tokens_per_request = ndt
        self.host_requests.append((np.arange(n) // (ndt or 1)).astype(np.int32))
        if len(self.host_steps) >= self.steps:
            self.write()

    def trace(self) -> Trace | None:
        """The recorded steps as a :class:`~sglang_xshare.trace.Trace` (``None`` if nothing was recorded)."""
        if not self.host_steps:
            return None
        L = min(s.shape[0] for s in self.host_steps)
        T = max(s.shape[1] for s in self.host_steps)
        E = self.host_steps[0].shape[2]
        S = len(self.host_steps)
        logits = np.zeros((S, L, T, E), dtype=np.float16)
        req = np.full((S, T), -1, dtype=np.int32)
        for s, (x, r) in enumerate(zip(self.host_steps, self.host_requests)):
            logits[s, :, : x.shape[1]] = x[:L]
            req[s, : r.shape[0]] = r
        routing = self.routing
        meta: dict[str, Any] = {
            "num_experts": int(E),
            "top_k": int(routing.top_k),
            "scoring": routing.scoring,
            "renormalize": bool(routing.renormalize),
            "layer_ids": sorted(self.slots)[:L],
            "source": "sglang_xshare.serving.telemetry.recorder",
        }
        if routing.num_expert_group is not None:
            meta["num_expert_group"] = routing.num_expert_group
            meta["topk_group"] = routing.topk_group
        if self.tokens_per_request:
            meta["tokens_per_request"] = int(self.tokens_per_request)
        try:
            from sglang.srt.runtime_context import get_server_args

            meta["model"] = str(get_server_args().model_path)
        except Exception:
            pass
        return Trace(logits=logits, request_ids=req, meta=json.loads(json.dumps(meta)))

    def write(self) -> Path | None:
        """Write the trace (once) to this rank's path; stop recording."""
        if self.done:
            return self.written
        self.done = True
        tr = self.trace()
        if tr is None:
            return None
        rank, per_rank = _rank_layout()
        if rank != 0 and not per_rank:
            return None
        path = tr.save(rank_path(self.path, rank, per_rank))
        self.written = path
        logger.info("xshare trace: wrote %d steps x %d layers x %d slots to %s", tr.num_steps, tr.num_layers, tr.batch_slots, path)
        self.buf = None
        return path

    def close(self) -> None:
        """Write what was recorded so far (at exit / uninstall)."""
        if not self.done and self.host_steps:
            self.write()
