"""The serving benchmark's parts that run without a GPU: configurations, model folders, SGLang's
client arguments, metric scraping, and the server life cycle (nothing left behind)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from servebench.configs import parse_config, parse_configs
from servebench.server import MARK_ENV, Server, ServerDied, http_get, marked_processes

ROOT = Path(__file__).resolve().parents[1]


# ---- configurations ---------------------------------------------------------------------------

def test_config_grammar_maps_to_server_flags():
    c = parse_config("xshare_ep@0.7+k0=2+min=1+global")
    assert c.policy == "xshare_ep" and c.selects and not c.plain
    assert c.flags == ("--xshare-policy", "xshare_ep", "--xshare-budget", "0.7", "--xshare-warmup-k0", "2",
                       "--xshare-min-tokens", "1", "--xshare-ep-global")
    assert parse_config("off").flags == () and not parse_config("off").selects
    assert parse_config("plain").plain and parse_config("plain").flags == ()
    assert parse_config("cap+cap=6").flags == ("--xshare-policy", "cap", "--xshare-cap", "6")
    assert [c.label for c in parse_configs("off, xshare@0.7 ,oea+k0=4")] == ["off", "xshare@0.7", "oea+k0=4"]
    for bad in ("off@0.5", "plain+k0=1", "xshare@0.7+bogus=1", "xshare+nonsense", ""):
        with pytest.raises(ValueError):
            parse_configs(bad)


def test_every_config_flag_is_a_real_server_flag():
    """The flags a configuration produces parse and validate with the server's own flag parser."""
    from sglang_xshare.serving.cli_flags import parse_xshare_argv

    for text in ("xshare@0.7", "xshare_ep@0.7+global", "oea+k0=4", "cap+cap=6", "xshare@0.7+min=1",
                 "xshare_spec@0.7+rb=0.75", "xshare@0.7+vb=0.9", "oea+k0=1+guard=8"):
        cfg = parse_xshare_argv(list(parse_config(text).flags))
        assert cfg.policy == parse_config(text).policy


# ---- model folders ----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "deepseek-v3-mini"])
def test_preset_folder_is_a_loadable_model_config(tmp_path, preset):
    from transformers import AutoConfig, AutoTokenizer

    from servebench.models import PRESETS, write_model
    from sglang_xshare.serving.cli_flags import routing_from_model_config

    folder = write_model(tmp_path / preset, preset, layers=4)
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 2048
    spec = routing_from_model_config(str(folder))
    assert spec.top_k == 8 and spec.num_experts == PRESETS[preset].get("num_experts", PRESETS[preset].get("n_routed_experts"))
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.vocab_size == PRESETS[preset]["vocab_size"]
    ids = [5, 77, cfg.vocab_size - 1, 1234]
    assert tok(tok.decode(ids), add_special_tokens=False).input_ids == ids  # every id round-trips through text


@pytest.mark.sglang
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "deepseek-v3-mini"])
def test_preset_routes_tokens_apart_under_sglangs_dummy_weights(preset):
    """``--load-format dummy`` fills every parameter uniformly in +-1e-3 (SGLang's own
    ``initialize_dummy_weights``, RMSNorm weights too): the router logits are ~1e-5. A preset
    whose routing a +-1e-3 correction bias then decides alone (DeepSeek-V3's ``noaux_tc``) sends
    every token to the same ~9 experts and measures nothing; 16 tokens must spread over many."""
    pytest.importorskip("sglang")
    from sglang.srt.model_loader.weight_utils import initialize_dummy_weights

    from sglang_xshare import RoutingSpec, SelectionConfig, Selector
    from servebench.models import PRESETS

    c = PRESETS[preset]
    E, H, k = c.get("num_experts", c.get("n_routed_experts")), c["hidden_size"], c["num_experts_per_tok"]
    biased = c.get("topk_method") == "noaux_tc"  # what SGLang's DeepSeek gate keys its bias on
    m = torch.nn.Module()
    m.norm, m.gate = torch.nn.Parameter(torch.empty(H)), torch.nn.Parameter(torch.empty(E, H))
    if biased:
        m.bias = torch.nn.Parameter(torch.empty(E))
    initialize_dummy_weights(m)
    h = torch.randn(16, H, generator=torch.Generator().manual_seed(0))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * m.norm.detach()  # the MoE input: RMSNorm
    logits = h @ m.gate.detach().T
    grouped = dict(num_expert_group=c["n_group"], topk_group=c["topk_group"]) if "n_group" in c else {}
    routing = RoutingSpec(E, k, scoring=c.get("scoring_func", "softmax"), has_correction_bias=biased, **grouped)
    sel = Selector(routing, SelectionConfig(policy="topk"), backend="reference",
                   correction_bias=m.bias.detach() if biased else None)
    distinct = sel(logits).topk_ids.unique().numel()
    assert distinct >= 6 * k, f"{preset}: 16 tokens use only {distinct} distinct experts under dummy weights"


# ---- SGLang's client --------------------------------------------------------------------------

@pytest.mark.sglang
def test_bench_serving_arguments_parse_with_sglangs_parser(tmp_path):
    pytest.importorskip("sglang")
    from servebench.client import _parsed, bench_serving_argv

    argv = bench_serving_argv("http://127.0.0.1:1", "tok", concurrency=16, num_prompts=32, input_len=32,
                              output_len=256, seed=3, output_file=str(tmp_path / "o.jsonl"))
    ns = _parsed(argv)
    assert (ns.backend, ns.dataset_name, ns.max_concurrency, ns.num_prompts) == ("sglang", "random-ids", 16, 32)
    assert (ns.random_input_len, ns.random_output_len, ns.random_range_ratio) == (32, 256, 1.0)
    assert ns.disable_ignore_eos is False  # every request decodes its full length
    # no bench_serving warm-up request inside a measured run: its one-token decode steps would land in
    # the run's live-metrics window (the server is warmed once, before the first level)
    assert ns.warmup_requests == 0
    assert _parsed(bench_serving_argv("http://127.0.0.1:1", "tok", concurrency=1, num_prompts=1, input_len=8,
                                      output_len=8, seed=0, output_file=str(tmp_path / "w.jsonl"),
                                      warmup_requests=2)).warmup_requests == 2


# ---- repeated, interleaved server starts (bench/serve.py) -------------------------------------

