"""Train the small quality MoE (transformers ``Qwen3MoeForCausalLM``) on the prepared datasets.

One script, one GPU call: trains for a fixed wall time (``train.train_seconds`` of
``config.json``), then evaluates held-out cross-entropy / perplexity per dataset, computes
routing statistics and writes everything to ``--out``::

    model/config.json, model/model.safetensors, model/generation_config.json   (bf16)
    train_log.txt      step, elapsed, lr, lm loss, aux loss, periodic held-out CE
    stats.json         held-out CE/ppl per dataset, train CE, routing statistics

Routing statistics (per MoE layer, top-k of the trained router, held-out tokens):

* ``load_entropy``: normalised entropy of the expert-assignment histogram (1 = uniform)
* ``load_entropy_per_dataset``: the same within one dataset
* ``pair_overlap_same`` / ``pair_overlap_diff``: mean ``|topk(a) & topk(b)| / k`` for random
  token pairs from the same / different datasets (uniform routing gives ``k / E``)
* ``distinct_homog`` / ``distinct_mixed``: distinct experts activated by a decode batch of
  ``stats_batch_tokens`` tokens (same position of different sequences), sequences from one
  dataset vs. from all datasets; ``distinct_uniform`` is the independent-uniform expectation
* ``distinct_spec``: distinct experts of ``spec_group`` consecutive tokens of one sequence
* ``js_divergence``: mean pairwise Jensen-Shannon divergence (bits) of per-dataset loads

Usage (GPU; data from ``prepare_data.py``)::

    PYTHONUNBUFFERED=1 python3 bench/quality/train.py --config bench/quality/config.json \\
        --data .dev/quality_data --out $OUT
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("pydoc", "kernel", "gcide")


def build_model(model_cfg: dict) -> torch.nn.Module:
    """Instantiate a randomly initialised ``Qwen3MoeForCausalLM`` from the config dict."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = dict(model_cfg)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    rope_theta = cfg.pop("rope_theta", 10000.0)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    config = Qwen3MoeConfig(**cfg)
    config.architectures = ["Qwen3MoeForCausalLM"]
    return Qwen3MoeForCausalLM(config)


