"""Load generation and counters: SGLang's own benchmark client, SGLang's and xshare's ``/metrics``.

:func:`run_bench_serving` runs ``sglang.bench_serving`` (``sglang.benchmark.serving``) in this
process -- its own argument parser, dataset generation (``random-ids``: prompts of random token
ids, varied; ``ignore_eos`` is its default, so every request decodes its full output length) and
metrics -- once per load level, without paying its import for every level.
:func:`xshare_counters` reads this package's live metrics from a ``/metrics`` scrape
(:mod:`sglang_xshare.serving.telemetry.metrics`), summed over layers, per rank.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from sglang_xshare.serving.telemetry.metrics import parse_prometheus
from .server import http_get

__all__ = ["bench_serving_argv", "run_bench_serving", "scrape", "xshare_counters", "sglang_counters", "counter_delta",
           "spec_accept_length", "RESULT_KEYS"]

#: SGLang's own counters (``/metrics`` with ``--enable-metrics``) a run keeps, summed over label sets:
#: tokens generated, and speculative verify forwards per request (both counted when a request finishes).
SGLANG_COUNTERS = {"sglang:generation_tokens_total": "generation_tokens",
                   "sglang:spec_verify_calls_total": "spec_verify_calls"}

#: What a level keeps of ``bench_serving``'s result.
RESULT_KEYS = ("completed", "duration", "total_output_tokens", "output_throughput", "request_throughput",
               "median_tpot_ms", "p99_tpot_ms", "mean_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_ttft_ms",
               "p99_ttft_ms", "accept_length", "concurrency")


def bench_serving_argv(base_url: str, tokenizer: str, *, concurrency: int, num_prompts: int, input_len: int,
                       output_len: int, seed: int, output_file: str, dataset: str = "random-ids",
                       dataset_path: str | None = None, extra: Sequence[str] = (), warmup_requests: int = 0) -> list[str]:
    """``sglang.bench_serving`` arguments of one load level (decode-heavy by default).

    ``warmup_requests``: ``bench_serving``'s own warm-up requests before the measured ones (its
    default is 1). 0 here: the benchmark warms each server itself once, and a warm-up request (up
    to 32 tokens, alone in its batch) would put ~31 one-token decode steps into the run's window of
    xshare's live metrics, which pulls the per-call means of a policy that routes single tokens
    (``cap``, or any policy under ``--xshare-ep-global``) towards one token's figures."""
    argv = ["--backend", "sglang", "--base-url", base_url, "--tokenizer", tokenizer,
            "--dataset-name", dataset, "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", "1.0", "--seed", str(seed), "--output-file", output_file,
            "--disable-tqdm", "--warmup-requests", str(int(warmup_requests)), "--ready-check-timeout-sec", "0"]
    if dataset_path:
        argv += ["--dataset-path", dataset_path]
    return argv + list(extra)


def _parsed(argv: Sequence[str]) -> Any:
    """SGLang's own parser and defaults for ``argv`` (its ``cli_main`` up to the run)."""
    import sglang.benchmark.serving as bs

    captured: dict[str, Any] = {}
    real, old_argv = bs.run_benchmark, sys.argv
    bs.run_benchmark = lambda a: captured.setdefault("args", a)
    sys.argv = ["sglang.bench_serving", *argv]
    try:
        bs.cli_main()
    finally:
        bs.run_benchmark, sys.argv = real, old_argv
    return captured["args"]


#: Tokenizers loaded by :func:`run_bench_serving`, by name: ``bench_serving`` loads its tokenizer on
#: every run (seconds each for a 150k vocabulary), so a bench of many levels loads it once.
_TOKENIZERS: dict[str, Any] = {}


def run_bench_serving(argv: Sequence[str]) -> dict[str, Any]:
    """Run one ``sglang.bench_serving`` level in-process; returns its result (:data:`RESULT_KEYS`)."""
    import sglang.benchmark.serving as bs

    real = bs.get_tokenizer

    def cached(name, *a, **kw):
        key = repr((name, a, sorted(kw.items())))
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = real(name, *a, **kw)
        return _TOKENIZERS[key]

    bs.get_tokenizer = cached
    try:
        result = bs.run_benchmark(_parsed(argv)) or {}
    finally:
        bs.get_tokenizer = real
    return {k: result.get(k) for k in RESULT_KEYS}


def scrape(base_url: str) -> str:
    """The server's ``/metrics`` text (empty when metrics are off or nothing answers)."""
    code, body = http_get(base_url + "/metrics", timeout=10.0)
    return body if code == 200 else ""


def xshare_counters(text: str) -> dict[str, dict[str, float]]:
    """``{rank: {field: value}}`` from a scrape: each ``sglang_xshare_<field>`` summed over layers
    (``decode_steps``, ``barrier_faults`` and ``path_steps:<path>`` as they are). A rank that shows
    up under several PIDs (multi-process registry) keeps its largest values (they only grow)."""
    out: dict[str, dict[str, float]] = {}
    for name, labels, value in parse_prometheus(text):
        field = name[len("sglang_xshare_"):]
        if field == "path_steps":
            field = "path_steps:" + labels.get("path", "?")
        rank = labels.get("rank", "0")
        key = (labels.get("layer"), labels.get("pid"))
        per = out.setdefault(rank, {})
        bucket = per.setdefault(f"__{field}", {})
        bucket[key] = max(value, bucket.get(key, 0.0))
    for rank, per in out.items():
        for k in [k for k in per if k.startswith("__")]:
            vals: dict = per.pop(k)
            by_layer: dict = {}
            for (layer, _pid), v in vals.items():
                by_layer[layer] = max(v, by_layer.get(layer, 0.0))
            per[k[2:]] = float(sum(by_layer.values()))
    return out


def sglang_counters(text: str) -> dict[str, float]:
    """SGLang's request counters of a scrape (:data:`SGLANG_COUNTERS`), each summed over its label
    sets (``is_streaming`` etc.); a counter the server does not export is absent."""
    out: dict[str, float] = {}
    for name, _labels, value in parse_prometheus(text, prefix="sglang:"):
        field = SGLANG_COUNTERS.get(name)
        if field is not None:
            out[field] = out.get(field, 0.0) + value
    return out


def spec_accept_length(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Speculative accept length of the requests finished between two :func:`sglang_counters`
    scrapes: generated tokens / verify forwards (SGLang's own definition, bonus token included);
    ``None`` without speculative decoding. Unlike ``bench_serving``'s ``accept_length`` (the
    server's average since start) this belongs to one run."""
    verify = after.get("spec_verify_calls", 0.0) - before.get("spec_verify_calls", 0.0)
    if verify <= 0:
        return None
    return (after.get("generation_tokens", 0.0) - before.get("generation_tokens", 0.0)) / verify


def counter_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``after - before`` per rank and field (counters that only grow)."""
    out = {}
    for rank, vals in after.items():
        b = before.get(rank, {})
        out[rank] = {k: v - b.get(k, 0.0) for k, v in vals.items()}
    return out
