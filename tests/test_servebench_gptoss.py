"""The GPT-OSS-120B serving preset: a model folder SGLang accepts, and routing that spreads tokens
over experts under SGLang's dummy weights (every bias zeroed by the benchmark's servers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpt_oss_folder_matches_the_released_shape(tmp_path):
    from transformers import AutoConfig

    from servebench.models import PRESETS, ZERO_BIASES, write_model
    from sglang_xshare.serving.cli_flags import routing_from_model_config

    folder = write_model(tmp_path / "g", "gpt-oss-120b", layers=5)
    cfg = AutoConfig.from_pretrained(folder)
    assert type(cfg).__name__ == "GptOssConfig" and cfg.num_hidden_layers == 5
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok) == (2880, 2880, 128, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (64, 8, 64, 201088)
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.swiglu_limit == 7.0
    spec = routing_from_model_config(str(folder))
    assert (spec.num_experts, spec.top_k) == (128, 4)
    full = json.loads((write_model(tmp_path / "f", "gpt-oss-120b") / "config.json").read_text())
    assert len(full["layer_types"]) == full["num_hidden_layers"] == PRESETS["gpt-oss-120b"]["num_hidden_layers"] == 36
    assert "gpt-oss-120b" in ZERO_BIASES and "qwen3-30b-a3b" not in ZERO_BIASES


@pytest.mark.sglang
def test_sglang_reads_the_gpt_oss_folder(tmp_path):
    pytest.importorskip("sglang")
    from sglang.srt.configs.model_config import ModelConfig

    from servebench.models import write_model

    m = ModelConfig(str(write_model(tmp_path / "g", "gpt-oss-120b", layers=4)))
    assert m.hf_config.architectures == ["GptOssForCausalLM"] and m.num_hidden_layers == 4
    assert m.is_hybrid_swa  # sliding-window layers, as the released model


_ROUTE = textwrap.dedent("""
    import json, sys, torch
    from transformers import GptOssConfig, GptOssForCausalLM
    from sglang.srt.model_loader import loader
    # GPT-OSS's layout (biased router, attention projections and experts), cut small for a CPU
    cfg = GptOssConfig(hidden_size=2880, intermediate_size=64, num_local_experts=128, num_experts_per_tok=4,
                       num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                       vocab_size=4096, layer_types=["sliding_attention", "full_attention"],
                       sliding_window=128)
    def route(mode):
        torch.manual_seed(0)
        m = GptOssForCausalLM(cfg).to(torch.bfloat16)
        loader.initialize_dummy_weights(m)  # what SGLang's DummyModelLoader calls
        if mode == "router-only":
            for name, p in m.named_parameters():
                if name.endswith("router.bias"):
                    p.data.zero_()
        prompts = torch.randint(0, cfg.vocab_size, (16, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            seq = m.generate(prompts, max_new_tokens=4, do_sample=False)  # greedy decoding, as the benchmark
            logits = m(seq, output_router_logits=True).router_logits[-1].view(16, seq.shape[1], -1)
        # distinct experts of the 16 requests' last decode token in the last layer
        return {"distinct": int(logits[:, -1].topk(4, dim=-1).indices.unique().numel()),
                "emitted": len(set(seq[:, -1].tolist())),
                "bias_max": max(float(p.abs().max()) for n, p in m.named_parameters() if n.endswith("bias"))}
    print(json.dumps({mode: route(mode) for mode in sys.argv[1:]}))
""")


def _route(*modes: str, zero: bool = False) -> dict:
    """``{mode: {distinct, emitted, bias_max}}``; ``zero``: the servers' start-up file acts (a new process)."""
    env = dict(os.environ)
    env.pop("XSHARE_BENCH_DUMMY_BIASES", None)
    if zero:
        env["XSHARE_BENCH_DUMMY_BIASES"] = "zero"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "bench" / "dummy_routing"), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _ROUTE, *modes], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.sglang
def test_biases_decide_dummy_routing_unless_the_bench_zeroes_them():
    """SGLang's dummy loader reseeds one generator per parameter, so every layer adds the same
    bias vectors to the residual stream and they swamp the token embedding: 16 requests decode
    the same token and route to the same 4 experts, also with the router bias alone zeroed. The
    benchmark's start-up file zeroes every bias in the server processes: the routing then spreads
    as independent random routing does (about 51 of 128 experts for 16 tokens at top-4)."""
    pytest.importorskip("sglang")
    plain = _route("drawn", "router-only")
    drawn, router_only, zeroed = plain["drawn"], plain["router-only"], _route("zeroed", zero=True)["zeroed"]
    assert drawn["bias_max"] > 5e-4 and drawn["distinct"] <= 8 and drawn["emitted"] <= 2, drawn
    assert router_only["distinct"] <= 8, router_only
    assert zeroed["bias_max"] == 0.0 and zeroed["distinct"] >= 40 and zeroed["emitted"] >= 8, zeroed


def test_servers_of_a_biased_preset_get_the_start_up_file():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve_g", ROOT / "bench" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    args = SimpleNamespace(zero_biases=True, profile_steps=0, profile_concurrency=None, concurrency=[1, 16])
    env = serve.server_env(args)
    assert env["XSHARE_BENCH_DUMMY_BIASES"] == "zero"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "bench" / "dummy_routing")
    assert (ROOT / "bench" / "dummy_routing" / "sitecustomize.py").is_file()
    args.zero_biases, args.profile_steps, args.profile_concurrency = False, 5, [64, 16]
    env = serve.server_env(args)
    assert "XSHARE_BENCH_DUMMY_BIASES" not in env and env["SGLANG_PROFILE_BY_STAGE_DECODE_MIN_BS"] == "16"
