"""Serving benchmark: a real SGLang server per configuration, SGLang's own load generator, ratios vs off.

For each configuration (``off``, ``xshare@0.7``, ``xshare_ep@0.7``, ``oea+k0=4``, ``cap+cap=6`` ...,
see :mod:`servebench.configs`) this starts the server through
``sglang-xshare-launch-server`` (or ``sglang-xshare-ray`` with ``--ray``), waits until it
generates, drives a decode-heavy workload with ``sglang.bench_serving`` at each concurrency
(``--reps`` runs, prompts of random token ids, every request decodes ``--output-len`` tokens),
reads xshare's live metrics and SGLang's counters from ``/metrics`` around each run, stops the
server (nothing left behind) and moves on. Same workload, same seeds for every configuration.

Servers of one machine differ from start to start (the first run saw up to 16 % TPOT between
servers running identical kernels), so ``--starts N`` starts every configuration N times,
interleaved (``off, A, B, off, A, B``): each round has its own ``off``, the ratio of a
configuration to ``off`` is taken within each round (paired) and its spread over rounds is
reported beside the between-start spread of ``off`` itself (an A/A check). ``--state FILE`` keeps
the finished servers' records so a run cut by a time limit (``--time-budget``) continues where it
stopped when called again with the same arguments.

``--ab`` measures inside one server: each policy server also computes SGLang's routing in every
MoE layer (``--xshare-ab-switch``, :mod:`sglang_xshare.serving.measure`) and every rep runs both
arms, the policy's and SGLang's, in ABBA order; the policy's TPOT speed-up over its own server's
SGLang arm is free of the server-to-server spread. By default (``--ab-idle-arms skip``) an arm the
switch does not route by skips its selection kernel, so the speed-up is net of the policy's
selection (conservatively: the policy's arm also runs SGLang's top-k); with ``compute`` every arm
selects in every layer and the speed-up is the expert cut alone (the runs before the option), the
selection's cost then being ``bench/hook_overhead.py``'s figure. ``--ab-one-server`` puts every configuration into one such
server as arms of its switch (``--xshare-ab-arm``): one start-up, every policy and SGLang's routing
alternated on the same server. With speculative decoding by NGRAM add ``--flush-cache``: its
corpus learns from every output, so the second arm of a pair (same prompts) would accept more.

Writes ``bench/results/<name>.{json,md,png}``: per configuration and concurrency the median
output throughput (and its spread over the runs), TPOT and ITL median / p99, the ratio to ``off``,
and per MoE layer call the distinct experts and the busiest rank's experts -- the policy's and
plain top-k's on the same batches.

Model: ``--model PATH`` (real weights) or ``--preset qwen3-30b-a3b|deepseek-v3-mini [--layers N]``
(a config written here, ``--load-format dummy``). Everything after ``--`` goes to the server.

    python bench/serve.py --preset qwen3-30b-a3b --layers 24 --tp 2 --ep 2 \\
        --configs off,xshare@0.7,xshare_ep@0.7,oea+k0=4,cap+cap=6 --concurrency 1,8,16,32,64,128 \\
        --starts 2 --name serve_qwen3_tp2 -- --moe-runner-backend triton
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

from sglang_xshare.benchio import markdown_table, md_cell, mean_ci, run_metadata, write_results
from sglang_xshare.serving.config import AB_IDLE_ARMS

from servebench.client import (bench_serving_argv, counter_delta, run_bench_serving, scrape, sglang_counters,
                               spec_accept_length, xshare_counters)
from servebench.configs import ServeConfig, one_server, parse_configs
from servebench.models import PRESETS, ZERO_BIASES, write_model
from servebench.server import MARK_ENV, Server, ServerDied, http_get

#: Flags every server of a run gets (the combination seen to start on the H200 hosts).
BASE_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none",
              "--disable-custom-all-reduce", "--enforce-disable-flashinfer-allreduce-fusion",
              "--disable-prefill-cuda-graph", "--enable-metrics", "--skip-server-warmup"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(cfg: ServeConfig, model: str, port: int, args: argparse.Namespace, extra: list[str],
                   switch: str | None = None) -> list[str]:
    """The command line of one configuration's server (``switch``: the file of its in-server A/B
    switch, ``--xshare-ab-switch``)."""
    sizes = [b for b in args.graph_bs if b <= args.max_bs]
    par = ["--tp-size", str(args.tp)] + (["--ep-size", str(args.ep)] if args.ep > 1 else [])  # Ray's launcher sets them
    sg = ["--model-path", model, "--host", "127.0.0.1", "--port", str(port),
          "--cuda-graph-max-bs-decode", str(args.max_bs), "--cuda-graph-bs-decode", *map(str, sizes),
          "--mem-fraction-static", str(args.mem_fraction)]
    if args.dummy:
        sg += ["--load-format", "dummy"]
    sg += BASE_FLAGS + extra
    xs = list(cfg.flags)
    if cfg.selects and args.metrics:
        xs += ["--xshare-metrics", "--xshare-metrics-interval", "50"]
    if switch is not None:
        xs += ["--xshare-ab-switch", switch, "--xshare-ab-idle-arms", args.ab_idle_arms]
        # both arms of a rep send the same prompts: without the prefix cache the second arm's
        # prefill is no cheaper than the first's
        sg += ["--disable-radix-cache"]
    py = sys.executable
    if cfg.plain:
        return [py, "-m", "sglang.launch_server", *par, *sg]
    if args.ray:
        ray = [py, "-m", "sglang_xshare.launch.ray_launcher", "--address", "auto", "--nnodes", "1",
               "--gpus-per-node", str(args.tp), *par, "--health-timeout", "900"]
        return [*ray, "--", *sg, *xs]
    return [py, "-m", "sglang_xshare.launch_server", *par, *sg, *xs]


def shown_command(cmd: list[str]) -> str:
    """The server command as a result file records it: this interpreter written ``python3`` (its path
    is the measuring machine's, not part of the command a user runs)."""
    return " ".join(["python3", *cmd[1:]] if cmd and cmd[0] == sys.executable else cmd)


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment variables of every server of a run (on top of this process's own)."""
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if getattr(args, "zero_biases", False):  # see bench/dummy_routing/sitecustomize.py
        env["XSHARE_BENCH_DUMMY_BIASES"] = "zero"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "bench" / "dummy_routing"),
                                                        os.environ.get("PYTHONPATH")) if p)
    if args.profile_steps:  # SGLang's profiler traces decode steps once the batch holds this many requests
        env["SGLANG_PROFILE_BY_STAGE_DECODE_MIN_BS"] = str(min(args.profile_concurrency or [max(args.concurrency)]))
    return env