def _serve_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_correctness_servers_side_by_side_take_gpu_groups_in_turn():
    """``serve_correctness.py --parallel``: servers on their own GPU groups while there are enough,
    then sharing them (TP 2 servers on a 2-GPU host all get both GPUs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve_correctness", ROOT / "bench" / "serve_correctness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [mod.gpu_slot(i, 2, 1, 2) for i in range(4)] == ["0", "1", "0", "1"]
    assert [mod.gpu_slot(i, 3, 2, 2) for i in range(3)] == ["0,1"] * 3
    assert [mod.gpu_slot(i, 4, 2, 8) for i in range(5)] == ["0,1", "2,3", "4,5", "6,7", "0,1"]
    assert mod.gpu_slot(3, 1, 2, 8) is None


def test_correctness_report_written_per_server_with_equality_and_paired_ce(tmp_path):
    """``serve_correctness.py`` writes its report after every finished server (a run killed later keeps
    it): token equality against the first of ``--equal``, the first differing prompt, and the
    in-server dCE paired per window against ``off``, with the servers still running named."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_serve_correctness", ROOT / "bench" / "serve_correctness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = SimpleNamespace(tp=2, ep=2, equal="plain,off,topk", prompts=3, prompt_len=4, new_tokens=2, batch=2,
                           windows=4, out=str(tmp_path), name="c", no_harness=True, mem_fraction=0.85,
                           kv_tokens=24576, parallel=4)
    ids = [[1, 2], [3, 4], [5, 6]]
    res = {"plain": {"config": "plain", "ids": ids, "ce": [2.0, 2.0, 3.0, 3.0]},
           "off": {"config": "off", "ids": ids, "ce": [2.0, 2.0, 3.0, 3.0]},
           "topk": {"config": "topk", "ids": [[1, 2], [3, 9], [5, 6]], "ce": [2.0, 2.0, 3.0, 3.0]},
           "xshare@0.7": {"config": "xshare@0.7", "ids": ids, "ce": [2.1, 2.3, 3.0, 3.2]}}
    md = mod.report(res, parse_configs("plain,off,topk,xshare@0.7"), args, [], {}, None, ["xshare_ep@0.7"])
    assert "| plain vs off | 3/3 | - |" in md and "| plain vs topk | 2/3 | 1 |" in md
    assert "Partial: still running when written: xshare_ep@0.7" in md and "--max-total-tokens 24576" in md
    q = json.loads((tmp_path / "c.json").read_text())["quality"]["xshare@0.7"]
    assert q["server_delta"] == pytest.approx(0.15)  # batches of 2 windows: +0.2 and +0.1
    cmd = mod.start(parse_config("off"), args, 1, tmp_path / "l", []).cmd
    assert cmd[cmd.index("--max-total-tokens") + 1] == "24576" and cmd[cmd.index("--mem-fraction-static") + 1] == "0.85"


def test_a_server_killed_mid_run_leaves_its_levels_and_runs_again_on_resume(tmp_path, monkeypatch):
    """After every concurrency level the state file and the results hold the server's record so far
    (marked incomplete): a kill in the middle of a server keeps its measured levels; a resumed run
    starts that server again and replaces the incomplete record."""
    serve = _serve_module()
    state = tmp_path / "state.json"
    written = []

    def killed_after_first_level(cfg, model, args, extra, work, start=0, progress=None):
        rec = {"config": cfg.label, "start": start, "levels": [{"concurrency": 1, "runs": [
            {"output_throughput": 100.0, "median_tpot_ms": 5.0}]}]}
        progress(dict(rec, error="incomplete: the run stopped after concurrency 1", wall_s=50.0))
        raise KeyboardInterrupt  # the call's time limit

    monkeypatch.setattr(serve, "run_config", killed_after_first_level)
    args = SimpleNamespace(starts=1, state=str(state), time_budget=None)
    with pytest.raises(KeyboardInterrupt):
        serve.run_rounds(parse_configs("xshare@0.7"), "m", args, [], tmp_path, 0.0,
                         on_record=lambda recs: written.append(recs))
    import json

    saved = json.loads(state.read_text())
    assert saved[0]["levels"][0]["runs"][0]["output_throughput"] == 100.0 and "incomplete" in saved[0]["error"]
    assert written and written[-1][0]["levels"]  # the results were written with the level
    rows, _ = serve.summarize(saved)
    assert rows[0]["tok_s"] == 100.0

    calls = []

    def full(cfg, model, args, extra, work, start=0, progress=None):
        calls.append(cfg.label)
        return {"config": cfg.label, "start": start, "levels": [], "wall_s": 1.0}

    monkeypatch.setattr(serve, "run_config", full)
    recs, _ = serve.run_rounds(parse_configs("xshare@0.7"), "m", args, [], tmp_path, 0.0)
    assert calls == ["xshare@0.7"] and len(recs) == 1 and "error" not in recs[0]


def test_time_budget_estimates_a_server_by_the_median_not_the_cold_first_start(tmp_path, monkeypatch):
    """A resumed call whose state holds one cold first server (230 s) and two warm ones (150 s)
    still starts a server with 200 s left: the estimate is the median (150 s x 1.1), not the
    slowest (230 s x 1.1 would skip it)."""
    import json

    serve = _serve_module()
    state = tmp_path / "state.json"
    state.write_text(json.dumps([{"config": lab, "start": 0, "levels": [], "wall_s": w}
                                 for lab, w in (("off", 230.0), ("xshare@0.7", 150.0), ("oea+k0=4", 150.0))]))
    calls = []

    def full(cfg, model, args, extra, work, start=0, progress=None):
        calls.append((cfg.label, start))
        return {"config": cfg.label, "start": start, "levels": [], "wall_s": 150.0}

    monkeypatch.setattr(serve, "run_config", full)
    clock = iter([0.0, 150.0, 300.0])  # 200 s left at the first new server, 50 s at the second
    monkeypatch.setattr(serve.time, "monotonic", lambda: next(clock))
    args = SimpleNamespace(starts=2, state=str(state), time_budget=200.0)
    recs, skipped = serve.run_rounds(parse_configs("off,xshare@0.7,oea+k0=4"), "m", args, [], tmp_path, 0.0)
    assert calls == [("off", 1)]
    assert [(lab, s) for lab, s, _ in skipped] == [("xshare@0.7", 1), ("oea+k0=4", 1)]
    assert "median of 150 s" in skipped[0][2]


def _fake_tok_s(label: str, start: int, c: int) -> float:
    # a server-to-server shift (start 1 is 2x start 0) that the paired ratio must cancel
    base = {"off": 100.0, "xshare@0.7": 120.0, "oea+k0=4": 90.0}[label] * (1 + start) * c
    return base + (3.0 if label == "off" and start == 1 else 0.0)


