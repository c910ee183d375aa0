"""``--xshare-*`` flags next to SGLang's own ``ServerArgs`` flags (CPU, sglang installed)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("sglang")
pytestmark = pytest.mark.sglang

from sglang_xshare.config import Budget, XShareConfigError  # noqa: E402
from sglang_xshare.serving.api import disable, enable  # noqa: E402
from sglang_xshare.serving.config import ENV_VAR, XShareServerConfig  # noqa: E402
from sglang_xshare.serving.measure.arms import arm_configs  # noqa: E402
from sglang_xshare.serving.cli_flags import (  # noqa: E402
    build_parser,
    parse_server_argv,
    parse_xshare_argv,
    split_xshare_argv,
)

SGLANG_FLAGS = [
    "--model-path", "dummy", "--tp-size", "4", "--ep-size", "4", "--moe-a2a-backend", "deepep",
    "--enable-eplb", "--ep-num-redundant-experts", "8", "--ep-dispatch-algorithm", "dynamic",
    "--cuda-graph-max-bs-decode", "64", "--mem-fraction-static", "0.8",
]


def test_accepts_sglang_flags_and_xshare_flags():
    argv = SGLANG_FLAGS[:4] + ["--xshare-policy", "xshare_ep", "--xshare-budget=0.6"] + SGLANG_FLAGS[4:] + [
        "--xshare-warmup-k0", "2", "--xshare-layer-budgets", "0:32,5:mass:0.95", "--xshare-metrics"]
    server_args, cfg = parse_server_argv(argv)
    assert server_args.model_path == "dummy" and server_args.tp_size == 4 and server_args.ep_size == 4
    assert server_args.moe_a2a_backend == "deepep" and server_args.enable_eplb is True
    assert server_args.ep_num_redundant_experts == 8 and server_args.ep_dispatch_algorithm == "dynamic"
    assert cfg.policy == "xshare_ep" and cfg.budget == "0.6" and cfg.warmup_k0 == 2 and cfg.metrics
    sched = cfg.selection_config().budget
    assert str(sched.default) == "frac:0.6" and str(sched.for_layer(5)) == "mass:0.95" and str(sched.for_layer(0)) == "32"


def test_split_keeps_order_and_values():
    sg, xs = split_xshare_argv(["--model-path", "m", "--xshare-policy", "cap", "--xshare-cap=2", "--tp", "2",
                                "--xshare-apply-to-draft"])
    assert sg == ["--model-path", "m", "--tp", "2"]
    assert xs == ["--xshare-policy", "cap", "--xshare-cap=2", "--xshare-apply-to-draft"]


@pytest.mark.parametrize("argv, flag, fragment", [
    (["--xshare-policy", "greedy"], "--xshare-policy", "unknown policy 'greedy'"),
    (["--xshare-policy", "auto"], "--xshare-policy", "--xshare-policy xshare --xshare-budget auto"),
    (["--xshare-policy", "0.7"], "--xshare-policy", "--xshare-policy xshare --xshare-budget 0.7"),
    (["--xshare-policy", "xshare", "--xshare-budget", "lots"], "--xshare-budget", "cannot parse budget"),
    (["--xshare-policy", "xshare", "--xshare-budget", "1.5"], "--xshare-budget", "fraction must be in (0, 1]"),
    (["--xshare-policy", "xshare", "--xshare-budget", "0"], "--xshare-budget", "must be >= 1"),
    (["--xshare-policy", "xshare", "--xshare-budget", "mass:2"], "--xshare-budget", "mass:X"),
    (["--xshare-policy", "xshare"], "--xshare-budget", "needs a batch budget"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-warmup-k0", "0"], "--xshare-warmup-k0", ">= 1"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-warmup-k0", "two"], "--xshare-warmup-k0", "invalid int"),
    (["--xshare-policy", "cap"], "--xshare-cap", "needs --xshare-cap"),
    (["--xshare-policy", "topk", "--xshare-budget", "8"], "--xshare-budget", "takes no batch budget"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-layer-budgets", "a:3"], "--xshare-layer-budgets", "integer"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-layer-budgets", "3"], "--xshare-layer-budgets", "LAYER:BUDGET"),
    (["--xshare-budget", "8"], "--xshare-budget", "no effect with --xshare-policy off"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-empty-slots", "zero"], "--xshare-empty-slots", "minus_one"),
    (["--xshare-metrics-interval", "0"], "--xshare-metrics-interval", ">= 1"),
    (["--xshare-record-trace", "/nonexistent/dir/t.npz"], "--xshare-record-trace", "does not exist"),
    (["--xshare-budjet", "8"], "--xshare-budjet", "unknown flag"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-arm", "policy=oea"], "--xshare-ab-arm",
     "add --xshare-ab-switch"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch", "/tmp/arm", "--xshare-ab-arm",
      "policy=oea,metrics"], "--xshare-ab-arm", "'metrics' is not a policy flag"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch", "/tmp/arm", "--xshare-ab-arm",
      "policy=topk"], "--xshare-ab-arm", "other than off / topk"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch", "/tmp/arm", "--xshare-ab-arm",
      "policy=xshare,budget=lots"], "--xshare-ab-arm", "cannot parse budget"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch", "/tmp/arm", "--xshare-ab-arm",
      "policy=cap"], "--xshare-ab-arm", "needs --xshare-cap"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-min-tokens", "\u00b2"], "--xshare-min-tokens",
     "integer >= 1"),
    (["--xshare-policy", "xshare", "--xshare-budget", "count:1.5"], "--xshare-budget", "count:N needs an integer"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-layer-budgets=-1:4"], "--xshare-layer-budgets",
     ">= 0"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-layer-budgets", "3:4,3:30"],
     "--xshare-layer-budgets", "given twice"),
    # flags that would be silently ignored
    (["--xshare-policy", "oea", "--xshare-hard-cap"], "--xshare-hard-cap", "only policy xshare_ep"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-no-fill-to-peak"], "--xshare-no-fill-to-peak",
     "only policy xshare_ep"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-metrics-interval", "5"], "--xshare-metrics-interval",
     "without --xshare-metrics"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-record-trace-steps", "5"],
     "--xshare-record-trace-steps", "without --xshare-record-trace"),
    (["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-idle-arms", "compute"], "--xshare-ab-idle-arms",
     "without --xshare-ab-switch"),
])
def test_rejects_bad_values_naming_the_flag(argv, flag, fragment):
    with pytest.raises(XShareConfigError) as e:
        parse_server_argv(["--model-path", "dummy"] + argv)
    assert e.value.flag == flag
    assert str(e.value).startswith(flag + ":") and fragment in str(e.value)


def test_xshare_spec_needs_speculative_decoding():
    argv = ["--model-path", "dummy", "--xshare-policy", "xshare_spec", "--xshare-budget", "8", "--xshare-request-budget", "4"]
    with pytest.raises(XShareConfigError, match="--speculative-algorithm") as e:
        parse_server_argv(argv)
    assert e.value.flag == "--xshare-policy"
    _, cfg = parse_server_argv(argv + ["--speculative-algorithm", "EAGLE", "--speculative-num-draft-tokens", "4"])
    assert cfg.policy == "xshare_spec"


def test_xshare_spec_without_request_budget_is_the_batch_budget():
    """No --xshare-request-budget: the server takes xshare_spec with no per-request budget (xshare's selection)."""
    argv = ["--model-path", "dummy", "--xshare-policy", "xshare_spec", "--xshare-budget", "8",
            "--speculative-algorithm", "EAGLE", "--speculative-num-draft-tokens", "4"]
    _, cfg = parse_server_argv(argv)
    assert cfg.policy == "xshare_spec" and cfg.request_budget is None
    assert cfg.selection_config(None).request_budget is None


def test_budget_checked_against_local_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 16, "num_experts_per_tok": 4}))
    with pytest.raises(XShareConfigError, match="exceeds the model's 16 experts"):
        parse_server_argv(["--model-path", str(tmp_path), "--xshare-policy", "xshare", "--xshare-budget", "24"])
    with pytest.raises(XShareConfigError, match=r"k0 must be in \[1, top_k=4\]"):
        parse_server_argv(["--model-path", str(tmp_path), "--xshare-policy", "xshare", "--xshare-budget", "8",
                           "--xshare-warmup-k0", "5"])
    _, cfg = parse_server_argv(["--model-path", str(tmp_path), "--xshare-policy", "xshare", "--xshare-budget", "8"])
    assert cfg.budget == "8"