def poke(base_url: str) -> None:
    """One tiny generation (a few decode steps: every rank passes its step ends); errors ignored."""
    http_get(base_url + "/generate", timeout=60.0,
             json_body={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})


def set_arm(switch: Path | None, idx: int, base_url: str) -> None:
    """Point the A/B switch file at arm ``idx`` and send one request, so every rank reads it at a
    step end before the next run (nothing without a switch)."""
    if switch is not None:
        switch.write_text(str(idx))
        poke(base_url)


def safe_name(text: str) -> str:
    """``text`` as a file-name part: ``@``, ``+``, ``=`` and anything else not ``[A-Za-z0-9_.-]`` made safe."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("@", "_").replace("+", "_").replace("=", ""))


def flush_cache(base_url: str, tries: int = 40, wait: float = 0.25) -> bool:
    """SGLang's ``/flush_cache``: empties the prefix cache and the speculative worker's cache (NGRAM's
    corpus of earlier outputs), so that a run starts from the state the previous one started from.
    SGLang refuses while requests are running or waiting (400): retried. Returns whether it flushed."""
    for _ in range(tries):
        code, _body = http_get(base_url + "/flush_cache", timeout=30.0)
        if code == 200:
            return True
        time.sleep(wait)
    return False


def switch_arms(cfg: ServeConfig, ab: bool) -> list[tuple[int, str]]:
    """``(switch index, name)`` of a server's arms: ``0`` SGLang's routing, ``1`` the policy (named by
    ``cfg.arms`` when one server runs several), ``2..`` the others; without the A/B switch only ``1``."""
    if not ab:
        return [(1, "policy")]
    return [(0, "sglang")] + [(i, name) for i, name in enumerate(cfg.arms or ("policy",), start=1)]


def profile_arms(base_url: str, switch: Path | None, arms: list[tuple[int, str]], argv: list[str], steps: int,
                 ranks: int, trace_dir: Path, tag: str, timeout: float = 120.0,
                 on_arm: Callable[[dict], None] | None = None) -> dict:
    """One more run per arm under SGLang's profiler (``/start_profile``, by stage): ``steps`` decode
    steps at full batch traced on every rank, then :func:`kernel_breakdown` of the decode traces.
    Returns ``{arm: {rank: breakdown}}`` (``{"error": ...}`` for an arm whose traces did not come);
    ``on_arm(so_far)`` runs after each arm with the arms done so far (a run stopped in the middle of
    the profile keeps them)."""
    from servebench.profile import kernel_breakdown, profile_request, trace_files

    out: dict = {}
    for idx, arm in arms:
        set_arm(switch, idx, base_url)
        prefix = safe_name(f"{tag}_{arm}")
        code, body = http_get(base_url + "/start_profile", timeout=60.0,
                              json_body=profile_request(trace_dir, steps, prefix))
        if code != 200:
            out[arm] = {"error": f"/start_profile answered {code}: {body[:200]}"}
            continue
        run_bench_serving(argv)
        deadline = time.monotonic() + timeout
        stopped = False
        while len(trace_files(trace_dir, prefix)) < ranks and time.monotonic() < deadline:
            if not stopped and time.monotonic() > deadline - timeout / 2:
                http_get(base_url + "/stop_profile", timeout=60.0, json_body={})  # fewer decode steps than asked
                stopped = True
            time.sleep(1.0)
        files = trace_files(trace_dir, prefix)
        out[arm] = kernel_breakdown(files) if files else {"error": f"no decode trace in {trace_dir} after {timeout:.0f} s"}
        if on_arm is not None:
            on_arm(dict(out))
    return out


def _ms_per_step(rank: dict, cat: str) -> float:
    """One rank's kernel ms per decode step in category ``cat`` (:func:`kernel_breakdown`'s figures)."""
    return rank["kernel_us"].get(cat, 0.0) / rank["graph_launches"] / 1000.0


def profile_lines(records: list[dict]) -> list[str]:
    """Markdown: GPU kernel time per decode step by category, per configuration arm (rank 0), and
    the MoE experts' and the communication kernels' time on every rank (an all-reduce waits for the
    slowest rank, so one rank's fewer expert-ms can show up as its communication-ms)."""
    from servebench.profile import CATEGORIES

    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = []
    for rec in records:
        for lvl in rec.get("levels", []):
            for arm, per_rank in (lvl.get("profile") or {}).items():
                r0 = per_rank.get("0") if isinstance(per_rank, dict) else None
                head = f"| {md_cell(rec['config'])} | {md_cell(arm)} | {lvl['concurrency']} | "
                if not r0 or not r0.get("graph_launches"):
                    lines.append(head + f"{md_cell((per_rank or {}).get('error', 'no decode steps traced'))} |"
                                 + " |" * (len(cats) + 1))
                    continue
                n = r0["graph_launches"]
                step = r0["total_us"] / n / 1000.0
                shares = [f"{_ms_per_step(r0, c):.3f} ({100 * r0['kernel_us'].get(c, 0.0) / max(r0['total_us'], 1e-9):.0f}%)"
                          for c in cats]
                ranks = sorted((k for k, v in per_rank.items() if isinstance(v, dict) and v.get("graph_launches")),
                               key=lambda k: (len(k), k))
                per = " / ".join(f"{_ms_per_step(per_rank[k], 'MoE experts'):.2f}, {_ms_per_step(per_rank[k], 'communication'):.2f}"
                                 for k in ranks)
                lines.append(head + f"{n} steps, {step:.3f} ms | " + " | ".join(shares) + f" | {per} |")
    if not lines:
        return []
    head = ["", "Where a decode step's GPU time goes (SGLang's profiler, rank 0; kernel ms per step and share; "
            "last column: MoE experts, communication ms per step on rank 0 / 1 / ...):", "",
            "| config | arm | conc. | kernel time / step | " + " | ".join(cats) + " | per rank: experts, comm. |",
            "|---|---|---|---|" + "---|" * (len(cats) + 1)]
    return head + lines + _selection_lines(records)


def _selection_lines(records: list[dict]) -> list[str]:
    """Markdown: each policy's selection kernel, µs per MoE layer call, in the trace of every
    profiled arm (:func:`~servebench.profile.selection_per_arm`). Under
    ``--ab-idle-arms skip`` the arm routed by runs its selection in full and the others' kernels
    return at once (an empty launch each); under ``compute`` every trace holds every selection."""
    from servebench.profile import selection_per_arm

    rows = []
    for rec in records:
        arms = list(rec.get("arms") or [rec["config"]])
        for lvl in rec.get("levels", []):
            for arm, per_rank in (lvl.get("profile") or {}).items():
                r0 = per_rank.get("0") if isinstance(per_rank, dict) else None
                got = selection_per_arm(r0, arms) if r0 else None
                if got:
                    rows.append(f"| {md_cell(rec['config'])} | {lvl['concurrency']} | {md_cell(arm)} | "
                                + " | ".join(f"{md_cell(a)}: {us:.1f}" for a, us in got.items()) + " |")
    if not rows:
        return []
    return ["", "Each policy's selection kernel in the server (rank 0, µs per MoE layer call, by its position in the "
            "layer) in the trace of each profiled arm (the arm the switch routed by; under `--ab-idle-arms skip` only "
            "its selection runs in full, the others are empty launches):", "",
            "| config | conc. | trace of arm | selection µs per layer call |", "|---|---|---|---|", *rows]


def flush_metrics(base_url: str, settle: float) -> None:
    """xshare's live metrics are read at decode-step ends, asynchronously (the copy started at one
    read is taken at the next, >= 1 s later): two tiny one-request generations ``settle`` seconds
    apart make the counts of the run just finished reach ``/metrics``."""
    for _ in range(2):
        time.sleep(settle)
        poke(base_url)
    time.sleep(0.5)


def per_call(delta: dict[str, float]) -> dict[str, float]:
    """Layer-call means of xshare's counters (per MoE layer and step)."""
    calls = delta.get("calls", 0.0)
    out = {"calls": calls, "decode_steps": delta.get("decode_steps", 0.0),
           "policy_steps": delta.get("path_steps:policy", 0.0), "sglang_steps": delta.get("path_steps:sglang", 0.0),
           "barrier_faults": delta.get("barrier_faults", 0.0)}
    if calls > 0:
        for f in ("distinct", "topk_distinct", "peak", "topk_peak", "valid_tokens", "short_tokens"):
            out[f] = delta.get(f, 0.0) / calls
    return out


_PATH_LINE = re.compile(r"xshare: (target|draft) batches of (\d+) tokens: (\w+) path")
_LAYER_LINE = re.compile(r"xshare: (target|draft) layer (\d+): policy (\w+) \(.*?shared slots=(\d+)")


def hook_summary(log_text: str) -> dict:
    """What the hook logged in a server (every process): the routing path per batch size of target /
    draft layers (``sglang`` / ``fast`` / ``general`` / ``legacy``), the layers it selects in, and
    whether any has fused shared-expert slots -- so a result file says which path its figures took."""
    paths: dict[str, dict[str, list[str]]] = {}
    for kind, n, path in _PATH_LINE.findall(log_text):
        seen = paths.setdefault(kind, {}).setdefault(n, [])
        if path not in seen:
            seen.append(path)
    layers = {(kind, int(layer), policy, int(shared)) for kind, layer, policy, shared in _LAYER_LINE.findall(log_text)}
    return {"paths": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in paths.items()},
            "layers": len({(k, layer) for k, layer, _, _ in layers}),
            "policies": sorted({p for _, _, p, _ in layers}),
            "shared_slots": max((s for *_, s in layers), default=0)}


