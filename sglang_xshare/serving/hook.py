"""Install an expert-selection policy into SGLang 0.5.23's MoE routing, without editing SGLang.

Where it plugs in (``sglang/srt/layers/moe/topk.py``): every routing path that materialises
``topk_ids`` (``TopK.forward_native/cuda/cpu/xpu``, ``BypassedTopKOutput.to_standard``,
``mega_gate``) ends in ``_post_process_topk_ids(topk_ids, topk_weights, topk_config,
router_logits, layer_id, num_token_non_padded, expert_location_dispatch_info, ...)``. At that
point SGLang has computed the model's *logical* top-k (grouped / biased / shared columns /
routed scaling) and has not yet done its own post-processing (routed-experts capture, the
LP solve, EPLB logical -> physical, shared-expert layouts, padded-row masking, the EPLB
expert-distribution recorder). The hook wraps that function:

1. the policy (:class:`~sglang_xshare.select.Selector`) selects from the same ``router_logits``
   the routed columns of ``topk_ids`` / ``topk_weights`` (``-1`` = empty slot); fused
   shared-expert columns are kept untouched; the routed scaling factor is applied when SGLang
   folds it into the weights (``is_routed_scaling_factor_fused_in_topk``);
2. empty slots are filled (:func:`~.slots.fill_empty_slots`) so that SGLang's remap tables never
   see ``-1``; SGLang's own post-processing then runs unchanged;
3. the filled slots are put back to ``-1`` (backends that drop ``-1``) or onto the physical
   copy of the slot they duplicate, weight 0 (the others); see :mod:`.slots`.

``xshare_ep`` chooses physical copies itself: with EPLB dispatch ``static`` / ``dynamic`` its
physical ids go to SGLang with the remap disabled for that call; with ``lp`` (SGLang's
per-batch LP replica solver, whose EP all-reduce every rank must join) ``xshare_ep`` picks the
logical experts and the LP solver their copies. Its placement is SGLang's
``physical_to_logical_map`` of the layer, a *view* of the device tensor EPLB rebalances in
place, so a rebalance reaches the policy (and captured CUDA graphs) without a rebuild.

Also patched: ``TopK.__init__`` (marks draft-model layers), ``TopK.bind_runner_backend`` (logs
layers whose output format bypasses ``select_experts``: TRITON_KERNEL, BYPASSED -- the policy
cannot apply there), ``select_experts`` (per-token ``dynamic_expert_bias`` -> fall back), and
``forward_context`` (which batch is running: decode / target-verify / prefill, the number of
draft tokens, the step boundary for metrics and the trace recorder).

Hot path: no host sync, static shapes; request groups of target-verify batches are
``arange(T) // num_draft_tokens`` (each request has ``num_draft_tokens`` consecutive tokens).

Reaching SGLang's child processes: :func:`sglang_plugin` is registered as an entry point of
SGLang's plugin group ``sglang.srt.plugins``; SGLang calls ``load_plugins()`` at the start of
every scheduler / TP / EP / DP-controller process. It reads :data:`~.flags.ENV_VAR`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import RoutingSpec, XShareConfigError
from ..placement import Placement
from ..select import Selector
from .flags import ENV_VAR, XShareServerConfig
from .patching import Patch, post_import_hooks
from .slots import copy_source_physical, fill_empty_slots, fill_empty_slots_distinct, resolve_empty_slot_mode

__all__ = ["install", "uninstall", "installed_config", "sglang_plugin", "LayerPolicy", "BatchInfo",
           "current_batch", "DRAFT_ATTR"]

logger = logging.getLogger("sglang_xshare.serving")

TOPK_MODULE = "sglang.srt.layers.moe.topk"
FORWARD_CONTEXT_MODULE = "sglang.srt.model_executor.forward_context"
#: Attribute set on ``TopKConfig`` by the patched ``TopK.__init__``.
DRAFT_ATTR = "_xshare_is_draft"

_DECODE_KINDS = ("decode", "verify")


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


# ---- per-layer policy -------------------------------------------------------------------

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
        eplb_rebalances: SGLang's EPLB may rebalance this server (read once, see :func:`_eplb_rebalances`).
        topk_config: SGLang's ``TopKConfig`` (kept alive: the cache is keyed by its id).
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
    eplb_rebalances: bool = False
    topk_config: Any = field(repr=False, default=None)


def _routing_from_topk_config(tc: Any, num_experts: int) -> tuple[RoutingSpec | None, str | None]:
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


def _eplb_rebalances() -> bool:
    """Whether SGLang's EPLB may rebalance (``--enable-eplb``) in this process.

    The Triton ``xshare_ep`` path caches placement tables derived from the map it saw first
    (and CUDA graphs capture those buffers), so after a rebalance its physical copies could be
    stale. While EPLB rebalances, ``xshare_ep`` therefore picks the *logical* experts and
    SGLang's own live logical -> physical mapping picks their copies (always correct).
    """
    try:
        from sglang.srt.runtime_context import get_exec

        return bool(get_exec().moe.enable_eplb)
    except Exception:
        return False


def _sglang_placement(num_experts: int, layer_id: int, device: torch.device, is_draft: bool) -> tuple[Placement, bool]:
    """The layer's placement and whether it is SGLang's EPLB map (physical ids != logical ids).

    With EPLB metadata the placement's ``physical_to_logical`` is a view of SGLang's device
    tensor (updated in place on rebalance); otherwise plain EP over ``moe_ep_size`` ranks.
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
    placement = Placement.expert_parallel(num_experts, ep) if ep >= 1 and num_experts % ep == 0 else Placement.tensor_parallel(num_experts)
    return dataclasses.replace(placement, physical_to_logical=placement.physical_to_logical.to(device)), False