@pytest.mark.parametrize("arm,fragment", [
    ("policy=xshare,budget=24", "exceeds the model's 16 experts"),
    ("policy=oea,warmup-k0=9", "top_k=4"),
    ("policy=cap,cap=9", "top_k=4"),
    ("policy=xshare_spec,budget=8,request-budget=4", "--speculative-algorithm"),
])
def test_ab_arms_checked_against_the_model_and_the_server(tmp_path, arm, fragment):
    """Every A/B arm meets the checks the main policy meets: against the local model's
    ``config.json`` and against SGLang's server arguments, at start-up, not at model load inside
    the scheduler."""
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 16, "num_experts_per_tok": 4}))
    argv = ["--model-path", str(tmp_path), "--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch",
            str(tmp_path / "arm")]
    with pytest.raises(XShareConfigError, match=fragment) as e:
        parse_server_argv(argv + ["--xshare-ab-arm", arm])
    assert e.value.flag == "--xshare-ab-arm"
    parse_server_argv(argv + ["--xshare-ab-arm", "policy=oea,warmup-k0=4"])


def test_xshare_ep_experts_not_divisible_by_ep_size_without_a_map(tmp_path):
    """``xshare_ep`` places experts on EP ranks: with the model's expert count known, an EP size
    that does not divide it and no placement map is refused at start-up naming ``--ep-size`` (main
    policy or arm); a placement map (redundant experts) makes it valid; other policies do not care."""
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 64, "num_experts_per_tok": 4}))
    base = ["--model-path", str(tmp_path), "--tp-size", "6", "--ep-size", "6"]
    with pytest.raises(XShareConfigError, match="64 experts are not divisible by EP size 6") as e:
        parse_server_argv(base + ["--xshare-policy", "xshare_ep", "--xshare-budget", "0.7"])
    assert e.value.flag == "--ep-size"
    with pytest.raises(XShareConfigError, match="not divisible"):
        parse_server_argv(base + ["--xshare-policy", "xshare", "--xshare-budget", "0.7", "--xshare-ab-switch",
                                  str(tmp_path / "arm"), "--xshare-ab-arm", "policy=xshare_ep,budget=0.7"])
    parse_server_argv(base + ["--xshare-policy", "xshare", "--xshare-budget", "0.7"])
    parse_server_argv(base + ["--xshare-policy", "xshare_ep", "--xshare-budget", "0.7", "--ep-num-redundant-experts", "2"])


