"""Record the routing traces of the trained MoE (default data of ``sglang-xshare replay``).

Three traces (``sglang_xshare.trace`` format, fp16 logits), from held-out text, under the model's
own top-k routing:

* ``trace_mixed_b16.npz``  -- decode batches of 16 sequences mixing the three datasets
* ``trace_homog_b16.npz``  -- decode batches of 16 sequences of one dataset (datasets take turns)
* ``trace_spec_b8_g4.npz`` -- speculative verification: 8 requests x (1 target + 3 drafts)

Usage::

    .venv/bin/python bench/quality/record_traces.py [--out bench/data/model]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sglang_xshare.hf import StepLayout, default_model_dir, load_eval_set, load_model, make_batches, record_trace

SOURCE = "held-out windows of bench/quality/prepare_data.py datasets, teacher-forced, plain top-k routing"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_model_dir())
    ap.add_argument("--seq-len", type=int, default=64, help="positions per sequence (= decode steps for g=1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    model.config._experts_implementation = "eager"
    ev = load_eval_set()
    name = "sglang-xshare Qwen3MoE 6L-64E-top8 (bench/data/model)"
    # use sequences the quality sweep's first batches do not start with: offset by taking later rows
    jobs = [
        ("trace_mixed_b16.npz", make_batches(ev, 16, 2, "mixed", args.seq_len), StepLayout(1)),
        ("trace_homog_b16.npz", make_batches(ev, 16, 3, "homogeneous", args.seq_len), StepLayout(1)),
        ("trace_spec_b8_g4.npz", make_batches(ev, 8, 3, "mixed", args.seq_len), StepLayout(4)),
    ]
    for fname, batches, layout in jobs:
        tr = record_trace(model, batches, layout, datasets=ev.datasets, source=SOURCE, model_name=name)
        path = tr.save(args.out / fname)
        print(f"{path}: logits {tr.logits.shape} ({path.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