def test_rounds_interleave_resume_and_pair_ratios_within_a_round(tmp_path, monkeypatch):
    serve = _serve_module()
    calls = []

    def fake_run_config(cfg, model, args, extra, work, start=0, progress=None):
        calls.append((cfg.label, start))
        levels = [{"concurrency": c, "runs": [{"output_throughput": _fake_tok_s(cfg.label, start, c) + d,
                                               "median_tpot_ms": 1000.0 / _fake_tok_s(cfg.label, start, c)}
                                              for d in (-1.0, 1.0)]} for c in (1, 16)]
        return {"config": cfg.label, "start": start, "levels": levels, "wall_s": 100.0}

    monkeypatch.setattr(serve, "run_config", fake_run_config)
    configs = parse_configs("off,xshare@0.7,oea+k0=4")
    state = tmp_path / "state.json"
    args = SimpleNamespace(starts=2, state=str(state), time_budget=None)
    # a first call that has room for 4 servers of 100 s (the first has no estimate yet)
    clock = iter([0.0, 0.0, 100.0, 200.0, 300.0, 400.0, 500.0])
    monkeypatch.setattr(serve.time, "monotonic", lambda: next(clock))
    args.time_budget = 440.0
    recs, skipped = serve.run_rounds(configs, "m", args, [], tmp_path, serve.time.monotonic())
    assert calls == [("off", 0), ("xshare@0.7", 0), ("oea+k0=4", 0), ("off", 1)]  # interleaved rounds
    assert [(lab, s) for lab, s, _ in skipped] == [("xshare@0.7", 1), ("oea+k0=4", 1)]
    # the second call continues from the state file: only the two missing servers start
    calls.clear()
    args.time_budget = None
    recs, skipped = serve.run_rounds(configs, "m", args, [], tmp_path, 0.0)
    assert calls == [("xshare@0.7", 1), ("oea+k0=4", 1)] and skipped == []
    assert sorted((r["config"], r["start"]) for r in recs) == sorted(
        (c.label, s) for c in configs for s in (0, 1))

    rows, table = serve.summarize(recs)
    by = {(r["config"], r["concurrency"]): r for r in rows}
    x = by[("xshare@0.7", 16)]
    # paired: each round's own off (1600 and 3203) -> 1920/1600 and 3840/3203
    assert x["paired_ratios"] == pytest.approx([1920 / 1600, 3840 / 3203])
    assert x["paired_ratio"] == pytest.approx((1920 / 1600 + 3840 / 3203) / 2)
    # pooled: median over all four runs of each
    assert x["ratio_vs_off"] == pytest.approx(((1919 + 1921 + 3839 + 3841) / 4) / ((1599 + 1601 + 3202 + 3204) / 4))
    assert by[("off", 1)]["aa_spread"] == pytest.approx(203 / 100)  # the A/A between-start spread
    assert x["tok_s_per_start"] == {"0": 1920.0, "1": 3840.0} and x["starts"] == 2 and x["runs"] == 4
    assert "A/A max/min 2.030" in table and "1.200" in table
    # TPOT speed-up (off's TPOT / this one), paired within each round like the throughput
    assert x["tpot_paired_speedups"] == pytest.approx([1920 / 1600, 3840 / 3203])
    assert x["tpot_speedup"] == pytest.approx(((1000 / 1600 + 1000 / 3203) / 2) / ((1000 / 1920 + 1000 / 3840) / 2))


def test_plain_sglang_is_the_baseline_where_the_run_has_it():
    """With ``plain`` (SGLang's own launcher) in the run, every ratio is taken against it, not
    against ``off`` (the plugin's launcher with the policy off)."""
    serve = _serve_module()

    def rec(label, tok_s):
        return {"config": label, "start": 0, "levels": [{"concurrency": 16, "runs": [
            {"output_throughput": tok_s, "median_tpot_ms": 1000.0 / tok_s}]}]}

    rows, table = serve.summarize([rec("plain", 100.0), rec("off", 80.0), rec("xshare@0.7", 125.0)])
    by = {r["config"]: r for r in rows}
    assert serve.baseline(rows) == "plain"
    assert by["xshare@0.7"]["ratio_vs_off"] == pytest.approx(1.25) and by["off"]["ratio_vs_off"] == pytest.approx(0.8)
    assert by["xshare@0.7"]["tpot_speedup"] == pytest.approx(1.25) and "vs plain" in table
    rows, _ = serve.summarize([rec("off", 80.0), rec("xshare@0.7", 125.0)])
    assert serve.baseline(rows) == "off" and {r["config"]: r for r in rows}["xshare@0.7"]["ratio_vs_off"] == pytest.approx(125 / 80)


def test_ab_mode_pairs_each_policy_run_with_its_own_servers_sglang_arm(tmp_path):
    """``--ab``: the policy server gets the switch flag (a real server flag), and the summary pairs
    rep i's policy run with rep i's SGLang run of the same server."""
    from sglang_xshare.serving.cli_flags import parse_xshare_argv

    serve = _serve_module()
    args = SimpleNamespace(graph_bs=[1, 2], max_bs=2, tp=2, ep=2, mem_fraction=0.8, dummy=True, ray=False,
                           ab_idle_arms="compute", metrics=True)
    cfg = parse_config("xshare@0.7")
    cmd = serve.server_command(cfg, "m", 1, args, [], str(tmp_path / "arm"))
    xs = cmd[cmd.index("--xshare-policy"):]
    assert parse_xshare_argv(xs).ab_switch == str(tmp_path / "arm")
    assert parse_xshare_argv(xs).ab_idle_arms == "compute"  # --ab-idle-arms reaches the server
    assert parse_xshare_argv(xs).metrics  # the live metrics by default ...
    args.metrics = False  # ... --no-metrics: what a production server pays
    cmd = serve.server_command(cfg, "m", 1, args, [], str(tmp_path / "arm"))
    assert not parse_xshare_argv(cmd[cmd.index("--xshare-policy"):]).metrics
    assert "--disable-radix-cache" in cmd[:cmd.index("--xshare-policy")]  # an SGLang flag, before xshare's
    assert "--xshare-ab-switch" not in serve.server_command(cfg, "m", 1, args, [])
    assert "--disable-radix-cache" not in serve.server_command(cfg, "m", 1, args, [])

    def run(tpot, tok):
        return {"median_tpot_ms": tpot, "output_throughput": tok}

    lvl = {"concurrency": 16, "runs": [run(4.0, 200.0), run(5.0, 160.0)],
           "ab_sglang_runs": [run(4.4, 180.0), run(6.0, 150.0)]}
    rows, table = serve.summarize([{"config": "xshare@0.7", "start": 0, "levels": [lvl]}])
    r = rows[0]
    assert r["ab_tpot_speedups"] == pytest.approx([1.1, 1.2]) and r["ab_tpot_speedup"] == pytest.approx(1.15)
    assert r["ab_tok_ratios"] == pytest.approx([200 / 180, 160 / 150])
    assert r["ab_sglang_tpot_ms"] == pytest.approx(5.2)
    assert "1.150 [1.100-1.200]" in table and "(2 pairs)" in table


