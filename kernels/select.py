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

The launch condition ``gate=(flag, arm)`` (a keyword of every kernel entry point, not part of the
selection contract) makes the batch and refine launches return at once unless the
``[1] int64`` device flag holds ``arm`` (read on the device, so a captured graph follows the flag):
an A/B arm that is not routed by costs empty launches only. Its outputs are then left as they
were (unwritten memory), and its fused metrics do not count the call. The general
``xshare_spec`` path (``request_ids``) gates only its last (refine) launch.
"""

from __future__ import annotations

import torch
import triton

from sglang_xshare.config import RoutingSpec
from sglang_xshare.select.contract import BatchContext, SelectionOutput
from sglang_xshare.select.output import OutputSpec
from sglang_xshare.select.registry import get_policy

from ._batch import MAX_SPINS, batch_kernel
from ._refine import refine_kernel
from ._spec import group_kernel, spec_token_kernel
from .workspace import (Buffers, _pow2, budget_args, buffers, fault_counter, idle_stats, placement_tables,
                        routing_constexprs)

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
             workspace: dict, group: int = 0, general_spec: bool = False,
             two_launch: bool = False) -> tuple[torch.Tensor, Buffers, torch.Tensor, int]:
    """Validate shapes; return contiguous-row logits, the shape's buffers and how real rows are
    marked: ``(valid, VALID)`` -- a ``[T] uint8`` mask (0), the 0-d token count (1) or nothing (2)."""
    if router_logits.dim() != 2 or router_logits.shape[1] != routing.num_experts:
        raise ValueError(f"router_logits must be [T, {routing.num_experts}], got {tuple(router_logits.shape)}")
    if router_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"router_logits must be float32, bfloat16 or float16, got {router_logits.dtype}")
    x = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    T, E = x.shape
    buf = buffers(workspace, policy, T, E, ctx.top_k, x.device, x.dtype, group, general_spec, two_launch)
    if ctx.valid is not None:
        return x, buf, (ctx.valid.view(torch.uint8) if ctx.valid.dtype == torch.bool else ctx.valid), 0
    if ctx.num_valid is not None:
        n = ctx.num_valid
        if n.dtype not in (torch.int32, torch.int64) or n.device != x.device:
            raise TypeError(f"num_valid must be an int32/int64 tensor on {x.device}, got {n.dtype} on {n.device}")
        return x, buf, n, 1
    return x, buf, buf.dummy, 2


def _epilogue(output: OutputSpec | None, buf: Buffers, E: int, want_phys: bool) -> dict:
    """Kernel arguments of the output epilogue (:class:`OutputSpec`) and the fused metrics."""
    d = buf.dummy
    if output is None:
        return dict(out_scale=1.0, map_ptr=d, acc_ptr=d, mticket_ptr=d, used_ptr=d, top_ptr=d, urank_ptr=d,
                    lrank_ptr=d, U=1, OUT=0, SCALE=False, FILL_EMPTY=False, METRICS=False, BLOCK_U=16, BLOCK_MR=2)
    if output.ids == "physical" and not want_phys:
        raise ValueError("OutputSpec(ids='physical') needs policy xshare_ep")
    out = {"logical": 0, "physical": 1, "mapped": 2}[output.ids]
    args = dict(out_scale=float(output.scale) if output.scale is not None else 1.0,
                map_ptr=output.dispatch_map if output.dispatch_map is not None else d,
                OUT=out, SCALE=output.scale is not None, FILL_EMPTY=output.empty == "fill")
    m = output.metrics
    if m is None:
        args.update(acc_ptr=d, mticket_ptr=d, used_ptr=d, top_ptr=d, urank_ptr=d, lrank_ptr=d, U=1,
                    METRICS=False, BLOCK_U=16, BLOCK_MR=2)
    else:
        U = int(m.unit_rank.numel())
        used, top, ticket = buf.metrics_scratch(U)
        args.update(acc_ptr=m.acc, mticket_ptr=ticket, used_ptr=used, top_ptr=top, urank_ptr=m.unit_rank,
                    lrank_ptr=m.logical_rank, U=U, METRICS=True, BLOCK_U=used.numel(),
                    BLOCK_MR=max(2, triton.next_power_of_2(m.num_ranks)))
    return args


def _coop(p, x: torch.Tensor, workspace: dict) -> dict:
    """``launch_cooperative_grid`` for grid-barrier plans on a GPU: the driver then schedules all
    programs at once (or fails the launch) -- the barrier's co-residency is guaranteed, not assumed."""
    if p.sync == 1 and x.is_cuda and workspace.get("cooperative", True):
        return {"launch_cooperative_grid": True}
    return {}


def _gate(gate: tuple[torch.Tensor, int] | None, buf: Buffers) -> dict:
    """Kernel arguments of the launch condition ``gate = (flag [1] int64, arm)``: the launch returns
    at once unless the flag holds ``arm``; ``None``: always run."""
    if gate is None:
        return dict(gate_ptr=buf.dummy, gate_arm=0, GATE=False)
    flag, arm = gate
    if flag.dtype != torch.int64 or flag.numel() != 1 or flag.device != buf.dummy.device:
        raise TypeError(f"gate flag must be a [1] int64 tensor on {buf.dummy.device}, got {flag.dtype} "
                        f"{tuple(flag.shape)} on {flag.device}")
    return dict(gate_ptr=flag, gate_arm=int(arm), GATE=True)


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


