"""The hook's side paths and boundaries inside real SGLang 0.5.23 routing objects (CPU).

* side paths (per-token dynamic expert bias, EPLB ``fake`` dispatch) step aside to SGLang's
  routing bit for bit, and the layer's path label says ``sglang``; SGLang's routing simulation
  (a Triton kernel) is checked on the kernel path in ``tests/test_hook_launches.py``;
* ``--xshare-min-tokens``: ``T = min_tokens - 1`` steps aside and ``T = min_tokens`` selects, on the
  ``fast``, ``general`` and ``legacy`` paths and at the post-processing seam itself;
* a speculative target-verify batch counts its draft tokens (live metrics' path label, trace rows);
* live metrics' busiest-rank columns against a count written here from the dispatched ids and a
  placement spelled out in the test (EP 2 and 4, with and without redundant physical copies);
* the A/B switch file present, changed, deleted, unreadable: device flag and the experts' arm.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")
pytestmark = pytest.mark.sglang

from sglang_xshare import RoutingSpec, Selector  # noqa: E402
from sglang_xshare.serving import context, install, runtime  # noqa: E402
from sglang_xshare.serving.config import XShareServerConfig  # noqa: E402

from tests._sglang_cpu import E, HIDDEN, K, T, _logits, _topk, installed, sg  # noqa: E402,F401  (fixtures)


def _ref(cfg: XShareServerConfig, logits: torch.Tensor, **routing_kw) -> torch.Tensor:
    routing = RoutingSpec(num_experts=E, top_k=K, **routing_kw)
    return Selector(routing, cfg.selection_config(routing))(logits, layer_id=3).topk_ids


def _paths() -> dict[int, str]:
    return next(iter(runtime.current().layers.values())).paths


def _same(a, b) -> bool:
    return torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)


# ---- side paths ----------------------------------------------------------------------------------


_BIASED = dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid")


@pytest.mark.parametrize("force", [None, "legacy"])
def test_dynamic_expert_bias_steps_aside_bit_for_bit(sg, installed, monkeypatch, force):
    """A per-token ``dynamic_expert_bias`` (SGLang's ``select_experts`` then routes with
    ``biased_grouped_topk_impl``): the policy cannot reproduce it, SGLang routes bit for bit and
    the layer's path label is ``sglang``; also where the post-processing seam would select
    (``legacy`` forced: the seam passes the call through). Without the bias the same layer selects."""
    kw = dict(_BIASED, correction_bias=torch.linspace(-0.2, 0.2, E))
    x, logits = torch.randn(T, HIDDEN), _logits(63)
    bias = torch.randn(T, E, generator=torch.Generator().manual_seed(64)) * 0.3
    plain = _topk(sg, **kw).forward_native(x, logits.clone(), dynamic_expert_bias=bias)
    plain_nobias = _topk(sg, **kw).forward_native(x, logits.clone())
    if force:
        monkeypatch.setenv(runtime.FORCE_PATH_ENV, force)
    installed(policy="xshare", budget="6", empty_slots="minus_one")
    tk = _topk(sg, **kw)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        out = tk.forward_native(x, logits.clone(), dynamic_expert_bias=bias)
    assert _same(out, plain)
    assert _paths() == {T: "sglang"}
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        sel = tk.forward_native(x, logits.clone())
    assert _paths() == {T: force or "fast"} and not _same(sel, plain_nobias)


def test_eplb_fake_dispatch_steps_aside_bit_for_bit(sg, installed):
    """``--ep-dispatch-algorithm fake`` (SGLang overwrites the logits with random ones and maps
    through the dynamic dispatcher): SGLang's routing, bit for bit, path ``sglang``."""
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    P = E
    l2all = torch.full((E, P), -1, dtype=torch.int64)
    l2all[:, 0] = torch.arange(E)
    info = ExpertLocationDispatchInfo(ep_dispatch_algorithm="fake", partial_logical_to_rank_dispatch_physical_map=None,
                                      partial_logical_to_all_physical_map=l2all,
                                      partial_logical_to_all_physical_map_num_valid=torch.ones(E, dtype=torch.int64),
                                      num_physical_experts=P)
    x, logits = torch.randn(T, HIDDEN), _logits(65)

    def route(tk):
        torch.manual_seed(66)  # SGLang's fake dispatch draws the logits
        with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
            return tk.forward_native(x, logits.clone(), expert_location_dispatch_info=info)

    plain = route(_topk(sg))
    installed(policy="xshare", budget="6", empty_slots="minus_one")
    out = route(_topk(sg))
    assert _same(out, plain)
    assert _paths() == {T: "sglang"}