# ---- installed state ----------------------------------------------------------------------

class _State:
    """Everything the installed hook needs (one per process)."""

    def __init__(self, cfg: XShareServerConfig) -> None:
        self.cfg = cfg
        self.layers: dict[int, LayerPolicy] = {}
        self.logged: set[str] = set()
        self.lock = threading.Lock()
        self.dynamic_bias_call = False
        self.metrics = None
        self.recorder = None
        if cfg.metrics:
            from .metrics import LiveMetrics

            self.metrics = LiveMetrics(cfg.metrics_interval)
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
            lp = self._build(tc, -1 if layer_id is None else int(layer_id), router_logits)
            self.layers[key] = lp
        return lp

    def _build(self, tc: Any, layer_id: int, router_logits: torch.Tensor) -> LayerPolicy:
        cfg = self.cfg
        E = int(router_logits.shape[-1])
        is_draft = bool(getattr(tc, DRAFT_ATTR, False))
        routing, reason = _routing_from_topk_config(tc, E)
        placement, _ = _sglang_placement(E, layer_id, router_logits.device, is_draft) if routing is not None else (None, False)
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
        elif is_draft and not cfg.apply_to_draft:
            reason = "draft-model layer (use --xshare-apply-to-draft)"
        elif routing is not None:
            # Raises XShareConfigError naming the flag (budget > E, k0 > top_k, ...) at model load.
            sel_cfg = cfg.selection_config(routing)
            selector = Selector(routing, sel_cfg, placement=placement, correction_bias=tc.correction_bias)
        lp = LayerPolicy(layer_id, is_draft, E, routing, selector, None if selector is not None else reason,
                         scale, placement, empty_mode, _eplb_rebalances(), tc)
        if selector is not None:
            self.log_once(f"layer{layer_id}:{is_draft}",
                          "xshare: %s layer %d: policy %s (E=%d, top_k=%d, shared slots=%d, empty slots=%s, a2a=%s, runner=%s)",
                          "draft" if is_draft else "target", layer_id, cfg.policy, E, routing.top_k,
                          tc.num_shared_topk_slots, empty_mode, a2a, runner)
        elif cfg.selects and reason:
            self.log_once(f"fallback{layer_id}:{is_draft}", "xshare: %s layer %d keeps SGLang's routing: %s",
                          "draft" if is_draft else "target", layer_id, reason,
                          level=logging.INFO if "draft" in reason else logging.WARNING)
        return lp

    def applies_to_batch(self) -> bool:
        info = current_batch()
        if info is None:
            return True  # direct calls (no model runner): treat as a decode batch
        if info.kind in _DECODE_KINDS:
            return True
        return info.kind == "prefill" and self.cfg.apply_to_prefill

    def on_step_end(self, info: BatchInfo) -> None:
        if info.kind not in _DECODE_KINDS or _capturing():
            return
        if self.metrics is not None:
            self.metrics.on_step_end()
        if self.recorder is not None:
            self.recorder.on_step_end(info)


_STATE: _State | None = None


def installed_config() -> XShareServerConfig | None:
    """The config of the installed hook, or ``None``."""
    return None if _STATE is None else _STATE.cfg


# ---- the routing seam ---------------------------------------------------------------------

def _request_group() -> int | None:
    """Tokens per request of the running batch (target verify: each request's draft tokens are
    consecutive, token ``t`` is in request ``t // num_draft_tokens``), or ``None``."""
    info = current_batch()
    if info is None or info.kind != "verify" or not info.num_draft_tokens:
        return None
    return int(info.num_draft_tokens)


def _make_post_process_wrapper(orig: Callable) -> Callable:
    def _post_process_topk_ids(topk_ids, topk_weights, topk_config, router_logits, layer_id,
                                num_token_non_padded=None, expert_location_dispatch_info=None,
                                padded_rows_masked=False):
        st = _STATE
        if st is None or router_logits is None or router_logits.dim() != 2:
            return orig(topk_ids, topk_weights, topk_config, router_logits, layer_id,
                        num_token_non_padded, expert_location_dispatch_info, padded_rows_masked)
        return _route(st, orig, topk_ids, topk_weights, topk_config, router_logits, layer_id,
                      num_token_non_padded, expert_location_dispatch_info, padded_rows_masked)

    _post_process_topk_ids.__wrapped__ = orig  # type: ignore[attr-defined]
    return _post_process_topk_ids