def test_sglang_own_errors_stay_sglang_errors():
    with pytest.raises(SystemExit):  # argparse: unknown SGLang flag
        parse_server_argv(["--model-path", "dummy", "--no-such-sglang-flag", "1"])


def test_help_lists_both_flag_sets():
    text = build_parser().format_help()
    for flag in ("--model-path", "--moe-a2a-backend", "--ep-dispatch-algorithm", "--xshare-policy", "--xshare-budget",
                 "--xshare-warmup-k0", "--xshare-request-budget", "--xshare-layer-budgets", "--xshare-metrics",
                 "--xshare-record-trace", "--xshare-verify-guard", "--xshare-verify-budget"):
        assert flag in text


def test_env_roundtrip_and_unknown_keys():
    cfg = parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "mass:0.9", "--xshare-metrics"])
    env: dict[str, str] = {}
    cfg.export_env(env)
    assert XShareServerConfig.from_env(env) == cfg
    with pytest.raises(XShareConfigError, match="unknown keys"):
        XShareServerConfig.from_json(json.dumps({"policy": "xshare", "budgett": "3"}))
    assert XShareServerConfig.from_env({}) is None


def test_launcher_exits_2_with_flag_message(capsys):
    from sglang_xshare.launch_server import main

    assert main(["--model-path", "dummy", "--xshare-policy", "xshare", "--xshare-budget", "lots"]) == 2
    err = capsys.readouterr().err
    assert "error: --xshare-budget: cannot parse budget 'lots'" in err


