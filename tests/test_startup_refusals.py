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
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_invalid_combination_exits_2_naming_the_flag(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (the A/B switch file) resolve here
    flags, flag = REFUSED[name]
    assert main([*MODEL, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: {flag}: "), err