def gpu_state() -> list[str]:
    """SM / memory clock, temperature and power of every GPU (``nvidia-smi``), one line per GPU; [] without it."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=index,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []


def run_config(cfg: ServeConfig, model: str, args: argparse.Namespace, extra: list[str], out_dir: Path,
               start: int = 0, progress=None) -> dict:
    """Start ``cfg``'s server (its ``start``-th start), run every concurrency level, stop it; the record.
    ``progress(partial)`` gets the record so far after every level, marked incomplete (``error``), so
    what was measured survives a run killed in the middle of a server."""
    port = free_port()
    safe = safe_name(cfg.label)
    switch = out_dir / f"{args.name}_{safe}_s{start}.arm" if (args.ab and cfg.selects) else None
    if switch is not None:
        switch.write_text("0")
    cmd = server_command(cfg, model, port, args, extra, None if switch is None else str(switch))
    log = out_dir / f"{args.name}_{safe}_s{start}.log"
    env = server_env(args)
    prof_cs = (args.profile_concurrency or [max(args.concurrency)]) if args.profile_steps else []
    rec: dict = {"config": cfg.label, "start": start, "command": shown_command(cmd), "levels": [], "log": str(log),
                 "gpu_before": gpu_state()}
    if cfg.arms:
        rec["arms"] = list(cfg.arms)
    server = Server(cmd, port, log, env=env)
    t0 = time.time()
    try:
        server.start()
        rec["startup_s"] = round(server.wait_ready(timeout=args.startup_timeout), 1)
        print(f"[{cfg.label}] ready in {rec['startup_s']} s", flush=True)
        tok = model
        warm = bench_serving_argv(server.base_url, tok, concurrency=max(args.concurrency), num_prompts=max(args.concurrency),
                                  input_len=args.input_len, output_len=16, seed=999,
                                  output_file=str(out_dir / f"{args.name}_warmup.jsonl"))
        run_bench_serving(warm)
        flush_metrics(server.base_url, args.settle)  # the warm-up's counts reach /metrics before the first level
        for c in args.concurrency:
            runs, ab_runs = [], []
            arm_runs: dict[str, list[dict]] = {label: [] for label in cfg.arms}
            # with the A/B switch: every arm per rep (0 = SGLang's routing, 1 = the policy, 2.. = the
            # other policies of one server), in order and reversed in turn (ABBA: drift cancels over two reps)
            order = switch_arms(cfg, switch is not None)

            def level_argv(seed: int, tag: str = "") -> list[str]:  # one run at this level
                return bench_serving_argv(server.base_url, tok, concurrency=c,
                                          num_prompts=max(args.min_prompts, args.waves * c), input_len=args.input_len,
                                          output_len=args.output_len, seed=seed,
                                          output_file=str(out_dir / f"{args.name}_{safe}_s{start}_c{c}{tag}.jsonl"))

            def enter_arm(idx: int) -> bool | None:  # route by arm idx; with --flush-cache empty the caches
                set_arm(switch, idx, server.base_url)
                return flush_cache(server.base_url) if args.flush_cache else None

            if args.level_warmup:  # one discarded run per arm at this level (a first run is slow: new shapes, NGRAM)
                for idx, _arm in order:
                    enter_arm(idx)
                    run_bench_serving(level_argv(args.seed + 500 + c, "_warmup"))
            for rep in range(args.reps):
                for idx, arm in (order if rep % 2 == 0 else order[::-1]):
                    flushed = enter_arm(idx)
                    text = scrape(server.base_url)
                    before, sg_before = xshare_counters(text), sglang_counters(text)
                    res = run_bench_serving(level_argv(args.seed + 1000 * rep + c))
                    flush_metrics(server.base_url, args.settle)
                    text = scrape(server.base_url)
                    after = xshare_counters(text)
                    d = counter_delta(before, after)
                    # this run's accept length (speculative servers), from SGLang's counters
                    res["spec_accept_length"] = spec_accept_length(sg_before, sglang_counters(text))
                    # the arm's own counts (the server's policy as rank "0", arm N >= 2 as rank "0/armN")
                    own = d.get("0", next(iter(d.values()), {})) if idx <= 1 else d.get(f"0/arm{idx}", {})
                    res["xshare"] = per_call(own)
                    res["arm"] = arm
                    if flushed is not None:
                        res["cache_flushed"] = flushed
                    if idx == 0:
                        ab_runs.append(res)
                    else:
                        (arm_runs[arm] if cfg.arms else runs).append(res)
                    print(f"[{cfg.label} #{start}{'' if switch is None else ' ' + arm}] c={c} rep={rep}: "
                          f"{res['output_throughput']:.0f} tok/s, median TPOT {res['median_tpot_ms']:.2f} ms, experts "
                          f"{res['xshare'].get('distinct', float('nan')):.1f} "
                          f"(top-k {res['xshare'].get('topk_distinct', float('nan')):.1f})", flush=True)
            lvl = {"concurrency": c, "runs": arm_runs[cfg.arms[0]] if cfg.arms else runs}
            if switch is not None:
                lvl["ab_sglang_runs"] = ab_runs
            if cfg.arms:
                lvl["arm_runs"] = arm_runs
            rec["levels"].append(lvl)
            if progress is not None:  # the measured runs are kept before the (slower) profiled ones
                progress(dict(rec, error=f"incomplete: the run stopped after concurrency {c}",
                              wall_s=round(time.time() - t0, 1)))
            if c in prof_cs:
                def keep_arms(so_far: dict, lvl=lvl, c=c) -> None:  # each profiled arm is saved as it comes
                    lvl["profile"] = so_far
                    if progress is not None:
                        progress(dict(rec, error=f"incomplete: the run stopped during the profile at concurrency {c}",
                                      wall_s=round(time.time() - t0, 1)))

                lvl["profile"] = profile_arms(server.base_url, switch, order, level_argv(args.seed + c, "_profile"),
                                              args.profile_steps, args.tp,
                                              out_dir / f"{args.name}_profiles", f"{args.name}_{safe}_s{start}_c{c}",
                                              on_arm=keep_arms)
                if progress is not None:
                    progress(dict(rec, error=f"incomplete: the run stopped after concurrency {c} (profiled)",
                                  wall_s=round(time.time() - t0, 1)))
    except ServerDied as e:
        rec["error"] = str(e)[-4000:]
        print(f"[{cfg.label}] FAILED: {e}", flush=True)
    except Exception as e:  # keep the other configurations going
        rec["error"] = f"{type(e).__name__}: {e}\n{server.tail()}"[-4000:]
        print(f"[{cfg.label}] FAILED: {rec['error']}", flush=True)
    finally:
        rec["gpu_after"] = gpu_state()
        rec["killed_at_stop"] = server.stop(grace=args.stop_grace)
        rec["wall_s"] = round(time.time() - t0, 1)
        try:
            rec["hook"] = hook_summary(Path(log).read_text(errors="replace"))
        except OSError:
            pass
    return rec


def _med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _paired(per_start: dict[int, float], base: dict[int, float]) -> list[float]:
    """Ratios to ``off`` within each round (start index) where both ran."""
    return [per_start[k] / base[k] for k in sorted(per_start) if base.get(k)]


def per_arm(records: list[dict]) -> list[dict]:
    """A one-server record of several policies (``--ab-one-server``) as one record per policy: its
    own runs, paired with the server's SGLang-arm runs (the same for every policy of the server)."""
    out = []
    for rec in records:
        if not rec.get("arms"):
            out.append(rec)
            continue
        for label in rec["arms"]:
            levels = [{"concurrency": lvl["concurrency"], "runs": lvl["arm_runs"][label],
                       "ab_sglang_runs": lvl.get("ab_sglang_runs", [])} for lvl in rec.get("levels", [])]
            out.append({**{k: v for k, v in rec.items() if k not in ("arms", "levels")}, "config": label,
                        "server": rec["config"], "levels": levels})
    return out


