"""Quality yardstick on the trained evaluation MoE (CPU, a few small batches).

* plain top-k through the Selector hook vs itself: CE delta exactly 0, and equal to the unhooked model;
* a budgeted xshare run: finite, non-zero CE delta, fewer activated experts than top-k;
* speculative layout and xshare_spec run; the decode-step regrouping is a bijection;
* the trace recorder writes the sglang_xshare.trace format and round-trips.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sglang_xshare.config import Budget, BudgetSchedule, SelectionConfig  # noqa: E402
from sglang_xshare.hf import (StepLayout, evaluate_point, load_eval_set, load_model, make_batches,  # noqa: E402
                              record_trace, routing_spec_of, sequence_ce)
from sglang_xshare.hf.hook import from_decode_steps, to_decode_steps  # noqa: E402
from sglang_xshare.select import Selector  # noqa: E402
from sglang_xshare.trace import Trace  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = load_model()
    model.config._experts_implementation = "eager"
    ev = load_eval_set()
    batches = make_batches(ev, batch_size=4, num_batches=3, composition="mixed", seq_len=16)
    ref = [sequence_ce(model, t) for t, _ in batches]
    return model, ev, routing_spec_of(model.config), batches, ref


def test_evaluation_model_and_eval_set(setup):
    model, ev, routing, batches, ref = setup
    assert routing.num_experts == 64 and routing.top_k == 8
    assert ev.tokens.shape[0] == len(ev.datasets) == 3
    # held-out CE of the trained model is far below a uniform guess (ln 8192 = 9.01)
    assert all(float(r.mean()) < 5.0 for r in ref)
    # mixed batches really mix datasets
    assert len(set(batches[0][1].tolist())) == 3


def test_topk_vs_itself_is_exactly_zero(setup):
    model, ev, routing, batches, ref = setup
    sel = Selector(routing, SelectionConfig(policy="topk"), backend="reference")
    res = evaluate_point(model, sel, batches, ref)
    assert res.delta == 0.0
    assert all(d == 0.0 for d in res.batch_deltas)
    assert res.distinct == res.distinct_topk
    assert res.retained_mass == pytest.approx(1.0, abs=1e-6)
    assert res.moe_rel_err == 0.0
    # the unhooked transformers model gives the same CE (the hook changes nothing for top-k)
    again = evaluate_point(model, None, batches, ref)
    assert again.delta == pytest.approx(0.0, abs=1e-6)


def test_budgeted_xshare_finite_nonzero(setup):
    model, ev, routing, batches, ref = setup
    cfg = SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("0.5"))
    res = evaluate_point(model, Selector(routing, cfg, backend="reference"), batches, ref)
    assert math.isfinite(res.delta) and res.delta != 0.0
    assert math.isfinite(res.ci95)
    assert res.distinct < res.distinct_topk
    assert 0.0 < res.retained_mass < 1.0
    assert 0.0 < res.moe_rel_err < 1.5


def test_speculative_layout_runs(setup):
    model, ev, routing, batches, ref = setup
    cfg = SelectionConfig(policy="xshare_spec", k0=1, budget=BudgetSchedule.parse("0.6"),
                          request_budget=Budget.parse("frac:0.75"))
    res = evaluate_point(model, Selector(routing, cfg, backend="reference"), batches, ref, StepLayout(4))
    assert math.isfinite(res.delta)
    assert res.distinct < res.distinct_topk
    with pytest.raises(ValueError, match="multiple of tokens_per_request"):
        evaluate_point(model, Selector(routing, cfg, backend="reference"), batches[:1], ref[:1], StepLayout(3))


def test_decode_step_regrouping_is_a_bijection():
    B, S, g = 3, 8, 4
    x = torch.arange(B * S)
    steps = to_decode_steps(x, B, S, g)
    assert steps.shape == (S // g, B * g)
    # step 1 holds positions 4..7 of every sequence, sequence-major
    assert steps[1].tolist() == [b * S + p for b in range(B) for p in range(4, 8)]
    assert torch.equal(from_decode_steps(steps, B, S, g), x)


def test_recorder_round_trips(setup, tmp_path):
    model, ev, routing, batches, ref = setup
    tr = record_trace(model, batches[:2], StepLayout(2), datasets=ev.datasets, source="test")
    S_pos = batches[0][0].shape[1] - 1
    assert tr.logits.shape == (2 * S_pos // 2, 6, 4 * 2, 64)
    assert tr.logits.dtype == np.float16
    path = tr.save(tmp_path / "t.npz")
    back = Trace.load(path)
    assert np.array_equal(back.logits, tr.logits)
    assert np.array_equal(back.request_ids, tr.request_ids)
    assert np.array_equal(back.dataset_ids, tr.dataset_ids)
    assert back.meta["tokens_per_request"] == 2 and back.routing == routing
    # the two tokens of one request share an id; requests are distinct within a step
    assert back.request_ids[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # recorded logits are the router's: top-k of a step equals the model's own routing
    step = next(back.steps())
    assert step.logits.shape == (6, 8, 64) and step.num_valid == 8


def test_repository_traces_load():
    from sglang_xshare.hf import default_model_dir

    for name in ("trace_mixed_b16.npz", "trace_homog_b16.npz", "trace_spec_b8_g4.npz"):
        tr = Trace.load(default_model_dir() / name)
        assert tr.meta["num_experts"] == 64 and tr.meta["top_k"] == 8
        assert np.isfinite(tr.logits).all()
