"""The verify budget: speculative verify batches (``request_group = g >= 2``) take
``SelectionConfig.verify_budget`` instead of the layer's batch budget; decode batches keep it.
The server flag ``--xshare-verify-budget`` is in ``tests/test_sglang_flags.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sglang_xshare import Budget, BudgetSchedule, RoutingSpec, SelectionConfig, Selector, XShareConfigError

from .conftest import clustered_logits

E, K, T = 64, 8, 32


def make(policy: str = "xshare", budget: str = "0.5", verify: str | None = "1.0", backend: str = "reference",
         **kw) -> Selector:
    cfg = SelectionConfig(policy=policy, budget=BudgetSchedule.parse(budget),
                          verify_budget=None if verify is None else Budget.parse(verify), **kw)
    return Selector(RoutingSpec(E, K), cfg, backend=backend)


def test_verify_batches_take_the_verify_budget_decode_batches_the_batch_budget():
    """Budget 0.5 with verify budget 1.0 (every top-k expert): a verify batch (g = 4) routes as
    plain top-k; the same tokens as a decode batch (or g = 1) are cut as budget 0.5 cuts them; a
    verify budget of 0.5 is the batch budget's selection bit for bit."""
    logits = clustered_logits(T, E, seed=11)
    topk = Selector(RoutingSpec(E, K), SelectionConfig(policy="topk"), backend="reference")(logits).topk_ids
    sel = make()
    cut = make(verify=None)(logits).topk_ids
    assert torch.equal(sel(logits, request_group=4).topk_ids, topk)
    assert torch.equal(sel(logits).topk_ids, cut) and torch.equal(sel(logits, request_group=1).topk_ids, cut)
    assert not torch.equal(cut, topk), "budget 0.5 must cut these tokens"
    assert torch.equal(make(verify="0.5")(logits, request_group=4).topk_ids, make(verify=None)(logits, request_group=4).topk_ids)
    # a count verify budget below the batch budget cuts deeper in verify batches only
    deep = make(budget="1.0", verify="12")
    assert torch.equal(deep(logits).topk_ids, topk)
    assert deep(logits, request_group=4).topk_ids.unique().numel() - 1 <= 12  # (-1 empty slots aside)


def test_verify_budget_is_checked_at_configuration_time():
    with pytest.raises(XShareConfigError, match="--xshare-verify-budget: policy oea takes no batch budget"):
        Selector(RoutingSpec(E, K), SelectionConfig(policy="oea", verify_budget=Budget.parse("0.9")))
    with pytest.raises(XShareConfigError, match="--xshare-verify-budget"):
        make(verify="65")  # more experts than the model has


_KERNEL = textwrap.dedent("""
    import torch
    from sglang_xshare import Budget, BudgetSchedule, RoutingSpec, SelectionConfig, Selector
    from tests.conftest import clustered_logits
    logits = clustered_logits(32, 64, seed=11)
    topk = Selector(RoutingSpec(64, 8), SelectionConfig(policy="topk"), backend="reference")(logits).topk_ids
    full = SelectionConfig(policy="xshare", budget=BudgetSchedule.parse("0.5"), verify_budget=Budget.parse("1.0"))
    ker = Selector(RoutingSpec(64, 8), full, backend="kernel")
    assert torch.equal(ker(logits, request_group=4).topk_ids.to(torch.int32), topk.to(torch.int32))
    assert not torch.equal(ker(logits).topk_ids.to(torch.int32), topk.to(torch.int32))
    for verify in ("1.0", "12"):
        cfg = SelectionConfig(policy="xshare", budget=BudgetSchedule.parse("0.5"), verify_budget=Budget.parse(verify))
        ref = Selector(RoutingSpec(64, 8), cfg, backend="reference")
        ker = Selector(RoutingSpec(64, 8), cfg, backend="kernel")
        for g in (None, 4):
            a, b = ref(logits, request_group=g), ker(logits, request_group=g)
            assert torch.equal(a.topk_ids.to(torch.int32), b.topk_ids.to(torch.int32)), (verify, g)
    print("ok")
""")


def test_the_kernel_path_takes_the_verify_budget_too():
    """The Triton kernels (interpreter) read the same context: equal to the reference in verify
    and decode batches."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _KERNEL], env=env, capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
