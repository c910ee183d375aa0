"""The nucleus warm-up knob (``warmup_p``) of the reference policies, and batching of the
references over decode steps (``torch.func.vmap``, what the quality harness does)."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from sglang_xshare import Budget, BudgetSchedule, RoutingSpec, SelectionConfig, Selector, XShareConfigError
from sglang_xshare.select import compute_scores

from .conftest import clustered_logits


def _logits_from_probs(p: list[list[float]]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log().float()


def _kept(out, t: int) -> set[int]:
    return set(out.topk_ids[t][out.topk_ids[t] >= 0].tolist())


def test_nucleus_sizes_by_hand():
    # E = 8, k = 4. Token 0 is peaked (top-4 weights .6 .2 .1 .05), token 1 flat (.2 .2 .2 .2).
    probs = [[0.60, 0.20, 0.10, 0.05, 0.02, 0.01, 0.01, 0.01],
             [0.20, 0.20, 0.20, 0.20, 0.05, 0.05, 0.05, 0.05]]
    r = RoutingSpec(8, 4)
    logits = _logits_from_probs(probs)
    # budget count 1: the chosen set is exactly the union of the warm-up sets; one token per batch
    for t, p, want in [(0, 0.5, {0}), (0, 0.7, {0, 1}), (0, 0.84, {0, 1}), (0, 0.85, {0, 1, 2}), (0, 0.90, {0, 1, 2}),
                       (0, 1.0, {0, 1, 2, 3}), (1, 0.5, {0, 1}), (1, 0.51, {0, 1, 2}), (1, 0.8, {0, 1, 2, 3})]:
        cfg = SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("1"), warmup_p=p)
        out = Selector(r, cfg, backend="reference")(logits[t : t + 1])
        assert _kept(out, 0) == want, (t, p)
    # k0 is a floor under the nucleus
    cfg = SelectionConfig(policy="xshare", k0=3, budget=BudgetSchedule.parse("1"), warmup_p=0.5)
    assert _kept(Selector(r, cfg, backend="reference")(logits[:1]), 0) == {0, 1, 2}


def test_nucleus_is_a_warmup_and_oea_uses_it():
    torch.manual_seed(0)
    r = RoutingSpec(32, 8)
    logits = clustered_logits(24, 32, seed=3)
    scores = compute_scores(logits, r)
    order = torch.sort(scores.sel, dim=1, descending=True, stable=True).indices
    w = scores.gate.gather(1, order[:, :8])
    for policy in ("xshare", "oea", "xshare_spec"):
        kw = {"budget": BudgetSchedule.parse("0.3")} if policy != "oea" else {}
        if policy == "xshare_spec":
            kw["request_budget"] = Budget.parse("0.5")
        cfg = SelectionConfig(policy=policy, k0=1, warmup_p=0.75, **kw)
        out = Selector(r, cfg, backend="reference")(logits, request_group=4 if policy == "xshare_spec" else None)
        for t in range(24):
            need = int((torch.cumsum(w[t], 0) - w[t] < 0.75 * w[t].sum() * (1 - 1e-9)).sum())
            assert set(order[t, :need].tolist()) <= _kept(out, t), (policy, t)
        # without the nucleus the same budget activates strictly fewer distinct experts
        base = Selector(r, SelectionConfig(policy=policy, k0=1, **kw), backend="reference")(
            logits, request_group=4 if policy == "xshare_spec" else None)
        distinct = lambda o: len(set(o.topk_ids[o.topk_ids >= 0].tolist()))  # noqa: E731
        assert distinct(out) > distinct(base), policy


def test_nucleus_extremes():
    r = RoutingSpec(16, 4)
    logits = torch.randn(10, 16)
    top = Selector(r, SelectionConfig(policy="topk"), backend="reference")(logits)
    full = Selector(r, SelectionConfig(policy="xshare", budget=BudgetSchedule.parse("1"), warmup_p=1.0),
                    backend="reference")(logits)
    assert torch.equal(full.topk_ids, top.topk_ids) and torch.equal(full.topk_weights, top.topk_weights)
    off = Selector(r, SelectionConfig(policy="xshare", k0=2, budget=BudgetSchedule.parse("0.5")), backend="reference")(logits)
    tiny = Selector(r, SelectionConfig(policy="xshare", k0=2, budget=BudgetSchedule.parse("0.5"), warmup_p=1e-6),
                    backend="reference")(logits)
    assert torch.equal(off.topk_ids, tiny.topk_ids)  # nucleus of ~0 mass = the k0 floor


def test_nucleus_padding_and_validation():
    r = RoutingSpec(16, 4)
    cfg = SelectionConfig(policy="xshare", budget=BudgetSchedule.parse("0.5"), warmup_p=0.9)
    out = Selector(r, cfg, backend="reference")(torch.randn(6, 16), num_token_non_padded=4)
    assert torch.all(out.topk_ids[4:] == -1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(XShareConfigError, match="--xshare-warmup-p"):
            SelectionConfig(policy="xshare", budget=BudgetSchedule.parse("0.5"), warmup_p=bad).validate(r)
    with pytest.raises(XShareConfigError, match="--xshare-warmup-p"):
        SelectionConfig(policy="cap", cap=2, warmup_p=0.5).validate(r)
    # the kernels do not implement it: never silently ignored
    sel = Selector(r, cfg, backend="auto")
    assert sel._kernel is None
    with pytest.raises(XShareConfigError, match="warmup-p"):
        Selector(r, cfg, backend="kernel")


@pytest.mark.parametrize("cfg", [
    SelectionConfig(policy="topk"),
    SelectionConfig(policy="cap", cap=3),
    SelectionConfig(policy="oea", k0=2),
    SelectionConfig(policy="oea_simple", k0=2),
    SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("0.6")),
    SelectionConfig(policy="xshare", k0=2, budget=BudgetSchedule.parse("mass:0.9"), min_score=0.02),
    SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("0.7"), warmup_p=0.8),
    SelectionConfig(policy="xshare_spec", k0=1, budget=BudgetSchedule.parse("0.6"), request_budget=Budget.parse("10")),
    SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("0.6"), verify_guard=8),
    SelectionConfig(policy="oea", k0=2, verify_guard=4),
    SelectionConfig(policy="xshare_spec", k0=1, budget=BudgetSchedule.parse("0.6"), request_budget=Budget.parse("10"),
                    verify_guard=6, min_score=0.05),
], ids=lambda c: f"{c.policy}-{c.warmup_p}-guard{c.verify_guard}")
def test_references_vmap_over_decode_steps(cfg):
    """The harness selects all decode steps of a forward in one vmapped call: bit-identical to a loop."""
    r = RoutingSpec(64, 8)
    x = torch.randn(12, 16, 64)
    x[3, 5, 7] = float("nan")
    sel = Selector(r, cfg, backend="reference")
    g = 4 if cfg.policy == "xshare_spec" or cfg.verify_guard else None
    ids, w = vmap(lambda lg: tuple(sel(lg, layer_id=0, request_group=g)[:2]))(x)
    outs = [sel(x[j], layer_id=0, request_group=g) for j in range(x.shape[0])]
    assert torch.equal(ids, torch.stack([o.topk_ids for o in outs]))
    assert torch.equal(w, torch.stack([o.topk_weights for o in outs]))
