"""The route of one SGLang routing call: which path the batch takes, and the ``fast`` / ``sglang`` paths.

Called by the patched ``select_experts`` (:mod:`.patches`) with SGLang's original:

* :func:`decide` -- ``sglang`` / ``fast`` / ``general`` / ``legacy`` for this call (shapes and
  flags only, so under CUDA graphs it is decided once per captured batch size);
* :func:`select_experts` -- runs it: ``sglang`` and ``legacy`` call SGLang's router
  (:func:`run_sglang`; ``legacy`` selects at the post-processing seam, :mod:`.route_general`),
  ``fast`` one kernel launch of the layer's :class:`~sglang_xshare.select.Selector`
  (:func:`select_on`), ``general`` the selection then SGLang's post-processing
  (:func:`~.route_general.general`); :func:`emit` then hands the routing to SGLang.

Under the in-server A/B measurement (``--xshare-ab-switch``) the call goes to
:meth:`~.measure.ab.Measurement.select_experts` instead, which runs these same steps for each arm.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .context import request_group
from .layer import LayerPolicy
from .route_general import capture, general
from .runtime import Runtime, current
from .sglang_surface import TOPK_MODULE

__all__ = ["SELECTING", "decide", "emit", "fast_spec", "note_path", "run_sglang", "select_experts", "select_on"]

#: The paths on which the policy replaces SGLang's router.
SELECTING = ("fast", "general")


def _path(rt: Runtime, lp: LayerPolicy, topk_mod: Any, T: int, tc: Any, info: Any, extra: dict) -> str:
    """Which path this call takes; see :func:`decide`."""
    if lp.selector is None or not rt.applies_to_batch() or T == 0:
        return "sglang"
    if extra.get("dynamic_expert_bias") is not None:
        rt.log_once(f"dyn{lp.layer_id}", "xshare: layer %d got a per-token dynamic_expert_bias; SGLang routes it",
                    lp.layer_id)
        return "sglang"
    if T < lp.min_tokens:
        return "sglang"
    if extra.get("router_logits_partials") is not None or topk_mod._is_hip or topk_mod._use_aiter \
            or tc.num_shared_topk_slots > 0:
        return "legacy"
    envs = topk_mod.envs  # SGLang's routing simulation (uniform / round-robin experts)
    if envs.SGLANG_SIMULATE_UNIFORM_EXPERTS.get() or envs.SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS.get():
        return "sglang"
    algo = getattr(info, "ep_dispatch_algorithm", None) if info is not None else None
    if algo == "fake":
        return "sglang"
    if lp.empty_mode == "distinct":
        return "general"
    if info is None:
        return "fast"
    if lp.chooses_copies and algo in ("static", "dynamic"):
        return "fast"
    if algo == "static" and getattr(info, "partial_logical_to_rank_dispatch_physical_map", None) is not None:
        return "fast"
    return "general"


def decide(rt: Runtime, lp: LayerPolicy, topk_mod: Any, T: int, tc: Any, info: Any, extra: dict) -> str:
    """The path of a call of ``T`` tokens (``sglang`` / ``fast`` / ``general`` / ``legacy``; see
    :mod:`.layer`); ``SGLANG_XSHARE_FORCE_PATH`` turns ``fast`` / ``general`` into the forced one."""
    path = _path(rt, lp, topk_mod, T, tc, info, extra)
    if rt.force_path in ("general", "legacy") and path in SELECTING:
        return rt.force_path
    return path


def fast_spec(lp: LayerPolicy, info: Any):
    """The layer's :class:`~sglang_xshare.select.output.OutputSpec` for this dispatch info."""
    if info is None:
        return lp.output_spec("logical")
    if lp.chooses_copies:
        return lp.output_spec("physical")
    return lp.output_spec("mapped", info.partial_logical_to_rank_dispatch_physical_map)


def select_on(rt: Runtime, lp: LayerPolicy, path: str, topk_mod: Any, tc: Any, router_logits: torch.Tensor,
              layer_id: Any, ntnp: Any, info: Any, selector: Callable | None = None) -> tuple[Any, Any, Any]:
    """The layer's routing of the batch on ``path`` (``fast`` / ``general``): ``(ids, weights, rec)``,
    ``rec`` = the ids for EPLB's expert-distribution recorder (``general``) or ``None``.
    ``selector``: what runs the fast path's selection (default the layer's own
    :class:`~sglang_xshare.select.Selector`; the A/B measurement passes a gated one)."""
    if path == "fast":
        out = (selector or lp.selector)(router_logits, layer_id=lp.layer_id, num_token_non_padded=ntnp,
                                        request_group=request_group(), output=fast_spec(lp, info),
                                        stats_reduce=lp.stats_reduce)
        return out.topk_ids, out.topk_weights, None
    post = getattr(topk_mod._post_process_topk_ids, "__wrapped__", topk_mod._post_process_topk_ids)
    return general(rt, lp, post, None, None, tc, router_logits, layer_id, ntnp, info)