def test_enable_exports_env_for_children(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("SGLANG_PLUGINS", "other")
    try:
        cfg = enable(policy="xshare", budget=0.5, warmup_k0=1, layer_budgets={2: "mass:0.9"}, metrics=True)
        assert XShareServerConfig.from_json(os.environ[ENV_VAR]) == cfg
        assert os.environ["SGLANG_PLUGINS"] == "other,xshare"
        from sglang_xshare.serving.install import installed_config

        assert installed_config() == cfg
        with pytest.raises(XShareConfigError, match="--xshare-budget"):
            enable(policy="xshare", budget="nope")
    finally:
        disable()
    assert ENV_VAR not in os.environ


def test_hard_cap_flag_reaches_the_selection_config():
    cfg = parse_xshare_argv(["--xshare-policy", "xshare_ep", "--xshare-budget", "24", "--xshare-hard-cap"])
    assert cfg.hard_cap and cfg.selection_config().hard_cap
    assert XShareServerConfig.from_json(cfg.to_json()).hard_cap  # reaches the spawned processes
    assert not parse_xshare_argv(["--xshare-policy", "xshare_ep", "--xshare-budget", "24"]).selection_config().hard_cap


SPECULATIVE = ["--speculative-algorithm", "EAGLE", "--speculative-num-draft-tokens", "4"]


def test_verify_guard_flag_reaches_the_selection_config_and_the_children(tmp_path):
    """``--xshare-verify-guard K``: parsed next to SGLang's speculative flags, in the core
    SelectionConfig, carried to SGLang's child processes (JSON) and to an A/B arm; off (0) by default."""
    xs = ["--xshare-policy", "xshare", "--xshare-budget", "0.8", "--xshare-verify-guard", "8"]
    _, cfg = parse_server_argv(["--model-path", "dummy", *xs, *SPECULATIVE])
    assert cfg.verify_guard == 8 and cfg.selection_config().verify_guard == 8
    assert XShareServerConfig.from_json(cfg.to_json()).selection_config().verify_guard == 8
    assert parse_xshare_argv(xs[:4]).selection_config().verify_guard == 0
    arm = ["--xshare-ab-switch", str(tmp_path / "arm"), "--xshare-ab-arm", "policy=xshare,budget=0.8,verify-guard=4"]
    _, cfg = parse_server_argv(["--model-path", "dummy", *xs[:4], *arm, *SPECULATIVE])
    main, a1 = arm_configs(cfg)
    assert (main.verify_guard, a1.verify_guard, a1.selection_config().verify_guard) == (0, 4, 4)


def test_verify_guard_checked_against_the_model_and_the_server(tmp_path):
    """K above the model's top-k (local ``config.json``), the guard without speculative decoding (no
    verify batches), or with a policy without a warm-up floor: refused at configuration time."""
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 16, "num_experts_per_tok": 4}))
    xs = ["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-verify-guard"]
    with pytest.raises(XShareConfigError, match=r"--xshare-verify-guard: K must be in \(k0=1, top_k=4\]"):
        parse_server_argv(["--model-path", str(tmp_path), *xs, "5", *SPECULATIVE])
    _, cfg = parse_server_argv(["--model-path", str(tmp_path), *xs, "4", *SPECULATIVE])
    assert cfg.verify_guard == 4
    with pytest.raises(XShareConfigError, match="--speculative-algorithm") as e:
        parse_server_argv(["--model-path", str(tmp_path), *xs, "4"])
    assert e.value.flag == "--xshare-verify-guard"
    with pytest.raises(XShareConfigError, match="--xshare-ab-arm: .*--speculative-algorithm"):
        parse_server_argv(["--model-path", "dummy", *xs[:4], "--xshare-ab-switch", str(tmp_path / "arm"),
                           "--xshare-ab-arm", "policy=oea,verify-guard=4"])
    with pytest.raises(XShareConfigError, match="--xshare-verify-guard: policy cap"):
        parse_server_argv(["--model-path", "dummy", "--xshare-policy", "cap", "--xshare-cap", "2",
                           "--xshare-verify-guard", "4", *SPECULATIVE])


def test_verify_budget_flag_reaches_the_selection_config_and_is_checked(tmp_path):
    """``--xshare-verify-budget B``: in the core SelectionConfig (parsed), carried to SGLang's child
    processes and to an A/B arm; refused without speculative decoding, with a policy without a
    budget and with a preset."""
    from sglang_xshare import Budget

    xs = ["--xshare-policy", "xshare", "--xshare-budget", "0.7", "--xshare-verify-budget", "0.9"]
    _, cfg = parse_server_argv(["--model-path", "dummy", *xs, *SPECULATIVE])
    assert cfg.verify_budget == "0.9" and cfg.selection_config().verify_budget == Budget.parse("0.9")
    assert XShareServerConfig.from_json(cfg.to_json()).selection_config().verify_budget == Budget.parse("0.9")
    assert parse_xshare_argv(xs[:4]).selection_config().verify_budget is None
    arm = ["--xshare-ab-switch", str(tmp_path / "arm"), "--xshare-ab-arm", "policy=xshare,budget=0.7,verify-budget=40"]
    _, cfg = parse_server_argv(["--model-path", "dummy", *xs[:4], *arm, *SPECULATIVE])
    assert arm_configs(cfg)[1].selection_config().verify_budget == Budget.parse("40")
    with pytest.raises(XShareConfigError, match="--speculative-algorithm") as e:
        parse_server_argv(["--model-path", "dummy", *xs])
    assert e.value.flag == "--xshare-verify-budget"
    with pytest.raises(XShareConfigError, match="--xshare-verify-budget: policy oea takes no batch budget"):
        parse_server_argv(["--model-path", "dummy", "--xshare-policy", "oea", "--xshare-verify-budget", "0.9",
                           *SPECULATIVE])
    with pytest.raises(XShareConfigError, match="--xshare-verify-budget"):
        parse_server_argv(["--model-path", "dummy", *xs[:4], "--xshare-verify-budget", "auto", *SPECULATIVE])


