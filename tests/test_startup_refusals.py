"""Flag combinations the README calls invalid are refused by ``sglang-xshare-launch-server`` before
anything starts: exit status 2 and ``sglang-xshare-launch-server: error: <flag>: ...`` naming the
flag (argparse's convention), through the launcher's public entry point ``main``."""

from __future__ import annotations

import pytest

from sglang_xshare.launch_server import PROG, main

MODEL = ["--model-path", "/models/does-not-exist"]
XSHARE = ["--xshare-policy", "xshare", "--xshare-budget", "0.6"]

REFUSED = {
    # "bad values fail before anything starts, `error: --xshare-budget: ...`, exit 2"
    "bad-budget": (["--xshare-policy", "xshare", "--xshare-budget", "lots"], "--xshare-budget"),
    # "--xshare-warmup-p P: nucleus warm-up: refused by the server"
    "warmup-p": ([*XSHARE, "--xshare-warmup-p", "0.9"], "--xshare-warmup-p"),
    # "--xshare-ep-global: ... oea / xshare / xshare_ep choose one expert set from all ranks' tokens"
    "ep-global-cap": (["--xshare-policy", "cap", "--xshare-cap", "2", "--xshare-ep-global"], "--xshare-ep-global"),
    "ep-global-topk": (["--xshare-policy", "topk", "--xshare-ep-global"], "--xshare-ep-global"),
    # "--xshare-hard-cap: xshare_ep: ..."
    "hard-cap-xshare": ([*XSHARE, "--xshare-hard-cap"], "--xshare-hard-cap"),
    # "--xshare-request-budget B: per-request budget m_r (xshare_spec)"
    "request-budget-xshare": ([*XSHARE, "--xshare-request-budget", "4"], "--xshare-request-budget"),
    # "--xshare-verify-guard K": verify batches only (speculative decoding), k0 < K, policies with a warm-up
    "verify-guard-without-speculative": ([*XSHARE, "--xshare-verify-guard", "4"], "--xshare-verify-guard"),
    "verify-guard-cap": (["--xshare-policy", "cap", "--xshare-cap", "2", "--xshare-verify-guard", "4"],
                         "--xshare-verify-guard"),
    "verify-guard-at-k0": ([*XSHARE, "--xshare-warmup-k0", "2", "--xshare-verify-guard", "2"], "--xshare-verify-guard"),
    "verify-guard-negative": ([*XSHARE, "--xshare-verify-guard", "-1"], "--xshare-verify-guard"),
    "verify-guard-off": (["--xshare-policy", "off", "--xshare-verify-guard", "4"], "--xshare-verify-guard"),
    # "--xshare-cap K': per-token cap (cap)"
    "cap-xshare": ([*XSHARE, "--xshare-cap", "2"], "--xshare-cap"),
    "cap-without-value": (["--xshare-policy", "cap"], "--xshare-cap"),
    "budget-oea": (["--xshare-policy", "oea", "--xshare-budget", "0.6"], "--xshare-budget"),
    "xshare-without-budget": (["--xshare-policy", "xshare"], "--xshare-budget"),
    "budget-off": (["--xshare-policy", "off", "--xshare-budget", "0.6"], "--xshare-budget"),
    # "--xshare-apply-to-draft: also route the draft model's MoE layers"
    "draft-without-speculative": ([*XSHARE, "--xshare-apply-to-draft"], "--xshare-apply-to-draft"),
    # xshare_spec groups the draft tokens of target-verify batches
    "spec-without-speculative": (["--xshare-policy", "xshare_spec", "--xshare-budget", "8",
                                  "--xshare-request-budget", "4"], "--xshare-policy"),
    # "--xshare-metrics [--xshare-metrics-interval N]", "--xshare-record-trace PATH [--xshare-record-trace-steps S]"
    "metrics-interval-alone": ([*XSHARE, "--xshare-metrics-interval", "5"], "--xshare-metrics-interval"),
    "trace-steps-alone": ([*XSHARE, "--xshare-record-trace-steps", "5"], "--xshare-record-trace-steps"),
    # "--xshare-ab-switch PATH: ... compares the policy with SGLang's routing"; arms and idle arms need it
    "ab-switch-topk": (["--xshare-policy", "topk", "--xshare-ab-switch", "arm"], "--xshare-ab-switch"),
    "ab-arm-without-switch": ([*XSHARE, "--xshare-ab-arm", "policy=oea"], "--xshare-ab-arm"),
    "ab-arm-topk": ([*XSHARE, "--xshare-ab-switch", "arm", "--xshare-ab-arm", "policy=topk"], "--xshare-ab-arm"),
    "ab-idle-arms-without-switch": ([*XSHARE, "--xshare-ab-idle-arms", "compute"], "--xshare-ab-idle-arms"),
    # "--xshare-hard-cap: xshare_ep: ..." (and its companion --xshare-no-fill-to-peak)
    "no-fill-to-peak-xshare": ([*XSHARE, "--xshare-no-fill-to-peak"], "--xshare-no-fill-to-peak"),
    # "--xshare-layer-budgets": per-layer overrides of the batch budget
    "layer-budgets-cap": (["--xshare-policy", "cap", "--xshare-cap", "2", "--xshare-layer-budgets", "3:0.8"],
                          "--xshare-layer-budgets"),
    # bad values of the documented choices
    "min-tokens-zero": ([*XSHARE, "--xshare-min-tokens", "0"], "--xshare-min-tokens"),
    "warmup-k0-zero": ([*XSHARE, "--xshare-warmup-k0", "0"], "--xshare-warmup-k0"),
    "metrics-interval-zero": ([*XSHARE, "--xshare-metrics", "--xshare-metrics-interval", "0"],
                              "--xshare-metrics-interval"),
    "ab-switch-missing-directory": ([*XSHARE, "--xshare-ab-switch", "no/such/dir/arm"], "--xshare-ab-switch"),
    # "--xshare-ep-global": also xshare_spec (its statistics are per request, not shared over ranks)
    "ep-global-xshare_spec": (["--xshare-policy", "xshare_spec", "--xshare-budget", "8", "--xshare-request-budget", "4",
                               "--xshare-ep-global"], "--xshare-ep-global"),
    # an arm takes only the policy flags: --xshare-ep-global is the server's, never an arm's
    "ab-arm-ep-global": ([*XSHARE, "--xshare-ep-global", "--xshare-ab-switch", "arm", "--xshare-ab-arm",
                          "policy=cap,cap=2,ep-global"], "--xshare-ab-arm"),
}