# ---- --xshare-min-tokens boundary on every path ----------------------------------------------------


@pytest.mark.parametrize("force", [None, "general", "legacy"])
def test_min_tokens_boundary_on_every_path(sg, installed, monkeypatch, force):
    """``--xshare-min-tokens 5``: a batch of 4 tokens keeps SGLang's routing bit for bit (path
    ``sglang``); a batch of 5 gets the policy's (path ``fast`` / ``general`` / ``legacy``)."""
    if force:
        monkeypatch.setenv(runtime.FORCE_PATH_ENV, force)
    mt = 5
    lo, hi = _logits(70, n=mt - 1), _logits(71, n=mt)
    plain_lo = _topk(sg).forward_native(torch.randn(mt - 1, HIDDEN), lo.clone())
    plain_hi = _topk(sg).forward_native(torch.randn(mt, HIDDEN), hi.clone())
    cfg = installed(policy="cap", cap=2, empty_slots="minus_one", min_tokens=str(mt))
    tk = _topk(sg)
    with context.batch_scope(context.BatchInfo("decode", batch_size=mt - 1)):
        out_lo = tk.forward_native(torch.randn(mt - 1, HIDDEN), lo.clone())
    with context.batch_scope(context.BatchInfo("decode", batch_size=mt)):
        out_hi = tk.forward_native(torch.randn(mt, HIDDEN), hi.clone())
    assert _same(out_lo, plain_lo)
    assert torch.equal(out_hi.topk_ids.to(torch.int32), _ref(cfg, hi))
    assert not torch.equal(out_hi.topk_ids, plain_hi.topk_ids)
    assert _paths() == {mt - 1: "sglang", mt: force or "fast"}


