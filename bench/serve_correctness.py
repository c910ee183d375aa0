"""Correctness inside a running SGLang server (GPU): greedy equality, EOS, and quality from SGLang's logprobs.

1. **Token for token.** The same prompts, greedy, through ``plain`` (``python -m sglang.launch_server``),
   ``off`` and ``topk`` (the hook installed, SGLang's routing): the generated ids must be equal.
   Prompts are the evaluation model's held-out windows (real text), all sent at once so the server
   decodes them as one batch.
2. **EOS.** The same prompts without ``ignore_eos``: how many answers stop at the first token.
3. **Quality in the server.** The held-out windows (``eval_tokens.npy``, 129 tokens each) go
   through each server with ``return_logprob`` from position 0 (teacher forcing), the policy applied
   to prefill batches too (``--xshare-apply-to-prefill``); prefill batches hold ``--batch`` whole
   windows (``--chunked-prefill-size`` = batch x window). CE per window = mean negative log-prob of
   tokens 1..128; the delta vs ``off`` is paired per window (95% t-interval over batches). The
   same batches go through the offline harness (``sglang_xshare.hf``, the model in transformers)
   with the same grouping (all tokens of a batch in one selection, ``StepLayout(g=128)``), so the
   two deltas can be compared.

Writes ``bench/results/<name>.{json,md}``.

    python bench/serve_correctness.py --tp 1 --name serve_correctness_tp1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np

from sglang_xshare.benchio import markdown_table, run_metadata, write_results

from servebench.configs import parse_configs
from servebench.server import Server

MODEL = ROOT / "bench" / "data" / "model"
BASE = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none",
        "--disable-custom-all-reduce", "--enforce-disable-flashinfer-allreduce-fusion", "--disable-prefill-cuda-graph",
        "--disable-radix-cache", "--skip-server-warmup", "--random-seed", "0"]


def post(url: str, payload: dict, timeout: float = 600.0) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def t975(n: int) -> float:
    from sglang_xshare.hf.evaluate import t_quantile_975

    return t_quantile_975(n)


def start(cfg, args, port: int, log: Path, extra: list[str], gpus: str | None = None) -> Server:
    """The server of one configuration (on ``gpus``, a ``CUDA_VISIBLE_DEVICES`` list, when given)."""
    sg = ["--model-path", str(MODEL), "--host", "127.0.0.1", "--port", str(port), "--tp-size", str(args.tp),
          "--chunked-prefill-size", str(args.batch * 129), "--max-prefill-tokens", str(args.batch * 129),
          "--mem-fraction-static", str(args.mem_fraction), "--cuda-graph-max-bs-decode", str(args.prompts), *BASE, *extra]
    if args.kv_tokens:  # servers sharing GPUs: a fixed, small KV pool each (SGLang sizes it from free memory)
        sg += ["--max-total-tokens", str(args.kv_tokens)]
    if args.ep > 1:
        sg += ["--ep-size", str(args.ep)]
    py = sys.executable
    cmd = [py, "-m", "sglang.launch_server", *sg] if cfg.plain else \
        [py, "-m", "sglang_xshare.launch_server", *sg, *cfg.flags] + (["--xshare-apply-to-prefill"] if cfg.selects else [])
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return Server(cmd, port, log, env=env)


def gpu_slot(i: int, parallel: int, tp: int, gpus: int) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` of the ``i``-th server when ``parallel`` run at once on ``gpus`` GPUs:
    the servers take the ``gpus // tp`` groups of ``tp`` GPUs in turn, so with more servers than groups
    several share a group (each then gets a capped KV pool, ``--kv-tokens``); ``None`` for one at a time."""
    if parallel <= 1:
        return None
    groups = max(1, gpus // tp)
    slot = i % groups
    return ",".join(str(slot * tp + j) for j in range(tp))


def run_server(i: int, cfg, args, extra: list[str], prompts: list[list[int]], windows: np.ndarray, work: Path) -> dict:
    """One configuration's server: greedy ids, EOS behaviour, teacher-forced CE per window."""
    gpus = gpu_slot(i, args.parallel, args.tp, args.gpus)
    # SGLang derives several ports (dist init, ZMQ) from --port: keep the servers' ranges apart
    srv = start(cfg, args, args.port + 50 * i, work / f"{args.name}_{i}.log", extra, gpus)
    r: dict = {"config": cfg.label, "gpus": gpus}
    try:
        srv.start()
        r["startup_s"] = round(srv.wait_ready(900), 1)
        url = srv.base_url + "/generate"
        greedy = {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
        outs = post(url, {"input_ids": prompts, "sampling_params": greedy})
        r["ids"] = [o["output_ids"] for o in outs]
        free = post(url, {"input_ids": prompts, "sampling_params": {**greedy, "ignore_eos": False}})
        r["first_token_eos"] = sum(1 for o in free if len(o["output_ids"]) <= 1)
        r["mean_len_no_ignore_eos"] = statistics.mean(len(o["output_ids"]) for o in free)
        t0 = time.time()
        lp = post(url, {"input_ids": [w.tolist() for w in windows],
                        "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
                        "return_logprob": True, "logprob_start_len": 0})
        r["logprob_s"] = round(time.time() - t0, 1)
        r["ce"] = [-statistics.mean(x[0] for x in o["meta_info"]["input_token_logprobs"][1:]) for o in lp]
    except Exception as e:  # keep going: the report says what failed
        r["error"] = f"{type(e).__name__}: {e}\n{srv.tail()}"[-3000:]
        print(f"[{cfg.label}] FAILED {r['error']}", flush=True)
    finally:
        r["killed_at_stop"] = srv.stop(grace=8)
    print(f"[{cfg.label}] done: eos-first {r.get('first_token_eos')}, ce {statistics.mean(r['ce']) if 'ce' in r else '-'}",
          flush=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--configs", default="plain,off,topk,xshare@0.7,xshare_ep@0.7")
    ap.add_argument("--equal", default="plain,off,topk", help="configurations that must generate the same ids")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16, help="windows per prefill batch (quality)")
    ap.add_argument("--windows", type=int, default=256, help="held-out windows (quality; multiple of --batch)")
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--name", default="serve_correctness")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default="/tmp/xshare-correctness")
    ap.add_argument("--no-harness", action="store_true")
    ap.add_argument("--parallel", type=int, default=1,
                    help="servers at once (CUDA_VISIBLE_DEVICES): each on its own --tp GPUs while groups last, "
                         "then sharing them (each with a KV pool of --kv-tokens)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs for --parallel (default: all visible)")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="--mem-fraction-static of every server (default 0.5; 0.85 when servers share GPUs: SGLang "
                         "keeps 1 - this of the free memory it saw at start as slack, which the other servers take)")
    ap.add_argument("--kv-tokens", type=int, default=None,
                    help="--max-total-tokens of every server (default: SGLang's sizing; 24576 when servers share GPUs)")
    args, extra = ap.parse_known_args()
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count() or args.parallel * args.tp
    shared = args.parallel > max(1, args.gpus // args.tp)
    if args.mem_fraction is None:
        args.mem_fraction = 0.85 if shared else 0.5
    if args.kv_tokens is None and shared:
        args.kv_tokens = 24576
    extra = [a for a in extra if a != "--"]
    configs = parse_configs(args.configs)
    ev = np.load(MODEL / "eval_tokens.npy").astype(np.int64)  # [3, 256, 129]
    # interleave datasets so every batch mixes them (as the harness' "mixed" batches)
    windows = ev.transpose(1, 0, 2).reshape(-1, ev.shape[-1])[: args.windows]
    prompts = [w[: args.prompt_len].tolist() for w in windows[: args.prompts]]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pending = [c.label for c in configs]
    done: list[dict] = []
    lock = threading.Lock()

    def finished(r: dict) -> dict:  # results so far are written after every server (a kill keeps them)
        with lock:
            done.append(r)
            pending.remove(r["config"])
            report({d["config"]: d for d in done}, configs, args, extra, {}, None, pending)
        return r

    if args.parallel > 1:  # servers side by side (own GPUs, or sharing them with capped KV pools)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda ic: finished(run_server(ic[0], ic[1], args, extra, prompts, windows, work)),
                          enumerate(configs)))
    else:
        for i, cfg in enumerate(configs):
            finished(run_server(i, cfg, args, extra, prompts, windows, work))
    res: dict[str, dict] = {c.label: next(r for r in done if r["config"] == c.label) for c in configs}
    harness, harness_error = {}, None
    if not args.no_harness:
        try:
            harness = harness_deltas(configs, windows, args)
        except Exception as e:  # the server results still get written
            harness_error = f"{type(e).__name__}: {e}"
            print(f"harness FAILED: {harness_error}", flush=True)
    print(report(res, configs, args, extra, harness, harness_error, []))
    return 0


