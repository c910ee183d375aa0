"""The SGLang functions the plugin replaces: thin named wrappers, each handing over to its route.

Each wrapper keeps SGLang's signature and finds SGLang's original as its own ``__wrapped__``
(set by :class:`~.patching.Patch` when applied). :data:`PATCHES` lists them; :mod:`.install`
applies them when their module is imported.

* ``select_experts`` -> :func:`.route.select_experts` (the path decision and the ``sglang`` /
  ``fast`` / ``general`` paths);
* ``_post_process_topk_ids`` -> :func:`.route_general.post_process_topk_ids` (the ``legacy`` seam);
* ``TopK.__init__`` marks draft-model layers and allocates the live-metrics tables while the
  model is built (outside graph capture);
* ``TopK.bind_runner_backend`` logs layers whose output format bypasses ``select_experts``
  (TRITON_KERNEL, BYPASSED);
* ``TopK.empty_topk_output``: a rank without MoE tokens joins ``--xshare-ep-global``'s all-reduce;
* ``forward_context`` declares the running batch (:func:`.context.batch_scope`);
* ``ExpertLocationMetadata.update`` refreshes the policies' placement tables after EPLB rebalanced.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from . import route, route_general
from .context import batch_info_from_forward_batch, capturing, forward_scope
from .layer import DRAFT_ATTR
from .runtime import current
from .sglang_surface import EPLB_MODULE, FORWARD_CONTEXT_MODULE, TOPK_MODULE

__all__ = ["PATCHES"]


def select_experts(hidden_states, router_logits, topk_config, *, layer_id=None, num_token_non_padded=None,
                   expert_location_dispatch_info=None, **extra):
    """``sglang.srt.layers.moe.topk.select_experts`` under the plugin."""
    return route.select_experts(select_experts.__wrapped__, hidden_states, router_logits, topk_config,
                                layer_id=layer_id, num_token_non_padded=num_token_non_padded,
                                expert_location_dispatch_info=expert_location_dispatch_info, **extra)


def _post_process_topk_ids(topk_ids, topk_weights, topk_config, router_logits, layer_id,
                           num_token_non_padded=None, expert_location_dispatch_info=None, padded_rows_masked=False):
    """``sglang.srt.layers.moe.topk._post_process_topk_ids`` under the plugin."""
    return route_general.post_process_topk_ids(_post_process_topk_ids.__wrapped__, topk_ids, topk_weights,
                                               topk_config, router_logits, layer_id, num_token_non_padded,
                                               expert_location_dispatch_info, padded_rows_masked)


def topk_init(self, *args, **kwargs) -> None:
    """``TopK.__init__``: SGLang's, then mark draft layers on their ``TopKConfig`` and allocate the
    metrics tables (A/B arms' too) on the current GPU (a CPU without one), outside graph capture."""
    topk_init.__wrapped__(self, *args, **kwargs)
    try:
        setattr(self.topk_config, DRAFT_ATTR, bool(self.is_draft))
    except AttributeError:
        pass
    rt = current()
    if rt is not None and not capturing():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        for m in rt.metric_tables():
            m.row(0, device)


def bind_runner_backend(self, runner_backend, *args, **kwargs) -> Any:
    """``TopK.bind_runner_backend``: SGLang's, then warn about layers the policy cannot reach."""
    result = bind_runner_backend.__wrapped__(self, runner_backend, *args, **kwargs)
    rt = current()
    if rt is not None and rt.cfg.selects:
        fmt = self.topk_config.output_format
        name = getattr(fmt, "name", str(fmt))
        if name in ("TRITON_KERNEL", "BYPASSED"):
            rt.log_once(f"fmt{self.layer_id}:{self.is_draft}",
                        "xshare: layer %d: MoE runner %s routes in-kernel (TopK output format %s); the policy "
                        "cannot apply there and SGLang's routing is kept. Use --moe-runner-backend triton or "
                        "deep_gemm (standard format) to apply it.",
                        self.layer_id, getattr(runner_backend, "value", runner_backend), name, level=logging.WARNING)
    return result


def empty_topk_output(self, device, *args, **kwargs) -> Any:
    """``TopK.empty_topk_output``: ``--xshare-ep-global`` joins the layer's all-reduce with zeros
    on a rank without MoE tokens (as SGLang's LP solver does there), then SGLang's."""
    rt = current()
    if rt is not None and rt.cfg.active and rt.cfg.ep_global and not self.is_draft:
        rt.join_ep_global(self.topk_config, self.layer_id, device)
    return empty_topk_output.__wrapped__(self, device, *args, **kwargs)


def eplb_update(self, other, update_layer_ids, *args, **kwargs) -> Any:
    """``ExpertLocationMetadata.update``: SGLang's (rewrites the maps in place), then refresh the
    policies' device placement tables of the updated layers."""
    result = eplb_update.__wrapped__(self, other, update_layer_ids, *args, **kwargs)
    rt = current()
    if rt is not None:
        ids = set(int(i) for i in update_layer_ids)
        for lp in list(rt.layers.values()):
            if lp.selector is not None and not lp.is_draft and lp.layer_id in ids:
                lp.selector.refresh_placement_()
        rt.log_once("eplb_refresh", "xshare: EPLB rebalanced; the policies' placement tables follow the new map")
    return result


def forward_context(ctx, *, forward_batch=None):
    """``forward_context``: SGLang's, inside :func:`~.context.batch_scope` of the batch it runs."""
    inner = forward_context.__wrapped__(ctx, forward_batch=forward_batch)
    if forward_batch is None or current() is None:
        return inner
    return forward_scope(inner, batch_info_from_forward_batch(forward_batch))


#: ``(module, attribute, wrapper)`` of every patch, in the order they are applied.
PATCHES: tuple[tuple[str, str, Any], ...] = (
    (TOPK_MODULE, "_post_process_topk_ids", _post_process_topk_ids),
    (TOPK_MODULE, "TopK.__init__", topk_init),
    (TOPK_MODULE, "TopK.bind_runner_backend", bind_runner_backend),
    (TOPK_MODULE, "TopK.empty_topk_output", empty_topk_output),
    (TOPK_MODULE, "select_experts", select_experts),
    (FORWARD_CONTEXT_MODULE, "forward_context", forward_context),
    (EPLB_MODULE, "ExpertLocationMetadata.update", eplb_update),
)
