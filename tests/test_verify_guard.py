"""The verify-row guard of the reference policies: in a speculative verify batch (``request_group =
g >= 2``) each request's target row (``t % g == 0``) keeps its own top-``guard_k``; the other rows keep
their top-``k0``; the budget applies on top. The kernels are compared with these references in
``tests/test_kernels.py`` (``guard-*`` cases), the server flag in ``tests/test_sglang_flags.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_xshare import Budget, BudgetSchedule, Placement, RoutingSpec, SelectionConfig, Selector, XShareConfigError
from sglang_xshare.select import compute_scores
from sglang_xshare.select.common import token_order
from sglang_xshare.select.contract import BatchContext
from sglang_xshare.select.traits import policies_with

from .conftest import clustered_logits

GUARDED = ["oea", "oea_simple", "xshare", "xshare_ep", "xshare_spec"]


def make(policy: str, E: int = 64, k: int = 8, k0: int = 1, guard: int = 0, budget: str = "0.5",
         request_budget: str | None = "0.7", **kw) -> Selector:
    if policy in ("xshare", "xshare_ep", "xshare_spec"):
        kw["budget"] = BudgetSchedule.parse(budget)
    if policy == "xshare_spec" and request_budget is not None:
        kw["request_budget"] = Budget.parse(request_budget)
    cfg = SelectionConfig(policy=policy, k0=k0, verify_guard=guard, **kw)
    placement = Placement.expert_parallel(E, 8) if policy == "xshare_ep" else None
    return Selector(RoutingSpec(E, k), cfg, placement, backend="reference")


def check_guarded(sel: Selector, logits: torch.Tensor, g: int, n_valid: int) -> torch.Tensor:
    """The guard's contract on one call; returns the ids."""
    out = sel(logits, num_token_non_padded=n_valid, request_group=g)
    order = token_order(compute_scores(logits, sel.routing).sel)
    ids = out.topk_ids.long()
    gk, k0 = sel.config.verify_guard, sel.config.k0
    for t in range(n_valid):
        width = gk if t % g == 0 else k0
        assert torch.equal(ids[t, :width], order[t, :width]), (t, ids[t].tolist(), order[t, :width].tolist())
    assert torch.all(ids[n_valid:] == -1)
    return ids


@pytest.mark.parametrize("policy", GUARDED)
@pytest.mark.parametrize("g,guard", [(2, 8), (4, 8), (4, 4), (8, 3)])
def test_target_rows_keep_their_top_guard_k(policy, g, guard):
    """Every policy with a warm-up: target rows keep their top-guard_k (best first), the draft rows
    their top-k0, padding nothing; and the guard changes the selection (it is not a no-op)."""
    T = 40
    logits = clustered_logits(T, 64, seed=7 * g + guard)
    for n_valid in (T, T - 5):
        ids = check_guarded(make(policy, guard=guard), logits, g, n_valid)
        plain = make(policy)(logits, num_token_non_padded=n_valid, request_group=g).topk_ids.long()
        assert not torch.equal(ids, plain), "the guard did not change the selection"


def test_warmup_is_a_floor_the_budget_cannot_cut():
    """With a budget of one expert the chosen set is exactly the warm-up union: every target row's
    top-guard_k and every draft row's top-k0 (the floor exceeds the budget, as without the guard)."""
    T, g, gk = 24, 4, 6
    logits = clustered_logits(T, 64, seed=3)
    order = token_order(compute_scores(logits, RoutingSpec(64, 8)).sel)
    out = make("xshare", guard=gk, budget="1")(logits, request_group=g)
    warm = {int(e) for t in range(T) for e in order[t, :gk if t % g == 0 else 1]}
    assert set(out.topk_ids[out.topk_ids >= 0].tolist()) == warm