def _fake_server(arm_file: list, servers: list | None = None):
    """The process side of bench/serve.py's ``Server`` and nothing else (no SGLang starts on CPU):
    records the A/B switch file of the command it is given (and itself in ``servers``)."""
    servers = [] if servers is None else servers

    class FakeServer:
        def __init__(self, cmd, port, log, env=None):
            arm_file.append(cmd[cmd.index("--xshare-ab-switch") + 1])
            self.base_url = f"http://127.0.0.1:{port}"
            self.env = env
            servers.append(self)

        def start(self):
            pass

        def wait_ready(self, timeout):
            return 1.0

        def stop(self, grace):
            return []

        def tail(self):
            return ""

    return FakeServer


def test_ab_runs_flip_the_switch_then_flush_sglangs_cache_before_each_measured_run(tmp_path, monkeypatch):
    """``--ab --flush-cache`` (NGRAM: its corpus learns from each run's outputs, so without a flush the
    second arm of a pair, same prompts, accepts more): before every measured run the switch file
    names the arm, one request makes every rank read it, then SGLang's ``/flush_cache`` empties the
    caches; both arms of a rep send the same prompts, in ABBA order. Without the flag: no flush."""
    serve = _serve_module()
    events: list = []
    arm_file: list = []

    FakeServer = _fake_server(arm_file)
    def bench(argv):
        seed = argv[argv.index("--seed") + 1]
        events.append(("run", seed, Path(arm_file[0]).read_text()))
        return {"output_throughput": 100.0, "median_tpot_ms": 5.0}

    monkeypatch.setattr(serve, "Server", FakeServer)
    monkeypatch.setattr(serve, "run_bench_serving", bench)
    monkeypatch.setattr(serve, "poke", lambda url: events.append(("poke",)))
    monkeypatch.setattr(serve, "flush_cache", lambda url: events.append(("flush",)) or True)
    monkeypatch.setattr(serve, "flush_metrics", lambda url, settle: None)
    monkeypatch.setattr(serve, "scrape", lambda url: "")
    monkeypatch.setattr(serve, "gpu_state", lambda: [])
    args = SimpleNamespace(ab=True, ab_idle_arms="skip", metrics=True, flush_cache=True, reps=2, concurrency=[4],
                           graph_bs=[1, 2, 4], max_bs=4, tp=1,
                           ep=1, mem_fraction=0.8, dummy=True, ray=False, startup_timeout=10.0, input_len=8,
                           output_len=16, settle=0.0, min_prompts=1, waves=2, seed=1, name="t", stop_grace=1.0,
                           profile_steps=0, profile_concurrency=None, level_warmup=True)
    rec = serve.run_config(parse_config("xshare@0.7"), "m", args, [], tmp_path)
    measured = events[next(i for i, e in enumerate(events) if e == ("run", "999", "0")) + 1:]  # after the warm-up
    # the level's discarded warm-up runs first, one per arm (an arm's first run is slow), flushed like the others
    assert measured == [("poke",), ("flush",), ("run", "505", "0"), ("poke",), ("flush",), ("run", "505", "1"),
                        ("poke",), ("flush",), ("run", "5", "0"), ("poke",), ("flush",), ("run", "5", "1"),
                        ("poke",), ("flush",), ("run", "1005", "1"), ("poke",), ("flush",), ("run", "1005", "0")]
    lvl = rec["levels"][0]
    assert [r["arm"] for r in lvl["runs"] + lvl["ab_sglang_runs"]] == ["policy"] * 2 + ["sglang"] * 2
    assert all(r["cache_flushed"] for r in lvl["runs"] + lvl["ab_sglang_runs"]) and "error" not in rec
    events.clear()
    args.flush_cache = args.level_warmup = False
    serve.run_config(parse_config("xshare@0.7"), "m", args, [], tmp_path)
    assert ("flush",) not in events and not any(e[:2] == ("run", "505") for e in events)


