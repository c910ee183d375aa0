"""The xshare hook inside real SGLang 0.5.23 routing objects (CPU, sglang installed).

SGLang's ``TopK.forward_native`` is used: it is SGLang's torch routing path (``forward_cpu``
needs a CPU build of ``sgl_kernel``, which no wheel ships) and ends in the same
``select_experts`` -> ``_post_process_topk_ids`` seam as the CUDA path.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import textwrap

import pytest
from types import SimpleNamespace
import torch

pytest.importorskip("sglang")
pytestmark = pytest.mark.sglang

from sglang_xshare import Placement, RoutingSpec, Selector  # noqa: E402
from sglang_xshare.serving import context, install, route, runtime  # noqa: E402
from sglang_xshare.serving.config import ENV_VAR, XShareServerConfig  # noqa: E402
from sglang_xshare.serving.measure.arms import arm_configs  # noqa: E402
from sglang_xshare.serving.slots import (  # noqa: E402
    backend_takes_minus_one,
    fill_empty_slots,
    fill_empty_slots_distinct,
    resolve_empty_slot_mode,
)

from tests._sglang_cpu import E, HIDDEN, K, T, _logits, _topk, installed, sg  # noqa: E402,F401  (fixtures)


def _selector(cfg: XShareServerConfig, placement: Placement | None = None, **routing_kw) -> Selector:
    routing = RoutingSpec(num_experts=routing_kw.pop("num_experts", E), top_k=K, **routing_kw)
    return Selector(routing, cfg.selection_config(routing), placement=placement)


POLICIES = [
    dict(policy="topk"),
    dict(policy="cap", cap=2),
    dict(policy="oea"),
    dict(policy="oea_simple"),
    dict(policy="xshare", budget="8"),
    dict(policy="xshare", budget="mass:0.8", warmup_k0=2),
    dict(policy="xshare_spec", budget="10", request_budget="6"),
]


@pytest.mark.parametrize("kw", POLICIES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_hooked_topk_gives_policy_output(sg, installed, kw):
    cfg = installed(empty_slots="minus_one", **kw)
    tk = _topk(sg)
    x, logits = torch.randn(T, HIDDEN), _logits(1)
    info = context.BatchInfo("verify", num_draft_tokens=4, batch_size=T // 4) if kw["policy"] == "xshare_spec" \
        else context.BatchInfo("decode", batch_size=T)
    with context.batch_scope(info):
        out = tk.forward_native(x, logits.clone())
    rid = torch.arange(T) // 4 if kw["policy"] == "xshare_spec" else None
    ref = _selector(cfg)(logits, layer_id=3, request_ids=rid)
    assert torch.equal(out.topk_ids.to(torch.int32), ref.topk_ids)
    torch.testing.assert_close(out.topk_weights, ref.topk_weights, rtol=0, atol=0)
    if kw["policy"] in ("cap", "xshare"):  # the hook really changed SGLang's routing
        install.uninstall()
        plain = tk.forward_native(x, logits.clone())
        assert not torch.equal(plain.topk_ids.to(torch.int32), ref.topk_ids)


def _verify_batch(ndt: int, bs: int):
    """A real SGLang TARGET_VERIFY ForwardBatch of ``bs`` requests x ``ndt`` tokens (``T`` in all)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.speculative.eagle_info import EagleVerifyInput

    spec = EagleVerifyInput.create_idle_input(topk=1, spec_steps=ndt - 1, num_verify_tokens=ndt, device="cpu")
    return ForwardBatch(forward_mode=ForwardMode.TARGET_VERIFY, batch_size=bs, input_ids=torch.zeros(T, dtype=torch.long),
                        req_pool_indices=torch.arange(bs), seq_lens=torch.full((bs,), 10), out_cache_loc=torch.arange(T),
                        seq_lens_sum=10 * bs, spec_info=spec)


