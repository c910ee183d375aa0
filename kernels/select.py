"""The fast path of every selection policy (the ``KernelFn`` of :mod:`sglang_xshare.select.registry`).

Each function takes ``router_logits [T, E]`` (fp32 / bf16 / fp16, CUDA -- or CPU under
``TRITON_INTERPRET=1``), the model's :class:`~sglang_xshare.config.RoutingSpec`, the
:class:`~sglang_xshare.select.contract.BatchContext`, the ``[E]`` correction bias or ``None``
and the caller's ``workspace`` dict, and returns the same
:class:`~sglang_xshare.select.contract.SelectionOutput` as the policy's reference, from raw
logits (scoring is fused into the kernels).

Launches per call:

=====================================  ==============================================
policy                                 launches
=====================================  ==============================================
topk, cap                              1 (:mod:`._refine`)
oea(_simple), xshare, xshare_ep,       1 (:mod:`._batch`: one program, or a grid that
xshare_spec with ``request_group``     meets at a barrier); 2 under the interpreter
xshare_spec with ``request_ids``       3 (:mod:`._spec`, arbitrary request ids)
=====================================  ==============================================

No host synchronisation, no data-dependent Python branching, static shapes: every call of a
shape launches the same kernels with the same grids, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

from sglang_xshare.config import RoutingSpec
from sglang_xshare.select.contract import BatchContext, SelectionOutput

from ._batch import batch_kernel
from ._refine import refine_kernel
from ._spec import group_kernel, spec_token_kernel
from .workspace import Buffers, budget_args, buffers, placement_tables, routing_constexprs

__all__ = [
    "topk_kernel",
    "cap_kernel",
    "oea_kernel",
    "oea_simple_kernel",
    "xshare_kernel",
    "xshare_ep_kernel",
    "xshare_spec_kernel",
]

_PICK_OEA, _PICK_XSHARE, _PICK_EP, _PICK_EP_REP, _PICK_SPEC = 1, 2, 3, 4, 5
#: Request ids scanned per step by the general ``xshare_spec`` path.
_SCAN = 1024


def _prepare(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext, policy: str,
             workspace: dict, group: int = 0, general_spec: bool = False) -> tuple[torch.Tensor, Buffers, torch.Tensor]:
    """Validate shapes; return contiguous-row logits, the shape's buffers and ``valid [T] uint8``."""
    if router_logits.dim() != 2 or router_logits.shape[1] != routing.num_experts:
        raise ValueError(f"router_logits must be [T, {routing.num_experts}], got {tuple(router_logits.shape)}")
    if router_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"router_logits must be float32, bfloat16 or float16, got {router_logits.dtype}")
    x = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    T, E = x.shape
    buf = buffers(workspace, policy, T, E, ctx.top_k, x.device, x.dtype, group, general_spec)
    valid = ctx.valid.view(torch.uint8) if ctx.valid.dtype == torch.bool else ctx.valid
    return x, buf, valid


def _outputs(buf: Buffers, T: int, k: int, device: torch.device, workspace: dict, phys: bool):
    if workspace.get("reuse_outputs", False):
        return buf.out_ids, buf.out_w, (buf.out_phys if phys else None)
    ids = torch.empty(T, k, dtype=torch.int32, device=device)
    w = torch.empty(T, k, dtype=torch.float32, device=device)
    ph = torch.empty(T, k, dtype=torch.int32, device=device) if phys else None
    return ids, w, ph


def _empty(router_logits: torch.Tensor, k: int, phys: bool) -> SelectionOutput:
    dev = router_logits.device
    ids = torch.empty(0, k, dtype=torch.int32, device=dev)
    return SelectionOutput(ids, torch.empty(0, k, dtype=torch.float32, device=dev),
                           torch.empty(0, k, dtype=torch.int32, device=dev) if phys else None)


def _bias(correction_bias: torch.Tensor | None, buf: Buffers) -> torch.Tensor:
    if correction_bias is None:
        return buf.dummy
    return correction_bias if correction_bias.is_contiguous() else correction_bias.contiguous()


