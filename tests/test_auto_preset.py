"""``--xshare-budget auto``: the measured preset reaches every entry point (config, server flags,
``sglang.Engine`` API, replay CLI) as one budget + k0 + nucleus p, and conflicting flags fail."""

from __future__ import annotations

import json

import pytest
import torch

from sglang_xshare import RoutingSpec, Selector, XShareConfigError
from sglang_xshare.config import PRESETS, BudgetSchedule, SelectionConfig, resolve_preset
from sglang_xshare.serving.cli_flags import parse_xshare_argv
from sglang_xshare.serving.config import XShareServerConfig

AUTO = PRESETS["auto"]


def test_preset_is_valid_and_resolves():
    assert resolve_preset("auto", None, None) == (AUTO.budget, AUTO.k0, AUTO.warmup_p)
    assert resolve_preset(" AUTO ", None, None)[0] == AUTO.budget
    assert resolve_preset("0.6", 2, 0.5) == ("0.6", 2, 0.5)  # not a preset: unchanged
    assert resolve_preset("0.6", None, None) == ("0.6", 1, 0.0)
    assert BudgetSchedule.parse("auto") == BudgetSchedule.parse(AUTO.budget)
    cfg = SelectionConfig(policy="xshare", k0=AUTO.k0, warmup_p=AUTO.warmup_p, budget=BudgetSchedule.parse("auto"))
    cfg.validate(RoutingSpec(64, 8))
    assert 0 < AUTO.bound_rel < 0.05


def test_preset_conflicts_name_the_flag():
    other_k0 = AUTO.k0 + 1
    with pytest.raises(XShareConfigError, match="--xshare-warmup-k0"):
        resolve_preset("auto", other_k0, None)
    with pytest.raises(XShareConfigError, match="--xshare-warmup-p"):
        resolve_preset("auto", None, AUTO.warmup_p / 2 if AUTO.warmup_p else 0.5)
    with pytest.raises(XShareConfigError, match="--xshare-layer-budgets"):
        BudgetSchedule.parse("auto", "0:0.5")


def test_server_flags_auto():
    cfg = parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "auto"])
    sel_cfg = cfg.selection_config(RoutingSpec(64, 8))
    assert (sel_cfg.k0, sel_cfg.warmup_p) == (AUTO.k0, AUTO.warmup_p)
    assert sel_cfg.budget == BudgetSchedule.parse(AUTO.budget)
    # survives the trip to SGLang's child processes
    back = XShareServerConfig.from_json(cfg.to_json()).selection_config(RoutingSpec(64, 8))
    assert back == sel_cfg
    # the nucleus warm-up is not served (the kernels lack it): the server flag says so
    with pytest.raises(XShareConfigError, match="--xshare-warmup-p: the nucleus warm-up is not served"):
        parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "0.7", "--xshare-warmup-p", "0.6"])
    with pytest.raises(XShareConfigError, match="--xshare-warmup-p"):
        parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "0.7", "--xshare-warmup-p", "1.5"])
    with pytest.raises(XShareConfigError, match="--xshare-layer-budgets"):
        parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "auto", "--xshare-layer-budgets", "1:8"])
    with pytest.raises(XShareConfigError, match="--xshare-warmup-p"):
        parse_xshare_argv(["--xshare-policy", "cap", "--xshare-cap", "4", "--xshare-warmup-p", "0.5"]).selection_config(
            RoutingSpec(64, 8))


def test_auto_selector_matches_spelled_out_config():
    r = RoutingSpec(64, 8)
    logits = torch.randn(16, 64)
    auto = XShareServerConfig(policy="xshare", budget="auto").validate(r).selection_config(r)
    spelled = SelectionConfig(policy="xshare", k0=AUTO.k0, warmup_p=AUTO.warmup_p,
                              budget=BudgetSchedule.parse(AUTO.budget))
    a, b = Selector(r, auto, backend="reference")(logits), Selector(r, spelled, backend="reference")(logits)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)


def test_replay_cli_auto(tmp_path, capsys):
    from sglang_xshare.cli import main

    from .test_replay import small_trace

    p = small_trace().save(tmp_path / "t.npz")
    assert main(["replay", "--trace", str(p), "--budget", "auto", "--out", str(tmp_path), "--name", "a",
                 "--no-progress"]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())["overall"]
    ours = [k for k in rows if k.startswith("xshare(")]
    assert len(ours) == 1 and f"k0={AUTO.k0}" in ours[0]
    assert (f"p={AUTO.warmup_p:g}" in ours[0]) == (AUTO.warmup_p > 0)
    with pytest.raises(SystemExit):
        main(["replay", "--trace", str(p), "--budget", "auto", "--layer-budgets", "0:4", "--no-progress",
              "--out", str(tmp_path)])