def report(res: dict[str, dict], configs, args, extra: list[str], harness: dict, harness_error: str | None,
           pending: list[str]) -> str:
    """Write ``<out>/<name>.{json,md}`` from the servers finished so far (``pending``: those still
    running, named in the file); returns the Markdown."""
    # 1. equality
    eq_names = [c for c in args.equal.split(",") if c in res and "ids" in res[c]]
    eq_rows = []
    if eq_names:
        ref = res[eq_names[0]]["ids"]
        for n in eq_names[1:]:
            same = sum(1 for a, b in zip(ref, res[n]["ids"]) if a == b)
            first_diff = next((j for j, (a, b) in enumerate(zip(ref, res[n]["ids"])) if a != b), None)
            eq_rows.append([f"{eq_names[0]} vs {n}", f"{same}/{len(ref)}", "-" if first_diff is None else first_diff])
    # 3. quality
    q_rows, quality = [], {}
    base = res.get("off", {}).get("ce")
    nb = args.windows // args.batch
    for cfg in configs:
        ce = res.get(cfg.label, {}).get("ce")
        if not cfg.selects or ce is None or base is None:
            continue
        d = [a - b for a, b in zip(ce, base)]
        per_batch = [statistics.mean(d[j * args.batch:(j + 1) * args.batch]) for j in range(nb)]
        m = statistics.mean(per_batch)
        ci = t975(nb - 1) * statistics.stdev(per_batch) / math.sqrt(nb)
        h = harness.get(cfg.label)
        quality[cfg.label] = {"server_delta": m, "server_ci95": ci, "harness": h}
        q_rows.append([cfg.label, f"{statistics.mean(base):.4f}", f"{m:+.4f} ± {ci:.4f}",
                       "-" if h is None else f"{h['delta']:+.4f} ± {h['ci95']:.4f}",
                       "-" if h is None else f"{h['distinct']:.1f} / {h['distinct_topk']:.1f}"])
    eos_rows = [[n, r.get("first_token_eos"), r.get("mean_len_no_ignore_eos")] for n, r in res.items()]
    errors = [f"- `{n}` failed: `{r['error'].splitlines()[0]}`" for n, r in res.items() if r.get("error")]
    md = (f"Shipped model (`bench/data/model`), TP {args.tp} / EP {args.ep}, SGLang server per configuration "
          f"({' '.join(BASE + extra)}; --mem-fraction-static {args.mem_fraction}"
          f"{'' if not args.kv_tokens else f', --max-total-tokens {args.kv_tokens}'}; {args.parallel} at a time).\n\n"
          + (f"**Partial: still running when written: {', '.join(pending)}.**\n\n" if pending else "")
          + ("\n".join(errors) + "\n\n" if errors else "")
          + f"## Greedy generation, token for token\n\n{args.prompts} held-out prompts of {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, one batched request.\n\n"
          + markdown_table(["comparison", "identical outputs", "first differing prompt"], eq_rows)
          + "\n\n## EOS\n\nThe same prompts without ignore_eos: answers that end at the first token.\n\n"
          + markdown_table(["config", "first token is EOS", "mean new tokens"], eos_rows)
          + f"\n\n## Quality from SGLang's input logprobs\n\n{args.windows} held-out windows of 129 tokens, prefill "
          f"batches of {args.batch} windows, policy applied to prefill. dCE = CE(policy) - CE(off), nats/token, "
          f"95% CI over {nb} batches. Harness = the same batches in transformers with the same grouping "
          f"(`StepLayout(tokens_per_request=128)`){'; not run (--no-harness)' if args.no_harness else ''}.\n\n"
          + markdown_table(["config", "CE off (server)", "dCE server", "dCE harness", "harness experts / top-k"], q_rows)
          + ("" if harness_error is None else f"\n\nHarness failed: `{harness_error}`")
          + "\n")
    payload = {"results": {k: {kk: vv for kk, vv in v.items() if kk != "ids"} for k, v in res.items()},
               "equality": eq_rows, "quality": quality, "harness_error": harness_error, "pending": pending}
    write_results(args.out, args.name, payload, md, run_metadata())
    return md