def _refine_launch(x, bias, valid, buf: Buffers, ids, w, ph, ctx: BatchContext, rc: dict, allow: int, keep_n: int,
                   want_phys: bool) -> None:
    """One :func:`refine_kernel` launch over ``T`` tokens, ``BT`` per program."""
    T, E = x.shape
    k = ctx.top_k
    p = buf.plan
    bt = max(1, min(p.bt, 2048 // p.block_e))
    refine_kernel[(triton.cdiv(T, bt),)](
        x, x.stride(0), bias, valid, T, E, buf.sel, buf.req, ids, w, ph if ph is not None else ids,
        float(ctx.min_score), **rc, ALLOW=allow, K=k, K0=ctx.k0, KEEP_N=keep_n, HAS_MIN=ctx.min_score > 0,
        RENORM=ctx.renormalize, WANT_PHYS=want_phys, BT=bt, BLOCK_E=p.block_e,
        BLOCK_K=max(2, triton.next_power_of_2(k)), num_warps=p.num_warps,
    )


def _refine_only(router_logits, routing, ctx, correction_bias, workspace, policy: str, keep_n: int) -> SelectionOutput:
    """``topk`` / ``cap``: one refine launch over every expert."""
    k = ctx.top_k
    if router_logits.shape[0] == 0:
        return _empty(router_logits, k, False)
    x, buf, valid = _prepare(router_logits, routing, ctx, policy, workspace)
    ids, w, _ = _outputs(buf, x.shape[0], k, x.device, workspace, False)
    _refine_launch(x, _bias(correction_bias, buf), valid, buf, ids, w, None, ctx,
                   routing_constexprs(routing, correction_bias is not None), 0, keep_n, False)
    return SelectionOutput(ids, w)


def _batch_policy(router_logits, routing, ctx, correction_bias, workspace, policy: str, pick: int,
                  allow: int, group: int = 0) -> SelectionOutput:
    """The batch policies: one :func:`batch_kernel` launch (+ a refine launch under the interpreter)."""
    k = ctx.top_k
    want_phys = policy == "xshare_ep"
    if router_logits.shape[0] == 0:
        return _empty(router_logits, k, want_phys)
    x, buf, valid = _prepare(router_logits, routing, ctx, policy, workspace, group)
    T, E = x.shape
    p = buf.plan
    ids, w, ph = _outputs(buf, T, k, x.device, workspace, want_phys)
    if want_phys:
        tab = placement_tables(workspace, ctx.placement, E, x.device)
        if tab.replicated:
            pick = _PICK_EP_REP
        rank, copy, slot_expert, slot_rank = tab.rank, tab.copy, tab.slot_expert, tab.slot_rank
        R, block_p, block_r = tab.num_ranks, tab.block_p, tab.block_r
    else:
        rank = copy = slot_expert = slot_rank = buf.dummy
        R, block_p, block_r = 1, 2, 2
        ph = ids
    mode, b_count, b_frac, b_eps, b_mass, b_mass_c = budget_args(ctx.budget)
    rmode, rb_count, rb_frac, rb_eps, rb_mass, rb_mass_c = budget_args(ctx.request_budget)
    rc = routing_constexprs(routing, correction_bias is not None)
    bias = _bias(correction_bias, buf)
    batch_kernel[(p.nb,)](
        x, x.stride(0), bias, valid, T, E, p.chunks,
        buf.part_mass, buf.part_flags, buf.part_tot, buf.tot_mass, buf.tot_flags, buf.tot_tot,
        buf.sync, buf.sel, buf.req, buf.pk_scr, buf.val_scr, buf.rk_scr, buf.rv_scr,
        rank, copy, slot_expert, slot_rank, R,
        b_count, b_frac, b_eps, b_mass, b_mass_c,
        rb_count, rb_frac, rb_eps, rb_mass, rb_mass_c,
        ids, w, ph, float(ctx.min_score),
        **rc, K=k, K0=ctx.k0, MASS_FULL=ctx.mass_source == "full",
        PICK=pick, ALLOW=allow, MODE=mode, RMODE=rmode, FILL=bool(ctx.fill_to_peak), HAS_MIN=ctx.min_score > 0,
        RENORM=ctx.renormalize, WANT_PHYS=want_phys, SYNC=p.sync, TWO_STAGE=p.two_stage, CW=p.cw, RB2=p.rb2,
        ONE_CHUNK=p.chunks == 1,
        GROUP=group, GP=p.gp, RB=p.rb, CH=p.ch, BT=p.bt, BLOCK_E=p.block_e,
        BLOCK_K=max(2, triton.next_power_of_2(k)), BLOCK_P=block_p, BLOCK_R=block_r, HARD=bool(ctx.hard_cap),
        num_warps=p.num_warps,
    )
    if p.sync == 2:
        _refine_launch(x, bias, valid, buf, ids, w, ph if want_phys else None, ctx, rc,
                       3 if group else allow, k, want_phys)
    return SelectionOutput(ids, w, ph if want_phys else None)


def topk_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                correction_bias: torch.Tensor | None, workspace: dict) -> SelectionOutput:
    """``topk``: every valid token's own top-k (SGLang's ``select_experts``), fused scoring."""
    return _refine_only(router_logits, routing, ctx, correction_bias, workspace, "topk", ctx.top_k)


def cap_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
               correction_bias: torch.Tensor | None, workspace: dict) -> SelectionOutput:
    """``cap``: each token's top-``ctx.cap``; slots ``cap..k-1`` are -1."""
    if ctx.cap is None:
        raise ValueError("cap policy needs ctx.cap")
    return _refine_only(router_logits, routing, ctx, correction_bias, workspace, "cap", int(ctx.cap))