def _route(st: _State, orig: Callable, topk_ids: torch.Tensor, topk_weights: torch.Tensor, tc: Any,
           router_logits: torch.Tensor, layer_id: Any, ntnp: Any, info: Any, padded_rows_masked: bool):
    lp = st.layer(tc, layer_id, router_logits)
    in_batch = st.applies_to_batch()
    if st.recorder is not None and not lp.is_draft and in_batch:
        st.recorder.record(lp, router_logits)
    dyn = st.dynamic_bias_call
    if dyn and lp.selector is not None:
        st.log_once(f"dyn{lp.layer_id}", "xshare: layer %d got a per-token dynamic_expert_bias; SGLang routes it", lp.layer_id)
    if lp.selector is None or not in_batch or dyn or topk_ids.shape[0] != router_logits.shape[0]:
        ids_in = topk_ids  # SGLang masks padded rows of its input in place on some paths
        out = orig(topk_ids, topk_weights, tc, router_logits, layer_id, ntnp, info, padded_rows_masked)
        if (st.metrics is not None and lp.routing is not None and not lp.is_draft and in_batch
                and topk_ids.shape[0] == router_logits.shape[0]):
            k = lp.routing.top_k
            phys = out[0][:, :k] if info is not None else None
            st.metrics.observe(lp, router_logits, ids_in[:, :k], topk_weights[:, :k], phys, ntnp)
        return out

    routing = lp.routing
    assert routing is not None
    k = routing.top_k
    T = router_logits.shape[0]
    sel = lp.selector(router_logits, layer_id=lp.layer_id, num_token_non_padded=ntnp,
                      request_group=_request_group())
    weights = sel.topk_weights if lp.scale is None else sel.topk_weights * lp.scale
    rebalancing = lp.eplb_rebalances
    use_physical = (sel.physical_ids is not None and info is not None and not rebalancing
                    and getattr(info, "ep_dispatch_algorithm", None) in ("static", "dynamic"))
    if sel.physical_ids is not None and info is not None and not use_physical:
        st.log_once("ep_lp", "xshare: xshare_ep with --ep-dispatch-algorithm %s%s: xshare_ep picks the experts, "
                    "SGLang's dispatcher picks their copies", getattr(info, "ep_dispatch_algorithm", None),
                    " and EPLB rebalancing" if rebalancing else "")
    chosen = sel.physical_ids if use_physical else sel.topk_ids
    empty = chosen < 0
    if lp.empty_mode == "distinct":
        width = lp.placement.num_physical if (use_physical and lp.placement is not None) else routing.num_experts
        filled, filled_w, source = fill_empty_slots_distinct(chosen, weights, width)
    else:
        filled, filled_w, source = fill_empty_slots(chosen, weights)
    filled = filled.to(topk_ids.dtype)
    filled_w = filled_w.to(topk_weights.dtype)
    if topk_ids.shape[-1] > k:  # fused shared-expert columns written by the router: untouched
        filled = torch.cat([filled, topk_ids[:, k:]], dim=-1)
        filled_w = torch.cat([filled_w, topk_weights[:, k:]], dim=-1)
    call_info, call_logits = info, router_logits
    if use_physical:
        call_info = None  # ids are physical already: SGLang's remap must not run again
        P = lp.placement.num_physical if lp.placement is not None else routing.num_experts
        if P != router_logits.shape[1]:  # only its width is read (per-rank shared-slot layout)
            call_logits = router_logits[:, :1].expand(T, P)
    new_ids, new_w, rec = orig(filled, filled_w, tc, call_logits, layer_id, ntnp, call_info, False)
    routed = new_ids[:, :k]
    if lp.empty_mode == "minus_one":
        routed.copy_(routed.masked_fill(empty, -1))
    elif lp.empty_mode == "fill":
        routed.copy_(copy_source_physical(routed, source))
    if st.metrics is not None and not lp.is_draft:
        phys = routed.masked_fill(empty, -1) if info is not None else None
        st.metrics.observe(lp, router_logits, sel.topk_ids, sel.topk_weights, phys, ntnp)
    return new_ids, new_w, rec


# ---- the other patches --------------------------------------------------------------------

def _make_topk_init_wrapper(orig: Callable) -> Callable:
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        try:
            setattr(self.topk_config, DRAFT_ATTR, bool(self.is_draft))
        except AttributeError:
            pass

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


def _make_select_experts_wrapper(orig: Callable) -> Callable:
    def select_experts(*args, **kwargs):
        st = _STATE
        if st is None or kwargs.get("dynamic_expert_bias") is None:
            return orig(*args, **kwargs)
        st.dynamic_bias_call = True
        try:
            return orig(*args, **kwargs)
        finally:
            st.dynamic_bias_call = False

    select_experts.__wrapped__ = orig  # type: ignore[attr-defined]
    return select_experts


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
        Patch(TOPK_MODULE, "select_experts", _make_select_experts_wrapper),
        Patch(FORWARD_CONTEXT_MODULE, "forward_context", _make_forward_context_wrapper),
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