def test_one_server_runs_every_policy_as_an_arm_and_reports_each(tmp_path, monkeypatch):
    """``--ab --ab-one-server``: the configurations become the arms of one server (the first its
    policy, the others ``--xshare-ab-arm`` flags SGLang's launcher parses back to the same policies);
    each rep runs SGLang's arm and every policy's, in order then reversed; each policy's runs keep its
    own live-metric counts (rank ``0`` / ``0/armN``) and pair with the server's SGLang runs."""
    from sglang_xshare.serving.cli_flags import parse_xshare_argv
    from servebench.configs import one_server

    serve = _serve_module()
    profile_arms_real = serve.profile_arms
    cfg = one_server(parse_configs("xshare@0.7,oea+k0=4,cap+cap=6"))
    assert cfg.arms == ("xshare@0.7", "oea+k0=4", "cap+cap=6")
    args = SimpleNamespace(ab=True, ab_idle_arms="skip", metrics=True, flush_cache=False, reps=2, concurrency=[4],
                           graph_bs=[1, 2, 4], max_bs=4, tp=2,
                           ep=2, mem_fraction=0.8, dummy=True, ray=False, startup_timeout=10.0, input_len=8,
                           output_len=16, settle=0.0, min_prompts=1, waves=2, seed=1, name="t", stop_grace=1.0,
                           profile_steps=0, profile_concurrency=None, level_warmup=False)
    cmd = serve.server_command(cfg, "m", 1, args, [], str(tmp_path / "arm"))
    from sglang_xshare.serving.measure.arms import arm_configs

    xs = parse_xshare_argv(cmd[cmd.index("--xshare-policy"):])
    assert [(a.policy, a.budget, a.warmup_k0, a.cap) for a in arm_configs(xs)] == [
        ("xshare", "0.7", 1, None), ("oea", None, 4, None), ("cap", None, 1, 6)]
    seen, arm_file, n = [], [], [0]

    FakeServer = _fake_server(arm_file)
    def bench(argv):
        arm = Path(arm_file[0]).read_text()
        seen.append(arm)
        return {"output_throughput": 100.0 * (1 + int(arm)), "median_tpot_ms": 10.0 / (1 + int(arm))}

    def counters(text):  # every arm counts on every batch: arm i's distinct experts are 10 * i per call
        n[0] += 1
        return {r: {"calls": float(n[0]), "distinct": 10.0 * i * n[0]} for i, r in ((1, "0"), (2, "0/arm2"), (3, "0/arm3"))}

    for name, fn in (("Server", FakeServer), ("run_bench_serving", bench), ("poke", lambda url: None),
                     ("flush_metrics", lambda url, settle: None), ("scrape", lambda url: ""), ("gpu_state", lambda: []),
                     ("xshare_counters", counters)):
        monkeypatch.setattr(serve, name, fn)
    rec = serve.run_config(cfg, "m", args, [], tmp_path)
    assert seen[1:] == ["0", "1", "2", "3", "3", "2", "1", "0"]  # after the warm-up run
    assert "error" not in rec and rec["arms"] == list(cfg.arms)
    # the recorded command names the interpreter as a user would, not by this machine's path
    assert rec["command"].startswith("python3 -m sglang_xshare.launch_server ") and sys.executable not in rec["command"]
    rows, table = serve.summarize([rec])
    by = {r["config"]: r for r in rows}
    assert list(by) == ["xshare@0.7", "oea+k0=4", "cap+cap=6"]
    for i, label in enumerate(cfg.arms, start=1):
        assert by[label]["experts"] == pytest.approx(10.0 * i)
        assert by[label]["ab_tpot_speedups"] == pytest.approx([1.0 + i, 1.0 + i])  # vs the server's SGLang arm
    # --profile-steps: after the measured runs of the profiled level (already saved), one profiled run per arm
    saved, profiled, servers = [], [], []
    monkeypatch.setattr(serve, "Server", _fake_server(arm_file, servers))
    monkeypatch.setattr(serve, "profile_arms", lambda url, sw, names, argv, steps, ranks, tdir, tag, on_arm=None:
                        profiled.append((names, steps, ranks, len(saved[-1]["levels"]))) or {"sglang": {}})
    args.profile_steps, args.profile_concurrency = 7, [4]
    rec = serve.run_config(cfg, "m", args, [], tmp_path, progress=saved.append)
    assert profiled == [([(0, "sglang"), (1, "xshare@0.7"), (2, "oea+k0=4"), (3, "cap+cap=6")], 7, 2, 1)]
    assert rec["levels"][0]["profile"] == {"sglang": {}} and "profile" in saved[-1]["levels"][0]
    assert servers[-1].env["SGLANG_PROFILE_BY_STAGE_DECODE_MIN_BS"] == "4"  # profile decode steps at full batch
    # a run stopped in the middle of the profile keeps the arms profiled so far (the real profile_arms,
    # its third arm's run cut short by the time limit)
    import servebench.profile as sp

    def bench_cut(argv):
        if "_profile" in str(argv) and len(cut) == 2:
            raise KeyboardInterrupt
        return bench(argv)

    cut, saved = [], []
    monkeypatch.setattr(serve, "profile_arms", profile_arms_real)
    monkeypatch.setattr(serve, "run_bench_serving", bench_cut)
    monkeypatch.setattr(serve, "http_get", lambda url, timeout=0, json_body=None: (200, ""))
    monkeypatch.setattr(sp, "trace_files", lambda d, prefix, stage="DECODE": [f"{prefix}-TP-{r}" for r in range(2)])
    monkeypatch.setattr(sp, "kernel_breakdown", lambda files: cut.append(files) or {"0": {"files": files}})
    with pytest.raises(KeyboardInterrupt):
        serve.run_config(cfg, "m", args, [], tmp_path, progress=saved.append)
    assert list(saved[-1]["levels"][0]["profile"]) == ["sglang", "xshare@0.7"]
    assert "during the profile" in saved[-1]["error"]


@pytest.mark.sglang
def test_result_records_say_which_path_the_hook_took(tmp_path):
    """The server log's hook lines (the real messages, from SGLang's ``TopK`` through the hook) become
    the record's ``hook`` summary and a line of the report: layers, policies, fused shared slots, and
    the path per batch size -- e.g. ``legacy`` where fused shared-expert columns route."""
    import logging

    pytest.importorskip("sglang")
    from sglang.srt.configs.shared_experts import SharedExpertsConfig
    from sglang.srt.layers.moe import topk
    from sglang.srt.runtime_context import SpawnRanks, get_model, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    from sglang_xshare.serving import context, install, route, runtime
    from sglang_xshare.serving.config import XShareServerConfig

    serve = _serve_module()
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append("[2026-11-30 12:00:00 TP0] " + record.getMessage())

    log = logging.getLogger("sglang_xshare")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    reset_context()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    try:
        install.install(XShareServerConfig(policy="xshare", budget="6", empty_slots="minus_one"))
        with get_model().override(shared_experts=SharedExpertsConfig(num_fused_shared_experts=1)):
            fused = topk.TopK(top_k=4, layer_id=5)
        plain = topk.TopK(top_k=4, layer_id=3)
        g = torch.Generator().manual_seed(0)
        for tk, n in ((plain, 8), (plain, 1), (fused, 8)):
            with context.batch_scope(context.BatchInfo("decode", batch_size=n)):
                tk.forward_native(torch.randn(n, 16), torch.randn(n, 32, generator=g))
    finally:
        install.uninstall()
        reset_context()
        log.removeHandler(handler)
        log.setLevel(level)
    text = "\n".join(lines)
    hk = serve.hook_summary(text + "\n" + text)  # two ranks log the same lines
    assert hk["layers"] == 2 and hk["policies"] == ["xshare"] and hk["shared_slots"] == 1
    assert hk["paths"] == {"target": {"1": ["sglang"], "8": ["fast", "legacy"]}}, hk