def _route_verify_and_decode(sg, seed: int):
    """Route the same ``T`` tokens through SGLang's TopK twice: as a real TARGET_VERIFY batch of
    ``T // 4`` requests x 4 tokens, then as a decode batch. ``(logits, verify ids, decode ids)``."""
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # the patched one

    tk = _topk(sg)
    x, logits = torch.randn(T, HIDDEN), _logits(seed)
    with forward_context(ForwardContext(attn_backend=None), forward_batch=_verify_batch(4, T // 4)):
        ver = tk.forward_native(x, logits.clone()).topk_ids.to(torch.int32)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        dec = tk.forward_native(x, logits.clone()).topk_ids.to(torch.int32)
    return logits, ver, dec


def test_target_verify_batch_groups_tokens_by_request(sg, installed):
    """A real SGLang TARGET_VERIFY ForwardBatch entering SGLang's forward_context: xshare_spec sees
    each request's draft tokens as one group (``arange(T) // num_tokens_per_req``)."""
    cfg = installed(policy="xshare_spec", budget="10", request_budget="6", empty_slots="minus_one")
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # the patched one

    ndt, bs = 4, T // 4
    fb = _verify_batch(ndt, bs)
    tk = _topk(sg)
    logits = _logits(13)
    with forward_context(ForwardContext(attn_backend=None), forward_batch=fb):
        assert context.current_batch() == context.BatchInfo("verify", num_draft_tokens=ndt, batch_size=bs)
        out = tk.forward_native(torch.randn(T, HIDDEN), logits.clone())
    assert context.current_batch() is None
    ref = _selector(cfg)(logits, layer_id=3, request_ids=torch.arange(T) // ndt)
    assert torch.equal(out.topk_ids.to(torch.int32), ref.topk_ids)
    for r in range(bs):
        ids = out.topk_ids[r * ndt:(r + 1) * ndt]
        assert len(set(ids[ids >= 0].tolist())) <= 6  # the per-request budget m_r
    assert len(set(out.topk_ids[out.topk_ids >= 0].tolist())) <= 10  # the batch budget m_l


def test_verify_guard_reaches_target_verify_batches_only(sg, installed):
    """``--xshare-verify-guard K`` in a real SGLang TARGET_VERIFY ForwardBatch: the first row of every
    request (its target row) keeps its own top-K, the selection is the Selector's with
    ``request_group = num_tokens_per_req`` and differs from the unguarded one; a decode batch of the
    same tokens is routed as without the guard."""
    import dataclasses

    cfg = installed(policy="xshare", budget="5", verify_guard=K, empty_slots="minus_one")
    logits, ids, dec = _route_verify_and_decode(sg, 17)
    assert torch.equal(ids, _selector(cfg)(logits, layer_id=3, request_group=4).topk_ids)
    own = torch.softmax(logits, -1).topk(K).indices
    for t in range(0, T, 4):
        assert set(ids[t].tolist()) == set(own[t].tolist()), t
    plain = _selector(dataclasses.replace(cfg, verify_guard=0))
    assert not torch.equal(ids, plain(logits, layer_id=3, request_group=4).topk_ids), "the guard changed nothing"
    assert torch.equal(dec, plain(logits, layer_id=3).topk_ids)


def test_verify_budget_reaches_target_verify_batches_only(sg, installed):
    """``--xshare-verify-budget 1.0`` with ``--xshare-budget 5`` in a real SGLang TARGET_VERIFY
    ForwardBatch: the verify batch routes as plain top-k (every top-k expert allowed); a decode batch
    of the same tokens is cut by the batch budget (above it only by the tokens' top-1 warm-up)."""
    import dataclasses

    cfg = installed(policy="xshare", budget="5", verify_budget="1.0", empty_slots="minus_one")
    logits, ver, dec = _route_verify_and_decode(sg, 19)
    own = torch.softmax(logits, -1).topk(K).indices
    assert all(set(ver[t].tolist()) == set(own[t].tolist()) for t in range(T))
    cut = _selector(dataclasses.replace(cfg, verify_budget=None))(logits, layer_id=3).topk_ids
    assert torch.equal(dec, cut)
    assert len(set(dec[dec >= 0].tolist())) < len(set(own.flatten().tolist()))  # cut


ROUTERS = {
    "softmax": dict(),
    "grouped": dict(use_grouped_topk=True, num_expert_group=4, topk_group=2),
    "deepseek_v3": dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                        correction_bias=torch.linspace(-0.2, 0.2, E), routed_scaling_factor=2.5),
    "no_renorm": dict(renormalize=False),
}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_topk_policy_is_sglang_routing_bit_for_bit(sg, installed, router):
    """Policy ``topk`` is SGLang's own routing: bit-identical ids and weights for softmax,
    grouped, DeepSeek-V3 biased-sigmoid and unnormalised routers."""
    x, logits = torch.randn(T, HIDDEN), _logits(14)
    plain = _topk(sg, **ROUTERS[router]).forward_native(x, logits.clone())
    installed(policy="topk", empty_slots="minus_one")
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        out = _topk(sg, **ROUTERS[router]).forward_native(x, logits.clone())
    assert torch.equal(plain.topk_ids, out.topk_ids) and torch.equal(plain.topk_weights, out.topk_weights)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_policy_translates_sglang_routing(sg, installed, router):
    """The hook translates SGLang's TopKConfig (groups, bias, sigmoid, renormalize, routed scale)
    into the RoutingSpec faithfully: ``cap`` with k' = k (the fast path) selects SGLang's experts
    with SGLang's weights."""
    x, logits = torch.randn(T, HIDDEN), _logits(14)
    plain = _topk(sg, **ROUTERS[router]).forward_native(x, logits.clone())
    installed(policy="cap", cap=K, empty_slots="minus_one")
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        out = _topk(sg, **ROUTERS[router]).forward_native(x, logits.clone())
    assert next(iter(runtime.current().layers.values())).paths == {T: "fast"}
    for a, b in zip(plain.topk_ids.tolist(), out.topk_ids.tolist()):
        assert set(a) == set(b)
    torch.testing.assert_close(plain.topk_weights.sort(-1).values, out.topk_weights.sort(-1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(policy="xshare", budget="6"), dict(policy="cap", cap=2, metrics=True)],
                         ids=["xshare", "cap+metrics"])
def test_hooked_routing_traces_as_one_graph(sg, installed, kw):
    """torch.compile(fullgraph=True) of SGLang's TopK with the hook: no graph break, i.e. no host
    sync (.item(), .tolist(), data-dependent Python branching) on the per-layer path."""
    installed(empty_slots="minus_one", **kw)
    tk = _topk(sg)
    x, logits = torch.randn(T, HIDDEN), _logits(15)
    eager = tk.forward_native(x, logits.clone())
    torch._dynamo.reset()
    compiled = torch.compile(tk.forward_native, backend="eager", fullgraph=True)
    out = compiled(x, logits.clone(), num_token_non_padded=torch.tensor(T))
    assert torch.equal(out.topk_ids, eager.topk_ids) and torch.equal(out.topk_weights, eager.topk_weights)
    torch._dynamo.reset()


def test_off_installs_nothing_and_is_bit_identical(sg, installed):
    orig = sg._post_process_topk_ids
    tk = _topk(sg)
    x, logits = torch.randn(T, HIDDEN), _logits(2)
    before = tk.forward_native(x, logits.clone())
    assert install.install(XShareServerConfig(policy="off")) is False
    assert sg._post_process_topk_ids is orig
    after = tk.forward_native(x, logits.clone())
    assert torch.equal(before.topk_ids, after.topk_ids) and torch.equal(before.topk_weights, after.topk_weights)


def test_metrics_only_passes_routing_through_bit_identical(sg, installed):
    tk = _topk(sg)
    x, logits = torch.randn(T, HIDDEN), _logits(3)
    before = tk.forward_native(x, logits.clone())
    installed(policy="off", metrics=True, metrics_interval=2)
    assert sg.select_experts is not install.installed_patches()[3].original
    for _ in range(2):
        with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
            after = tk.forward_native(x, logits.clone())
        assert torch.equal(before.topk_ids, after.topk_ids) and torch.equal(before.topk_weights, after.topk_weights)
    assert runtime.current().metrics.steps == 2 and runtime.current().metrics.flush() == {}  # nothing selected, nothing counted


def test_live_metrics_count_what_was_dispatched(sg, installed):
    """The fused metrics against an expectation built from the routed ids alone (not from the
    Selector): distinct experts, the busiest of 4 EP ranks, top-k's distinct experts, tokens."""
    from sglang.srt.runtime_context import get_parallel

    installed(policy="xshare", budget="6", empty_slots="minus_one", metrics=True, metrics_interval=1000)
    ep = get_parallel().moe_ep_size
    tk = _topk(sg)
    want = torch.zeros(8, dtype=torch.int64)
    for step in range(3):
        logits = _logits(40 + step)
        n = T - 3 * step
        with context.batch_scope(context.BatchInfo("decode", batch_size=n)):
            out = tk.forward_native(torch.randn(T, HIDDEN), logits.clone(), num_token_non_padded=torch.tensor(n))
        ids = out.topk_ids[:n]
        used = sorted(set(ids[ids >= 0].tolist()))
        top = sorted(set(torch.topk(logits[:n], K, dim=-1).indices.flatten().tolist()))
        per = E // ep
        peak = max(sum(1 for e in used if e // per == r) for r in range(ep))
        tpeak = max(sum(1 for e in top if e // per == r) for r in range(ep))
        short = int(((ids >= 0).sum(-1) < K).sum())
        want += torch.tensor([1, n, len(used), len(top), peak, tpeak, int((ids >= 0).sum()), short])
        assert (out.topk_ids[n:] == -1).all()
    got = runtime.current().metrics.flush()
    assert list(got) == [3]
    assert [got[3][f] for f in ("calls", "valid_tokens", "distinct", "topk_distinct", "peak", "topk_peak", "pairs",
                                "short_tokens")] == want.tolist()
    assert runtime.current().metrics.path_steps == {"policy": 3} and runtime.current().metrics.steps == 3


def test_uninstall_restores_sglang(sg, installed):
    orig = (sg._post_process_topk_ids, sg.select_experts, sg.TopK.__init__)
    installed(policy="xshare", budget="0.5")
    assert sg._post_process_topk_ids is not orig[0]
    install.uninstall()
    assert (sg._post_process_topk_ids, sg.select_experts, sg.TopK.__init__) == orig


def test_num_token_non_padded_from_forward_context(sg, installed):
    from sglang.srt.model_executor.forward_context import ForwardContext, set_forward_context

    cfg = installed(policy="xshare", budget="6", empty_slots="minus_one")
    tk = _topk(sg)
    x, logits = torch.randn(T, HIDDEN), _logits(4)
    n = torch.tensor(T - 5)
    logits[T - 5:] = float("nan")  # padding rows may hold anything
    prev = set_forward_context(ForwardContext(attn_backend=None, moe_num_token_non_padded=lambda: n))
    try:
        out = tk.forward_native(x, logits.clone())
    finally:
        set_forward_context(prev)
    ref = _selector(cfg)(logits, layer_id=3, num_token_non_padded=n)
    assert torch.equal(out.topk_ids.to(torch.int32), ref.topk_ids)
    assert (out.topk_ids[T - 5:] == -1).all()
    assert (out.topk_weights[T - 5:] == 0).all()
    assert torch.isfinite(out.topk_weights).all()


def _eplb_map(num_ranks: int = 4, redundant: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A placement with redundant copies: ``(p2l [P], logical_to_all_physical [E, P], num_valid [E])``.
    Not the identity on the first ``E`` slots, so a skipped logical -> physical remap shows."""
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(77))
    p2l = torch.cat([perm, torch.arange(redundant) * 3 % E])
    P = p2l.numel()
    l2all = torch.full((E, P), -1, dtype=torch.int64)
    for e in range(E):
        phys = torch.nonzero(p2l == e).flatten()
        l2all[e, : phys.numel()] = phys
    return p2l, l2all, (l2all != -1).sum(-1)


@pytest.mark.parametrize("algorithm", ["static", "dynamic"])
@pytest.mark.parametrize("mode", ["minus_one", "fill"])
def test_eplb_redundant_mapping_is_honoured(sg, installed, algorithm, mode):
    from sglang.srt.eplb.expert_location import compute_logical_to_rank_dispatch_physical_map
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    cfg = installed(policy="cap", cap=2, empty_slots=mode)
    p2l, l2all, nv = _eplb_map()
    P = p2l.numel()
    rank_map = None
    if algorithm == "static":
        rank_map = compute_logical_to_rank_dispatch_physical_map(
            logical_to_all_physical_map=l2all[None], ep_size=4, num_physical_experts=P, ep_rank=1)[0]
    info = ExpertLocationDispatchInfo(ep_dispatch_algorithm=algorithm, partial_logical_to_rank_dispatch_physical_map=rank_map,
                                      partial_logical_to_all_physical_map=l2all,
                                      partial_logical_to_all_physical_map_num_valid=nv, num_physical_experts=P)
    tk = _topk(sg)
    logits = _logits(5)
    out = tk.forward_native(torch.randn(T, HIDDEN), logits.clone(), expert_location_dispatch_info=info)
    assert next(iter(runtime.current().layers.values())).paths == {T: "fast" if algorithm == "static" else "general"}
    ref = _selector(cfg)(logits, layer_id=3)
    kept = ref.topk_ids >= 0
    assert not torch.equal(out.topk_ids[kept].long(), ref.topk_ids[kept].long())  # remapped: not the logical ids
    assert (out.topk_ids[kept] < P).all() and (out.topk_ids[kept] >= 0).all()
    assert torch.equal(p2l[out.topk_ids[kept].long()], ref.topk_ids[kept].long())  # right logical expert
    if algorithm == "static":
        assert torch.equal(out.topk_ids[kept].long(), rank_map[ref.topk_ids[kept].long()])
    if mode == "minus_one":
        assert (out.topk_ids[~kept] == -1).all()
    else:  # filled slots sit on a physical copy the token already uses, weight 0
        for t in range(T):
            used = set(out.topk_ids[t][kept[t]].tolist())
            assert set(out.topk_ids[t][~kept[t]].tolist()) <= used
        assert (out.topk_weights[~kept] == 0).all()
    torch.testing.assert_close(out.topk_weights[kept], ref.topk_weights[kept], rtol=0, atol=0)


@pytest.fixture
def eplb_metadata(sg):
    """Publish a real ExpertLocationMetadata (EPLB map with redundant experts) for layer 3."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, get_global_expert_location_metadata, \
        set_global_expert_location_metadata

    p2l, _, _ = _eplb_map()
    L = 4
    p2l_layers = p2l.repeat(L, 1)
    l2all = torch.full((L, E, p2l.numel()), -1, dtype=torch.int64)
    for layer in range(L):
        for e in range(E):
            phys = torch.nonzero(p2l_layers[layer] == e).flatten()
            l2all[layer, e, : phys.numel()] = phys
    md = ExpertLocationMetadata._init_raw(ep_size=4, physical_to_logical_map=p2l_layers, logical_to_all_physical_map=l2all)
    prev = get_global_expert_location_metadata()
    set_global_expert_location_metadata(md, allow_overwrite=True)
    yield md
    set_global_expert_location_metadata(prev, allow_overwrite=True)


@pytest.mark.parametrize("algorithm", ["static", "dynamic"])
def test_xshare_ep_chooses_physical_copies_of_sglang_placement(sg, installed, eplb_metadata, algorithm):
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    md = eplb_metadata
    cfg = installed(policy="xshare_ep", budget="10", empty_slots="minus_one")
    info = ExpertLocationDispatchInfo(
        ep_dispatch_algorithm=algorithm, partial_logical_to_rank_dispatch_physical_map=md.logical_to_all_physical_map[3, :, 0],
        partial_logical_to_all_physical_map=md.logical_to_all_physical_map[3],
        partial_logical_to_all_physical_map_num_valid=md.logical_to_all_physical_map_num_valid[3],
        num_physical_experts=md.num_physical_experts)
    tk = _topk(sg)
    logits = _logits(6)
    out = tk.forward_native(torch.randn(T, HIDDEN), logits.clone(), expert_location_dispatch_info=info)
    placement = Placement.from_map(E, 4, md.physical_to_logical_map_cpu[3])
    ref = _selector(cfg, placement)(logits, layer_id=3)
    assert ref.physical_ids is not None
    assert torch.equal(out.topk_ids.to(torch.int32), ref.physical_ids)  # xshare_ep's copies, not SGLang's remap
    lp = next(iter(runtime.current().layers.values()))
    assert lp.placement.physical_to_logical.data_ptr() == md.physical_to_logical_map[3].data_ptr()  # a live view
    kept = ref.topk_ids >= 0
    assert torch.equal(md.physical_to_logical_map[3][out.topk_ids[kept].long()], ref.topk_ids[kept].long())


class _RoutedExpertsCapture:
    """SGLang's routed-experts capturer (``--enable-return-routed-experts``) as far as the router
    sees it: ``capture(layer_id, topk_indices)`` into SGLang's own device cache
    (``BaseDeviceCache``; the real capturer's host cache needs CUDA). Counts the calls."""

    def __init__(self):
        from sglang.srt.state_capturer.base import BaseDeviceCache

        self.cache = BaseDeviceCache(T, 8, K, "cpu", name="routed_experts")
        self.calls = 0

    def capture(self, layer_id, topk_indices):
        self.calls += 1
        self.cache.capture(layer_id, topk_indices)


@pytest.mark.parametrize("policy,algorithm,mode,path", [
    ("xshare_ep", "static", "minus_one", "fast"),   # xshare_ep's own physical copies
    ("xshare_ep", "dynamic", "minus_one", "fast"),
    ("xshare_ep", "static", "distinct", "general"),  # physical ids through SGLang's post-processing
    ("xshare", "static", "minus_one", "fast"),      # the rank's dispatch map, applied in the kernel
    ("cap", "static", "minus_one", "fast"),         # the same, with empty slots
    ("xshare", "dynamic", "minus_one", "general"),  # SGLang's own remap after ours
])
def test_routed_experts_capture_gets_logical_ids_under_eplb(sg, installed, eplb_metadata, policy, algorithm, mode, path):
    """``return_routed_experts`` reports logical experts: SGLang captures the ids before its
    logical -> physical remap. Where the hook dispatches physical slots itself (``xshare_ep``, the
    mapped fast path) or hands physical ids to SGLang's post-processing, the capture must still get
    the logical expert of every dispatched slot (``-1`` where the slot is empty), once per call.
    With physical ids captured, a user would read slot numbers (some >= E) as experts."""
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo
    from sglang.srt.state_capturer.routed_experts import get_global_experts_capturer, set_global_experts_capturer

    md = eplb_metadata
    installed(policy=policy, empty_slots=mode, **(dict(cap=2) if policy == "cap" else dict(budget="8")))
    info = ExpertLocationDispatchInfo(
        ep_dispatch_algorithm=algorithm,
        partial_logical_to_rank_dispatch_physical_map=md.logical_to_all_physical_map[3, :, 0] if algorithm == "static" else None,
        partial_logical_to_all_physical_map=md.logical_to_all_physical_map[3],
        partial_logical_to_all_physical_map_num_valid=md.logical_to_all_physical_map_num_valid[3],
        num_physical_experts=md.num_physical_experts)
    cap, prev = _RoutedExpertsCapture(), get_global_experts_capturer()
    set_global_experts_capturer(cap)
    try:
        with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
            out = _topk(sg).forward_native(torch.randn(T, HIDDEN), _logits(26).clone(), expert_location_dispatch_info=info)
    finally:
        set_global_experts_capturer(prev)
    assert next(iter(runtime.current().layers.values())).paths == {T: path}
    assert cap.calls == 1
    got = cap.cache.buffer[:T, 3].long()
    p2l = md.physical_to_logical_map[3]
    kept = out.topk_ids >= 0
    slot = out.topk_ids[kept].long()
    assert kept.sum(-1).min() >= 1 and (slot != p2l[slot]).any()  # physical slot numbers are not the experts
    assert ((got >= -1) & (got < E)).all()
    assert torch.equal(got[kept], p2l[slot])
    if policy == "cap":
        assert (~kept).any() and (got[~kept] == -1).all()


def test_eplb_rebalance_reaches_xshare_ep(sg, installed, eplb_metadata):
    """SGLang's EPLB rewrites the placement in place (``ExpertLocationMetadata.update``); xshare_ep
    keeps choosing the physical copies itself and dispatches on the *new* map afterwards."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    md = eplb_metadata
    installed(policy="xshare_ep", budget="10", empty_slots="minus_one")

    def info():
        return ExpertLocationDispatchInfo(
            ep_dispatch_algorithm="static", partial_logical_to_rank_dispatch_physical_map=md.logical_to_all_physical_map[3, :, 0],
            partial_logical_to_all_physical_map=md.logical_to_all_physical_map[3],
            partial_logical_to_all_physical_map_num_valid=md.logical_to_all_physical_map_num_valid[3],
            num_physical_experts=md.num_physical_experts)

    tk = _topk(sg)
    logits = _logits(19)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        tk.forward_native(torch.randn(T, HIDDEN), logits.clone(), expert_location_dispatch_info=info())
    old = md.physical_to_logical_map[3].clone()
    g = torch.Generator().manual_seed(5)
    P = old.numel()
    new_map = torch.cat([torch.randperm(E, generator=g), torch.randint(0, E, (P - E,), generator=g)])[torch.randperm(P, generator=g)]
    L = md.num_layers
    l2all = torch.full((L, E, P), -1, dtype=torch.int64)
    for layer in range(L):
        for e in range(E):
            phys = torch.nonzero(new_map == e).flatten()
            l2all[layer, e, : phys.numel()] = phys
    other = ExpertLocationMetadata._init_raw(ep_size=4, physical_to_logical_map=new_map.repeat(L, 1),
                                             logical_to_all_physical_map=l2all)
    md.update(other, update_layer_ids=[3])  # SGLang's own rebalance path (the patched method)
    assert torch.equal(md.physical_to_logical_map[3], new_map) and not torch.equal(old, new_map)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        out = tk.forward_native(torch.randn(T, HIDDEN), logits.clone(), expert_location_dispatch_info=info())
    kept = out.topk_ids >= 0
    logical = new_map[out.topk_ids[kept].long()]
    ref = _selector(XShareServerConfig(policy="xshare_ep", budget="10"), Placement.from_map(E, 4, new_map))(logits, layer_id=3)
    assert torch.equal(out.topk_ids.to(torch.int32), ref.physical_ids)  # the copies a fresh placement would choose
    assert torch.equal(logical, ref.topk_ids[ref.topk_ids >= 0].long())


def test_xshare_ep_against_independent_expectation(sg, installed, eplb_metadata):
    """xshare_ep through the hook, checked without the Selector: dispatched physical slots hold
    the logical experts, every token keeps its own top-1, and the busiest EP rank reads at most
    ceil(budget / ranks) slots (a selector that lost the placement would not know the ranks)."""
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    md = eplb_metadata
    budget, R = 28, 4
    installed(policy="xshare_ep", budget=str(budget), empty_slots="minus_one")
    info = ExpertLocationDispatchInfo(
        ep_dispatch_algorithm="static", partial_logical_to_rank_dispatch_physical_map=md.logical_to_all_physical_map[3, :, 0],
        partial_logical_to_all_physical_map=md.logical_to_all_physical_map[3],
        partial_logical_to_all_physical_map_num_valid=md.logical_to_all_physical_map_num_valid[3],
        num_physical_experts=md.num_physical_experts)
    logits = _logits(16)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        out = _topk(sg).forward_native(torch.randn(T, HIDDEN), logits.clone(), expert_location_dispatch_info=info)
    p2l = md.physical_to_logical_map[3]
    per_rank = md.num_physical_experts // R
    kept = out.topk_ids >= 0
    logical = torch.where(kept, p2l[out.topk_ids.clamp(min=0).long()], -1)
    top1 = logits.argmax(-1)
    assert (logical == top1[:, None]).any(-1).all()  # warm-up: each token keeps its own best expert
    warm = len(set(top1.tolist()))
    cap = -(-max(budget, warm) // R)
    assert warm <= cap  # the data leaves room: the bound below is the policy's, not the warm-up's
    slots = set(out.topk_ids[kept].tolist())
    loads = [sum(1 for s_ in slots if s_ // per_rank == r) for r in range(R)]
    assert max(loads) <= cap, loads
    assert len({int(p2l[s_]) for s_ in slots}) <= budget + R  # fill-to-peak stays within one slot per rank
    w = torch.softmax(logits, -1).gather(1, logical.clamp(min=0)) * kept
    torch.testing.assert_close(out.topk_weights, w / w.sum(-1, keepdim=True))


def test_single_token_batches_step_aside(sg, installed):
    """``--xshare-min-tokens auto``: a one-token decode batch has nothing to share, so a batch
    policy leaves SGLang's routing untouched there (bit for bit) and applies from two tokens on."""
    x, logits = torch.randn(1, HIDDEN), _logits(17, n=1)
    tk = _topk(sg)
    plain = tk.forward_native(x, logits.clone())
    installed(policy="xshare", budget="0.5", empty_slots="minus_one")
    with context.batch_scope(context.BatchInfo("decode", batch_size=1)):
        one = tk.forward_native(x, logits.clone())
    assert torch.equal(one.topk_ids, plain.topk_ids) and torch.equal(one.topk_weights, plain.topk_weights)
    two = torch.cat([logits, _logits(18, n=1)])
    with context.batch_scope(context.BatchInfo("decode", batch_size=2)):
        out = tk.forward_native(torch.randn(2, HIDDEN), two.clone())
    union = set(torch.topk(two, K, dim=-1).indices.flatten().tolist())
    assert len(set(out.topk_ids[out.topk_ids >= 0].tolist())) == -(-len(union) // 2)  # half of top-k's experts
    assert next(iter(runtime.current().layers.values())).paths == {1: "sglang", 2: "fast"}
    install.uninstall()
    installed(policy="xshare", budget="0.5", empty_slots="minus_one", min_tokens="1")
    with context.batch_scope(context.BatchInfo("decode", batch_size=1)):
        forced = _topk(sg).forward_native(x, logits.clone())
    assert (forced.topk_ids == -1).any()


class _OtherRankOfEPGroup:
    """The collective of SGLang's MoE EP group seen from rank 0 of two (a real group needs two
    processes and a GPU; the all-reduce through SGLang's GroupCoordinator runs in the GPU servers):
    ``all_reduce`` sums this rank's tensor with the peer's, and records what each call sent."""

    world_size = 2

    def __init__(self):
        self.sent: list[torch.Tensor] = []
        self.peer: torch.Tensor | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.sent.append(t.clone())
        return t if self.peer is None else t + self.peer


@pytest.mark.parametrize("policy", ["xshare", "oea", "xshare_ep"])
def test_ep_global_selects_from_every_ranks_tokens(sg, installed, monkeypatch, policy):
    """``--xshare-ep-global`` when SGLang scatters the MoE input over the EP ranks (DP attention,
    DeepEP): this rank's routing is the single-process selection over *both* ranks' tokens (rows of
    this rank), every call joins the collective -- also one that does not select (a prefill batch),
    with zeros of exactly the shape and dtype a selecting call sends, else the two ranks' collectives
    would not match -- and one-token batches select too (the path must not depend on the local size)."""
    import sglang.srt.layers.moe.utils as moe_utils
    import sglang.srt.runtime_context as rc

    grp = _OtherRankOfEPGroup()
    monkeypatch.setattr(moe_utils, "is_moe_input_scattered_across_dp_ranks", lambda: True)
    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(moe_ep_group=grp))
    kw = dict(budget="0.5") if policy != "oea" else dict(warmup_k0=1)
    cfg = installed(policy=policy, empty_slots="minus_one", ep_global=True, **kw)
    tk = _topk(sg)
    mine, theirs = _logits(41, n=T // 2), _logits(42, n=T // 2)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T // 2)):
        tk.forward_native(torch.randn(T // 2, HIDDEN), theirs.clone())  # the peer's statistics
        grp.peer = grp.sent[-1]
        out = tk.forward_native(torch.randn(T // 2, HIDDEN), mine.clone())
    ref = _selector(cfg)(torch.cat([mine, theirs]), layer_id=3)
    assert torch.equal(out.topk_ids.to(torch.int32), ref.topk_ids[: T // 2])
    torch.testing.assert_close(out.topk_weights, ref.topk_weights[: T // 2], rtol=0, atol=0)
    local = _selector(cfg)(mine.clone(), layer_id=3)
    assert not torch.equal(local.topk_ids, ref.topk_ids[: T // 2])  # the peer's tokens changed the choice
    grp.peer = None
    with context.batch_scope(context.BatchInfo("prefill", batch_size=T)):
        tk.forward_native(torch.randn(T, HIDDEN), _logits(43).clone())  # SGLang's routing, still the collective
    with context.batch_scope(context.BatchInfo("decode", batch_size=1)):
        one = tk.forward_native(torch.randn(1, HIDDEN), _logits(44, n=1).clone())
    assert len(grp.sent) == 4
    assert {(t.dtype, tuple(t.shape)) for t in grp.sent} == {(grp.sent[0].dtype, tuple(grp.sent[0].shape))}
    assert torch.count_nonzero(grp.sent[2]) == 0  # the idle call adds nothing
    assert next(iter(runtime.current().layers.values())).paths[1] == "fast" and (one.topk_ids >= 0).any()


@pytest.mark.parametrize("force", [None, "legacy"])
def test_ep_global_joins_each_collective_once_per_call_on_every_path(sg, installed, monkeypatch, tmp_path, force):
    """``--xshare-ep-global``: a rank with tokens must run exactly the collectives a rank without
    tokens runs (one per policy, main and each A/B arm, per layer call), else the ranks' all-reduces
    pair up wrongly or one rank waits forever. Also on the ``legacy`` path (ROCm, router logit
    partials), where the selection happens at SGLang's post-processing seam: the call joins there,
    not again before it. Its routing equals the fast path's."""
    import sglang.srt.layers.moe.utils as moe_utils
    import sglang.srt.runtime_context as rc

    grp = _OtherRankOfEPGroup()
    monkeypatch.setattr(moe_utils, "is_moe_input_scattered_across_dp_ranks", lambda: True)
    par = SimpleNamespace(moe_ep_group=grp, moe_ep_size=2, tp_group=SimpleNamespace(world_size=1))
    monkeypatch.setattr(rc, "get_parallel", lambda: par)
    monkeypatch.setattr(sg, "get_parallel", lambda: par)
    if force:
        monkeypatch.setenv(runtime.FORCE_PATH_ENV, force)
    sw = tmp_path / "arm"
    sw.write_text("1")
    installed(policy="xshare", budget="0.5", empty_slots="minus_one", ep_global=True, ab_switch=str(sw),
              ab_arms=("policy=oea,warmup-k0=1",))
    tk = _topk(sg)
    logits = _logits(27)
    outs = []
    for n in (T, 1):
        before = len(grp.sent)
        with context.batch_scope(context.BatchInfo("decode", batch_size=n)):
            outs.append(tk.forward_native(torch.randn(n, HIDDEN), logits[:n].clone()))
        assert len(grp.sent) - before == 2, (n, len(grp.sent) - before)  # xshare's and the oea arm's
    assert next(iter(runtime.current().layers.values())).paths == {T: force or "fast", 1: force or "fast"}
    before = len(grp.sent)
    tk.empty_topk_output(torch.device("cpu"))  # what the other rank runs when it has no tokens
    assert len(grp.sent) - before == 2
    ref = _selector(XShareServerConfig(policy="xshare", budget="0.5"))(logits, layer_id=3)
    assert torch.equal(outs[0].topk_ids.to(torch.int32), ref.topk_ids)
    torch.testing.assert_close(outs[0].topk_weights, ref.topk_weights, rtol=0, atol=0)


def test_legacy_path_drops_the_routers_stale_packed_ids(sg, installed, monkeypatch):
    """SGLang's fused router can also emit FlashInfer's packed ids (``fused_gate_packed_ids``,
    ``StandardTopKOutputPacked``; a CUDA kernel, so here SGLang's own ``select_experts`` with the
    pack added as the kernel writes it: ``expert << 16 | bf16 weight bits``). On the ``legacy`` path
    the policy rewrites ids and weights at the post-processing seam, after the pack: a consumer of
    the packed ids would run SGLang's routing. The hook must hand on the seam's routing only."""
    monkeypatch.setenv(runtime.FORCE_PATH_ENV, "legacy")
    real = sg.select_experts

    def packing_router(*args, **kw):
        out = real(*args, **kw)
        bits = out.topk_weights.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
        return sg.StandardTopKOutputPacked(out.topk_weights, out.topk_ids, out.router_logits,
                                           (out.topk_ids.to(torch.int32) << 16) | bits)

    cfg = installed(policy="xshare", budget="6", empty_slots="minus_one")
    select = functools.partial(route.select_experts, packing_router)
    tc = _topk(sg).topk_config
    tc.torch_native = True  # what TopK.forward_native sets (the CPU router)
    logits = _logits(28)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        out = select(torch.randn(T, HIDDEN), logits.clone(), tc, layer_id=3)
    assert next(iter(runtime.current().layers.values())).paths == {T: "legacy"}
    ref = _selector(cfg)(logits, layer_id=3)
    assert torch.equal(out.topk_ids.to(torch.int32), ref.topk_ids)
    assert getattr(out, "packed_topk_ids", None) is None and type(out) is sg.StandardTopKOutput
    install.uninstall()
    plain = functools.partial(route.select_experts, packing_router)(torch.randn(T, HIDDEN), logits.clone(), tc, layer_id=3)
    assert plain.packed_topk_ids is not None  # without the hook SGLang's pack stays (it is SGLang's routing)


def test_ep_global_rank_without_tokens_joins_the_all_reduce(sg, installed, monkeypatch, tmp_path):
    """``--xshare-ep-global`` under DP attention / DeepEP: a rank whose MoE input is empty does not
    route (SGLang's model calls ``TopK.empty_topk_output``); it must still join the layer's
    all-reduce once, with zeros shaped as the other rank's, else the rank with tokens waits forever
    (a DP-attention + DeepEP server hung so at its first prefill). Also when the layer has not routed
    on this rank yet: built here, with the expert count of SGLang's expert-location metadata.
    Draft layers and servers without the flag send nothing."""
    import sglang.srt.eplb.expert_location as el
    import sglang.srt.layers.moe.utils as moe_utils
    import sglang.srt.runtime_context as rc

    grp = _OtherRankOfEPGroup()
    monkeypatch.setattr(moe_utils, "is_moe_input_scattered_across_dp_ranks", lambda: True)
    par = SimpleNamespace(moe_ep_group=grp, moe_ep_size=2, tp_group=SimpleNamespace(world_size=1))
    monkeypatch.setattr(rc, "get_parallel", lambda: par)
    monkeypatch.setattr(sg, "get_parallel", lambda: par)  # empty_topk_output's allocation context
    # the metadata gives the expert count; no EPLB map for this layer (num_layers 0): plain EP placement
    monkeypatch.setattr(el, "get_global_expert_location_metadata",
                        lambda: SimpleNamespace(num_logical_experts=E, num_layers=0))
    installed(policy="xshare", budget="0.5", empty_slots="minus_one", ep_global=True)
    fresh = _topk(sg, layer_id=5)  # no routing call on this rank yet
    out = fresh.empty_topk_output(torch.device("cpu"))
    assert out.topk_ids.shape == (0, K) and len(grp.sent) == 1 and torch.count_nonzero(grp.sent[0]) == 0
    tk = _topk(sg)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        tk.forward_native(torch.randn(T, HIDDEN), _logits(45).clone())  # a selecting call: what the peer sends
    with context.batch_scope(context.BatchInfo("idle", batch_size=0)):
        tk.empty_topk_output(torch.device("cpu"))
        tk.empty_topk_output(torch.device("cpu"), layer_id=3)
    assert len(grp.sent) == 4 and len(runtime.current().layers) == 2
    assert {(t.dtype, tuple(t.shape)) for t in grp.sent} == {(grp.sent[1].dtype, tuple(grp.sent[1].shape))}
    assert torch.count_nonzero(grp.sent[2]) == 0 and torch.count_nonzero(grp.sent[3]) == 0
    _topk(sg, layer_id=7, is_draft=True).empty_topk_output(torch.device("cpu"))
    assert len(grp.sent) == 4  # a draft layer has no global statistics
    installed(policy="xshare", budget="0.5", empty_slots="minus_one")
    _topk(sg).empty_topk_output(torch.device("cpu"))
    assert len(grp.sent) == 4
    # A/B arms (--xshare-ab-arm) each run their own collective: the oea arm joins too, cap has none
    installed(policy="xshare", budget="0.5", empty_slots="minus_one", ep_global=True, ab_switch=str(tmp_path / "a"),
              ab_arms=("policy=oea", "policy=cap,cap=2"))
    _topk(sg, layer_id=6).empty_topk_output(torch.device("cpu"))
    assert len(grp.sent) == 6


def _ep_global_rank(rank: int, port: int, queue) -> None:
    """One of two spawned EP ranks (gloo; SGLang's GroupCoordinator needs CUDA for a group of two,
    so the MoE EP group is ``torch.distributed``'s world behind SGLang's ``all_reduce`` signature).
    Each step is a forward of SGLang's real ``TopK`` as a DP-attention + DeepEP server runs it."""
    from datetime import timedelta

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=20))
        from sglang.srt.layers.moe import topk as sg_topk
        import sglang.srt.layers.moe.utils as moe_utils
        import sglang.srt.runtime_context as rc
        from sglang.srt.server_args import ServerArgs

        rc.publish(ServerArgs(model_path="dummy", device="cpu"), role="test",
                   ranks=rc.SpawnRanks(world_rank=0, dp_rank=None))

        class Group:  # SGLang's GroupCoordinator.all_reduce: returns the sum over the group
            world_size = 2

            def all_reduce(self, t):
                dist.all_reduce(t)
                return t

        par = SimpleNamespace(moe_ep_group=Group(), moe_ep_size=2, tp_group=SimpleNamespace(world_size=1))
        moe_utils.is_moe_input_scattered_across_dp_ranks = lambda: True
        rc.get_parallel = sg_topk.get_parallel = lambda: par
        install.install(XShareServerConfig(policy="xshare", budget="0.5", empty_slots="minus_one", ep_global=True))
        layers = [sg_topk.TopK(top_k=K, renormalize=True, layer_id=i) for i in (3, 4)]
        mine = _logits(51 + rank, n=T // 2)
        outs = []

        def decode():
            with context.batch_scope(context.BatchInfo("decode", batch_size=T // 2)):
                outs.append([tk.forward_native(torch.randn(T // 2, HIDDEN), mine.clone()).topk_ids for tk in layers[:1]])

        decode()
        # rank 0 prefills while rank 1 has no request: SGLang's model calls empty_topk_output there;
        # layer 4 has never routed on rank 1
        with context.batch_scope(context.BatchInfo("prefill" if rank == 0 else "idle", batch_size=T if rank == 0 else 0)):
            for tk in layers:
                if rank == 0:
                    tk.forward_native(torch.randn(T, HIDDEN), _logits(60).clone())
                else:
                    tk.empty_topk_output(torch.device("cpu"))
        decode()
        queue.put((rank, [o[0] for o in outs]))
    except Exception as e:  # report, do not hang the parent
        queue.put((rank, repr(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ep_global_two_ranks_one_without_tokens_do_not_hang():
    """``--xshare-ep-global`` with two real processes and a real collective: rank 1 has no tokens
    while rank 0 prefills (DP attention); both then decode again and choose one expert set from both
    ranks' tokens. Without rank 1 joining the all-reduce in ``empty_topk_output``, rank 0 waits
    until the collective times out (a DP-attention + DeepEP server hung so at its first request)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ep_global_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert not isinstance(got[0], str) and not isinstance(got[1], str), got
    cfg = XShareServerConfig(policy="xshare", budget="0.5", empty_slots="minus_one")
    ref = _selector(cfg)(torch.cat([_logits(51, n=T // 2), _logits(52, n=T // 2)]), layer_id=3).topk_ids
    assert not torch.equal(_selector(cfg)(_logits(51, n=T // 2), layer_id=3).topk_ids, ref[: T // 2])  # not local
    for step in (0, 1):  # before and after the prefill / idle step: the same global selection
        assert torch.equal(got[0][step].to(torch.int32), ref[: T // 2])
        assert torch.equal(got[1][step].to(torch.int32), ref[T // 2:])


def test_ab_arms_compare_several_policies_in_one_server(sg, installed, tmp_path):
    """``--xshare-ab-arm``: more policies beside the main one, every one computed on every batch; the
    switch file's number picks whose routing the experts get (0 = SGLang's, 1 = the main policy,
    2.. = the arms), each exactly what that policy alone would route. Each arm counts its own live
    metrics (rank label ``R/armN``). A one-token batch: the batch policies step aside, ``cap``
    (min tokens 1) still selects. A number beyond the arms reads as SGLang's."""
    import os

    from sglang_xshare.serving.cli_flags import parse_xshare_argv

    sw = tmp_path / "arm"
    sw.write_text("0")
    cfg = installed(policy="xshare", budget="8", empty_slots="minus_one", ab_switch=str(sw), metrics=True,
                    metrics_interval=1000, ab_arms=("policy=oea,warmup-k0=2", "policy=cap,cap=2"))
    main, oea, cap = arm_configs(cfg)
    assert (oea.policy, oea.warmup_k0, cap.policy, cap.cap) == ("oea", 2, "cap", 2)
    assert parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch", str(sw),
                              "--xshare-ab-arm", "policy=oea,warmup-k0=2", "--xshare-ab-arm", "policy=cap,cap=2",
                              "--xshare-empty-slots", "minus_one", "--xshare-metrics", "--xshare-metrics-interval",
                              "1000"]) == cfg
    x, logits = torch.randn(T, HIDDEN), _logits(23)
    plain = _topk(sg).forward_native(x, logits.clone())
    refs = [_selector(c)(logits, layer_id=3) for c in (main, oea, cap)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(refs[a].topk_ids, refs[b].topk_ids)  # the arms differ on this batch
    tk = _topk(sg)
    mtime = [sw.stat().st_mtime_ns]

    def step(n=T):
        with context.batch_scope(context.BatchInfo("decode", batch_size=n)):
            return tk.forward_native(x[:n], logits[:n].clone())

    def write(text):
        sw.write_text(text)
        mtime[0] += 1_000_000
        os.utime(sw, ns=(mtime[0], mtime[0]))
        step()  # read at this step's end

    def routed_by(out, ref):
        return torch.equal(out.topk_ids.to(torch.int32), ref.topk_ids) and torch.equal(out.topk_weights, ref.topk_weights)

    assert torch.equal(step().topk_ids, plain.topk_ids)
    for arm, ref in ((1, refs[0]), (2, refs[1]), (3, refs[2])):
        write(str(arm))
        assert runtime.current().ab.switch.arm == arm and routed_by(step(), ref), arm
    write("9")  # no such arm
    out = step()
    assert runtime.current().ab.switch.arm == 0 and torch.equal(out.topk_ids, plain.topk_ids)
    one_plain = _topk(sg).forward_native(x[:1], logits[:1].clone())
    write("3")
    assert routed_by(step(1), _selector(cap)(logits[:1], layer_id=3))  # cap selects one token
    write("1")
    assert torch.equal(step(1).topk_ids, one_plain.topk_ids)  # xshare steps aside at one token
    counts = [m.flush()[3] for m in (runtime.current().metrics, *runtime.current().ab.arm_metrics)]
    assert [m.rank for m in runtime.current().ab.arm_metrics] == ["0/arm2", "0/arm3"]
    calls = [c["calls"] for c in counts]
    assert calls[0] == calls[1] and calls[2] > calls[1]  # every arm ran every batch; cap also the one-token ones
    per_call = [c["distinct"] / c["calls"] for c in counts[:2]]
    assert per_call == [len(set(r.topk_ids[r.topk_ids >= 0].tolist())) for r in refs[:2]]


def test_experts_not_divisible_by_ep_size_without_a_map(sg, installed, monkeypatch):
    """A MoE EP size that does not divide the experts, and no EPLB map: ``xshare_ep`` cannot know
    the ranks, so the layer's build (model load) fails naming ``--ep-size``; the other policies
    route as usual and warn that the busiest-rank metric counts one group."""
    import logging

    import sglang.srt.runtime_context as rc

    from sglang_xshare.config import XShareConfigError

    par = SimpleNamespace(moe_ep_size=3, tp_group=SimpleNamespace(world_size=1))
    monkeypatch.setattr(rc, "get_parallel", lambda: par)
    installed(policy="xshare_ep", budget="8", empty_slots="minus_one")
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)), \
            pytest.raises(XShareConfigError, match="--ep-size.*32 experts are not divisible by EP size 3"):
        _topk(sg).forward_native(torch.randn(T, HIDDEN), _logits(29).clone())
    install.uninstall()
    cfg = installed(policy="xshare", budget="8", empty_slots="minus_one")
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("sglang_xshare.serving")
    log.addHandler(handler)
    try:
        with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
            out = _topk(sg).forward_native(torch.randn(T, HIDDEN), _logits(29).clone())
    finally:
        log.removeHandler(handler)
    assert torch.equal(out.topk_ids.to(torch.int32), _selector(cfg)(_logits(29), layer_id=3).topk_ids)
    assert any("not divisible by the MoE EP size 3" in m for m in seen), seen
    par.moe_ep_size = 4
    install.uninstall()
    installed(policy="xshare_ep", budget="8", empty_slots="minus_one")
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        _topk(sg).forward_native(torch.randn(T, HIDDEN), _logits(29).clone())
    assert next(iter(runtime.current().layers.values())).placement.num_ranks == 4


def test_ab_switch_gives_the_experts_the_arm_the_file_names(sg, installed, tmp_path):
    """``--xshare-ab-switch``: both routings are computed, the file (read at step ends) picks the one
    the experts get; the device flag is flipped in place (captured graphs keep reading it)."""
    import os

    from sglang_xshare.config import XShareConfigError
    from sglang_xshare.serving.cli_flags import parse_xshare_argv

    x, logits = torch.randn(T, HIDDEN), _logits(21)
    plain = _topk(sg).forward_native(x, logits.clone())
    sw = tmp_path / "arm"
    sw.write_text("0")
    cfg = installed(policy="xshare", budget="8", empty_slots="minus_one", ab_switch=str(sw), metrics=True,
                    metrics_interval=1000)
    ref = _selector(cfg)(logits, layer_id=3)
    assert not torch.equal(ref.topk_ids, plain.topk_ids.to(torch.int32))  # the two arms differ here
    tk = _topk(sg)
    mtime = [sw.stat().st_mtime_ns]

    def step():
        with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
            return tk.forward_native(x, logits.clone())

    def write(text):
        sw.write_text(text)
        mtime[0] += 1_000_000
        os.utime(sw, ns=(mtime[0], mtime[0]))  # a new modification time even on coarse clocks

    def is_sglang(out):
        return torch.equal(out.topk_ids, plain.topk_ids) and torch.equal(out.topk_weights, plain.topk_weights)

    def is_policy(out):
        return torch.equal(out.topk_ids.to(torch.int32), ref.topk_ids) and torch.equal(out.topk_weights, ref.topk_weights)

    assert is_sglang(step())
    flag = runtime.current().ab.switch.on_flag(logits.device)
    write("1")
    assert is_sglang(step())  # read at that step's end ...
    assert is_policy(step()) and bool(flag) and runtime.current().ab.switch.on_flag(logits.device) is flag  # ... in place
    write("policy")
    assert is_policy(step())  # same arm: nothing flips
    write("0")
    with context.batch_scope(context.BatchInfo("idle", batch_size=0)):  # a DP rank without requests reads it too
        pass
    assert not bool(flag)
    write("1")
    assert is_sglang(step())
    assert is_policy(step())
    write("0")
    step()
    assert is_sglang(step()) and not bool(flag) and runtime.current().ab.switch.flips == 4
    assert runtime.current().metrics.path_steps == {"ab_sglang": 4, "policy": 4}  # steps 1, 2, 5, 8 / 3, 4, 6, 7
    write("1")
    step()
    assert is_policy(step()) and bool(flag)  # the policy routes when the file goes away ...
    sw.unlink()
    step()  # ... read at this step's end
    assert is_sglang(step()) and not bool(flag)  # no file: SGLang's routing
    with pytest.raises(XShareConfigError, match="--xshare-ab-switch"):
        XShareServerConfig(policy="off", ab_switch=str(sw)).validate()
    with pytest.raises(XShareConfigError, match="--xshare-ab-switch"):
        XShareServerConfig(policy="xshare", budget="8", ab_switch=str(tmp_path / "no" / "arm")).validate()
    assert parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch",
                              str(sw)]).ab_switch == str(sw)


def test_fused_shared_expert_columns_untouched(sg, installed):
    from sglang.srt.configs.shared_experts import SharedExpertsConfig
    from sglang.srt.runtime_context import get_model

    with get_model().override(shared_experts=SharedExpertsConfig(num_fused_shared_experts=1)):
        tk = _topk(sg)
    assert tk.topk_config.top_k == K + 1 and tk.topk_config.num_shared_topk_slots == 1
    x, logits = torch.randn(T, HIDDEN), _logits(7)
    plain = tk.forward_native(x, logits.clone())
    cfg = installed(policy="xshare", budget="6", empty_slots="minus_one")
    out = tk.forward_native(x, logits.clone())
    ref = _selector(cfg)(logits, layer_id=3)
    assert out.topk_ids.shape == (T, K + 1)
    assert torch.equal(out.topk_ids[:, K], plain.topk_ids[:, K])
    assert torch.equal(out.topk_weights[:, K], plain.topk_weights[:, K])
    assert torch.equal(out.topk_ids[:, :K].to(torch.int32), ref.topk_ids)


def test_ab_switch_and_arms_at_the_post_processing_seam(sg, installed, tmp_path):
    """Fused shared-expert columns take the ``legacy`` path (SGLang routes, the policy applies at the
    post-processing seam): the A/B switch and ``--xshare-ab-arm`` must pick there too, else both
    arms of a measurement would run the policy."""
    import os

    from sglang.srt.configs.shared_experts import SharedExpertsConfig
    from sglang.srt.runtime_context import get_model

    with get_model().override(shared_experts=SharedExpertsConfig(num_fused_shared_experts=1)):
        tk = _topk(sg)
    x, logits = torch.randn(T, HIDDEN), _logits(7)
    plain = tk.forward_native(x, logits.clone())
    sw = tmp_path / "arm"
    sw.write_text("0")
    cfg = installed(policy="xshare", budget="6", empty_slots="minus_one", ab_switch=str(sw),
                    ab_arms=("policy=cap,cap=2",))
    refs = [_selector(c)(logits, layer_id=3).topk_ids for c in arm_configs(cfg)]

    def step():
        with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
            return tk.forward_native(x, logits.clone())

    out = step()
    assert next(iter(runtime.current().layers.values())).paths[T] == "legacy"
    assert torch.equal(out.topk_ids, plain.topk_ids) and torch.equal(out.topk_weights, plain.topk_weights)
    for arm, ref in ((1, refs[0]), (2, refs[1])):
        sw.write_text(str(arm))
        os.utime(sw, ns=(10**18 + arm, 10**18 + arm))
        step()  # read at this step's end
        out = step()
        assert torch.equal(out.topk_ids[:, :K].to(torch.int32), ref), arm
        assert torch.equal(out.topk_ids[:, K], plain.topk_ids[:, K])  # the shared column stays


def test_routed_scaling_factor_applied_like_sglang(sg, installed):
    tk = _topk(sg, routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)
    x, logits = torch.randn(T, HIDDEN), _logits(8)
    plain = tk.forward_native(x, logits.clone())
    assert plain.topk_weights.sum(-1).allclose(torch.full((T,), 2.5))  # SGLang folds the factor in
    installed(policy="cap", cap=2, empty_slots="minus_one")
    out = tk.forward_native(x, logits.clone())
    kept = out.topk_ids >= 0
    assert kept.sum(-1).eq(2).all()
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.full((T,), 2.5))  # renormalised, then scaled
    p = torch.softmax(logits, -1).gather(1, out.topk_ids[:, :2].long())
    torch.testing.assert_close(out.topk_weights[:, :2], 2.5 * p / p.sum(-1, keepdim=True))


def test_draft_layers_keep_sglang_routing_unless_asked(sg, installed):
    x, logits = torch.randn(T, HIDDEN), _logits(9)
    plain = _topk(sg, is_draft=True).forward_native(x, logits.clone())
    installed(policy="xshare", budget="4")
    draft = _topk(sg, is_draft=True)
    out = draft.forward_native(x, logits.clone())
    assert torch.equal(out.topk_ids, plain.topk_ids) and torch.equal(out.topk_weights, plain.topk_weights)
    install.uninstall()
    cfg = installed(policy="xshare", budget="4", apply_to_draft=True, empty_slots="minus_one")
    out = _topk(sg, is_draft=True).forward_native(x, logits.clone())
    assert torch.equal(out.topk_ids.to(torch.int32), _selector(cfg)(logits, layer_id=3).topk_ids)


def test_prefill_batches_keep_sglang_routing_by_default(sg, installed):
    x, logits = torch.randn(T, HIDDEN), _logits(10)
    plain = _topk(sg).forward_native(x, logits.clone())
    installed(policy="xshare", budget="4")
    tk = _topk(sg)
    with context.batch_scope(context.BatchInfo("prefill", batch_size=2)):
        out = tk.forward_native(x, logits.clone())
    assert torch.equal(out.topk_ids, plain.topk_ids)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        out = tk.forward_native(x, logits.clone())
    assert not torch.equal(out.topk_ids, plain.topk_ids)


def test_trace_recorder_writes_trace_format(sg, installed, tmp_path):
    from sglang_xshare.trace import Trace

    path = tmp_path / "t.npz"
    installed(policy="off", record_trace=str(path), record_trace_steps=3)
    layers = [_topk(sg, layer_id=i) for i in (1, 4)]
    steps = []
    for s, n in enumerate((5, 7, 6)):
        logits = [_logits(20 + 2 * s + j, n=8) for j in range(2)]
        steps.append((n, logits))
        with context.batch_scope(context.BatchInfo("decode", batch_size=n)):
            for tk, lg in zip(layers, logits):
                tk.forward_native(torch.randn(8, HIDDEN), lg.clone())
    tr = Trace.load(path)
    assert tr.logits.shape == (3, 2, 7, E) and tr.meta["layer_ids"] == [1, 4]
    assert tr.meta["num_experts"] == E and tr.meta["top_k"] == K
    for s, (n, logits) in enumerate(steps):
        assert (tr.request_ids[s, :n] == torch.arange(n).numpy()).all() and (tr.request_ids[s, n:] == -1).all()
        for j in range(2):
            assert torch.equal(torch.from_numpy(tr.logits[s, j, :n]), logits[j][:n].half())


def test_fill_empty_slots():
    ids = torch.tensor([[5, -1, 7, -1], [-1, -1, -1, -1], [-1, 3, -1, 2]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0, 0.4, 0], [0, 0, 0, 0], [0, 0.5, 0, 0.5]])
    f, fw, src = fill_empty_slots(ids, w)
    assert torch.equal(f, torch.tensor([[5, 5, 7, 5], [0, 0, 0, 0], [3, 3, 3, 2]], dtype=torch.int32))
    assert torch.equal(fw, w) and f.dtype == ids.dtype
    assert torch.equal(src, torch.tensor([[0, 0, 2, 0], [3, 3, 3, 3], [1, 1, 1, 3]]))


def test_fill_empty_slots_distinct():
    ids = torch.tensor([[5, -1, 7, -1], [-1, -1, -1, -1], [-1, 3, -1, 2]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0, 0.4, 0], [0, 0, 0, 0], [0, 0.5, 0, 0.5]])
    f, fw, _ = fill_empty_slots_distinct(ids, w, num_experts=8)
    # batch uses {2, 3, 5, 7}: fillers come from it first, lowest id first, never a duplicate
    assert torch.equal(f, torch.tensor([[5, 2, 7, 3], [2, 3, 5, 7], [5, 3, 7, 2]], dtype=torch.int32))
    assert torch.equal(fw, w)


def test_standard_ep_dispatcher_keeps_minus_one(sg):
    """SGLang's standard (no a2a) EP dispatcher maps global -> local ids and keeps -1 as the drop
    sentinel that the triton / deep_gemm runners honour (the ``minus_one`` rows of the table)."""
    from sglang.srt.layers.moe.token_dispatcher.standard import _map_topk_ids_to_local_experts

    local = torch.full((E,), -1, dtype=torch.int32)
    local[8:16] = torch.arange(8, dtype=torch.int32)  # this rank holds experts 8..15
    ids = torch.tensor([[9, -1, 3, 15], [-1, -1, -1, -1]], dtype=torch.int32)
    assert torch.equal(_map_topk_ids_to_local_experts(ids, local),
                       torch.tensor([[1, -1, -1, 7], [-1, -1, -1, -1]], dtype=torch.int32))


def test_backend_table():
    assert backend_takes_minus_one("deepep", None) and backend_takes_minus_one("mooncake", "auto")
    assert backend_takes_minus_one("none", "triton") and backend_takes_minus_one("none", "deep_gemm")
    assert not backend_takes_minus_one("none", "flashinfer_cutlass") and not backend_takes_minus_one("none", "aiter")
    assert not backend_takes_minus_one("mori", "aiter") and not backend_takes_minus_one("none", None)
    assert resolve_empty_slot_mode("auto", "none", "flashinfer_cutlass") == "fill"
    assert resolve_empty_slot_mode("auto", "deepep", "deep_gemm") == "minus_one"
    assert resolve_empty_slot_mode("fill", "deepep", "deep_gemm") == "fill"
    assert resolve_empty_slot_mode("auto", "none", None, "cpu") == "distinct"
    assert resolve_empty_slot_mode("auto", "none", None, "cuda") == "fill"


def _child_probe(queue) -> None:
    """Runs in a *spawned* child: what SGLang's scheduler process does first (load_plugins)."""
    try:
        from sglang.srt.plugins import load_plugins

        load_plugins()
        from sglang_xshare.serving import install as child_hook

        cfg = child_hook.installed_config()
        from sglang.srt.model_executor import forward_context as fc

        queue.put((None if cfg is None else cfg.to_json(), fc.forward_context.__module__))
    except Exception as e:  # report, do not hang the parent
        queue.put(("error", repr(e)))


def test_hook_reaches_spawned_child_through_sglang_plugin_loader(tmp_path, monkeypatch):
    from sglang_xshare.serving.api import PLUGIN_GROUP, PLUGIN_NAME, plugin_registered

    if not plugin_registered():  # what `pip install` writes for the pyproject entry point
        dist = tmp_path / "sglang_xshare_plugin_probe-0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang-xshare-plugin-probe\nVersion: 0.0\n")
        (dist / "entry_points.txt").write_text(
            textwrap.dedent(f"""\
            [{PLUGIN_GROUP}]
            {PLUGIN_NAME} = sglang_xshare.serving.hook:sglang_plugin
            """))
        monkeypatch.syspath_prepend(str(tmp_path))
    cfg = XShareServerConfig(policy="xshare", budget="0.6", warmup_k0=2)
    monkeypatch.setenv(ENV_VAR, cfg.to_json())
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_probe, args=(q,))
    p.start()
    got = q.get(timeout=240)
    p.join(timeout=60)
    assert got[0] != "error", got
    assert got[0] == cfg.to_json()
    assert got[1] == "sglang_xshare.serving.patches"  # SGLang's module, imported after the plugin ran, is patched


@pytest.fixture(scope="module")
def moe_layer(sg):
    """SGLang's real ``FusedMoE`` layer on CPU (gloo world of one, SGLang's own distributed init)."""
    import socket

    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                    distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    ps.initialize_model_parallel(backend="gloo")
    H, I = 64, 32
    moe = FusedMoE(num_experts=E, hidden_size=H, intermediate_size=I, layer_id=3, top_k=K, params_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.w13_weight.copy_(torch.randn(moe.w13_weight.shape, generator=g) * 0.1)
        moe.w2_weight.copy_(torch.randn(moe.w2_weight.shape, generator=g) * 0.1)
    yield moe
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


def _expert_mix(moe, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference: ``sum_j w_j * expert_{ids_j}(x)`` over non-empty slots (SwiGLU experts)."""
    out = torch.zeros_like(x)
    I = moe.w2_weight.shape[-1]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = moe.w13_weight[e] @ x[t]
            out[t] += w[t, j] * (moe.w2_weight[e] @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return out


def test_moe_layer_forward_with_policy(sg, installed, moe_layer):
    """TopK -> SGLang's FusedMoE forward on CPU: the policy's experts, and only those, contribute."""
    x, logits = torch.randn(T, 64), _logits(11)
    tk = _topk(sg)
    cfg = installed(policy="cap", cap=2)  # auto on CPU: SGLang's torch-native MoE -> distinct fillers
    out = tk.forward_native(x, logits.clone())
    lp = next(iter(runtime.current().layers.values()))
    assert lp.empty_mode == "distinct" and (out.topk_ids >= 0).all()
    assert all(len(set(r.tolist())) == K for r in out.topk_ids)  # no duplicate ids in a row
    ref = _selector(cfg)(logits, layer_id=3)
    assert (ref.topk_ids < 0).any()  # the cap leaves empty slots that had to be filled
    used = set(ref.topk_ids[ref.topk_ids >= 0].tolist())
    assert set(out.topk_ids.flatten().tolist()) == used  # fillers activate no new expert
    with torch.no_grad():
        y = moe_layer(x, out)
        torch.testing.assert_close(y, _expert_mix(moe_layer, x, ref.topk_ids, ref.topk_weights), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["minus_one", "fill"])
def test_moe_layer_native_runner_rejects_minus_one_and_duplicates(sg, installed, moe_layer, mode):
    """Why ``distinct`` exists: SGLang's torch-native MoE (``moe_forward_native``) counts tokens per
    expert with ``scatter_`` -- a ``-1`` id is out of range and a duplicated id is counted once."""
    x, logits = torch.randn(T, 64), _logits(12)
    installed(policy="cap", cap=2, empty_slots=mode)
    out = _topk(sg).forward_native(x, logits.clone())
    with pytest.raises(RuntimeError), torch.no_grad():
        moe_layer(x, out)
