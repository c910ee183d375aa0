"""Speculative mode of the quality yardstick: argmax agreement, the shuffled request layout, and the
xshare vs xshare_spec frontier comparison of ``bench/quality.py`` (CPU, the evaluation model)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sglang_xshare.hf import (RoutingHook, StepLayout, argmax_agreement, load_eval_set, load_model,  # noqa: E402
                              make_batches, routing_spec_of, sequence_ce_argmax)

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def q():
    return _quality()


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = load_model()
    model.config._experts_implementation = "eager"
    tok = make_batches(load_eval_set(), batch_size=4, num_batches=1, composition="mixed", seq_len=16)[0][0]
    ref, ref_am = sequence_ce_argmax(model, tok)
    return model, routing_spec_of(model.config), tok, ref, ref_am


def test_argmax_agreement_counts_rows_targets_and_leading_runs():
    ref = torch.zeros(2, 8, dtype=torch.int64)
    pol = ref.clone()
    # sequence 0, requests of g=4: [same, same, diff, same], [diff, same, same, same]
    pol[0, 2] = 1
    pol[0, 4] = 1
    out = argmax_agreement(pol, ref, 4)
    assert out["agree"] == pytest.approx(14 / 16)
    assert out["agree_first"] == pytest.approx(3 / 4)        # one target row of four changed
    assert out["accept"] == pytest.approx((2 + 0 + 4 + 4) / 4 / 4)  # leading unchanged rows / g
    same = argmax_agreement(ref, ref, 2)
    assert same == {"agree": 1.0, "agree_first": 1.0, "accept": 1.0}
    with pytest.raises(ValueError, match="multiple of g"):
        argmax_agreement(ref, ref, 3)
    with pytest.raises(ValueError, match="one shape"):
        argmax_agreement(ref[:1], ref, 2)


def test_shuffled_layout_mixes_sequences_and_keeps_offsets():
    B, g = 4, 4
    cons = StepLayout(g).request_ids(B)
    assert cons.tolist() == [b for b in range(B) for _ in range(g)]
    shuf = StepLayout(g, "shuffled").request_ids(B)
    for r in range(B):
        toks = (shuf == r).nonzero().flatten()
        assert sorted((toks % g).tolist()) == list(range(g))      # one row of each offset
        assert len(set((toks // g).tolist())) == g                # from g different sequences (B >= g)
        assert int(toks[(toks % g) == 0][0]) // g == r            # its target row is sequence r's
    assert torch.equal(StepLayout(g, "shuffled").request_ids(1), StepLayout(g).request_ids(1))
    with pytest.raises(ValueError, match="requests"):
        StepLayout(2, "random")


def test_request_layout_changes_xshare_spec_only(q, setup):
    model, routing, tok, ref, ref_am = setup
    res = {}
    for spec in ("xshare k0=1 budget=0.6 g=4", "xshare k0=1 budget=0.6 g=4 req=shuffled",
                 "xshare_spec k0=1 budget=1.0 mr=frac:0.6 g=4", "xshare_spec k0=1 budget=1.0 mr=frac:0.6 g=4 req=shuffled"):
        p = q.parse_point(spec)
        res[spec] = q.run_batch(model, p.selector(routing), tok, ref, p.layout, False, ref_am)
    # xshare selects over the union: the grouping into requests changes nothing
    assert res["xshare k0=1 budget=0.6 g=4"]["seq_deltas"] == res["xshare k0=1 budget=0.6 g=4 req=shuffled"]["seq_deltas"]
    # a request budget depends on which rows form a request
    a, b = res["xshare_spec k0=1 budget=1.0 mr=frac:0.6 g=4"], res["xshare_spec k0=1 budget=1.0 mr=frac:0.6 g=4 req=shuffled"]
    assert a["seq_deltas"] != b["seq_deltas"]
    for r in res.values():
        assert 0.0 <= r["accept"] <= r["agree_first"] <= 1.0 and 0.0 <= r["agree"] < 1.0


def test_run_batch_agreement_matches_a_direct_evaluation(q, setup):
    model, routing, tok, ref, ref_am = setup
    p = q.parse_point("xshare_spec k0=1 budget=0.6 mr=frac:0.9 g=4")
    sel = p.selector(routing)
    r = q.run_batch(model, sel, tok, ref, p.layout, False, ref_am)
    with RoutingHook(model, sel, StepLayout(4)):
        _, am = sequence_ce_argmax(model, tok)
    same = (am == ref_am).view(4, 4, 4)
    assert r["agree"] == pytest.approx(float(same.double().mean()))
    assert r["agree_first"] == pytest.approx(float(same[..., 0].double().mean()))
    top = q.run_batch(model, None, tok, ref, StepLayout(4), False, ref_am)
    assert (top["agree"], top["agree_first"], top["accept"], top["delta"]) == (1.0, 1.0, 1.0, 0.0)
    plain = q.run_batch(model, sel, tok, ref, StepLayout(1), False, ref_am)
    assert "agree" not in plain                                   # g = 1: no verify rows


def _row(q, spec, B, deltas, accepts, ratio):
    p = q.parse_point(spec)
    return {"B": B, "spec": spec, "policy": p.policy, "g": p.g, "req": p.req, "ratio": ratio,
            "delta": sum(deltas) / len(deltas), "ci95": 0.0, "batch_ids": list(range(len(deltas))),
            "batch_deltas": deltas, "agree": 0.9, "agree_first": 0.95, "accept": sum(accepts) / len(accepts),
            "batch_accept": accepts}


def test_compare_spec_interpolates_xshare_at_the_spec_points_ratio(q):
    rows = [_row(q, "xshare k0=1 budget=0.6 g=4", 4, [0.10, 0.12, 0.11], [0.6, 0.6, 0.6], 0.60),
            _row(q, "xshare k0=1 budget=0.8 g=4", 4, [0.02, 0.04, 0.03], [0.8, 0.8, 0.8], 0.80),
            _row(q, "xshare_spec k0=1 budget=0.6 mr=frac:0.9 g=4", 4, [0.20, 0.21, 0.22], [0.5, 0.5, 0.6], 0.60),
            _row(q, "xshare_spec k0=1 budget=1.0 mr=frac:0.8 g=4", 4, [0.01, 0.015, 0.01], [0.9, 0.9, 0.9], 0.75),
            _row(q, "xshare_spec k0=1 budget=1.0 mr=frac:0.8 g=4 req=shuffled", 4, [0.3, 0.3, 0.3], [0.9] * 3, 0.85)]
    out = {(c["spec"]): c for c in q.compare_spec(rows)}
    c = out["xshare_spec k0=1 budget=0.6 mr=frac:0.9 g=4"]               # same ratio as an xshare point
    assert c["verdict"] == "xshare better" and c["diff"] == pytest.approx(0.10, abs=1e-9)
    assert c["accept_diff"] == pytest.approx((0.5 + 0.5 + 0.6) / 3 - 0.6)
    c = out["xshare_spec k0=1 budget=1.0 mr=frac:0.8 g=4"]               # 3/4 of the way from 0.6 to 0.8
    assert c["xshare_delta"] == pytest.approx(0.25 * 0.11 + 0.75 * 0.03)
    assert c["diff"] == pytest.approx(0.035 / 3 - (0.25 * 0.11 + 0.75 * 0.03))
    assert c["verdict"] == "xshare_spec better"
    assert out["xshare_spec k0=1 budget=1.0 mr=frac:0.8 g=4 req=shuffled"]["verdict"].startswith("outside")
    assert "xshare_spec better" in q.spec_md(list(out.values()))


def test_guard_point_guards_the_target_rows(q, setup):
    """``guard=K``: the point's selector takes the verify-row guard; it changes the routing of the
    verify batches (consecutive requests) and is refused with request ids (shuffled requests)."""
    model, routing, tok, ref, ref_am = setup
    p = q.parse_point("xshare k0=1 budget=0.6 g=4 guard=8")
    assert p.cfg.verify_guard == 8 and q.parse_point("xshare k0=1 budget=0.6 g=4").cfg.verify_guard == 0
    on = q.run_batch(model, p.selector(routing), tok, ref, p.layout, False, ref_am)
    off_p = q.parse_point("xshare k0=1 budget=0.6 g=4")
    off = q.run_batch(model, off_p.selector(routing), tok, ref, off_p.layout, False, ref_am)
    assert on["seq_deltas"] != off["seq_deltas"] and on["distinct"] >= off["distinct"]
    shuffled = q.parse_point("xshare k0=1 budget=0.6 g=4 guard=8 req=shuffled")
    with pytest.raises(ValueError, match="request_group"):
        q.run_batch(model, shuffled.selector(routing), tok, ref, shuffled.layout, False, ref_am)
    assert all(" guard=" in s for s in q.grid("specguard") if s.endswith(("guard=8", "guard=4")))


def _grow(q, spec, deltas, accepts, ratio, first):
    r = _row(q, spec, 4, deltas, accepts, ratio)
    r.update(guard=q.parse_point(spec).cfg.verify_guard, batch_agree_first=first, agree_first=sum(first) / len(first),
             batch_agree=[0.9] * len(deltas))
    return r


def test_compare_guard_pairs_the_same_budget_and_the_frontier(q):
    rows = [_grow(q, "xshare k0=1 budget=0.6 g=4", [0.10, 0.12, 0.11], [0.6, 0.6, 0.6], 0.60, [0.9, 0.9, 0.9]),
            _grow(q, "xshare k0=1 budget=0.8 g=4", [0.02, 0.04, 0.03], [0.8, 0.8, 0.8], 0.80, [0.95, 0.95, 0.95]),
            _grow(q, "xshare k0=1 budget=0.6 g=4 guard=8", [0.05, 0.07, 0.06], [0.8, 0.8, 0.8], 0.70, [1.0, 1.0, 1.0]),
            _grow(q, "xshare k0=1 budget=0.8 g=4 guard=8", [0.03, 0.04, 0.03], [0.8, 0.8, 0.8], 0.90, [1.0, 1.0, 1.0])]
    out = {c["spec"]: c for c in q.compare_guard(rows)}
    assert set(out) == {"xshare k0=1 budget=0.6 g=4 guard=8", "xshare k0=1 budget=0.8 g=4 guard=8"}
    c = out["xshare k0=1 budget=0.6 g=4 guard=8"]
    assert c["off_spec"] == "xshare k0=1 budget=0.6 g=4" and c["off_ratio"] == 0.60
    assert c["same_delta"] == pytest.approx(-0.05) and c["same_accept"] == pytest.approx(0.2)
    assert c["same_agree_first"] == pytest.approx(0.1)
    # ratio 0.7: halfway between the unguarded 0.6 and 0.8 points, batch by batch
    assert c["front_delta"] == pytest.approx(0.07) and c["eq_delta"] == pytest.approx(-0.01)
    assert c["eq_delta_ci"] == pytest.approx(0.0, abs=1e-12)
    assert c["front_accept"] == pytest.approx(0.7) and c["eq_accept"] == pytest.approx(0.1)
    assert c["verdict"] == "guard lower dCE; guard higher accept"
    assert out["xshare k0=1 budget=0.8 g=4 guard=8"]["verdict"].startswith("outside")
    md = q.guard_md(list(out.values()))
    assert "guard lower dCE" in md and "Equal expert ratio" in md