def acceptance(runs: list[dict], ab_pairs: list[tuple[dict, dict]]) -> dict:
    """Speculative decoding's accept length of one (configuration, concurrency), each run one sample:
    ``accept_mean`` / ``accept_ci`` (mean and 95 % t half-width over the runs), the same of the
    SGLang arm's runs under ``--ab`` (``ab_sglang_accept_*``), and the paired difference policy -
    SGLang arm over the A/B pairs (``accept_delta`` / ``accept_delta_ci``: same prompts, same
    server; an interval that holds 0 means no measurable change). The verify step
    (``verify_step_ms``, ``ab_sglang_verify_step_ms``) is a request's time per verify forward,
    median TPOT x mean accept length. Empty without speculative decoding."""
    acc = [r.get("spec_accept_length") for r in runs]
    if all(a is None for a in acc):
        return {}
    m, ci = mean_ci(acc)
    sm, sci = mean_ci([sg.get("spec_accept_length") for _, sg in ab_pairs])
    d, dci = mean_ci([po["spec_accept_length"] - sg["spec_accept_length"] for po, sg in ab_pairs
                      if po.get("spec_accept_length") is not None and sg.get("spec_accept_length") is not None])
    tpot, sg_tpot = _med([r.get("median_tpot_ms") for r in runs]), _med([sg.get("median_tpot_ms") for _, sg in ab_pairs])
    return {"accept_runs": [a for a in acc if a is not None], "accept_mean": m, "accept_ci": ci,
            "ab_sglang_accept_mean": sm, "ab_sglang_accept_ci": sci, "accept_delta": d, "accept_delta_ci": dci,
            "verify_step_ms": tpot * m if tpot and m else None,
            "ab_sglang_verify_step_ms": sg_tpot * sm if sg_tpot and sm else None}