def harness_deltas(configs, windows: np.ndarray, args) -> dict:
    """The offline harness on the same batches (transformers, CUDA if available)."""
    import torch

    from sglang_xshare.config import BudgetSchedule, SelectionConfig
    from sglang_xshare.hf import evaluate_point, load_model, routing_spec_of
    from sglang_xshare.hf.hook import StepLayout
    from sglang_xshare.select import Selector

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(MODEL, device=dev)
    routing = routing_spec_of(model.config)
    toks = torch.from_numpy(windows).to(dev)
    batches = [(toks[j * args.batch:(j + 1) * args.batch], torch.zeros(args.batch, dtype=torch.long))
               for j in range(args.windows // args.batch)]
    out = {}
    for cfg in configs:
        if not cfg.selects or cfg.policy not in ("xshare", "xshare_ep", "oea", "cap"):
            continue
        flags = dict(zip(cfg.flags[::2], cfg.flags[1::2]))
        sc = SelectionConfig(policy=cfg.policy, k0=int(flags.get("--xshare-warmup-k0", 1)),
                             budget=BudgetSchedule.parse(flags["--xshare-budget"]) if "--xshare-budget" in flags else None,
                             cap=int(flags["--xshare-cap"]) if "--xshare-cap" in flags else None)
        p = evaluate_point(model, Selector(routing, sc), batches, layout=StepLayout(tokens_per_request=windows.shape[1] - 1),
                           measure_output_error=False)
        out[cfg.label] = {"delta": p.delta, "ci95": p.ci95, "distinct": p.distinct, "distinct_topk": p.distinct_topk}
    return out


if __name__ == "__main__":
    sys.exit(main())