def load_streams(data: Path, split: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Load ``{name: [n_tokens] int64}`` token streams of one split onto ``device``."""
    return {n: torch.from_numpy(np.load(data / f"{n}_{split}.npy").astype(np.int64)).to(device) for n in DATASETS}


def sample_batch(streams: dict[str, torch.Tensor], probs: torch.Tensor, batch: int, window: int,
                 gen: torch.Generator) -> torch.Tensor:
    """Random windows ``[batch, window] int64``; each row's dataset drawn with ``probs``."""
    names = list(streams)
    which = torch.multinomial(probs, batch, replacement=True, generator=gen)
    rows = []
    for i, n in enumerate(names):
        cnt = int((which == i).sum())
        if cnt == 0:
            continue
        s = streams[n]
        starts = torch.randint(0, s.numel() - window, (cnt,), generator=gen)
        idx = starts[:, None] + torch.arange(window)[None, :]
        rows.append(s[idx.to(s.device)])
    out = torch.cat(rows)
    return out[torch.randperm(out.shape[0], generator=gen).to(out.device)]


def windows(stream: torch.Tensor, window: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, window]`` of a stream (first ``max_windows``, evenly spread)."""
    n = stream.numel() // window
    w = stream[: n * window].view(n, window)
    if n > max_windows:
        w = w[torch.linspace(0, n - 1, max_windows).long().to(w.device)]
    return w


@torch.no_grad()
def eval_ce(model: torch.nn.Module, stream: torch.Tensor, window: int, max_windows: int,
            batch: int = 128) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats/token) over held-out windows; returns (ce, n_tokens)."""
    model.eval()
    w = windows(stream, window, max_windows)
    tot, cnt = 0.0, 0
    for i in range(0, w.shape[0], batch):
        x = w[i : i + batch]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            logits = model(input_ids=x[:, :-1]).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot += float(ce)
        cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt, cnt


def _entropy_norm(counts: np.ndarray) -> float:
    p = counts / max(counts.sum(), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(counts.size))


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def routing_stats(model: torch.nn.Module, held: dict[str, torch.Tensor], window: int, n_win: int,
                  batch_tokens: int, spec_group: int, seed: int) -> dict:
    """Routing statistics of the trained router on held-out windows (see module docstring)."""
    model.eval()
    cfg = model.config
    E, k, L = cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    ids: dict[str, list[np.ndarray]] = {}  # name -> per layer [n, S, k]
    for n, s in held.items():
        w = windows(s, window, n_win)[:, :-1]
        per_layer: list[list[torch.Tensor]] = [[] for _ in range(L)]
        for i in range(0, w.shape[0], 64):
            x = w[i : i + 64]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                out = model(input_ids=x, output_router_logits=True)
            for li, lg in enumerate(out.router_logits):
                per_layer[li].append(lg.float().topk(k, dim=-1).indices.view(x.shape[0], x.shape[1], k).cpu())
        ids[n] = [torch.cat(p).numpy() for p in per_layer]
    rng = np.random.default_rng(seed)
    names = list(ids)
    layers = []
    for li in range(L):
        all_ids = np.concatenate([ids[n][li].reshape(-1, k) for n in names])
        load = np.bincount(all_ids.ravel(), minlength=E)
        per_ds = {n: np.bincount(ids[n][li].ravel(), minlength=E) for n in names}

        def overlap(a: np.ndarray, b: np.ndarray) -> float:
            # a, b: [P, k] expert ids
            eq = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)
            return float(eq.mean() / k)

        P = 20000
        same, diff = [], []
        for n in names:
            t = ids[n][li].reshape(-1, k)
            i1, i2 = rng.integers(0, t.shape[0], P), rng.integers(0, t.shape[0], P)
            same.append(overlap(t[i1], t[i2]))
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                ta, tb = ids[names[a]][li].reshape(-1, k), ids[names[b]][li].reshape(-1, k)
                diff.append(overlap(ta[rng.integers(0, ta.shape[0], P)], tb[rng.integers(0, tb.shape[0], P)]))

        def distinct(batches: list[np.ndarray]) -> float:
            return float(np.mean([np.unique(b).size for b in batches]))

        homog, mixed, spec = [], [], []
        S = ids[names[0]][li].shape[1]
        for _ in range(300):
            pos = int(rng.integers(0, S))
            n = names[int(rng.integers(0, len(names)))]
            arr = ids[n][li]
            rows = rng.choice(arr.shape[0], batch_tokens, replace=False)
            homog.append(arr[rows, pos])
            mix = []
            for j in range(batch_tokens):
                a2 = ids[names[j % len(names)]][li]
                mix.append(a2[int(rng.integers(0, a2.shape[0])), pos])
            mixed.append(np.stack(mix))
            r = int(rng.integers(0, arr.shape[0]))
            p0 = int(rng.integers(0, S - spec_group))
            spec.append(arr[r, p0 : p0 + spec_group])
        js = [_js_bits(per_ds[names[a]].astype(float) + 1e-9, per_ds[names[b]].astype(float) + 1e-9)
              for a in range(len(names)) for b in range(a + 1, len(names))]
        layers.append({
            "layer": li,
            "load_entropy": _entropy_norm(load),
            "load_entropy_per_dataset": {n: _entropy_norm(c) for n, c in per_ds.items()},
            "max_load_share": float(load.max() / load.sum()),
            "pair_overlap_same": float(np.mean(same)),
            "pair_overlap_diff": float(np.mean(diff)),
            "pair_overlap_uniform": k / E,
            "distinct_homog": distinct(homog),
            "distinct_mixed": distinct(mixed),
            "distinct_uniform": float(E * (1 - (1 - k / E) ** batch_tokens)),
            "distinct_spec": distinct(spec),
            "distinct_spec_uniform": float(E * (1 - (1 - k / E) ** spec_group)),
            "js_divergence_bits": float(np.mean(js)),
        })
    model.train()
    return {"batch_tokens": batch_tokens, "spec_group": spec_group, "num_experts": E, "top_k": k, "layers": layers}