def run_sglang(rt: Runtime, lp: LayerPolicy, path: str, orig: Callable, args: tuple, kwargs: dict) -> Any:
    """SGLang's router ``orig(*args, **kwargs)`` on the ``sglang`` or ``legacy`` path. ``sglang``:
    the post-processing seam passes through and the layer joins its collectives with zeros;
    ``legacy``: the seam selects (or, if it did not run, the layer joins with zeros), and a fused
    router's packed ids, which still hold SGLang's routing, are dropped."""
    if path == "sglang":
        rt.reduce_idle(lp)  # every rank joins the collective on every call
    rt.dynamic_bias_call = kwargs.get("dynamic_expert_bias") is not None
    rt.in_select, rt.seam_selected = path == "sglang", False
    try:
        out = orig(*args, **kwargs)
    finally:
        rt.dynamic_bias_call = rt.in_select = False
    if path == "legacy" and not rt.seam_selected:
        rt.reduce_idle(lp)
    if path == "legacy" and rt.seam_selected and getattr(out, "packed_topk_ids", None) is not None:
        out = sys.modules[TOPK_MODULE].StandardTopKOutput(out.topk_weights, out.topk_ids, out.router_logits)
    return out


def emit(topk_mod: Any, lp: LayerPolicy, path: str, ids: torch.Tensor, weights: torch.Tensor, rec: Any,
         router_logits: torch.Tensor, tc: Any, layer_id: Any, info: Any) -> Any:
    """SGLang's ``StandardTopKOutput`` of the routing the experts get; on ``fast`` SGLang's
    routed-experts capture and EPLB's expert-distribution recorder are called as its
    ``select_experts`` would (``general``: its post-processing did, the recorder gets ``rec``)."""
    if path == "fast":
        capture(topk_mod, tc, layer_id, lp, ids, physical=info is not None)
        topk_mod.get_global_expert_distribution_recorder().on_select_experts(topk_ids=ids)
    elif rec is not None:
        topk_mod.get_global_expert_distribution_recorder().on_select_experts(topk_ids=rec)
    return topk_mod.StandardTopKOutput(weights, ids, router_logits)


def note_path(rt: Runtime, lp: LayerPolicy, T: int, path: str) -> None:
    """Remember (and log once) the path batches of ``T`` tokens take in this layer."""
    if lp.paths.get(T) != path:
        lp.paths[T] = path
        rt.log_once(f"path{lp.is_draft}:{T}:{path}", "xshare: %s batches of %d tokens: %s path",
                    "draft" if lp.is_draft else "target", T, path)


def select_experts(orig: Callable, hidden_states: torch.Tensor, router_logits: torch.Tensor, topk_config: Any, *,
                   layer_id: Any = None, num_token_non_padded: Any = None, expert_location_dispatch_info: Any = None,
                   **extra: Any) -> Any:
    """SGLang's ``select_experts`` under the plugin (``orig``: SGLang's); same arguments and result."""
    rt = current()
    args = (hidden_states, router_logits, topk_config)
    kwargs = dict(layer_id=layer_id, num_token_non_padded=num_token_non_padded,
                  expert_location_dispatch_info=expert_location_dispatch_info, **extra)
    if rt is None or not rt.cfg.active or router_logits is None or router_logits.dim() != 2:
        return orig(*args, **kwargs)
    topk_mod = sys.modules[TOPK_MODULE]
    lp = rt.layer(topk_config, layer_id, router_logits)
    T = int(router_logits.shape[0])
    info = expert_location_dispatch_info
    path = decide(rt, lp, topk_mod, T, topk_config, info, extra)
    note_path(rt, lp, T, path)
    if rt.recorder is not None and not lp.is_draft and rt.applies_to_batch():
        rt.recorder.record(lp, router_logits)
    if rt.ab is not None and not lp.is_draft:
        return rt.ab.select_experts(rt, lp, path, orig, args, kwargs)
    if path not in SELECTING:
        return run_sglang(rt, lp, path, orig, args, kwargs)
    ids, weights, rec = select_on(rt, lp, path, topk_mod, topk_config, router_logits, layer_id,
                                  num_token_non_padded, info)
    return emit(topk_mod, lp, path, ids, weights, rec, router_logits, topk_config, layer_id, info)