def baseline(rows: list[dict]) -> str:
    """The configuration the ratios are taken against: ``plain`` (SGLang's own launcher, no plugin)
    where the run has it, else ``off`` (the plugin's launcher with the policy off)."""
    return "plain" if any(r["config"] == "plain" for r in rows) else "off"


def summarize(records: list[dict]) -> tuple[list[dict], str]:
    """Rows per (configuration, concurrency): medians over every run of every start, the median of
    each start, and the ratio to the baseline -- pooled (median / median) and paired within rounds.
    The baseline is ``plain`` (SGLang's own launcher) where the run has it, else ``off``."""
    records = per_arm(records)
    groups: dict[tuple[str, int], dict[int, list[dict]]] = {}
    ab: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    for rec in records:
        for lvl in rec.get("levels", []):
            key = (rec["config"], lvl["concurrency"])
            groups.setdefault(key, {})[rec.get("start", 0)] = lvl["runs"]
            if lvl.get("ab_sglang_runs"):  # in-server A/B: rep i's policy run with rep i's SGLang run
                ab.setdefault(key, []).extend(zip(lvl["runs"], lvl["ab_sglang_runs"]))
    rows = []
    for (cfg, c), by_start in groups.items():
        runs = [r for s in sorted(by_start) for r in by_start[s]]
        ab_pairs = ab.get((cfg, c), [])
        ab_tpot = [sg["median_tpot_ms"] / po["median_tpot_ms"] for po, sg in ab_pairs
                   if po.get("median_tpot_ms") and sg.get("median_tpot_ms")]
        ab_tok = [po["output_throughput"] / sg["output_throughput"] for po, sg in ab_pairs
                  if po.get("output_throughput") and sg.get("output_throughput")]
        tp = [r["output_throughput"] for r in runs if r.get("output_throughput")]
        x = [r.get("xshare", {}) for r in runs]
        per_start = {s: _med([r.get("output_throughput") for r in rs]) for s, rs in sorted(by_start.items())}
        tpot_start = {s: _med([r.get("median_tpot_ms") for r in rs]) for s, rs in sorted(by_start.items())}
        rows.append({
            "config": cfg, "concurrency": c, "runs": len(runs), "starts": len(by_start),
            "tok_s": _med(tp), "tok_s_min": min(tp) if tp else None, "tok_s_max": max(tp) if tp else None,
            "tok_s_per_start": {str(k): v for k, v in per_start.items() if v is not None},
            "tpot_per_start": {str(k): v for k, v in tpot_start.items() if v is not None},
            "tpot_med_ms": _med([r.get("median_tpot_ms") for r in runs]),
            "tpot_p99_ms": _med([r.get("p99_tpot_ms") for r in runs]),
            "itl_med_ms": _med([r.get("median_itl_ms") for r in runs]),
            "itl_p99_ms": _med([r.get("p99_itl_ms") for r in runs]),
            "accept_length": _med([r.get("spec_accept_length") for r in runs]),
            "ab_sglang_accept_length": _med([sg.get("spec_accept_length") for _, sg in ab_pairs]),
            **acceptance(runs, ab_pairs),
            "experts": _med([v.get("distinct") for v in x]), "topk_experts": _med([v.get("topk_distinct") for v in x]),
            "peak": _med([v.get("peak") for v in x]), "topk_peak": _med([v.get("topk_peak") for v in x]),
            "tokens_per_call": _med([v.get("valid_tokens") for v in x]),
            "policy_steps": sum(v.get("policy_steps", 0) for v in x), "sglang_steps": sum(v.get("sglang_steps", 0) for v in x),
            "barrier_faults": sum(v.get("barrier_faults", 0) for v in x),
            "ab_tpot_speedups": ab_tpot, "ab_tpot_speedup": _med(ab_tpot),
            "ab_tok_ratios": ab_tok, "ab_tok_ratio": _med(ab_tok),
            "ab_sglang_tpot_ms": _med([sg.get("median_tpot_ms") for _, sg in ab_pairs]),
            "ab_sglang_tok_s": _med([sg.get("output_throughput") for _, sg in ab_pairs]),
        })
    order = {c: i for i, c in enumerate(dict.fromkeys(rec["config"] for rec in records))}
    rows.sort(key=lambda r: (order[r["config"]], r["concurrency"]))
    ref = baseline(rows)
    base = {r["concurrency"]: r for r in rows if r["config"] == ref}
    for row in rows:
        b = base.get(row["concurrency"])
        row["ratio_vs_off"] = (row["tok_s"] / b["tok_s"]) if (b and b["tok_s"] and row["tok_s"]) else None
        pairs = _paired({int(k): v for k, v in row["tok_s_per_start"].items()},
                        {int(k): v for k, v in b["tok_s_per_start"].items()}) if b else []
        row["paired_ratios"] = pairs
        row["paired_ratio"] = _med(pairs)
        # TPOT speed-up (off's TPOT / this TPOT: > 1 is faster), pooled and paired within rounds
        row["tpot_speedup"] = (b["tpot_med_ms"] / row["tpot_med_ms"]) if (b and b["tpot_med_ms"] and row["tpot_med_ms"]) else None
        tp_pairs = _paired({int(k): 1.0 / v for k, v in row["tpot_per_start"].items() if v},
                           {int(k): 1.0 / v for k, v in b["tpot_per_start"].items() if v}) if b else []
        row["tpot_paired_speedups"] = tp_pairs
        row["tpot_paired_speedup"] = _med(tp_pairs)
        if row["config"] == ref:
            v = list(row["tok_s_per_start"].values())
            row["aa_spread"] = (max(v) / min(v)) if len(v) > 1 and min(v) > 0 else None
    head = ["config", "conc.", "tok/s (median)", "per start", f"vs {ref}", f"paired vs {ref} (rounds)", "TPOT med / p99 ms",
            f"TPOT speed-up vs {ref} (paired)", "in-server A/B: TPOT speed-up, tok/s ratio", "ITL med / p99 ms",
            "experts / layer", "top-k experts", "busiest rank", "top-k busiest"]

    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    def paired_cell(r):
        if r["config"] == ref:
            return "-" if r.get("aa_spread") is None else f"A/A max/min {r['aa_spread']:.3f}"
        p = r["paired_ratios"]
        if not p:
            return "-"
        return f(r["paired_ratio"], 3) + (f" [{min(p):.3f}-{max(p):.3f}]" if len(p) > 1 else "")

    def tpot_cell(r):
        if r["config"] == ref or r["tpot_speedup"] is None:
            return "-"
        p = r["tpot_paired_speedups"]
        return f(r["tpot_speedup"], 3) + (f" ({f(r['tpot_paired_speedup'], 3)} [{min(p):.3f}-{max(p):.3f}])" if len(p) > 1 else "")

    def ab_cell(r):
        p = r["ab_tpot_speedups"]
        if not p:
            return "-"
        return (f"{f(r['ab_tpot_speedup'], 3)} [{min(p):.3f}-{max(p):.3f}], {f(r['ab_tok_ratio'], 3)} "
                f"({len(p)} pairs)")

    spec = any(r.get("accept_length") is not None for r in rows)
    if spec:  # speculative servers: accept length per run, mean ± 95 % CI (the SGLang arm's and the paired difference under --ab)
        head.insert(9, "accept length ± CI (A/B: SGLang arm; paired difference)")
        head.insert(10, "verify step ms (A/B: SGLang arm)")

    def pm(m, ci):
        return f(m, 2) + ("" if ci is None else f" ± {ci:.2f}")

    def accept_cell(r):
        if r.get("accept_mean") is None:
            return "-"
        cell = pm(r["accept_mean"], r.get("accept_ci")) + f" ({len(r['accept_runs'])} runs)"
        if r.get("ab_sglang_accept_mean") is not None:
            d = r.get("accept_delta")
            cell += f" ({pm(r['ab_sglang_accept_mean'], r.get('ab_sglang_accept_ci'))}; " + \
                ("-" if d is None else f"{d:+.2f}" + ("" if r.get("accept_delta_ci") is None else f" ± {r['accept_delta_ci']:.2f}")) + ")"
        return cell

    def verify_cell(r):
        a, b = r.get("verify_step_ms"), r.get("ab_sglang_verify_step_ms")
        return f(a, 2) + ("" if b is None else f" ({f(b, 2)})")

    table = [[r["config"], r["concurrency"], f(r["tok_s"], 0), " / ".join(f(v, 0) for v in r["tok_s_per_start"].values()),
              f(r["ratio_vs_off"], 3), paired_cell(r), f"{f(r['tpot_med_ms'], 2)} / {f(r['tpot_p99_ms'], 2)}",
              tpot_cell(r), ab_cell(r), f"{f(r['itl_med_ms'], 2)} / {f(r['itl_p99_ms'], 2)}", f(r["experts"]), f(r["topk_experts"]),
              f(r["peak"]), f(r["topk_peak"])] for r in rows]
    if spec:
        for r, line in zip(rows, table):
            line.insert(9, accept_cell(r))
            line.insert(10, verify_cell(r))
    return rows, markdown_table(head, table)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Throughput per concurrency, and two ratios to ``off`` (paired medians, bars = min-max over
    rounds): output throughput, and TPOT speed-up (off's TPOT / the configuration's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))

    def ratio_line(ax, rs, point, pairs, pooled, label, color):
        rr = [r for r in rs if r[point] or r[pooled]]
        y = [r[point] or r[pooled] for r in rr]  # the paired median where rounds exist
        lo = [v - min(r[pairs] or [v]) for v, r in zip(y, rr)]
        hi = [max(r[pairs] or [v]) - v for v, r in zip(y, rr)]
        ax.errorbar([r["concurrency"] for r in rr], y, yerr=[lo, hi], marker="o", capsize=3, label=label, color=color)

    ref = baseline(rows)
    ab_only = not any(r["config"] == ref for r in rows) and any(r.get("ab_tpot_speedups") for r in rows)
    for i, cfg in enumerate(dict.fromkeys(r["config"] for r in rows)):
        rs = [r for r in rows if r["config"] == cfg and r["tok_s"]]
        if not rs:
            continue
        color = f"C{i % 10}"  # one colour per configuration in every panel
        a.plot([r["concurrency"] for r in rs], [r["tok_s"] for r in rs], marker="o", label=cfg, color=color)
        sg = [r for r in rs if r.get("ab_sglang_tok_s")]
        if sg:  # --ab: the same server's SGLang arm, dashed
            a.plot([r["concurrency"] for r in sg], [r["ab_sglang_tok_s"] for r in sg], marker="x", ls="--",
                   color=color, alpha=0.7, label=cfg + ": SGLang arm")
        if ab_only:
            ratio_line(b, rs, "ab_tok_ratio", "ab_tok_ratios", "ab_tok_ratio", cfg + " (in-server A/B)", color)
        else:
            ratio_line(b, rs, "paired_ratio", "paired_ratios", "ratio_vs_off", cfg, color)
        if cfg != ref and any(r["tpot_speedup"] for r in rs):
            ratio_line(c, rs, "tpot_paired_speedup", "tpot_paired_speedups", "tpot_speedup", cfg, color)
        elif any(r["ab_tpot_speedup"] for r in rs):  # --ab: against its own server's SGLang arm (bars: pairs)
            ratio_line(c, rs, "ab_tpot_speedup", "ab_tpot_speedups", "ab_tpot_speedup", cfg + " (in-server A/B)", color)
    for ax in (a, b, c):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
    a.set_ylabel("output tokens / s (median)")
    b.set_ylabel("tok/s / SGLang arm (A/B; bars: pairs)" if ab_only else f"throughput / {ref} (paired; bars: rounds)")
    c.set_ylabel(f"TPOT speed-up vs {ref} / vs SGLang arm (A/B)")
    for ax in (b, c):
        ax.axhline(1.0, color="k", lw=0.8)
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(out_dir: Path, name: str, rows: list[dict], table: str, notes: list[str], title: str, meta: dict,
           **payload) -> None:
    """``<out_dir>/<name>.{json,md}`` (notes, table, plot link) and the plot when anything was measured."""
    md = "\n".join(notes) + "\n\n" + table + f"\n\n![{name}]({name}.png)\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir, name, {"title": title, "rows": rows, **payload}, md, meta)
    if any(r["tok_s"] for r in rows):
        plot(rows, out_dir / f"{name}.png", title)