def test_no_verify_batch_no_guard():
    """Without request groups, with g = 1 (every row its own request: a decode batch) or with
    guard_k <= k0 the guard changes nothing."""
    logits = clustered_logits(16, 64, seed=5)
    for policy in GUARDED:
        plain = make(policy, k0=2)
        guarded = make(policy, k0=2, guard=8)
        for g in (None, 1):
            a, b = plain(logits, request_group=g), guarded(logits, request_group=g)
            assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights), (policy, g)
    ctx = BatchContext(top_k=8, k0=3, renormalize=True, valid=None, request_group=4, guard_k=3)
    assert ctx.guard() == (0, 3)
    assert BatchContext(top_k=8, k0=3, renormalize=True, valid=None, request_group=4, guard_k=5).guard() == (4, 5)
    assert BatchContext(top_k=8, k0=3, renormalize=True, valid=None, request_group=1, guard_k=5).guard() == (0, 3)


def test_selector_passes_the_guard_only_to_verify_batches():
    sel = make("xshare", guard=8)
    dev = torch.device("cpu")
    assert sel.context(8, dev, request_group=4).guard_k == 8
    assert sel.context(8, dev, request_group=1).guard_k is None
    assert sel.context(8, dev).guard_k is None
    assert make("xshare").context(8, dev, request_group=4).guard_k is None
    with pytest.raises(ValueError, match="request_group"):  # request ids do not say which row is the target
        sel(clustered_logits(8, 64, seed=1), request_ids=torch.arange(8) // 4)


def test_min_score_spares_the_guarded_slots():
    """``min_score`` drops slots beyond the warm-up width: k0 on draft rows, guard_k on target rows."""
    T, g = 24, 4
    logits = clustered_logits(T, 64, seed=11)
    sel = make("xshare", guard=8, budget="1.0", min_score=0.2)
    ids = check_guarded(sel, logits, g, T)
    kept = (ids >= 0).sum(1)
    assert torch.all(kept[::g] == 8)
    assert kept[1::g].float().mean() < 8  # the floor does cut the draft rows


def test_guard_with_the_nucleus_warmup():
    """The nucleus warm-up (reference only) keeps at least the row's warm-up width."""
    logits = clustered_logits(24, 64, seed=13)
    sel = make("xshare", guard=6, budget="0.3", warmup_p=0.3)
    check_guarded(sel, logits, 4, 24)


def test_configuration_errors_name_the_flag():
    r = RoutingSpec(64, 8)
    for policy, kw in (("topk", {}), ("cap", {"cap": 4})):
        with pytest.raises(XShareConfigError, match="--xshare-verify-guard: policy"):
            SelectionConfig(policy=policy, verify_guard=8, **kw).validate(r)
    for bad, k0 in ((9, 1), (2, 2), (1, 3), (-1, 1)):
        with pytest.raises(XShareConfigError, match="--xshare-verify-guard"):
            SelectionConfig(policy="xshare", k0=k0, budget=BudgetSchedule.parse("0.6"), verify_guard=bad).validate(r)
    SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("0.6"), verify_guard=8).validate(r)
    with pytest.raises(ValueError, match="guard_k"):
        BatchContext(top_k=8, k0=1, renormalize=True, valid=None, guard_k=9)


def test_the_guard_is_a_capability_of_the_warmup_policies():
    assert policies_with("verify_guard") == tuple(GUARDED) == policies_with("warmup")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(GUARDED), g=st.integers(2, 8), T=st.integers(1, 30), k=st.integers(2, 6),
       k0=st.integers(1, 3), extra=st.integers(1, 5), budget=st.sampled_from(["1", "3", "0.3", "0.8", "mass:0.5", "mass:1"]),
       seed=st.integers(0, 10_000), pad=st.integers(0, 4), quantise=st.booleans())
def test_guard_contract_hypothesis(policy, g, T, k, k0, extra, budget, seed, pad, quantise):
    k0 = min(k0, k - 1)
    guard = min(k, k0 + extra)
    logits = clustered_logits(T, 16, seed)
    if quantise:  # many exact ties
        logits = torch.round(logits)
    sel = make(policy, E=16, k=k, k0=k0, guard=guard, budget=budget, request_budget=budget)
    check_guarded(sel, logits, g, max(T - pad, 0))
