"""Configuration errors name the flag; budgets parse in every mode."""

from __future__ import annotations

import pytest
import torch

from sglang_xshare import Budget, BudgetSchedule, Placement, RoutingSpec, SelectionConfig, Selector, XShareConfigError


@pytest.mark.parametrize(
    "text,mode,value",
    [("24", "count", 24), (24, "count", 24), ("0.6", "fraction", 0.6), ("frac:0.5", "fraction", 0.5),
     ("mass:0.9", "mass", 0.9), ("count:8", "count", 8), ("1.0", "fraction", 1.0)],
)
def test_budget_parse(text, mode, value):
    b = Budget.parse(text)
    assert (b.mode, b.value) == (mode, value)


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "mass:0", "mass:1.2", "abc", "nan", "frac:2"])
def test_budget_parse_rejects(text):
    with pytest.raises(XShareConfigError, match="--xshare-budget"):
        Budget.parse(text)


def test_layer_overrides():
    s = BudgetSchedule.parse("0.7", "0:32,5:mass:0.95")
    assert s.for_layer(0) == Budget("count", 32)
    assert s.for_layer(5) == Budget("mass", 0.95)
    assert s.for_layer(3) == Budget("fraction", 0.7)
    with pytest.raises(XShareConfigError, match="--xshare-layer-budgets"):
        BudgetSchedule.parse("0.7", "x:3")
    with pytest.raises(XShareConfigError, match="--xshare-layer-budgets"):
        BudgetSchedule.parse("0.7", "3")


def test_budget_exceeding_experts():
    r = RoutingSpec(16, 4)
    with pytest.raises(XShareConfigError, match="--xshare-budget.*exceeds"):
        SelectionConfig(policy="xshare", budget=BudgetSchedule.parse("17")).validate(r)
    with pytest.raises(XShareConfigError, match="--xshare-layer-budgets"):
        SelectionConfig(policy="xshare", budget=BudgetSchedule.parse("8", "1:40")).validate(r)
    with pytest.raises(XShareConfigError, match="--xshare-request-budget"):
        SelectionConfig(policy="xshare_spec", budget=BudgetSchedule.parse("8"), request_budget=Budget.parse(99)).validate(r)


def test_k0_and_k():
    r = RoutingSpec(16, 4)
    with pytest.raises(XShareConfigError, match="--xshare-warmup-k0"):
        SelectionConfig(policy="oea", k0=5).validate(r)
    with pytest.raises(XShareConfigError, match="--xshare-warmup-k0"):
        SelectionConfig(policy="oea", k0=0).validate(r)
    with pytest.raises(XShareConfigError, match="top_k"):
        RoutingSpec(4, 5)
    with pytest.raises(XShareConfigError, match="--xshare-cap"):
        SelectionConfig(policy="cap", cap=5).validate(r)


def test_unknown_policy_and_missing_budget():
    r = RoutingSpec(16, 4)
    with pytest.raises(XShareConfigError, match="--xshare-policy.*unknown"):
        SelectionConfig(policy="nope").validate(r)
    with pytest.raises(XShareConfigError, match="--xshare-budget"):
        SelectionConfig(policy="xshare").validate(r)
    # xshare_spec needs its batch budget; the request budget is optional (none: xshare over the union)
    with pytest.raises(XShareConfigError, match="--xshare-budget"):
        SelectionConfig(policy="xshare_spec").validate(r)
    assert SelectionConfig(policy="xshare_spec", budget=BudgetSchedule.parse("8")).validate(r).request_budget is None


def test_placement_errors():
    with pytest.raises(XShareConfigError, match="--ep-size.*not divisible.*placement map"):
        Placement.expert_parallel(30, 4)
    ok = Placement.from_map(30, 4, list(range(30)) + [0, 1])  # redundant experts make 32 slots
    assert ok.num_physical == 32 and ok.has_replicas
    with pytest.raises(XShareConfigError, match="physical_to_logical.*without a physical copy"):
        Placement.from_map(4, 2, [0, 1, 2, 2])
    with pytest.raises(XShareConfigError, match="--ep-size"):
        Placement.from_sglang(16, tp_size=4, ep_size=3)
    hybrid = Placement.from_sglang(16, tp_size=8, ep_size=4)
    assert hybrid.num_ranks == 4 and hybrid.experts_per_rank == 4
    with pytest.raises(XShareConfigError, match="--ep-size"):
        Selector(RoutingSpec(16, 4), SelectionConfig(policy="topk"), Placement.expert_parallel(8, 2))


def test_routing_groups():
    with pytest.raises(XShareConfigError, match="num_expert_group"):
        RoutingSpec(10, 2, num_expert_group=3, topk_group=1)
    with pytest.raises(XShareConfigError, match="topk_group"):
        RoutingSpec(16, 8, num_expert_group=8, topk_group=1)


def test_selector_rejects_wrong_logits_shape():
    s = Selector(RoutingSpec(16, 4), SelectionConfig(policy="topk"))
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        s(torch.zeros(3, 15))


def test_launcher_and_flag_parsing_do_not_import_torch():
    """The launcher, the ray launcher's flag parsing and the --xshare-* parser stay light: a fresh
    interpreter that runs them has not imported torch (or SGLang)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import sglang_xshare.launch_server\n"
        "from sglang_xshare.serving import split_xshare_argv, XShareServerConfig\n"
        "from sglang_xshare.serving.cli_flags import parse_xshare_argv\n"
        "sg, xs = split_xshare_argv(['--model-path', 'm', '--xshare-policy', 'xshare_ep', '--xshare-budget', '0.6'])\n"
        "parse_xshare_argv(xs).selection_config()\n"
        "from sglang_xshare.launch.args import parse_args\n"
        "parse_args(['--nnodes', '2', '--', '--model-path', 'm', '--xshare-policy', 'xshare', '--xshare-budget', '8'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sglang', 'triton')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