@pytest.mark.sglang
def test_profile_request_is_sglangs_and_decode_traces_break_down_by_category(tmp_path):
    """``--profile-steps``: the ``/start_profile`` body is SGLang's own ``ProfileReq`` (by stage, GPU);
    the decode traces of one prefix (every rank; not the prefill trace, not another arm's) are read
    and each kernel's time lands in its category, per decode step (one ``cudaGraphLaunch`` each)."""
    import gzip
    import json

    pytest.importorskip("sglang")
    from sglang.srt.managers.io_struct import ProfileReq

    from servebench.profile import category, kernel_breakdown, profile_request, trace_files

    body = profile_request(tmp_path, 20, "run_c64_policy")
    req = ProfileReq(**body)
    assert req.profile_by_stage and req.num_steps == 20 and req.activities == ["GPU"]
    with pytest.raises(ValueError):
        profile_request(tmp_path, 0, "x")
    names = {"batch_kernel": "xshare selection", "refine_kernel": "xshare selection",
             "fused_moe_kernel": "MoE experts", "act_and_mul_kernel": "MoE experts", "moe_align_block_size_kernel":
             "MoE experts", "topkGatingSoftmax": "SGLang routing", "moe_fused_gate_kernel": "SGLang routing",
             "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "communication", "_fwd_kernel_stage1": "attention",
             "nvjet_tst_64x8_64x16_4x1_v_bz_TNT": "dense GEMM", "triton_poi_fused_add_0": "other"}
    assert {n: category(n) for n in names} == names

    def trace(path, kernels, launches):
        ev = [{"ph": "X", "cat": "kernel", "name": n, "dur": d, "ts": i} for i, (n, d) in enumerate(kernels)]
        ev += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "dur": 3.0, "ts": 0}] * launches
        ev += [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 50.0, "ts": 0}]
        with gzip.open(path, "wt") as f:
            json.dump({"traceEvents": ev}, f)

    step = [("fused_moe_kernel", 30.0), ("batch_kernel", 4.0), ("ncclDevKernel_AllReduce_Sum", 6.0),
            ("_fwd_kernel_stage1", 10.0)]
    trace(tmp_path / "run_c64_policy-abc-TP-0-EP-0-DECODE.trace.json.gz", step * 2, 2)
    trace(tmp_path / "run_c64_policy-abc-TP-1-EP-1-DECODE.trace.json.gz", step * 2, 2)
    trace(tmp_path / "run_c64_policy-abc-TP-0-EP-0-EXTEND.trace.json.gz", [("fused_moe_kernel", 900.0)], 0)
    trace(tmp_path / "run_c64_sglang-abc-TP-0-EP-0-DECODE.trace.json.gz", [("fused_moe_kernel", 99.0)], 1)
    files = trace_files(tmp_path, "run_c64_policy")
    assert [f.name.split("-")[3] for f in files] == ["0", "1"]
    bd = kernel_breakdown(files)
    assert set(bd) == {"0", "1"}
    r0 = bd["0"]
    assert r0["kernel_us"] == {"MoE experts": 60.0, "attention": 20.0, "communication": 12.0, "xshare selection": 8.0}
    assert (r0["total_us"], r0["kernels"], r0["graph_launches"]) == (100.0, 8, 2)
    assert [(t["name"], t["category"], t["us"], t["launches"]) for t in r0["top_kernels"]] == [
        ("fused_moe_kernel", "MoE experts", 60.0, 2), ("_fwd_kernel_stage1", "attention", 20.0, 2),
        ("ncclDevKernel_AllReduce_Sum", "communication", 12.0, 2), ("batch_kernel", "xshare selection", 8.0, 2)]
    assert len(kernel_breakdown(files, top_kernels=1)["0"]["top_kernels"]) == 1
    # rank 1 spends less on experts and waits less in the all-reduce: its column says so
    trace(tmp_path / "run_c64_policy-abc-TP-1-EP-1-DECODE.trace.json.gz",
          [("fused_moe_kernel", 20.0), ("ncclDevKernel_AllReduce_Sum", 16.0)] * 2, 2)
    bd = kernel_breakdown(files)
    serve = _serve_module()
    label = "xshare@0.7 | oea+k0=4"  # a one-server configuration's label
    lines = serve.profile_lines([{"config": label, "levels": [{"concurrency": 64, "profile": {
        "xshare@0.7": bd, "sglang": {"error": "no decode trace"}}}]}])
    row = next(ln for ln in lines if "| xshare@0.7 | 64 |" in ln)
    assert row.startswith("| xshare@0.7 \\| oea+k0=4 | xshare@0.7 | 64 |"), row
    assert "2 steps, 0.050 ms" in row and "0.030 (60%)" in row and "0.004 (8%)" in row
    assert row.endswith("| 0.03, 0.01 / 0.02, 0.02 |"), row
    cells = lambda ln: len(ln.replace("\\|", "").split("|"))  # noqa: E731
    tables = "\n".join(lines).split("\n\n")
    for t in (t for t in tables if t.startswith("| config")):  # every row as many cells as its header
        assert len({cells(ln) for ln in t.splitlines() if ln.startswith("| ")}) == 1, t
    assert any("no decode trace" in ln for ln in lines)
    # a one-policy server: position 0 is its policy's selection (2 launches of 4 µs on rank 0)
    assert lines[-1] == "| xshare@0.7 \\| oea+k0=4 | 64 | xshare@0.7 | xshare@0.7 \\| oea+k0=4: 4.0 |", lines[-1]

    # one server, three policy arms: per layer SGLang's routing, then each arm's one selection launch in
    # arm order, then the experts; numbered by position in the layer (time order, not file order)
    from servebench.profile import selection_per_arm

    layer = [("topkGatingSoftmax", 1.0), ("batch_kernel", 4.0), ("batch_kernel", 7.0), ("refine_kernel", 2.0),
             ("elementwise_kernel", 0.5), ("fused_moe_kernel", 30.0), ("_fwd_kernel_stage1", 5.0)]
    f3 = tmp_path / "run_c64_arm3-abc-TP-0-EP-0-DECODE.trace.json.gz"
    trace(f3, list(reversed(layer * 3)), 1)
    with gzip.open(f3, "rt") as f:  # events in reverse file order, timestamps in launch order
        ev = json.load(f)["traceEvents"]
    for i, e in enumerate(e for e in ev if e["cat"] == "kernel"):
        e["ts"] = 21 - i
    with gzip.open(f3, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    r = kernel_breakdown([f3])["0"]
    assert r["selection_by_position"] == [{"us": 12.0, "launches": 3}, {"us": 21.0, "launches": 3},
                                          {"us": 6.0, "launches": 3}]
    arms = ["xshare@0.7", "oea+k0=4", "cap+cap=6"]
    assert selection_per_arm(r, arms) == {"xshare@0.7": 4.0, "oea+k0=4": 7.0, "cap+cap=6": 2.0}
    assert selection_per_arm(r, arms[:2]) is None  # positions do not match one launch per arm
    lines = serve.profile_lines([{"config": " | ".join(arms), "arms": arms, "levels": [{"concurrency": 64, "profile": {
        "sglang": {"0": r}, "oea+k0=4": {"0": r}}}]}])
    # every profiled arm's trace is a row (under --ab-idle-arms skip each holds its own arm's full selection)
    assert lines[-2:] == [f"| xshare@0.7 \\| oea+k0=4 \\| cap+cap=6 | 64 | {a} | xshare@0.7: 4.0 | oea+k0=4: 7.0 | "
                          "cap+cap=6: 2.0 |" for a in ("sglang", "oea+k0=4")], lines[-2:]


def test_flush_cache_retries_while_sglang_refuses_with_requests_running():
    """``/flush_cache`` answers 400 while requests run or wait (SGLang's http_server): retried until 200."""
    import http.server
    import threading

    serve = _serve_module()
    answers = [400, 400, 200]
    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(answers.pop(0) if answers else 400)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert serve.flush_cache(url, tries=5, wait=0.01) and seen == ["/flush_cache"] * 3
        assert not serve.flush_cache(url, tries=2, wait=0.01) and len(seen) == 5
    finally:
        srv.shutdown()


def test_merged_runs_keep_each_ratio_paired_with_its_own_off(tmp_path):
    """Two earlier result files (e.g. two separate runs): each file's starts become rounds of their own."""
    import json

    serve = _serve_module()

    def rec(label, start, tok):
        return {"config": label, "start": start, "levels": [{"concurrency": 16, "runs": [
            {"output_throughput": tok, "median_tpot_ms": 1000.0 / tok}]}]}

    a = {"title": "t", "meta": {"git": "aaa"}, "records": [rec("off", 0, 100.0), rec("xshare@0.7", 0, 110.0)]}
    b = {"title": "t", "meta": {"git": "bbb"}, "records": [rec("off", 0, 300.0), rec("xshare@0.7", 0, 360.0),
                                                         rec("off", 1, 200.0), rec("xshare@0.7", 1, 250.0)]}
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps(a))
    fb.write_text(json.dumps(b))
    serve.merge_results([fa, fb], tmp_path / "out", "m")
    d = json.loads((tmp_path / "out" / "m.json").read_text())
    x = next(r for r in d["rows"] if r["config"] == "xshare@0.7")
    assert x["paired_ratios"] == pytest.approx([1.10, 1.20, 1.25])  # never 360 / 100 across files
    assert x["tok_s_per_start"] == {"0": 110.0, "1": 360.0, "2": 250.0}
    md = (tmp_path / "out" / "m.md").read_text()
    assert "`a.json`: rounds 0..0" in md and "`b.json`: rounds 1..2" in md and "git `bbb`" in md


