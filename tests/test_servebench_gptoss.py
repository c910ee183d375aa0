"""The GPT-OSS-120B serving preset: a model folder SGLang accepts, and routing that spreads tokens
over experts under SGLang's dummy weights (its router bias zeroed by the benchmark's servers)."""

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

    from servebench.models import PRESETS, ZERO_ROUTER_BIAS, write_model
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
    assert "gpt-oss-120b" in ZERO_ROUTER_BIAS and "qwen3-30b-a3b" not in ZERO_ROUTER_BIAS


@pytest.mark.sglang
def test_sglang_reads_the_gpt_oss_folder(tmp_path):
    pytest.importorskip("sglang")
    from sglang.srt.configs.model_config import ModelConfig

    from servebench.models import write_model

    m = ModelConfig(str(write_model(tmp_path / "g", "gpt-oss-120b", layers=4)))
    assert m.hf_config.architectures == ["GptOssForCausalLM"] and m.num_hidden_layers == 4
    assert m.is_hybrid_swa  # sliding-window layers, as the released model


_ROUTE = textwrap.dedent("""
    import json, torch
    from sglang.srt.model_loader import loader
    E, H, k = 128, 2880, 4
    m = torch.nn.Module()
    m.norm = torch.nn.Parameter(torch.empty(H))
    m.mlp = torch.nn.Module()
    m.mlp.router = torch.nn.Linear(H, E, bias=True)
    loader.initialize_dummy_weights(m)  # what SGLang's DummyModelLoader calls
    h = torch.randn(16, H, generator=torch.Generator().manual_seed(0))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm.detach()
    logits = m.mlp.router(h).detach()
    print(json.dumps({"distinct": int(logits.topk(k, dim=-1).indices.unique().numel()),
                      "bias_max": float(m.mlp.router.bias.abs().max())}))
""")


def _route(zero: bool) -> dict:
    env = dict(os.environ)
    env.pop("XSHARE_BENCH_ROUTER_BIAS", None)
    if zero:
        env["XSHARE_BENCH_ROUTER_BIAS"] = "zero"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "bench" / "dummy_routing"), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _ROUTE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.sglang
def test_router_bias_decides_dummy_routing_unless_the_bench_zeroes_it():
    """SGLang's dummy loader draws the router bias in +-1e-3 against logits of ~2e-5: 16 tokens all
    take the same few experts. The benchmark's start-up file zeroes it in the server processes."""
    pytest.importorskip("sglang")
    drawn, zeroed = _route(False), _route(True)
    assert drawn["bias_max"] > 5e-4 and drawn["distinct"] <= 8, drawn
    assert zeroed["bias_max"] == 0.0 and zeroed["distinct"] >= 6 * 4, zeroed


def test_servers_of_a_biased_preset_get_the_start_up_file():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve_g", ROOT / "bench" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    args = SimpleNamespace(zero_router_bias=True, profile_steps=0, profile_concurrency=None, concurrency=[1, 16])
    env = serve.server_env(args)
    assert env["XSHARE_BENCH_ROUTER_BIAS"] == "zero"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "bench" / "dummy_routing")
    assert (ROOT / "bench" / "dummy_routing" / "sitecustomize.py").is_file()
    args.zero_router_bias, args.profile_steps, args.profile_concurrency = False, 5, [64, 16]
    env = serve.server_env(args)
    assert "XSHARE_BENCH_ROUTER_BIAS" not in env and env["SGLANG_PROFILE_BY_STAGE_DECODE_MIN_BS"] == "16"