def _idle_note(args: argparse.Namespace) -> str:
    """What the in-server A/B's ratios include (``--ab-idle-arms``), for the notes."""
    if not getattr(args, "ab", False):
        return ""
    if getattr(args, "ab_idle_arms", "compute") == "skip":
        return ("; `--ab-idle-arms skip`: each arm pays only its own selection (the others' kernels return at once), "
                "so the A/B speed-up is net of the policy's selection (the policy's arm also runs SGLang's top-k)")
    return ("; `--ab-idle-arms compute`: every arm's selection runs in every arm, so the A/B speed-up is the expert "
            "cut alone, without the selection's cost")


def report(records: list[dict], skipped: list[tuple[str, int, str]], args: argparse.Namespace, extra: list[str],
           meta: dict) -> str:
    """Write ``<out>/<name>.{json,md,png}`` from the records so far; returns the Markdown table."""
    out_dir = Path(args.out)
    rows, table = summarize(records)
    shape = args.preset or Path(args.model).name
    title = (f"{shape}{'' if args.layers is None else f' ({args.layers} layers)'}, TP {args.tp} / EP {args.ep}"
             f"{' through sglang-xshare-ray' if getattr(args, 'ray', False) else ''}"
             f"{', ' + ' '.join(extra) if extra else ''}; in {args.input_len} / out {args.output_len} tokens")
    notes = [f"Workload: `sglang.bench_serving` random-ids prompts, {args.input_len} input / {args.output_len} output "
             f"tokens (ignore_eos), {args.waves} x concurrency requests per run, {args.reps} runs per point and "
             f"server start, {args.starts} start(s) per configuration in interleaved rounds; tok/s = output "
             f"throughput, median over every run; per start = the median of each start; baseline `plain` = SGLang's own "
             f"launcher (`python -m sglang.launch_server`, no plugin), `off` = the plugin's launcher with the policy "
             f"off (ratios are taken against `plain` where the run has it); vs baseline = pooled medians; "
             f"paired = the ratio to the same round's baseline, median [min-max] over rounds; A/A = max/min of the "
             f"baseline's per-start medians (the spread between servers running identical kernels); TPOT speed-up = "
             f"the baseline's median "
             f"TPOT / the configuration's (> 1 is faster), pooled (paired median [min-max] over rounds); in-server A/B "
             f"(`--ab`) = the policy arm against the same server's SGLang arm, rep by rep (median [min-max] of "
             f"the TPOT speed-ups, median tok/s ratio){_idle_note(args)}. Experts = per MoE layer call, from "
             f"xshare's live metrics (the policy's distinct experts and busiest EP rank, and plain top-k's on the same "
             f"batches). Server: {title}."]
    for rec in records:
        hk = rec.get("hook") or {}
        hook_note = ""
        if hk.get("layers"):
            target = ", ".join(f"{n}: {'/'.join(p)}" for n, p in hk.get("paths", {}).get("target", {}).items())
            hook_note = (f"; hook: {hk['layers']} layers ({', '.join(hk.get('policies', []))}), shared slots "
                         f"{hk.get('shared_slots', 0)}, path per batch size {{{target}}}")
        notes.append(f"- `{rec['config']}` #{rec.get('start', 0)}: start-up {rec.get('startup_s', '-')} s, killed at stop "
                     f"{rec.get('killed_at_stop')}{', ERROR: ' + rec['error'].splitlines()[0] if rec.get('error') else ''}"
                     + hook_note + (f"; GPU before: {'; '.join(rec['gpu_before'])}" if rec.get("gpu_before") else ""))
    for label, start, why in skipped:
        notes.append(f"- `{label}` #{start}: not run ({why})")
    notes += profile_lines(records)
    _write(out_dir, args.name, rows, table, notes, title, meta, records=records, not_run=[list(x) for x in skipped])
    return table


