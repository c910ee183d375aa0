"""``topk`` equals SGLang 0.5.23's own ``select_experts`` (the real function, CPU path)."""

from __future__ import annotations

import pytest
import torch

from sglang_xshare import RoutingSpec, SelectionConfig, Selector

from .conftest import clustered_logits

topk_mod = pytest.importorskip("sglang.srt.layers.moe.topk", reason="sglang[extra] not installed")


def sglang_select(logits, k, renormalize, scoring="softmax", groups=None, bias=None, n_valid=None):
    cfg = topk_mod.TopKConfig(
        top_k=k,
        use_grouped_topk=groups is not None,
        num_expert_group=None if groups is None else groups[0],
        topk_group=None if groups is None else groups[1],
        renormalize=renormalize,
        correction_bias=bias,
        torch_native=True,
        scoring_func=scoring,
    )
    hidden = torch.zeros(logits.shape[0], 8)
    ntnp = None if n_valid is None else torch.tensor(n_valid)
    return topk_mod.select_experts(hidden, logits, cfg, num_token_non_padded=ntnp)


def assert_same_sets(ours, ref):
    """Same experts and weights per token; SGLang's grouped paths do not order the top-k."""
    o = torch.sort(ours.topk_ids, 1)
    r = torch.sort(ref.topk_ids.to(torch.int32), 1)
    assert torch.equal(o.values, r.values)
    torch.testing.assert_close(ours.topk_weights.gather(1, o.indices), ref.topk_weights.float().gather(1, r.indices),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E,k,renorm", [(64, 8, True), (128, 4, False), (32, 2, True), (160, 6, True)])
def test_softmax_topk_bit_identical(E, k, renorm):
    logits = clustered_logits(37, E, seed=E + k)
    ref = sglang_select(logits, k, renorm)
    ours = Selector(RoutingSpec(E, k, renormalize=renorm), SelectionConfig(policy="topk"), backend="reference")(logits)
    assert torch.equal(ours.topk_ids, ref.topk_ids.to(torch.int32))
    assert torch.equal(ours.topk_weights, ref.topk_weights.float())


def test_grouped_topk_matches():
    E, k, G, TG = 64, 6, 8, 3
    logits = clustered_logits(29, E, seed=7)
    ref = sglang_select(logits, k, True, groups=(G, TG))
    ours = Selector(RoutingSpec(E, k, num_expert_group=G, topk_group=TG), SelectionConfig(policy="topk"), backend="reference")(logits)
    assert_same_sets(ours, ref)


def test_biased_grouped_sigmoid_matches():
    E, k, G, TG = 64, 8, 8, 4
    logits = clustered_logits(23, E, seed=11)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.1
    ref = sglang_select(logits, k, True, scoring="sigmoid", groups=(G, TG), bias=bias)
    routing = RoutingSpec(E, k, scoring="sigmoid", num_expert_group=G, topk_group=TG, has_correction_bias=True)
    ours = Selector(routing, SelectionConfig(policy="topk"), backend="reference", correction_bias=bias)(logits)
    assert_same_sets(ours, ref)


def test_padded_rows_match_sglang():
    E, k = 32, 4
    logits = clustered_logits(12, E, seed=5)
    ref = sglang_select(logits, k, True, n_valid=9)
    ours = Selector(RoutingSpec(E, k), SelectionConfig(policy="topk"), backend="reference")(logits, num_token_non_padded=torch.tensor(9))
    assert torch.equal(ours.topk_ids, ref.topk_ids.to(torch.int32))