def patch_config(path: Path, model_cfg: dict, eos_id: int | None = None) -> None:
    """Add the pre-5.x spellings (``num_experts``, ``rope_theta``) next to the 5.x ones.

    transformers 5.x writes ``num_local_experts`` and ``rope_parameters``; readers that look
    for the older keys (SGLang's model code, older transformers) then find them too. Also
    records the tokenizer's ``<|endoftext|>`` id as ``eos_token_id`` (config and generation config).
    """
    c = json.loads(path.read_text())
    c["num_experts"] = model_cfg["num_experts"]
    c["rope_theta"] = model_cfg.get("rope_theta", 10000.0)
    if eos_id is not None:
        c["eos_token_id"] = eos_id
        gen = path.with_name("generation_config.json")
        if gen.exists():
            gc = json.loads(gen.read_text())
            gc["eos_token_id"] = eos_id
            gen.write_text(json.dumps(gc, indent=2, sort_keys=True) + "\n")
    path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def check_reload(model: torch.nn.Module, path: Path, held: dict[str, torch.Tensor], window: int, say) -> None:
    """Reload the saved checkpoint and check its logits match the in-memory bf16 model."""
    from transformers import AutoModelForCausalLM

    re = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(next(model.parameters()).device)
    re.eval()
    model.eval()
    x = windows(held[DATASETS[0]], window, 4)[:, :-1]
    a, b = model(input_ids=x).logits.float(), re(input_ids=x).logits.float()
    err = float((a - b).abs().max())
    y = x[:, 1:].reshape(-1)
    ce_a = float(F.cross_entropy(a[:, :-1].reshape(-1, a.shape[-1]), y))
    ce_b = float(F.cross_entropy(b[:, :-1].reshape(-1, b.shape[-1]), y))
    # bf16 rounding of the in-memory rotary buffers makes tiny differences; weights must be equal
    say(f"reload check: {type(re).__name__} num_experts={re.config.num_experts} max |dlogit| {err:.3e} "
        f"CE {ce_a:.4f} vs {ce_b:.4f}")
    if abs(ce_a - ce_b) > 1e-2:
        raise RuntimeError(f"reloaded checkpoint differs: CE {ce_a} vs {ce_b}")