def merge_results(files: list[Path], out_dir: Path, name: str) -> str:
    """Join result files of earlier runs (e.g. two runs on different days): every file's starts become rounds of
    their own, so each ratio to ``off`` stays paired with the ``off`` of its own run. Writes
    ``<out_dir>/<name>.{json,md,png}``; returns the Markdown table."""
    records: list[dict] = []
    notes = ["Merged from these runs; the starts of each run are rounds of their own (paired ratios compare a "
             "configuration with the `off` of its own round):"]
    offset = 0
    title = None
    for f in files:
        d = json.loads(f.read_text())
        title = title or d.get("title")
        m = d.get("meta", {})
        recs = d.get("records", [])
        starts = sorted({r.get("start", 0) for r in recs}) or [0]
        notes.append(f"- `{f.name}`: rounds {offset}..{offset + max(starts)}; `{m.get('command', '?')}` "
                     f"(git `{m.get('git', '?')}`, {m.get('device', '?')}, {m.get('date', '?')})")
        for r in recs:
            records.append(dict(r, start=offset + r.get("start", 0), source=f.name))
        offset += max(starts) + 1
    rows, table = summarize(records)
    _write(out_dir, name, rows, table, notes, f"{title} (merged runs)", run_metadata(), records=records,
           merged_from=[str(f) for f in files])
    return table


def replot(path: Path) -> str:
    """Summarise ``path``'s records again (rows in the JSON replaced) and redraw ``<same name>.png``;
    the Markdown and the run's metadata stay as written. Returns the table."""
    d = json.loads(path.read_text())
    rows, table = summarize(d["records"])
    d["rows"] = rows
    path.write_text(json.dumps(d, indent=1))
    plot(rows, path.with_suffix(".png"), d.get("title", path.stem))
    return table


def run_rounds(configs: list[ServeConfig], model: str, args: argparse.Namespace, extra: list[str], work: Path,
               t_start: float, on_record=None) -> tuple[list[dict], list[tuple[str, int, str]]]:
    """Every configuration ``args.starts`` times, round by round; returns the records (those of
    ``args.state`` first) and the ``(label, start, reason)`` of the servers not started.
    ``on_record(records)`` runs after each server and after each concurrency level (the results so
    far are written then, an unfinished server's record marked incomplete, so a run killed at its
    time limit still leaves them; that server runs again when the run is resumed)."""
    state = Path(args.state) if args.state else None
    records: list[dict] = json.loads(state.read_text()) if state and state.exists() else []
    done = {(r["config"], r.get("start", 0)) for r in records if "error" not in r}
    records = [r for r in records if (r["config"], r.get("start", 0)) in done]  # a failed server runs again
    skipped: list[tuple[str, int, str]] = []
    for start in range(args.starts):
        for cfg in configs:
            if (cfg.label, start) in done:
                print(f"[{cfg.label} #{start}] done in {state}, skipped", flush=True)
                continue
            if args.time_budget is not None:
                # the median server, not the slowest: a fresh machine's first server took up to 2x
                # longer than the later ones, which would otherwise cost every resumed call one server
                walls = [r["wall_s"] for r in records if "wall_s" in r] or [0.0]
                est = statistics.median(walls)
                left = args.time_budget - (time.monotonic() - t_start)
                if left < est * 1.1 or left <= 0:
                    skipped.append((cfg.label, start, f"time budget: {left:.0f} s left, a server took a median "
                                                      f"of {est:.0f} s"))
                    continue
            records.append(run_config(cfg, model, args, extra, work, start,
                                      progress=lambda partial: _save(records + [partial], state, on_record)))
            _save(records, state, on_record)
    return records, skipped