def test_ab_arms_take_the_policy_flags_and_inherit_the_rest():
    """``--xshare-ab-arm SPEC``: the policy flags of one more A/B arm; the server's other flags (empty
    slots, metrics, ...) are the arm's too, ``--xshare-ep-global`` where the arm's policy has batch
    statistics; the config survives the trip to SGLang's child processes (JSON)."""
    from sglang_xshare.serving.measure.arms import arm_spec, arm_spec_argv

    argv = ["--xshare-policy", "xshare_ep", "--xshare-budget", "0.7", "--xshare-ep-global", "--xshare-empty-slots",
            "minus_one", "--xshare-ab-switch", "/tmp/arm", "--xshare-ab-arm", "policy=oea,warmup-k0=4",
            "--xshare-ab-arm", "policy=cap,cap=6,min-tokens=2"]
    _, cfg = parse_server_argv(["--model-path", "dummy"] + argv)
    main, oea, cap = arm_configs(cfg)
    assert main is cfg and (oea.policy, oea.warmup_k0, oea.ep_global, oea.empty_slots) == ("oea", 4, True, "minus_one")
    assert (cap.policy, cap.cap, cap.min_tokens, cap.ep_global, cap.budget) == ("cap", 6, "2", False, None)
    assert oea.ab_arms == () and oea.ab_switch == cfg.ab_switch
    assert XShareServerConfig.from_json(cfg.to_json()) == cfg
    flags = ["--xshare-policy", "xshare_ep", "--xshare-budget", "0.7", "--xshare-hard-cap"]
    assert arm_spec(flags) == "policy=xshare_ep,budget=0.7,hard-cap" and arm_spec_argv(arm_spec(flags)) == flags
    # a value with commas (per-layer budgets) stays one value, both ways
    flags = ["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-layer-budgets", "0:4,1:6", "--xshare-hard-cap"]
    assert arm_spec_argv(arm_spec(flags)) == flags
    _, cfg = parse_server_argv(["--model-path", "dummy", "--xshare-policy", "oea", "--xshare-ab-switch", "/tmp/arm",
                                "--xshare-ab-arm", arm_spec(flags[:6])])
    assert arm_configs(cfg)[1].budget_schedule().per_layer == {0: Budget("count", 4), 1: Budget("count", 6)}


def test_ab_idle_arms_flag_defaults_to_skip_travels_and_rejects_other_values():
    """``--xshare-ab-idle-arms``: ``skip`` unless told, ``compute`` parsed, carried to SGLang's child
    processes (JSON), and anything else is refused naming the flag."""
    from sglang_xshare.config import XShareConfigError

    base = ["--xshare-policy", "xshare", "--xshare-budget", "0.7", "--xshare-ab-switch", "/tmp/arm"]
    assert parse_xshare_argv(base).ab_idle_arms == "skip"
    cfg = parse_xshare_argv(base + ["--xshare-ab-idle-arms", "compute"])
    assert cfg.ab_idle_arms == "compute" and XShareServerConfig.from_json(cfg.to_json()).ab_idle_arms == "compute"
    with pytest.raises(XShareConfigError, match="--xshare-ab-idle-arms"):
        XShareServerConfig(policy="xshare", budget="0.7", ab_switch="/tmp/arm", ab_idle_arms="lazy").validate()


def test_ab_switch_path_with_a_tilde_is_the_one_validated(tmp_path, monkeypatch):
    """``--xshare-ab-switch=~/arm`` (the ``=`` form, the Ray launcher: no shell expands the ``~``)
    is validated as ``$HOME/arm``; the switch must read that file too, not ``./~/arm`` (it would stay
    on SGLang's routing for the whole run: an A/B of SGLang against itself, with no error)."""
    from sglang_xshare.serving.measure.switch import ABSwitch

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arm").write_text("1")
    cfg = parse_xshare_argv(["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-ab-switch=~/arm"])
    sw = ABSwitch(cfg.ab_switch, len(arm_configs(cfg)))
    assert sw.arm == 1 and sw.path == tmp_path / "arm"