def lr_at(step: int, frac_time: float, tc: dict) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay over the *wall-time* fraction."""
    if step < tc["warmup_steps"]:
        return tc["lr"] * (step + 1) / tc["warmup_steps"]
    f = min(max(frac_time, 0.0), 1.0)
    return tc["lr"] * (tc["min_lr_frac"] + (1 - tc["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * f)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-seconds", type=float, default=None, help="override train.train_seconds")
    args = ap.parse_args()
    cfg = json.loads(args.config.read_text())
    tc, ec = cfg["train"], cfg["eval"]
    if args.train_seconds is not None:
        tc["train_seconds"] = args.train_seconds
    torch.manual_seed(cfg["seed"])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "train_log.txt", "w")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    import transformers
    say(f"torch {torch.__version__} transformers {transformers.__version__} device {dev} "
        f"{torch.cuda.get_device_name() if dev.type == 'cuda' else ''}")
    train = load_streams(args.data, "train", dev)
    held = load_streams(args.data, "heldout", dev)
    sizes = torch.tensor([float(train[n].numel()) for n in DATASETS])
    probs = sizes / sizes.sum()
    say("train tokens " + ", ".join(f"{n}={train[n].numel()}" for n in DATASETS))

    model = build_model(cfg["model"]).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"params {n_params} ({n_params * 2 / 2**20:.1f} MiB bf16) experts impl "
        f"{getattr(model.config, '_experts_implementation', None)}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc["lr"], betas=tuple(tc["betas"]), fused=dev.type == "cuda",
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    window = tc["seq_len"] + 1
    model.train()
    t0 = time.perf_counter()
    last_eval = t0
    step, tokens = 0, 0
    while True:
        el = time.perf_counter() - t0
        if el >= tc["train_seconds"]:
            break
        lr = lr_at(step, el / tc["train_seconds"], tc)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(train, probs, tc["batch_size"], window, gen)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(input_ids=x, labels=x, output_router_logits=True)
        except RuntimeError as e:  # grouped_mm unsupported here: fall back once to the eager loop
            if step > 0 or model.config._experts_implementation == "eager":
                raise
            say(f"experts implementation {model.config._experts_implementation} failed ({e}); using eager")
            model.config._experts_implementation = "eager"
            continue
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        step += 1
        tokens += x.shape[0] * (x.shape[1] - 1)
        if step % tc["log_every"] == 0:
            aux = float(out.aux_loss) if out.aux_loss is not None else float("nan")
            lm = float(out.loss) - cfg["model"]["router_aux_loss_coef"] * aux
            say(f"step {step:6d} t {el:6.1f}s lr {lr:.2e} lm {lm:.4f} aux {aux:.4f} tok {tokens / 1e6:.1f}M")
        if time.perf_counter() - last_eval > tc["eval_every_seconds"]:
            last_eval = time.perf_counter()
            ces = {n: eval_ce(model, held[n], window, 128)[0] for n in DATASETS}
            say(f"  eval step {step} " + " ".join(f"{n} {c:.3f}" for n, c in ces.items()))
    train_time = time.perf_counter() - t0
    say(f"trained {step} steps, {tokens / 1e6:.1f}M tokens in {train_time:.0f}s "
        f"({sum(train[n].numel() for n in DATASETS) / 1e6:.1f}M distinct train tokens)")

    stats: dict = {"steps": step, "tokens": tokens, "train_seconds": train_time, "params": n_params,
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                   "config": cfg, "heldout": {}, "train_subset": {}}
    for n in DATASETS:
        ce, cnt = eval_ce(model, held[n], window, ec["heldout_max_windows"])
        ce_tr, _ = eval_ce(model, train[n], window, 512)
        stats["heldout"][n] = {"ce": ce, "ppl": math.exp(ce), "tokens": cnt}
        stats["train_subset"][n] = {"ce": ce_tr, "ppl": math.exp(ce_tr)}
        say(f"held-out {n:7s} CE {ce:.4f} ppl {math.exp(ce):8.2f} ({cnt} tokens) | train CE {ce_tr:.4f}")
    stats["routing"] = routing_stats(model, held, window, ec["stats_windows_per_dataset"],
                                     ec["stats_batch_tokens"], ec["spec_group"], cfg["seed"])
    for r in stats["routing"]["layers"]:
        say(f"layer {r['layer']} H {r['load_entropy']:.3f} maxshare {r['max_load_share']:.3f} "
            f"overlap same {r['pair_overlap_same']:.3f} diff {r['pair_overlap_diff']:.3f} "
            f"(unif {r['pair_overlap_uniform']:.3f}) distinct16 homog {r['distinct_homog']:.1f} "
            f"mixed {r['distinct_mixed']:.1f} unif {r['distinct_uniform']:.1f} "
            f"spec{ec['spec_group']} {r['distinct_spec']:.1f} JS {r['js_divergence_bits']:.3f}")
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2))
    # shards < 16 MiB (easy to copy off the GPU host); merge_shards.py joins them
    model.to(torch.bfloat16).save_pretrained(args.out / "model", max_shard_size=tc.get("max_shard_size", "14MB"))
    eos_id = json.loads((args.data / "data_meta.json").read_text()).get("eos_id")
    patch_config(args.out / "model" / "config.json", cfg["model"], eos_id)
    check_reload(model, args.out / "model", held, window, say)
    say("saved " + ", ".join(f"{p.name}={p.stat().st_size}" for p in (args.out / "model").iterdir()))


if __name__ == "__main__":
    main()