def _guard(ctx: BatchContext) -> dict:
    """The verify-row guard's constexprs (:meth:`~sglang_xshare.select.contract.BatchContext.guard`):
    ``GUARD_G`` (0 = off) and ``GUARD_K`` -- fixed per shape and configuration (SGLang's verify
    batches have one ``g``), so a captured graph's launches never change."""
    g, width = ctx.guard()
    return dict(GUARD_G=g, GUARD_K=width if g else 0)


def _refine_launch(x, bias, valid, vmode: int, buf: Buffers, ids, w, ph, ctx: BatchContext, rc: dict, allow: int,
                   keep_n: int, want_phys: bool, epi: dict, gate: tuple[torch.Tensor, int] | None = None) -> None:
    """One :func:`refine_kernel` launch over ``T`` tokens, ``BT`` per program."""
    T, E = x.shape
    k = ctx.top_k
    p = buf.plan
    bt = max(1, min(p.bt, 2048 // p.block_e))
    refine_kernel[(triton.cdiv(T, bt),)](
        x, x.stride(0), bias, valid, T, E, buf.sel, buf.req, ids, w, ph if ph is not None else ids,
        float(ctx.min_score), **epi, **rc, **_gate(gate, buf), ALLOW=allow, K=k, K0=ctx.k0, KEEP_N=keep_n,
        HAS_MIN=ctx.min_score > 0,
        RENORM=ctx.renormalize, WANT_PHYS=want_phys, BT=bt, BLOCK_E=p.block_e,
        BLOCK_K=max(2, triton.next_power_of_2(k)), VALID=vmode, num_warps=p.num_warps, **_guard(ctx),
    )


def _refine_only(router_logits, routing, ctx, correction_bias, workspace, policy: str, keep_n: int,
                 output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``topk`` / ``cap``: one refine launch over every expert."""
    k = ctx.top_k
    if router_logits.shape[0] == 0:
        return _empty(router_logits, k, False)
    x, buf, valid, vmode = _prepare(router_logits, routing, ctx, policy, workspace)
    ids, w, _ = _outputs(buf, x.shape[0], k, x.device, workspace, False)
    _refine_launch(x, _bias(correction_bias, buf), valid, vmode, buf, ids, w, None, ctx,
                   routing_constexprs(routing, correction_bias is not None), 0, keep_n, False,
                   _epilogue(output, buf, x.shape[1], False), gate)
    return SelectionOutput(ids, w)


def _batch_policy(router_logits, routing, ctx, correction_bias, workspace, policy: str, pick: int,
                  allow: int, group: int = 0, output: OutputSpec | None = None,
                  gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """The batch policies: one :func:`batch_kernel` launch (+ a refine launch under the interpreter)."""
    k = ctx.top_k
    want_phys = get_policy(policy).uses_placement
    if router_logits.shape[0] == 0:
        if ctx.stats_reduce is not None:  # no tokens here: still join the collective the other ranks run
            ctx.stats_reduce(idle_stats(router_logits.shape[1], router_logits.device))
        return _empty(router_logits, k, want_phys and output is None)
    glob = ctx.stats_reduce is not None
    x, buf, valid, vmode = _prepare(router_logits, routing, ctx, policy, workspace, group, two_launch=glob)
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
    epi = _epilogue(output, buf, E, want_phys)

    def launch(sync: int, epi_l: dict) -> None:
        batch_kernel[(p.nb,)](
            x, x.stride(0), bias, valid, T, E, p.chunks,
            buf.part_mass, buf.part_flags, buf.part_tot, buf.tot_mass, buf.tot_flags, buf.tot_tot,
            buf.sync, buf.sel, buf.req, buf.pk_scr, buf.val_scr, buf.rk_scr, buf.rv_scr,
            rank, copy, slot_expert, slot_rank, R,
            b_count, b_frac, b_eps, b_mass, b_mass_c,
            rb_count, rb_frac, rb_eps, rb_mass, rb_mass_c,
            ids, w, ph, float(ctx.min_score), **epi_l, okv_ptr=buf.okv, fault_ptr=fault_counter(x.device),
            max_spins=int(workspace.get("max_spins", MAX_SPINS)), stats_ptr=buf.stats, **_gate(gate, buf),
            **rc, K=k, K0=ctx.k0, MASS_FULL=ctx.mass_source == "full",
            PICK=pick, ALLOW=allow, MODE=mode, RMODE=rmode, FILL=bool(ctx.fill_to_peak), HAS_MIN=ctx.min_score > 0,
            RENORM=ctx.renormalize, WANT_PHYS=want_phys, SYNC=sync, TWO_STAGE=p.two_stage, CW=p.cw, RB2=p.rb2,
            ONE_CHUNK=p.chunks == 1,
            GROUP=group, GP=p.gp, RB=p.rb, CH=p.ch, BT=p.bt, BLOCK_E=p.block_e,
            BLOCK_K=max(2, triton.next_power_of_2(k)), BLOCK_P=block_p, BLOCK_R=block_r, HARD=bool(ctx.hard_cap), VALID=vmode,
            NBP=max(2, _pow2(p.nb)), num_warps=p.num_warps, **_guard(ctx),
            **(_coop(p, x, workspace) if sync == 1 else {}),
        )

    if glob:  # statistics of this rank -> all-reduce (the caller's collective) -> the same pick everywhere
        launch(3, {**epi, "METRICS": False})
        red = ctx.stats_reduce(buf.stats)
        if red is not None and red is not buf.stats:
            buf.stats.copy_(red)
        launch(4, epi)
        return SelectionOutput(ids, w, ph if want_phys and output is None else None)
    launch(p.sync if p.sync else 0, epi if p.sync != 2 else {**epi, "METRICS": False})  # sync 2: the refine launch counts
    if p.sync == 2:
        _refine_launch(x, bias, valid, vmode, buf, ids, w, ph if want_phys else None, ctx, rc,
                       3 if group else allow, k, want_phys, epi, gate)
    return SelectionOutput(ids, w, ph if want_phys and output is None else None)


def topk_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                correction_bias: torch.Tensor | None, workspace: dict,
                output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``topk``: every valid token's own top-k (SGLang's ``select_experts``), fused scoring."""
    return _refine_only(router_logits, routing, ctx, correction_bias, workspace, "topk", ctx.top_k, output, gate)


def cap_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
               correction_bias: torch.Tensor | None, workspace: dict,
               output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``cap``: each token's top-``ctx.cap``; slots ``cap..k-1`` are -1."""
    if ctx.cap is None:
        raise ValueError("cap policy needs ctx.cap")
    return _refine_only(router_logits, routing, ctx, correction_bias, workspace, "cap", int(ctx.cap), output, gate)


def oea_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
               correction_bias: torch.Tensor | None, workspace: dict,
               output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``oea``: best ``<= k`` experts of each token inside the union of all top-``k0`` sets."""
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "oea", _PICK_OEA, 1,
                         output=output, gate=gate)


def oea_simple_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                      correction_bias: torch.Tensor | None, workspace: dict,
                      output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``oea_simple``: each token keeps those of its own top-k that are in the top-``k0`` union."""
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "oea_simple", _PICK_OEA, 2,
                         output=output, gate=gate)


def xshare_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                  correction_bias: torch.Tensor | None, workspace: dict,
                  output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``xshare``: warm-up + budgeted greedy pick over the batch mass, then refinement."""
    if ctx.budget is None:
        raise ValueError("xshare needs ctx.budget")
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "xshare", _PICK_XSHARE, 1,
                         output=output, gate=gate)


def xshare_ep_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                     correction_bias: torch.Tensor | None, workspace: dict,
                     output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``xshare_ep``: per-rank-capacity pick under ``ctx.placement`` (pure TP when ``None``);
    returns ``physical_ids`` too."""
    if ctx.budget is None:
        raise ValueError("xshare_ep needs ctx.budget")
    return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "xshare_ep", _PICK_EP, 1,
                         output=output, gate=gate)


def xshare_spec_kernel(router_logits: torch.Tensor, routing: RoutingSpec, ctx: BatchContext,
                       correction_bias: torch.Tensor | None, workspace: dict,
                       output: OutputSpec | None = None, gate: tuple[torch.Tensor, int] | None = None) -> SelectionOutput:
    """``xshare_spec``: two-level (per request, then batch) XShare.

    ``ctx.request_group = g`` (requests are runs of ``g`` consecutive tokens: SGLang's verify
    batches) runs fused in one launch; ``ctx.request_ids`` (any grouping) runs three launches;
    neither: every token is its own request (``g = 1``). Without ``ctx.request_budget``: no request
    stage, :func:`xshare_kernel` (the batch budget over the union).
    """
    if ctx.budget is None:
        raise ValueError("xshare_spec needs ctx.budget")
    if ctx.request_budget is None:
        return xshare_kernel(router_logits, routing, ctx, correction_bias, workspace, output=output, gate=gate)
    if ctx.request_ids is None:
        return _batch_policy(router_logits, routing, ctx, correction_bias, workspace, "xshare_spec", _PICK_SPEC, 1,
                             group=int(ctx.request_group or 1), output=output, gate=gate)
    k = ctx.top_k
    if router_logits.shape[0] == 0:
        return _empty(router_logits, k, False)
    x, buf, valid, vmode = _prepare(router_logits, routing, ctx, "xshare_spec", workspace, general_spec=True)
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
        **rc, K=k, K0=ctx.k0, MASS_FULL=ctx.mass_source == "full", BLOCK_E=p.block_e, VALID=vmode,
        num_warps=p.num_warps, **_guard(ctx),
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
    _refine_launch(x, bias, valid, vmode, buf, ids, w, None, ctx, rc, 3, k, False, _epilogue(output, buf, E, False),
                   gate)
    return SelectionOutput(ids, w)
