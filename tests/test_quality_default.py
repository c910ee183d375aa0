"""The ``auto`` preset keeps its documented quality bound on a fixed held-out slice.

The trained model, the committed held-out eval windows (never trained on), mixed batches at every
batch size the preset was chosen for; the policy is ``--xshare-budget auto`` exactly as the server
flags resolve it. Fails when a change to the preset, the reference policy or the harness pushes
the CE delta above ``PRESETS["auto"].bound_rel`` of top-k's CE at any batch size, or when the
preset stops cutting experts. ~20 s on 2 CPU cores.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sglang_xshare.config import PRESETS  # noqa: E402
from sglang_xshare.hf import evaluate_point, load_eval_set, load_model, make_batches, routing_spec_of, sequence_ce  # noqa: E402
from sglang_xshare.select import Selector  # noqa: E402
from sglang_xshare.serving.config import XShareServerConfig  # noqa: E402

#: batch size -> batches of the slice (the first windows of the committed held-out set, 64 positions)
SLICE = {1: 12, 4: 6, 16: 3, 64: 1}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = load_model()
    m.config._experts_implementation = "eager"
    return m


@pytest.mark.parametrize("B", sorted(SLICE))
def test_auto_preset_within_bound(model, B):
    routing = routing_spec_of(model.config)
    cfg = XShareServerConfig(policy="xshare", budget="auto").validate(routing).selection_config(routing)
    batches = make_batches(load_eval_set(), B, SLICE[B], "mixed", seq_len=64)
    ref = [sequence_ce(model, t) for t, _ in batches]
    res = evaluate_point(model, Selector(routing, cfg, backend="reference"), batches, ref, measure_output_error=False)
    bound = PRESETS["auto"].bound_rel
    assert res.delta_rel <= bound, f"B={B}: CE delta {res.delta:.4f} nats = {100 * res.delta_rel:.2f} % > {100 * bound} %"
    if B > 1:  # it must still cut experts (at B = 1 a nucleus may keep all of a flat token's top-k)
        assert res.distinct < res.distinct_topk