#: ``--xshare-ep-global`` with each policy that has no batch statistics (its REFUSED entry).
EP_GLOBAL_REFUSED = {"topk": "ep-global-topk", "cap": "ep-global-cap", "xshare_spec": "ep-global-xshare_spec"}


@pytest.mark.parametrize("name", list(REFUSED))
def test_invalid_combination_exits_2_naming_the_flag(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (the A/B switch file) resolve here
    flags, flag = REFUSED[name]
    assert main([*MODEL, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: {flag}: "), err


def test_every_policy_without_batch_statistics_refuses_ep_global():
    """Each policy without the ``ep_global`` capability has a refusal case above (a new policy
    without it needs one too)."""
    from sglang_xshare.select.traits import TRAITS, policies_with

    assert set(EP_GLOBAL_REFUSED) == set(TRAITS) - set(policies_with("ep_global"))
    for policy, name in EP_GLOBAL_REFUSED.items():
        flags, flag = REFUSED[name]
        assert flags[flags.index("--xshare-policy") + 1] == policy and "--xshare-ep-global" in flags
        assert flag == "--xshare-ep-global"


def test_ab_arm_without_batch_statistics_runs_per_rank_under_ep_global(tmp_path, monkeypatch):
    """``--xshare-ep-global`` with an arm whose policy has no batch statistics (``cap``) is accepted:
    the flag belongs to the server's policy; such an arm routes every token from its own logits,
    which is the same on every rank however SGLang splits the batch, so the arm has nothing to
    all-reduce and runs without the flag (docs/flags.md). An arm with statistics (``oea``) keeps it."""
    from sglang_xshare.serving.cli_flags import parse_xshare_argv
    from sglang_xshare.serving.measure.arms import arm_configs

    monkeypatch.chdir(tmp_path)
    cfg = parse_xshare_argv([*XSHARE, "--xshare-ep-global", "--xshare-ab-switch", "arm", "--xshare-ab-arm",
                             "policy=cap,cap=2", "--xshare-ab-arm", "policy=oea"])
    main_cfg, cap, oea = arm_configs(cfg)
    assert (main_cfg.ep_global, cap.policy, cap.ep_global, oea.policy, oea.ep_global) == (True, "cap", False, "oea", True)
