"""The ``general`` and ``legacy`` paths: the policy's selection, then SGLang's own post-processing.

``general`` (EPLB dynamic / LP dispatch, the torch-native CPU MoE, ``--xshare-empty-slots
distinct``): the policy replaces SGLang's router and SGLang's ``_post_process_topk_ids`` runs on
its output. ``legacy`` (fused shared-expert columns written by the router, ROCm, routing paths
that do not go through ``select_experts``): SGLang's router runs and the patched
``_post_process_topk_ids`` (:func:`post_process_topk_ids`) selects there. Empty slots are filled
before SGLang's post-processing (:mod:`.slots`) and restored after.
"""

from __future__ import annotations

import sys
from dataclasses import replace as dc_replace
from typing import Any, Callable

import torch

from .context import request_group
from .layer import LayerPolicy
from .runtime import Runtime, current
from .sglang_surface import TOPK_MODULE
from .slots import copy_source_physical, fill_empty_slots, fill_empty_slots_distinct, restore_empty_slots

__all__ = ["capture", "general", "post_process_topk_ids"]


def capture(topk_mod: Any, tc: Any, layer_id: Any, lp: LayerPolicy, ids: torch.Tensor, physical: bool) -> None:
    """SGLang's routed-experts capture (``--enable-return-routed-experts``) of the routing the experts
    get. SGLang captures logical ids (before its logical -> physical remap), so physical slot ids
    ``[T, w]`` (``physical``: EPLB dispatch info was given; the policy's own copies, the mapped or
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


def general(rt: Runtime, lp: LayerPolicy, post: Callable, topk_ids: torch.Tensor | None,
            topk_weights: torch.Tensor | None, tc: Any, router_logits: torch.Tensor, layer_id: Any, ntnp: Any,
            info: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The policy's selection, then SGLang's post-processing ``post`` on it (empty slots filled
    before, restored after): SGLang's ``(ids [T, w], weights [T, w], recorder ids)``.
    ``topk_ids / topk_weights``: SGLang's router output whose extra (fused shared-expert) columns
    are kept (``legacy``), or ``None`` (``general``)."""
    routing = lp.routing
    k = routing.top_k
    T = router_logits.shape[0]
    algo = getattr(info, "ep_dispatch_algorithm", None) if info is not None else None
    use_physical = lp.chooses_copies and algo in ("static", "dynamic")
    if lp.chooses_copies and info is not None and not use_physical:
        rt.log_once("ep_lp", "xshare: %s with --ep-dispatch-algorithm %s: the policy picks the experts, SGLang's "
                    "LP dispatcher picks their copies", rt.cfg.policy, algo)
    spec = lp.output_spec("physical" if use_physical else "logical", empty="minus_one")
    sel = lp.selector(router_logits, layer_id=lp.layer_id, num_token_non_padded=ntnp,
                      request_group=request_group(), output=spec, stats_reduce=lp.stats_reduce)
    chosen, weights = sel.topk_ids, sel.topk_weights
    empty = chosen < 0
    if lp.empty_mode == "distinct":
        width = lp.placement.num_physical if (use_physical and lp.placement is not None) else routing.num_experts
        filled, filled_w, source = fill_empty_slots_distinct(chosen, weights, width)
    else:
        filled, filled_w, source = fill_empty_slots(chosen, weights)
    filled = filled.to(topk_ids.dtype if topk_ids is not None else torch.int32)
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
            # SGLang would capture these physical ids: it captures nothing, the plugin the logical ones
            call_tc = dc_replace(tc, allow_routed_experts_capture=False)
            capture(topk_mod, tc, layer_id, lp, filled, physical=True)
    new_ids, new_w, rec = post(filled, filled_w, call_tc, call_logits, layer_id, ntnp, call_info, False)
    routed = new_ids[:, :k]
    if lp.empty_mode == "minus_one":
        routed.copy_(restore_empty_slots(routed, empty))
    elif lp.empty_mode == "fill":
        routed.copy_(copy_source_physical(routed, source))
    return new_ids, new_w, rec


def post_process_topk_ids(orig: Callable, topk_ids: torch.Tensor, topk_weights: torch.Tensor, topk_config: Any,
                          router_logits: torch.Tensor, layer_id: Any, num_token_non_padded: Any = None,
                          expert_location_dispatch_info: Any = None, padded_rows_masked: bool = False) -> Any:
    """SGLang's ``_post_process_topk_ids`` under the plugin (``orig``: SGLang's): the ``legacy``
    path's seam. Passes through inside the plugin's own routing, for a per-token dynamic bias,
    non-selected layers and batches, and mismatched shapes."""
    rt = current()
    call = (topk_ids, topk_weights, topk_config, router_logits, layer_id, num_token_non_padded,
            expert_location_dispatch_info, padded_rows_masked)
    if rt is None or rt.in_select or router_logits is None or router_logits.dim() != 2:
        return orig(*call)
    lp = rt.layer(topk_config, layer_id, router_logits)
    if (lp.selector is None or not rt.applies_to_batch() or rt.dynamic_bias_call
            or topk_ids.shape[0] != router_logits.shape[0] or router_logits.shape[0] < lp.min_tokens):
        return orig(*call)
    args = (topk_config, router_logits, layer_id, num_token_non_padded, expert_location_dispatch_info)
    rt.seam_selected = True  # the legacy path's collectives (--xshare-ep-global) run here
    if rt.ab is not None and not lp.is_draft:
        return rt.ab.post_process(rt, lp, orig, topk_ids, topk_weights, args, padded_rows_masked)
    return general(rt, lp, orig, topk_ids, topk_weights, *args)