def oea_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
               correction_bias: torch.Tensor | None, workspace: dict) -> SelectionOutput:
    """``oea``: best ``<= k`` experts of each token inside the union of all top-``k0`` sets."""
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "oea", _PICK_OEA, 1)


def oea_simple_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                      correction_bias: torch.Tensor | None, workspace: dict) -> SelectionOutput:
    """``oea_simple``: each token keeps those of its own top-k that are in the top-``k0`` union."""
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "oea_simple", _PICK_OEA, 2)


def xshare_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                  correction_bias: torch.Tensor | None, workspace: dict) -> SelectionOutput:
    """``xshare``: warm-up + budgeted greedy pick over the batch mass, then refinement."""
    if ctx.budget is None:
        raise ValueError("xshare needs ctx.budget")
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "xshare", _PICK_XSHARE, 1)


def xshare_ep_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                     correction_bias: torch.Tensor | None, workspace: dict) -> SelectionOutput:
    """``xshare_ep``: per-rank-capacity pick under ``ctx.placement`` (pure TP when ``None``);
    returns ``physical_ids`` too."""
    if ctx.budget is None:
        raise ValueError("xshare_ep needs ctx.budget")
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "xshare_ep", _PICK_EP, 1)


def xshare_spec_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                       correction_bias: torch.Tensor | None, workspace: dict) -> SelectionOutput:
    """``xshare_spec``: two-level (per request, then batch) XShare.

    ``ctx.request_group = g`` (requests are runs of ``g`` consecutive tokens: SGLang's verify
    batches) runs fused in one launch; ``ctx.request_ids`` (any grouping) runs three launches;
    neither: every token is its own request (``g = 1``).
    """
    if ctx.budget is None or ctx.request_budget is None:
        raise ValueError("xshare_spec needs ctx.budget and ctx.request_budget")
    if ctx.request_ids is None:
        return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "xshare_spec", _PICK_SPEC, 1,
                             group=int(ctx.request_group or 1))
    k = ctx.top_k
    if router_logits.shape[0] == 0:
        return _empty(router_logits, k, False)
    x, buf, valid = _prepare(router_logits, routing, ctx, "xshare_spec", workspace, general_spec=True)
    T, E = x.shape
    p = buf.plan
    ids, w, _ = _outputs(buf, T, k, x.device, workspace, False)
    rc = routing_constexprs(routing, correction_bias is not None)
    bias = _bias(correction_bias, buf)
    rid = ctx.request_ids
    if rid.dtype != torch.int64 or not rid.is_contiguous():
        rid = rid.to(torch.int64).contiguous()
    spec_token_kernel[(T,)](
        x, x.stride(0), bias, valid, T, E, buf.contrib, buf.tflags,
        **rc, K=k, K0=ctx.k0, MASS_FULL=ctx.mass_source == "full", BLOCK_E=p.block_e, num_warps=p.num_warps,
    )
    rmode, rb_count, rb_frac, rb_eps, rb_mass, rb_mass_c = budget_args(ctx.request_budget)
    mode, b_count, b_frac, b_eps, b_mass, b_mass_c = budget_args(ctx.budget)
    group_kernel[(T,)](
        buf.contrib, buf.tflags, rid, T, E,
        buf.part_mass, buf.part_flags, buf.part_tot, buf.req, buf.sync, buf.sel, buf.pk_scr, buf.val_scr,
        rb_count, rb_frac, rb_eps, rb_mass, rb_mass_c,
        b_count, b_frac, b_eps, b_mass, b_mass_c,
        RMODE=rmode, MODE=mode, SCAN=min(_SCAN, triton.next_power_of_2(T)), RB=p.rb, CH=p.ch, BLOCK_E=p.block_e,
        num_warps=p.num_warps,
    )
    _refine_launch(x, bias, valid, buf, ids, w, None, ctx, rc, 3, k, False)
    return SelectionOutput(ids, w)