def test_spec_accept_length_per_run_from_sglangs_own_counters():
    """A run's accept length comes from SGLang's request counters (its real ``TokenizerMetricsCollector``
    exporting to the Prometheus registry): tokens / verify forwards of the requests finished between
    two scrapes, summed over label sets, and ``None`` without speculation; the summary shows it per
    arm."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import REGISTRY, generate_latest
    from sglang.srt.observability.metrics_collector import TokenizerMetricsCollector
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    from servebench.client import sglang_counters, spec_accept_length

    reset_context()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    try:
        labels = {"model_name": "xshare-accept-test"}
        m = TokenizerMetricsCollector(labels=labels)
        scrape = lambda: sglang_counters(generate_latest(REGISTRY).decode())  # noqa: E731
        m.observe_one_finished_request(labels, 5, 7, 0, 0.1, False, spec_verify_ct=3)  # before the run
        b = scrape()
        m.observe_one_finished_request(labels, 10, 40, 0, 1.0, False, spec_verify_ct=10)
        m.observe_one_finished_request(labels, 10, 30, 0, 1.0, False, spec_verify_ct=20, is_streaming=True)
        a = scrape()
        assert spec_accept_length(b, a) == pytest.approx(70 / 30)
        m.observe_one_finished_request(labels, 10, 30, 0, 1.0, False)  # no speculation: no verify count
        assert spec_accept_length(a, scrape()) is None
    finally:
        reset_context()

    serve = _serve_module()
    run = lambda tpot, acc: {"median_tpot_ms": tpot, "output_throughput": 100.0, "spec_accept_length": acc}  # noqa: E731
    lvl = {"concurrency": 8, "runs": [run(4.0, 2.5), run(4.0, 2.7)], "ab_sglang_runs": [run(4.4, 3.0), run(4.4, 3.2)]}
    rows, table = serve.summarize([{"config": "xshare_spec@0.7", "start": 0, "levels": [lvl]}])
    r = rows[0]
    assert r["accept_length"] == pytest.approx(2.6) and r["ab_sglang_accept_length"] == pytest.approx(3.1)
    # mean ± 95 % t half-width over the runs (2 runs: t = 12.706, sd = 0.1414), the SGLang arm's, and
    # the paired difference rep by rep (-0.5 both times: no spread)
    assert r["accept_mean"] == pytest.approx(2.6) and r["accept_ci"] == pytest.approx(12.706 * 0.1, rel=1e-3)
    assert r["ab_sglang_accept_mean"] == pytest.approx(3.1) and r["accept_delta"] == pytest.approx(-0.5)
    assert r["accept_delta_ci"] == pytest.approx(0.0, abs=1e-12)
    assert r["verify_step_ms"] == pytest.approx(4.0 * 2.6) and r["ab_sglang_verify_step_ms"] == pytest.approx(4.4 * 3.1)
    assert "accept length" in table and "2.60 ± 1.27 (2 runs) (3.10 ± 1.27; -0.50 ± 0.00)" in table
    assert "10.40 (13.64)" in table
    _, plain_table = serve.summarize([{"config": "xshare@0.7", "start": 0, "levels": [
        {"concurrency": 8, "runs": [{"median_tpot_ms": 4.0, "output_throughput": 1.0}]}]}])
    assert "accept length" not in plain_table


# ---- metrics: exported by the hook's LiveMetrics, read back by the bench -------------------

def test_live_metrics_exported_and_read_back():
    pytest.importorskip("prometheus_client")
    from prometheus_client import REGISTRY, generate_latest

    from sglang_xshare.select.output import METRIC_FIELDS
    from servebench.client import counter_delta, xshare_counters
    from sglang_xshare.serving.telemetry.metrics import LiveMetrics

    m = LiveMetrics(interval=1, rank=7)  # its own series: other tests in this process export rank 0
    m.row(2, torch.device("cpu")).add_(torch.tensor([3, 40, 30, 45, 9, 14, 240, 2]))
    m.row(5, torch.device("cpu")).add_(torch.tensor([3, 40, 20, 40, 7, 12, 230, 1]))
    before = xshare_counters(generate_latest(REGISTRY).decode())
    m.on_step_end("policy")
    m.on_step_end("policy")  # the second poll reads the copy the first one started
    after = xshare_counters(generate_latest(REGISTRY).decode())
    d = counter_delta(before, after)["7"]
    assert d["calls"] == 6 and d["distinct"] == 50 and d["topk_distinct"] == 85 and d["peak"] == 16
    assert d["valid_tokens"] == 80 and d["decode_steps"] >= 1 and d["path_steps:policy"] >= 1
    assert set(METRIC_FIELDS) <= set(after["7"])


# ---- server life cycle -------------------------------------------------------------------------

_FAKE = textwrap.dedent('''
    import http.server, os, signal, subprocess, sys, time
    # a child that ignores SIGTERM, and a grandchild that leaves the process group
    subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    if os.environ.get("FAKE_DIE"):
        print("fatal: exiting on purpose", flush=True); sys.exit(3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health_generate" else 404); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    time.sleep(1.0)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_lifecycle_leaves_no_process(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(_FAKE)
    port = _port()
    srv = Server([sys.executable, str(script), str(port)], port, tmp_path / "s.log")
    srv.start()
    assert srv.wait_ready(timeout=60) > 0.5
    assert http_get(srv.base_url + "/health_generate")[0] == 200
    time.sleep(0.5)
    assert len(marked_processes(srv.mark)) == 3  # server, stubborn child, escaped grandchild
    killed = srv.stop(grace=3)
    assert marked_processes(srv.mark) == [] and not srv.alive()
    assert len(killed) >= 2  # the SIGTERM-immune child and the grandchild outside the group had to be killed
    assert http_get(srv.base_url + "/health_generate")[0] == 0


def test_server_that_dies_is_reported_with_its_log(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(_FAKE)
    port = _port()
    srv = Server([sys.executable, str(script), str(port)], port, tmp_path / "s.log", env={"FAKE_DIE": "1"})
    srv.start()
    with pytest.raises(ServerDied, match="exiting on purpose"):
        srv.wait_ready(timeout=60)
    srv.stop(grace=3)
    assert marked_processes(srv.mark) == []


@pytest.mark.sglang
def test_real_launcher_failure_is_reported_and_cleaned_up(tmp_path):
    """The real ``sglang_xshare.launch_server`` on this CPU machine cannot serve (no CUDA kernels):
    the bench reports it as a failed start and nothing of it survives."""
    pytest.importorskip("sglang")
    port = _port()
    cmd = [sys.executable, "-m", "sglang_xshare.launch_server", "--model-path", str(ROOT / "bench/data/model"),
           "--port", str(port), "--xshare-policy", "xshare", "--xshare-budget", "0.7"]
    srv = Server(cmd, port, tmp_path / "s.log")
    srv.start()
    with pytest.raises(ServerDied):
        srv.wait_ready(timeout=600)
    srv.stop(grace=5)
    assert marked_processes(srv.mark) == []
    assert MARK_ENV not in os.environ


def test_markdown_table_keeps_its_columns_when_a_label_holds_a_pipe():
    """A one-server configuration's label is ``"a | b"``: escaped, the row keeps the header's cells."""
    from sglang_xshare.benchio import markdown_table

    table = markdown_table(["config", "conc.", "tok/s"], [["xshare@0.7 | oea+k0=4", 16, 2122.4567]])
    head, _, row = table.splitlines()
    assert row == "| xshare@0.7 \\| oea+k0=4 | 16 | 2122 |"
    assert len(row.replace("\\|", "").split("|")) == len(head.split("|"))


def test_hook_overhead_variants_are_valid_server_configs_with_metrics_and_the_ab_switch(tmp_path):
    """``bench/hook_overhead.py --metrics --ab``: every variant is a valid server config, the ``+metrics``
    rows turn the live metrics on, the ``+ab`` rows select the policy's arm of a real switch file,
    ``+ab/sglang-arm`` SGLang's arm (the policy's kernel skipped), ``/compute`` selects anyway."""
    import importlib.util

    from sglang_xshare.serving.measure.switch import read_arm
    from sglang_xshare.serving.config import XShareServerConfig

    spec = importlib.util.spec_from_file_location("bench_hook_overhead", ROOT / "bench" / "hook_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    vs = mod.variants(no_legacy=True, metrics=True, ab_dir=str(tmp_path))
    names = [n for n, _, _ in vs]
    ab = [f"{n}{s}" for n in mod.CONFIGS for s in ("+ab", "+ab/sglang-arm", "+ab/sglang-arm/compute")]
    assert names == [*mod.CONFIGS, *(f"{n}+metrics" for n in mod.CONFIGS), *ab]
    for name, kw, force in vs:
        cfg = XShareServerConfig(empty_slots="minus_one", min_tokens="1", **kw).validate()
        assert force is None and cfg.selects
        assert cfg.metrics == name.endswith("+metrics")
        assert (cfg.ab_switch is not None) == ("+ab" in name)
        if cfg.ab_switch is not None:
            assert read_arm(cfg.ab_switch, 1) == (0 if "sglang-arm" in name else 1)
            assert cfg.ab_idle_arms == ("compute" if name.endswith("/compute") else "skip")
    assert [n for n, _, f in mod.variants() if f == "legacy"] == ["xshare/legacy", "cap/legacy"]


def test_poke_posts_one_tiny_generation_and_ignores_a_dead_server():
    """``poke`` (the step-end nudge of the live metrics and the A/B switch) POSTs SGLang's ``/generate``
    body: a few tokens, ``ignore_eos``; a server that does not answer is not an error."""
    import http.server
    import json
    import threading

    serve = _serve_module()
    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        serve.poke(f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
        srv.server_close()
    assert seen == [("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})]
    serve.poke(f"http://127.0.0.1:{srv.server_address[1]}")  # nothing listens any more: no exception
    assert serve.safe_name("xshare@0.7+k0=4 | cap") == "xshare_0.7_k04_cap"
