"""Install an expert-selection policy into SGLang 0.5.23's MoE routing, without editing SGLang.

Where it plugs in (``sglang/srt/layers/moe/topk.py``): ``TopK.forward_native/cuda/cpu/xpu`` and
``BypassedTopKOutput.to_standard`` compute routing through ``select_experts(hidden_states,
router_logits, topk_config, *, layer_id, num_token_non_padded, expert_location_dispatch_info,
...)``; other paths (``mega_gate``, model-specific routers) end in ``_post_process_topk_ids``.
The hook wraps both. For each call it asks the layer's :class:`~.layer.LayerPolicy` which path
the batch takes (see :mod:`.layer`; a pure function of shapes and flags, decided once per
captured CUDA-graph batch size):

* ``sglang`` -- SGLang routes (policy ``off``/``topk``, draft / prefill layers, one-token batches
  under ``--xshare-min-tokens auto``, per-token dynamic bias, routing simulation);
* ``fast`` -- the policy *replaces* SGLang's router: one Triton launch reads the router logits and
  the padding count on the device and writes the final ``topk_ids`` / ``topk_weights``: the ids
  the backend dispatches (logical, EPLB's static map fused in, or ``xshare_ep``'s physical
  copies), empty slots as ``-1`` (DeepEP, triton / deep_gemm runners) or filled with weight 0,
  SGLang's routed scaling factor, and the live metrics (:mod:`.metrics`) counted in the same
  launch. SGLang's routed-experts capture and EPLB's expert-distribution recorder are called
  as ``select_experts`` would;
* ``general`` -- the policy replaces the router, then SGLang's own ``_post_process_topk_ids`` runs
  (EPLB dynamic / LP dispatch, the torch-native CPU MoE): empty slots are filled before
  (:func:`~.slots.fill_empty_slots`) and restored after;
* ``legacy`` -- fused shared-expert columns written by SGLang's router, ROCm, paths that do not go
  through ``select_experts``: SGLang's router runs and the policy is applied at its
  post-processing seam (the policy's top-k then runs beside SGLang's).

``xshare_ep`` chooses physical copies itself: with EPLB dispatch ``static`` / ``dynamic`` its
physical ids are dispatched directly, also while EPLB rebalances (``--enable-eplb``): the patched
``ExpertLocationMetadata.update`` refreshes the policy's device placement tables in place after
each rebalance (:meth:`~sglang_xshare.select.Selector.refresh_placement_`; captured CUDA graphs
keep reading the same buffers). With ``lp`` (SGLang's per-batch LP replica solver, whose EP
all-reduce every rank must join) it picks the logical experts and the LP solver their copies.

Also patched: ``TopK.__init__`` (marks draft-model layers; allocates the metrics table while the
model is built, outside graph capture), ``TopK.bind_runner_backend`` (logs layers whose output
format bypasses ``select_experts``: TRITON_KERNEL, BYPASSED), ``TopK.empty_topk_output`` (a rank
without MoE tokens joins ``--xshare-ep-global``'s all-reduce there, as SGLang's LP solver does) and
``forward_context`` (which batch
is running: decode / target-verify / prefill, the number of draft tokens, the step boundary
for metrics and the trace recorder).

Hot path: no host sync, static shapes, no Python per token; request groups of target-verify
batches are ``t // num_draft_tokens`` (each request's draft tokens are consecutive).

Reaching SGLang's child processes: :func:`sglang_plugin` is registered as an entry point of
SGLang's plugin group ``sglang.srt.plugins``; SGLang calls ``load_plugins()`` at the start of
every scheduler / TP / EP / DP-controller process. It reads :data:`~.flags.ENV_VAR`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, replace as dc_replace
from typing import Any, Callable

import torch

from .flags import ENV_VAR, XShareServerConfig
from .layer import DRAFT_ATTR, LayerPolicy, build_layer
from .patching import Patch, post_import_hooks
from .slots import copy_source_physical, fill_empty_slots, fill_empty_slots_distinct, restore_empty_slots

__all__ = ["install", "uninstall", "installed_config", "sglang_plugin", "LayerPolicy", "BatchInfo",
           "current_batch", "DRAFT_ATTR"]

logger = logging.getLogger("sglang_xshare.serving")

TOPK_MODULE = "sglang.srt.layers.moe.topk"
FORWARD_CONTEXT_MODULE = "sglang.srt.model_executor.forward_context"
EPLB_MODULE = "sglang.srt.eplb.expert_location"
_DECODE_KINDS = ("decode", "verify")
#: Environment variable forcing the ``general`` or ``legacy`` path where ``fast`` would run (benchmarks).
FORCE_PATH_ENV = "SGLANG_XSHARE_FORCE_PATH"


# ---- batch information ------------------------------------------------------------------

@dataclass(frozen=True)
class BatchInfo:
    """What is known about the running forward (from SGLang's ``ForwardBatch``; Python ints only).

    Attributes:
        kind: ``"decode"``, ``"verify"`` (speculative target verify), ``"idle"``, ``"prefill"``
            (extend / mixed / draft extend / anything else).
        num_draft_tokens: tokens per request of a verify batch, else ``None``.
        batch_size: requests in the batch (real, not CUDA-graph padded), if known.
    """

    kind: str
    num_draft_tokens: int | None = None
    batch_size: int | None = None

    @property
    def num_real_tokens(self) -> int | None:
        """Real (non-padded) MoE tokens of the batch, if known."""
        if self.batch_size is None:
            return None
        return self.batch_size * (self.num_draft_tokens or 1)


def batch_info_from_forward_batch(fb: Any) -> BatchInfo:
    """Classify SGLang's ``ForwardBatch`` (no tensor access)."""
    mode = getattr(fb, "forward_mode", None)
    bs = getattr(fb, "batch_size", None)
    bs = bs if isinstance(bs, int) else None
    if mode is None:
        return BatchInfo("prefill", None, bs)
    if mode.is_target_verify():
        spec = getattr(fb, "spec_info", None)
        # tokens per request in the verify layout (padded width), else the draft token count
        ndt = getattr(spec, "num_tokens_per_req", None)
        if not (isinstance(ndt, int) and ndt > 0):
            ndt = getattr(spec, "draft_token_num", None)
        return BatchInfo("verify", ndt if isinstance(ndt, int) and ndt > 0 else None, bs)
    if mode.is_decode():
        return BatchInfo("decode", None, bs)
    if mode.is_idle():
        return BatchInfo("idle", None, bs)
    return BatchInfo("prefill", None, bs)


_batch_stack: list[BatchInfo] = []


def current_batch() -> BatchInfo | None:
    """The innermost forward's :class:`BatchInfo` (``None`` outside SGLang's model runner)."""
    return _batch_stack[-1] if _batch_stack else None


@contextlib.contextmanager
def batch_scope(info: BatchInfo):
    """Declare the running batch (what the patched ``forward_context`` does; tests use it too)."""
    _batch_stack.append(info)
    try:
        yield info
    finally:
        _batch_stack.pop()
        st = _STATE
        if st is not None and not _batch_stack:
            st.on_step_end(info)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---- installed state ----------------------------------------------------------------------

class _State:
    """Everything the installed hook needs (one per process)."""

    def __init__(self, cfg: XShareServerConfig) -> None:
        self.cfg = cfg
        self.layers: dict[int, LayerPolicy] = {}
        self.logged: set[str] = set()
        self.lock = threading.Lock()
        self.dynamic_bias_call = False
        self.in_select = False  # inside our select_experts: the post-processing seam passes through
        self.seam_selected = False  # legacy path: the post-processing seam selected (ran the collectives)
        self.min_tokens: int | None = None
        #: diagnostics (``SGLANG_XSHARE_FORCE_PATH=general|legacy``): take that path where the fast one would run
        self.force_path = os.environ.get(FORCE_PATH_ENV) or None
        self.metrics = None
        self.recorder = None
        self.switch = None
        #: ``--xshare-ab-arm``: the other policy arms (switch arms 2, 3, ...) and their metrics
        self.arm_cfgs = cfg.arm_configs()[1:]
        self.arm_metrics: list[Any] = [None] * len(self.arm_cfgs)
        if cfg.ab_switch is not None:
            from .abswitch import ABSwitch

            self.switch = ABSwitch(cfg.ab_switch, 1 + len(self.arm_cfgs))
        if cfg.metrics:
            from .metrics import LiveMetrics, _rank

            self.metrics = LiveMetrics(cfg.metrics_interval, rank=_rank())
            # each arm counts its own selection (while it selects: --xshare-ab-idle-arms), as rank "R/armN"
            self.arm_metrics = [LiveMetrics(cfg.metrics_interval, rank=f"{_rank()}/arm{i + 2}")
                                for i in range(len(self.arm_cfgs))]
        if cfg.record_trace is not None:
            from .recorder import TraceRecorder

            self.recorder = TraceRecorder(cfg.record_trace, cfg.record_trace_steps)

    def log_once(self, key: str, msg: str, *args: Any, level: int = logging.INFO) -> None:
        if key not in self.logged:
            self.logged.add(key)
            logger.log(level, msg, *args)

    def layer(self, tc: Any, layer_id: int | None, router_logits: torch.Tensor) -> LayerPolicy:
        key = id(tc)
        lp = self.layers.get(key)
        if lp is not None and lp.num_experts == router_logits.shape[-1]:
            return lp
        with self.lock:
            lid = -1 if layer_id is None else int(layer_id)
            lp = build_layer(self.cfg, tc, lid, router_logits, self.metrics)
            if self.arm_cfgs and lp.selector is not None and not lp.is_draft:
                lp.arms = [build_layer(a, tc, lid, router_logits, m) for a, m in zip(self.arm_cfgs, self.arm_metrics)]
            self.layers[key] = lp
            if lp.selector is not None and not lp.is_draft:
                self.min_tokens = lp.min_tokens
        return lp

    def join_ep_global(self, tc: Any, layer_id: int | None, device: torch.device) -> None:
        """``--xshare-ep-global`` on a rank whose MoE input is empty this forward (DP attention or
        DeepEP with no tokens here: SGLang's model calls ``TopK.empty_topk_output`` instead of the
        router): join the layer's all-reduce with zeros, as a call that does not select does, so
        that every rank of the EP group runs the same collectives (a rank left out hangs the others,
        seen in a DP-attention + DeepEP server at its first prefill). A layer not built yet on this
        rank is built here; its expert count comes from another layer or SGLang's expert-location
        metadata."""
        key = id(tc)
        lp = self.layers.get(key)
        if lp is None:
            E = self._num_experts_hint()
            if E is None:
                self.log_once("ep_global_unknown_e", "xshare: --xshare-ep-global: layer %s has no tokens on this rank "
                              "before its first routing call and the expert count is unknown; this rank skips its "
                              "all-reduce (the other ranks may wait)", layer_id, level=logging.WARNING)
                return
            lp = self.layer(tc, layer_id, torch.empty(0, E, device=device))
        for a in (lp, *lp.arms):
            a.reduce_idle()

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
        info = current_batch()
        if info is None:
            return True  # direct calls (no model runner): treat as a decode batch
        if info.kind in _DECODE_KINDS:
            return True
        return info.kind == "prefill" and self.cfg.apply_to_prefill

    def on_step_end(self, info: BatchInfo) -> None:
        # idle steps (a DP rank without requests) only read the A/B switch, so that all ranks change arm together
        if _capturing() or info.kind not in (*_DECODE_KINDS, "idle"):
            return
        if info.kind != "idle":
            if self.metrics is not None:
                path = None
                n = info.num_real_tokens
                if self.min_tokens is not None and n is not None:
                    path = "policy" if n >= self.min_tokens else "sglang"
                for idx, m in enumerate([self.metrics, *self.arm_metrics], start=1):
                    m.on_step_end(self._arm_path(path, idx))
            if self.recorder is not None:
                self.recorder.on_step_end(info)
        if self.switch is not None:
            self.switch.poll()  # the next step (and graph replay) reads the new arm

    def _arm_path(self, path: str | None, idx: int) -> str | None:
        """The path label of a policy step for arm ``idx``'s metrics: ``policy`` when the switch
        gives the experts that arm's routing, ``ab_sglang`` when SGLang's, ``ab_armN`` another arm's."""
        if path != "policy" or self.switch is None or self.switch.arm == idx:
            return path
        return "ab_sglang" if self.switch.arm == 0 else f"ab_arm{self.switch.arm}"


_STATE: _State | None = None


def installed_config() -> XShareServerConfig | None:
    """The config of the installed hook, or ``None``."""
    return None if _STATE is None else _STATE.cfg


# ---- the routing seams --------------------------------------------------------------------

def _request_group() -> int | None:
    """Tokens per request of the running batch (target verify: each request's draft tokens are
    consecutive, token ``t`` is in request ``t // num_draft_tokens``), or ``None``."""
    info = current_batch()
    if info is None or info.kind != "verify" or not info.num_draft_tokens:
        return None
    return int(info.num_draft_tokens)


def _sglang_overrides_routing(topk_mod: Any) -> bool:
    """SGLang's routing simulation (uniform / round-robin experts) is on."""
    envs = topk_mod.envs
    return bool(envs.SGLANG_SIMULATE_UNIFORM_EXPERTS.get() or envs.SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS.get())


def _path(st: _State, lp: LayerPolicy, topk_mod: Any, T: int, tc: Any, info: Any, extra: dict) -> str:
    """Which path this call takes (``sglang`` / ``fast`` / ``general`` / ``legacy``); shapes and flags only."""
    if lp.selector is None or not st.applies_to_batch() or T == 0:
        return "sglang"
    if extra.get("dynamic_expert_bias") is not None:
        st.log_once(f"dyn{lp.layer_id}", "xshare: layer %d got a per-token dynamic_expert_bias; SGLang routes it",
                    lp.layer_id)
        return "sglang"
    if T < lp.min_tokens:
        return "sglang"
    if extra.get("router_logits_partials") is not None or getattr(topk_mod, "_is_hip", False) \
            or getattr(topk_mod, "_use_aiter", False) or tc.num_shared_topk_slots > 0:
        return "legacy"
    if _sglang_overrides_routing(topk_mod):
        return "sglang"
    algo = getattr(info, "ep_dispatch_algorithm", None) if info is not None else None
    if algo == "fake":
        return "sglang"
    if lp.empty_mode == "distinct":
        return "general"
    if info is None:
        return "fast"
    if lp.selector.config.policy == "xshare_ep" and algo in ("static", "dynamic"):
        return "fast"
    if algo == "static" and getattr(info, "partial_logical_to_rank_dispatch_physical_map", None) is not None:
        return "fast"
    return "general"


def _decide(st: _State, lp: LayerPolicy, topk_mod: Any, T: int, tc: Any, info: Any, extra: dict) -> str:
    path = _path(st, lp, topk_mod, T, tc, info, extra)
    if st.force_path in ("general", "legacy") and path in ("fast", "general"):
        return st.force_path
    return path


def _fast_spec(lp: LayerPolicy, info: Any):
    """The layer's :class:`~sglang_xshare.select.output.OutputSpec` for this dispatch info."""
    if info is None:
        return lp.output_spec("logical")
    if lp.selector.config.policy == "xshare_ep":
        return lp.output_spec("physical")
    return lp.output_spec("mapped", info.partial_logical_to_rank_dispatch_physical_map)


def _make_select_experts_wrapper(orig: Callable) -> Callable:
    def select_experts(hidden_states, router_logits, topk_config, *, layer_id=None, num_token_non_padded=None,
                       expert_location_dispatch_info=None, **extra):
        st = _STATE
        if st is None or not st.cfg.active or router_logits is None or router_logits.dim() != 2:
            return orig(hidden_states, router_logits, topk_config, layer_id=layer_id,
                        num_token_non_padded=num_token_non_padded,
                        expert_location_dispatch_info=expert_location_dispatch_info, **extra)
        topk_mod = sys.modules[TOPK_MODULE]
        lp = st.layer(topk_config, layer_id, router_logits)
        T = int(router_logits.shape[0])
        path = _decide(st, lp, topk_mod, T, topk_config, expert_location_dispatch_info, extra)
        if lp.paths.get(T) != path:
            lp.paths[T] = path
            st.log_once(f"path{lp.is_draft}:{T}:{path}", "xshare: %s batches of %d tokens: %s path",
                        "draft" if lp.is_draft else "target", T, path)
        if st.recorder is not None and not lp.is_draft and st.applies_to_batch():
            st.recorder.record(lp, router_logits)
        # --xshare-ab-arm: the other policies run on the same batch (each on its own path)
        arms = lp.arms if (st.switch is not None and not lp.is_draft) else []
        arm_paths = [_decide(st, a, topk_mod, T, topk_config, expert_location_dispatch_info, extra) for a in arms]
        if path == "legacy" or (path == "sglang" and not any(pa in _SELECTING for pa in arm_paths)):
            if path == "sglang":
                for a in (lp, *arms):
                    a.reduce_idle()  # every rank joins the collective on every call
            dyn = extra.get("dynamic_expert_bias") is not None
            st.dynamic_bias_call, st.in_select, st.seam_selected = dyn, path == "sglang", False
            try:
                out = orig(hidden_states, router_logits, topk_config, layer_id=layer_id,
                           num_token_non_padded=num_token_non_padded,
                           expert_location_dispatch_info=expert_location_dispatch_info, **extra)
            finally:
                st.dynamic_bias_call = st.in_select = False
            if path == "legacy" and not st.seam_selected:
                for a in (lp, *arms):  # SGLang's post-processing seam did not select: join with zeros
                    a.reduce_idle()
            if path == "legacy" and st.seam_selected and getattr(out, "packed_topk_ids", None) is not None:
                # the fused router's packed ids (FlashInfer's layout) still hold SGLang's routing:
                # drop them, so that consumers read the seam's ids and weights
                out = topk_mod.StandardTopKOutput(out.topk_weights, out.topk_ids, out.router_logits)
            return out
        base = None
        if st.switch is not None and not lp.is_draft:  # A/B measurement: SGLang's routing too, same kernels in both arms
            st.in_select = True  # SGLang's post-processing seam passes SGLang's routing through
            try:
                base = orig(hidden_states, router_logits, topk_config, layer_id=layer_id,
                            num_token_non_padded=num_token_non_padded,
                            expert_location_dispatch_info=expert_location_dispatch_info, **extra)
            finally:
                st.in_select = False
        call = (st, topk_mod, topk_config, router_logits, layer_id, num_token_non_padded, expert_location_dispatch_info)
        # each policy in turn (--xshare-ep-global: its collective inside, or zeros when it steps aside:
        # every rank runs the same collectives in the same order)
        outs = []
        for idx, (a, pa) in enumerate(zip((lp, *arms), (path, *arm_paths)), start=1):
            if pa in _SELECTING:
                outs.append(_select(a, pa, *call, gate=_arm_gate(st, lp, idx, router_logits.device)))
            else:  # this batch is below the policy's min tokens: SGLang's routing (another arm selects)
                a.reduce_idle()
                outs.append((base.topk_ids, base.topk_weights, None))
        ids, weights, rec = outs[0]
        if base is not None:
            ids, weights = st.switch.choose(base.topk_ids, base.topk_weights, [o[:2] for o in outs])
        if path == "fast":
            _capture(topk_mod, topk_config, layer_id, lp, ids, physical=expert_location_dispatch_info is not None)
            topk_mod.get_global_expert_distribution_recorder().on_select_experts(topk_ids=ids)
        elif rec is not None:
            topk_mod.get_global_expert_distribution_recorder().on_select_experts(topk_ids=rec)
        return topk_mod.StandardTopKOutput(weights, ids, router_logits)

    select_experts.__wrapped__ = orig  # type: ignore[attr-defined]
    return select_experts


_SELECTING = ("fast", "general")


def _capture(topk_mod: Any, tc: Any, layer_id: Any, lp: LayerPolicy, ids: torch.Tensor, physical: bool) -> None:
    """SGLang's routed-experts capture (``--enable-return-routed-experts``) of the routing the experts
    get. SGLang captures logical ids (before its logical -> physical remap), so physical slot ids
    ``[T, w]`` (``physical``: EPLB dispatch info was given; ``xshare_ep``'s slots, the mapped or
    SGLang-remapped ids) are mapped back through the layer's placement: the first ``top_k`` columns,
    ``-1`` kept, any further (fused shared-expert) columns as they are. No-op without a capturer."""
    if not getattr(tc, "allow_routed_experts_capture", True) or topk_mod.get_global_experts_capturer() is None:
        return
    if physical and lp.placement is not None and lp.routing is not None:
        k = lp.routing.top_k
        routed = ids[:, :k]
        p2l = lp.placement.physical_to_logical
        logical = torch.where(routed >= 0, p2l[routed.clamp(min=0).long()].to(ids.dtype), routed)
        ids = torch.cat([logical, ids[:, k:]], dim=-1) if ids.shape[-1] > k else logical
    topk_mod.capture_routed_experts_if_allowed(tc, layer_id, ids)


def _arm_gate(st: _State, lp: LayerPolicy, idx: int, device: torch.device) -> tuple[torch.Tensor, int] | None:
    """``(switch flag, idx)``: arm ``idx``'s selection runs only while the A/B switch routes by it
    (``--xshare-ab-idle-arms skip``); ``None`` (always select) without a switch, on draft layers or
    with ``compute``."""
    if st.switch is None or lp.is_draft or st.cfg.ab_idle_arms != "skip":
        return None
    return st.switch.flag(device), idx


def _select(lp: LayerPolicy, path: str, st: _State, topk_mod: Any, tc: Any, router_logits: torch.Tensor, layer_id: Any,
            ntnp: Any, info: Any, gate: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One policy's routing of the batch on ``path`` (``fast`` / ``general``): ``(ids, weights, rec)``,
    ``rec`` = the ids for EPLB's expert-distribution recorder (``general``) or ``None``. ``gate``: the
    A/B switch's ``(flag, arm)``, honoured on the fast path only (there the ids go to the experts
    only through the switch's pick; ``general``'s SGLang post-processing reads them, so it always
    selects)."""
    if path == "fast":
        out = lp.selector(router_logits, layer_id=lp.layer_id, num_token_non_padded=ntnp,
                          request_group=_request_group(), output=_fast_spec(lp, info), stats_reduce=lp.stats_reduce,
                          gate=gate)
        return out.topk_ids, out.topk_weights, None
    post = getattr(topk_mod._post_process_topk_ids, "__wrapped__", topk_mod._post_process_topk_ids)
    return _general(st, lp, post, None, None, tc, router_logits, layer_id, ntnp, info)


def _general(st: _State, lp: LayerPolicy, post: Callable, topk_ids: torch.Tensor | None,
             topk_weights: torch.Tensor | None, tc: Any, router_logits: torch.Tensor, layer_id: Any, ntnp: Any,
             info: Any):
    """The policy's selection, then SGLang's post-processing ``post`` on it (empty slots filled
    before, restored after). ``topk_ids / topk_weights``: SGLang's router output whose extra
    (fused shared-expert) columns are kept (``legacy``), or ``None`` (``general``)."""
    routing = lp.routing
    k = routing.top_k
    T = router_logits.shape[0]
    use_physical = (lp.selector.config.policy == "xshare_ep" and info is not None
                    and getattr(info, "ep_dispatch_algorithm", None) in ("static", "dynamic"))
    if lp.selector.config.policy == "xshare_ep" and info is not None and not use_physical:
        st.log_once("ep_lp", "xshare: xshare_ep with --ep-dispatch-algorithm %s: xshare_ep picks the experts, "
                    "SGLang's LP dispatcher picks their copies", getattr(info, "ep_dispatch_algorithm", None))
    spec = lp.output_spec("physical" if use_physical else "logical", empty="minus_one")
    sel = lp.selector(router_logits, layer_id=lp.layer_id, num_token_non_padded=ntnp,
                      request_group=_request_group(), output=spec, stats_reduce=lp.stats_reduce)
    chosen, weights = sel.topk_ids, sel.topk_weights
    empty = chosen < 0
    if lp.empty_mode == "distinct":
        width = lp.placement.num_physical if (use_physical and lp.placement is not None) else routing.num_experts
        filled, filled_w, source = fill_empty_slots_distinct(chosen, weights, width)
    else:
        filled, filled_w, source = fill_empty_slots(chosen, weights)
    id_dtype = topk_ids.dtype if topk_ids is not None else torch.int32
    filled = filled.to(id_dtype)
    filled_w = filled_w.to(topk_weights.dtype if topk_weights is not None else torch.float32)
    if topk_ids is not None and topk_ids.shape[-1] > k:  # fused shared-expert columns of the router: untouched
        filled = torch.cat([filled, topk_ids[:, k:]], dim=-1)
        filled_w = torch.cat([filled_w, topk_weights[:, k:]], dim=-1)
    call_info, call_logits, call_tc = info, router_logits, tc
    if use_physical:
        call_info = None  # ids are physical already: SGLang's remap must not run again
        P = lp.placement.num_physical if lp.placement is not None else routing.num_experts
        if P != router_logits.shape[1]:  # only its width is read (per-rank shared-slot layout)
            call_logits = router_logits[:, :1].expand(T, P)
        topk_mod = sys.modules[TOPK_MODULE]
        if getattr(tc, "allow_routed_experts_capture", False) and topk_mod.get_global_experts_capturer() is not None:
            # SGLang would capture these physical ids: it captures nothing, the hook the logical ones
            call_tc = dc_replace(tc, allow_routed_experts_capture=False)
            _capture(topk_mod, tc, layer_id, lp, filled, physical=True)
    new_ids, new_w, rec = post(filled, filled_w, call_tc, call_logits, layer_id, ntnp, call_info, False)
    routed = new_ids[:, :k]
    if lp.empty_mode == "minus_one":
        routed.copy_(restore_empty_slots(routed, empty))
    elif lp.empty_mode == "fill":
        routed.copy_(copy_source_physical(routed, source))
    return new_ids, new_w, rec


def _make_post_process_wrapper(orig: Callable) -> Callable:
    def _post_process_topk_ids(topk_ids, topk_weights, topk_config, router_logits, layer_id,
                                num_token_non_padded=None, expert_location_dispatch_info=None,
                                padded_rows_masked=False):
        st = _STATE
        if st is None or st.in_select or router_logits is None or router_logits.dim() != 2:
            return orig(topk_ids, topk_weights, topk_config, router_logits, layer_id,
                        num_token_non_padded, expert_location_dispatch_info, padded_rows_masked)
        lp = st.layer(topk_config, layer_id, router_logits)
        if (lp.selector is None or not st.applies_to_batch() or st.dynamic_bias_call
                or topk_ids.shape[0] != router_logits.shape[0] or router_logits.shape[0] < lp.min_tokens):
            return orig(topk_ids, topk_weights, topk_config, router_logits, layer_id,
                        num_token_non_padded, expert_location_dispatch_info, padded_rows_masked)
        args = (topk_config, router_logits, layer_id, num_token_non_padded, expert_location_dispatch_info)
        st.seam_selected = True  # the legacy path's collectives (--xshare-ep-global) run here
        ids, weights, rec = _general(st, lp, orig, topk_ids, topk_weights, *args)
        if st.switch is None or lp.is_draft:
            return ids, weights, rec
        # A/B measurement at this seam (fused shared-expert columns, ...): SGLang's post-processing of
        # its own routing, the arms' policies, and the switch picks; the recorder sees the policy's ids
        outs = [(ids, weights)] + [_general(st, a, orig, topk_ids, topk_weights, *args)[:2] for a in lp.arms]
        b_ids, b_w, _ = orig(topk_ids.clone(), topk_weights.clone(), *args, padded_rows_masked)
        ids, weights = st.switch.choose(b_ids, b_w, outs)
        return ids, weights, rec

    _post_process_topk_ids.__wrapped__ = orig  # type: ignore[attr-defined]
    return _post_process_topk_ids


# ---- the other patches --------------------------------------------------------------------

def _make_empty_topk_wrapper(orig: Callable) -> Callable:
    def empty_topk_output(self, device, *args, **kwargs):
        st = _STATE
        if st is not None and st.cfg.active and st.cfg.ep_global and not self.is_draft:
            st.join_ep_global(self.topk_config, self.layer_id, device)
        return orig(self, device, *args, **kwargs)

    empty_topk_output.__wrapped__ = orig  # type: ignore[attr-defined]
    return empty_topk_output


def _make_topk_init_wrapper(orig: Callable) -> Callable:
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        try:
            setattr(self.topk_config, DRAFT_ATTR, bool(self.is_draft))
        except AttributeError:
            pass
        st = _STATE
        if st is not None and st.metrics is not None and torch.cuda.is_available() and not _capturing():
            for m in (st.metrics, *st.arm_metrics):  # the tables (A/B arms too), outside capture
                m.row(0, torch.device("cuda", torch.cuda.current_device()))

    __init__.__wrapped__ = orig  # type: ignore[attr-defined]
    return __init__


def _make_bind_wrapper(orig: Callable) -> Callable:
    def bind_runner_backend(self, runner_backend, *args, **kwargs):
        result = orig(self, runner_backend, *args, **kwargs)
        st = _STATE
        if st is not None and st.cfg.selects:
            fmt = self.topk_config.output_format
            name = getattr(fmt, "name", str(fmt))
            if name in ("TRITON_KERNEL", "BYPASSED"):
                st.log_once(f"fmt{self.layer_id}:{self.is_draft}",
                            "xshare: layer %d: MoE runner %s routes in-kernel (TopK output format %s); the policy "
                            "cannot apply there and SGLang's routing is kept. Use --moe-runner-backend triton or "
                            "deep_gemm (standard format) to apply it.",
                            self.layer_id, getattr(runner_backend, "value", runner_backend), name,
                            level=logging.WARNING)
        return result

    bind_runner_backend.__wrapped__ = orig  # type: ignore[attr-defined]
    return bind_runner_backend


def _make_eplb_update_wrapper(orig: Callable) -> Callable:
    def update(self, other, update_layer_ids, *args, **kwargs):
        result = orig(self, other, update_layer_ids, *args, **kwargs)
        st = _STATE
        if st is not None:  # EPLB rewrote the maps in place: refresh the policies' device tables
            ids = set(int(i) for i in update_layer_ids)
            for lp in list(st.layers.values()):
                if lp.selector is not None and not lp.is_draft and lp.layer_id in ids:
                    lp.selector.refresh_placement_()
            st.log_once("eplb_refresh", "xshare: EPLB rebalanced; xshare_ep's placement tables follow the new map")
        return result

    update.__wrapped__ = orig  # type: ignore[attr-defined]
    return update


def _make_forward_context_wrapper(orig: Callable) -> Callable:
    def forward_context(ctx, *, forward_batch=None):
        if forward_batch is None or _STATE is None:
            return orig(ctx, forward_batch=forward_batch)
        return _nested(orig(ctx, forward_batch=forward_batch), batch_info_from_forward_batch(forward_batch))

    forward_context.__wrapped__ = orig  # type: ignore[attr-defined]
    return forward_context


@contextlib.contextmanager
def _nested(inner_cm, info: BatchInfo):
    with batch_scope(info):
        with inner_cm:
            yield


# ---- install / uninstall ------------------------------------------------------------------

_PATCHES: list[Patch] = []


def _patches() -> list[Patch]:
    return [
        Patch(TOPK_MODULE, "_post_process_topk_ids", _make_post_process_wrapper),
        Patch(TOPK_MODULE, "TopK.__init__", _make_topk_init_wrapper),
        Patch(TOPK_MODULE, "TopK.bind_runner_backend", _make_bind_wrapper),
        Patch(TOPK_MODULE, "TopK.empty_topk_output", _make_empty_topk_wrapper),
        Patch(TOPK_MODULE, "select_experts", _make_select_experts_wrapper),
        Patch(FORWARD_CONTEXT_MODULE, "forward_context", _make_forward_context_wrapper),
        Patch(EPLB_MODULE, "ExpertLocationMetadata.update", _make_eplb_update_wrapper),
    ]


def install(cfg: XShareServerConfig) -> bool:
    """Install the hook for ``cfg`` in this process; return whether anything was installed.

    Idempotent; a second call replaces the config. ``policy="off"`` without metrics or trace
    installs nothing (SGLang's routing stays bit-identical). SGLang modules not imported yet
    are patched when they are imported.
    """
    global _STATE
    cfg.validate()
    if not cfg.active:
        uninstall()
        return False
    if _STATE is not None and _STATE.cfg == cfg and _PATCHES:
        return True  # e.g. SGLang's plugin loader after the launcher's __mp_main__ fallback
    if _STATE is not None and _STATE.recorder is not None:
        _STATE.recorder.close()
    _STATE = _State(cfg)
    if not _PATCHES:
        _PATCHES.extend(_patches())
        for p in _PATCHES:
            post_import_hooks.register(p.module, lambda _m, p=p: p.apply() if _PATCHES and p in _PATCHES else None)
    logger.info("xshare: hook installed (policy=%s, metrics=%s, trace=%s)", cfg.policy, cfg.metrics, cfg.record_trace)
    return True


def uninstall() -> None:
    """Remove every patch and forget the state (tests; SGLang is exactly as before)."""
    global _STATE
    if _STATE is not None and _STATE.recorder is not None:
        _STATE.recorder.close()
    _STATE = None
    for p in reversed(_PATCHES):
        p.revert()
    _PATCHES.clear()
    post_import_hooks.clear()
    _batch_stack.clear()


def sglang_plugin() -> None:
    """Entry point of SGLang's plugin group ``sglang.srt.plugins`` (run in every SGLang process).

    Installs the hook when :data:`~.flags.ENV_VAR` carries an active config; does nothing
    otherwise, so having sglang_xshare installed never changes SGLang by itself.
    """
    cfg = XShareServerConfig.from_env()
    if cfg is None or not cfg.active:
        return
    install(cfg)
    logger.info("xshare: plugin active in this process (%s)", ENV_VAR)