def _save(records: list[dict], state: Path | None, on_record) -> None:
    if state:
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(records, indent=1))
    if on_record is not None:
        on_record(records)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder with real weights (e.g. bench/data/model)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="MoE shape with random weights (--load-format dummy)")
    src.add_argument("--merge", nargs="+", metavar="JSON",
                     help="no server: join earlier result files, each file's starts as rounds of their own "
                          "(ratios paired within a file's round), and write --name")
    src.add_argument("--replot", metavar="JSON",
                     help="no server: summarise a result file's records again and redraw its PNG (rows updated)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of --preset (default: the model's)")
    ap.add_argument("--configs", default="off,xshare@0.7,xshare_ep@0.7,oea+k0=4,cap+cap=6")
    ap.add_argument("--concurrency", default="1,8,16,32,64,128", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="runs per concurrency (median and spread)")
    ap.add_argument("--waves", type=int, default=2, help="requests per run = waves x concurrency")
    ap.add_argument("--min-prompts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--max-bs", type=int, default=128, help="--cuda-graph-max-bs-decode")
    ap.add_argument("--graph-bs", default="1,2,4,8,16,32,64,96,128", type=lambda s: [int(x) for x in s.split(",")],
                    help="decode batch sizes captured as CUDA graphs (--cuda-graph-bs-decode)")
    ap.add_argument("--mem-fraction", type=float, default=0.8)
    ap.add_argument("--ray", action="store_true", help="start the servers through sglang-xshare-ray (a Ray head is started)")
    ap.add_argument("--starts", type=int, default=1,
                    help="server starts per configuration, interleaved in rounds (off, A, B, off, A, B, ...)")
    ap.add_argument("--state", default=None,
                    help="JSON file of finished servers: read at start (those are skipped), written after each server")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for this call: a server is not started when 1.1 x the median server so far would not fit")
    ap.add_argument("--stop-grace", type=float, default=8.0, help="seconds between SIGTERM and SIGKILL at stop")
    ap.add_argument("--ab", action="store_true",
                    help="in-server A/B: every policy server also runs SGLang's routing (--xshare-ab-switch) and each "
                         "rep runs both arms (ABBA order); reports the policy's TPOT speed-up over its own server's "
                         "SGLang arm, free of the spread between servers")
    ap.add_argument("--ab-one-server", action="store_true",
                    help="with --ab: every configuration is an arm of ONE server (the first its policy, the others "
                         "--xshare-ab-arm): each rep runs SGLang's arm and every policy's on the same server, in "
                         "order and reversed; one start-up for the whole comparison")
    ap.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                    help="xshare's live metrics in the policy servers (the experts columns; default on). They cost "
                         "+5-8 µs per MoE layer (bench/results/hook_overhead_gated.md): --no-metrics times what a "
                         "production server without --xshare-metrics pays (no experts columns then)")
    ap.add_argument("--ab-idle-arms", choices=AB_IDLE_ARMS, default="skip",
                    help="with --ab: what the arms the switch does not route by do (--xshare-ab-idle-arms): 'skip' "
                         "their selection (the A/B speed-up is net of it) or 'compute' it anyway (the speed-up is the "
                         "expert cut alone)")
    ap.add_argument("--level-warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one discarded run per arm at each concurrency level before its measured runs (default "
                         "on): the first run at a level ran up to 3x slower in the NGRAM server "
                         "(serve_ngram_tp1_flush.md), and after a single warm-up run the first measured run still ran "
                         "slower (serve_ngram_qwen3_tp1_arms.md)")
    ap.add_argument("--flush-cache", action="store_true",
                    help="SGLang's /flush_cache before every measured run: each run starts with an empty prefix "
                         "cache and an empty NGRAM corpus (NGRAM learns from the previous run's outputs, so without "
                         "it the second arm of an A/B pair accepts more drafts)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the measured runs at --profile-concurrency, one more run per arm under SGLang's "
                         "profiler (/start_profile by stage): this many decode steps at full batch, GPU kernel time "
                         "per step by category (MoE experts, selection, routing, communication, attention, ...)")
    ap.add_argument("--profile-concurrency", default=None, type=lambda s: [int(x) for x in s.split(",")],
                    help="the levels profiled, comma-separated (default: the largest --concurrency); SGLang traces "
                         "decode steps whose batch holds at least the smallest of them")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--settle", type=float, default=1.1, help="seconds between the two metric-flushing requests")
    ap.add_argument("--name", default="serve")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default="/tmp/xshare-serve", help="model folders and server logs")
    args = ap.parse_args(argv)
    if args.merge:
        print(merge_results([Path(f) for f in args.merge], Path(args.out), args.name))
        return 0
    if args.replot:
        print(replot(Path(args.replot)))
        return 0
    t_start = time.monotonic()
    # a SIGTERM (e.g. from `timeout`) unwinds like an exception: the running server is stopped and
    # what was measured so far is written, instead of a server left running without its benchmark
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.starts < 1:
        ap.error("--starts must be >= 1")
    configs = parse_configs(args.configs)
    if args.ab_one_server:
        if not args.ab:
            ap.error("--ab-one-server needs --ab")
        try:
            configs = [one_server(configs)]
        except ValueError as e:
            ap.error(str(e))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.dummy = args.preset is not None
    # biases drawn by SGLang's dummy loader would swamp the residual stream: every token the same experts
    args.zero_biases = args.dummy and args.preset in ZERO_BIASES
    model = str(write_model(work / f"{args.preset}-{args.layers}", args.preset, args.layers)) if args.dummy else args.model
    meta = run_metadata()
    try:
        import sglang

        meta["sglang"] = sglang.__version__
    except ImportError:
        meta["sglang"] = "not installed"
    if args.ab:
        meta["ab_idle_arms"] = args.ab_idle_arms
    meta["xshare_metrics"] = args.metrics
    if args.ray:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
        subprocess.run(["ray", "start", "--head", "--num-gpus", str(args.tp), "--disable-usage-stats"], check=True,
                       env=dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", **{MARK_ENV: "ray-head"}))
    records, skipped = run_rounds(configs, model, args, extra, work, t_start,
                                  on_record=lambda recs: report(recs, [], args, extra, meta))
    if args.ray:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
    table = report(records, skipped, args, extra, meta)
    print(table)
    return 0 if all("error" not in r for r in records) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