def test_a_count_budget_that_cannot_bind_keeps_sglangs_routing(sg, installed):
    """``--xshare-budget 10`` at top-4 (min tokens ``auto``): a batch of 2 tokens activates at most
    8 experts, so it keeps SGLang's routing bit for bit without a selection (path ``sglang``); a
    batch of 3 (up to 12 experts) selects. A fraction budget selects from 2 tokens on; a request
    budget (``xshare_spec``) can cut below the batch budget, so it selects too."""
    m = 10
    lo, hi = _logits(72, n=m // K), _logits(73, n=m // K + 1)
    plain_lo = _topk(sg).forward_native(torch.randn(m // K, HIDDEN), lo.clone())
    cfg = installed(policy="xshare", budget=str(m), empty_slots="minus_one")
    tk = _topk(sg)
    with context.batch_scope(context.BatchInfo("decode", batch_size=m // K)):
        out_lo = tk.forward_native(torch.randn(m // K, HIDDEN), lo.clone())
    with context.batch_scope(context.BatchInfo("decode", batch_size=m // K + 1)):
        out_hi = tk.forward_native(torch.randn(m // K + 1, HIDDEN), hi.clone())
    assert _same(out_lo, plain_lo)
    assert torch.equal(out_hi.topk_ids.to(torch.int32), _ref(cfg, hi))
    assert _paths() == {m // K: "sglang", m // K + 1: "fast"}
    from sglang_xshare.serving.layer import _min_tokens

    def mt(**kw):
        return _min_tokens(XShareServerConfig(empty_slots="minus_one", **kw).validate(), 3, K)

    assert mt(policy="xshare", budget="10") == 3 and mt(policy="xshare", budget="24") == 7
    assert mt(policy="xshare", budget="0.7") == 2 and mt(policy="oea") == 2 and mt(policy="cap", cap=2) == 1
    assert mt(policy="xshare_spec", budget="10", request_budget="4") == 2
    assert mt(policy="xshare", budget="10", min_tokens="1") == 1  # an explicit number wins
    # a verify budget: the smaller count bounds it; a non-count verify budget can always bind
    assert mt(policy="xshare", budget="24", verify_budget="10") == 3
    assert mt(policy="xshare", budget="24", verify_budget="0.9") == 2


def test_min_tokens_boundary_at_the_post_processing_seam(sg, installed):
    """The ``legacy`` seam reached by a router that is not ``select_experts`` (SGLang calls
    ``_post_process_topk_ids`` from its other routing paths): ``T = min_tokens - 1`` passes
    SGLang's ids through, ``T = min_tokens`` selects there."""
    mt = 5
    cfg = installed(policy="cap", cap=2, empty_slots="minus_one", min_tokens=str(mt))
    tc = _topk(sg).topk_config
    for n, selects in ((mt - 1, False), (mt, True)):
        logits = _logits(72 + n, n=n)
        w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        with context.batch_scope(context.BatchInfo("decode", batch_size=n)):
            new_ids, new_w, _ = sg._post_process_topk_ids(ids.to(torch.int32).clone(), w.clone(), tc, logits, 3)
        if selects:
            assert torch.equal(new_ids.to(torch.int32), _ref(cfg, logits)), n
        else:
            assert torch.equal(new_ids.to(torch.int32), ids.to(torch.int32)) and torch.equal(new_w, w), n


# ---- speculative verify batches count their draft tokens --------------------------------------------


def _verify_batch(bs: int, ndt: int):
    """A real SGLang TARGET_VERIFY ``ForwardBatch`` of ``bs`` requests with ``ndt`` tokens each."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.speculative.eagle_info import EagleVerifyInput

    n = bs * ndt
    spec = EagleVerifyInput.create_idle_input(topk=1, spec_steps=ndt - 1, num_verify_tokens=ndt, device="cpu")
    return ForwardBatch(forward_mode=ForwardMode.TARGET_VERIFY, batch_size=bs, input_ids=torch.zeros(n, dtype=torch.long),
                        req_pool_indices=torch.arange(bs), seq_lens=torch.full((bs,), 10), out_cache_loc=torch.arange(n),
                        seq_lens_sum=10 * bs, spec_info=spec)


def test_verify_batch_counts_draft_tokens(sg, installed, tmp_path):
    """A verify batch of one request with 4 draft tokens is a batch of 4 tokens: the live metrics
    count the step on the policy's path (``min_tokens`` 2), and ``--xshare-record-trace`` keeps all
    4 rows of each of 3 requests (``request_ids = t // 4``), not one row per request."""
    from sglang_xshare.trace import Trace

    path = tmp_path / "spec.npz"
    installed(policy="xshare", budget="0.5", empty_slots="minus_one", metrics=True, metrics_interval=1000,
              record_trace=str(path), record_trace_steps=2)
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # the patched one
    tk = _topk(sg)
    ndt = 4
    steps = []
    for bs in (1, 3):
        logits = _logits(80 + bs, n=bs * ndt)
        steps.append(logits)
        with forward_context(ForwardContext(attn_backend=None), forward_batch=_verify_batch(bs, ndt)):
            assert context.current_batch().num_real_tokens == bs * ndt
            tk.forward_native(torch.randn(bs * ndt, HIDDEN), logits.clone())
    assert runtime.current().metrics.path_steps == {"policy": 2}
    tr = Trace.load(path)
    assert tr.logits.shape == (2, 1, 3 * ndt, E) and tr.meta["tokens_per_request"] == ndt
    assert (tr.request_ids[0, :ndt] == 0).all() and (tr.request_ids[0, ndt:] == -1).all()
    assert (tr.request_ids[1] == torch.arange(3 * ndt).numpy() // ndt).all()
    for s, logits in enumerate(steps):
        assert torch.equal(torch.from_numpy(tr.logits[s, 0, : logits.shape[0]]), logits.half())


# ---- live metrics' busiest-rank columns against an independent count --------------------------------


def _placement_by_hand(ep: int, redundant: bool) -> list[int]:
    """``physical slot -> logical expert``, written out: ``E`` slots permuted, plus 8 copies of
    experts 0, 3, 6, ... when ``redundant`` (``P`` divisible by ``ep``)."""
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(90 + ep)).tolist()
    return perm + ([(3 * i) % E for i in range(8)] if redundant else [])


@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("redundant", [False, True], ids=["plain-ep", "eplb-redundant"])
def test_live_metrics_peak_against_independent_count(sg, installed, monkeypatch, ep, redundant):
    """``peak`` = the most distinct dispatched units (physical slots under EPLB, experts otherwise)
    on one EP rank, ``topk_peak`` = the most distinct top-k experts on one rank (an expert on the
    rank of its first copy), summed over calls; counted here from the hook's dispatched ids and a
    placement written in this test, not from the kernel's or the reference's placement tables."""
    import sglang.srt.runtime_context as rc
    from sglang.srt.eplb.expert_location import (ExpertLocationMetadata, compute_logical_to_rank_dispatch_physical_map,
                                                 get_global_expert_location_metadata, set_global_expert_location_metadata)
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    p2l = _placement_by_hand(ep, redundant) if redundant else list(range(E))
    P = len(p2l)
    per = P // ep
    info = None
    prev = get_global_expert_location_metadata()
    if redundant:
        p2l_t = torch.tensor(p2l, dtype=torch.int64)
        l2all = torch.full((4, E, P), -1, dtype=torch.int64)
        for e in range(E):
            phys = [p for p in range(P) if p2l[p] == e]
            l2all[:, e, : len(phys)] = torch.tensor(phys)
        md = ExpertLocationMetadata._init_raw(ep_size=ep, physical_to_logical_map=p2l_t.repeat(4, 1),
                                              logical_to_all_physical_map=l2all)
        set_global_expert_location_metadata(md, allow_overwrite=True)
        rank_map = compute_logical_to_rank_dispatch_physical_map(logical_to_all_physical_map=l2all[:1], ep_size=ep,
                                                                 num_physical_experts=P, ep_rank=ep - 1)[0]
        info = ExpertLocationDispatchInfo(ep_dispatch_algorithm="static", partial_logical_to_rank_dispatch_physical_map=rank_map,
                                          partial_logical_to_all_physical_map=l2all[3],
                                          partial_logical_to_all_physical_map_num_valid=(l2all[3] != -1).sum(-1),
                                          num_physical_experts=P)
    else:
        monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(moe_ep_size=ep))
    try:
        installed(policy="xshare", budget="10", empty_slots="minus_one", metrics=True, metrics_interval=1000)
        tk = _topk(sg)
        want_peak = want_tpeak = 0
        for step in range(3):
            logits = _logits(95 + step)
            with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
                out = tk.forward_native(torch.randn(T, HIDDEN), logits.clone(), expert_location_dispatch_info=info)
            ids = out.topk_ids[out.topk_ids >= 0].long()
            units = torch.unique(ids)  # physical slots (EPLB) or logical experts (plain EP: slot == expert)
            want_peak += int(torch.bincount(units // per, minlength=ep).max())
            top = torch.unique(torch.topk(logits, K, dim=-1).indices.flatten())
            first_copy = torch.tensor([p2l.index(int(e)) for e in top])
            want_tpeak += int(torch.bincount(first_copy // per, minlength=ep).max())
        got = runtime.current().metrics.flush()[3]
        assert _paths() == {T: "fast"}
        assert (got["peak"], got["topk_peak"]) == (want_peak, want_tpeak)
        assert want_peak < 3 * per  # not every slot of a rank: a wrong count can show
    finally:
        set_global_expert_location_metadata(prev, allow_overwrite=True)


def test_metrics_tables_allocated_when_the_model_is_built(sg, installed, tmp_path):
    """``TopK.__init__`` (model load, outside CUDA-graph capture) allocates the live-metrics tables
    of the policy and of every A/B arm, so that no layer's first routing call (maybe inside a
    capture) allocates them."""
    installed(policy="xshare", budget="0.5", empty_slots="minus_one", metrics=True, ab_switch=str(tmp_path / "arm"),
              ab_arms=("policy=cap,cap=2",))
    tables = runtime.current().metric_tables()
    assert len(tables) == 2 and all(m.table is None for m in tables)
    _topk(sg)
    assert all(m.table is not None and m.table.device.type == "cpu" for m in tables)


def test_live_metrics_read_the_kernels_barrier_fault_counter(sg, installed, warnings_of):
    """The selection kernels count grid-barrier waits that did not fill (``fault_counter``, one per
    device); the live metrics read it with the table at each poll, on every device, and warn when
    it grew (``sglang_xshare_barrier_faults``)."""
    from sglang_xshare.kernels.workspace import fault_counter

    installed(policy="xshare", budget="0.5", empty_slots="minus_one", metrics=True, metrics_interval=1000)
    with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
        _topk(sg).forward_native(torch.randn(T, HIDDEN), _logits(98).clone())
    fc = fault_counter(torch.device("cpu"))
    fc += 2  # what two programs that gave up waiting add
    try:
        log = warnings_of("sglang_xshare")
        got = runtime.current().metrics.flush()
        assert got[3]["calls"] == 1 and runtime.current().metrics.faults == int(fc) >= 2
        assert "grid barrier wait(s) did not fill" in log.text
    finally:
        fc -= 2


# ---- the A/B switch file ----------------------------------------------------------------------------


def test_ab_switch_file_present_changed_deleted_unreadable(sg, installed, tmp_path):
    """After each change of the switch file and one step end: the device flag, and the routing the
    experts get. Present (``1``: the policy), changed (``2``: the arm; ``0``: SGLang's), deleted
    while the policy routes (SGLang's), unreadable while the policy routes (a directory in its
    place: SGLang's), back (``1``)."""
    x, logits = torch.randn(T, HIDDEN), _logits(99)
    plain = _topk(sg).forward_native(x, logits.clone())
    sw = tmp_path / "arm"
    sw.write_text("1")
    cfg = installed(policy="xshare", budget="8", empty_slots="minus_one", ab_switch=str(sw),
                    ab_arms=("policy=cap,cap=2",))
    refs = {1: _ref(cfg, logits), 2: _ref(XShareServerConfig(policy="cap", cap=2, empty_slots="minus_one"), logits)}
    assert not torch.equal(refs[1], refs[2])
    tk = _topk(sg)
    sw_obj = runtime.current().ab.switch
    mtime = [sw.stat().st_mtime_ns]

    def bump():
        mtime[0] += 1_000_000
        os.utime(sw, ns=(mtime[0], mtime[0]))

    def step():
        with context.batch_scope(context.BatchInfo("decode", batch_size=T)):
            return tk.forward_native(x, logits.clone())

    def check(arm):
        flag = sw_obj.flag(logits.device)
        out = step()
        assert int(flag[0]) == arm and sw_obj.arm == arm and bool(sw_obj.on_flag(logits.device)) == (arm != 0)
        if arm == 0:
            assert _same(out, plain)
        else:
            assert torch.equal(out.topk_ids.to(torch.int32), refs[arm]), arm

    check(1)  # present at start-up
    sw.write_text("2"); bump(); step()
    check(2)
    sw.write_text("1"); bump(); step()
    check(1)
    sw.unlink(); step()
    check(0)
    sw.write_text("1"); bump(); step()
    check(1)
    sw.unlink(); sw.mkdir(); step()  # unreadable as a file
    check(0)
    sw.rmdir(); sw.write_text("1"); bump(); step()
    check(1)
