"""Model folders for serving benchmarks: real configs of MoE shapes, random weights (``--load-format dummy``).

No hub is reachable on the GPU hosts, so the bench writes the ``config.json`` of a model shape
itself and SGLang fills the weights with random values. A tokenizer is needed to serve text: a
word-level ``tokenizers`` vocabulary of the model's size (token ``i`` is ``<t{i}>``), so every id
the random model emits decodes. Presets:

``qwen3-30b-a3b``   Qwen3-30B-A3B's MoE shape: hidden 2048, 128 experts, top-8, expert
                    intermediate 768, 32 heads / 4 KV heads of 128, vocab 151936 (48 layers; ``layers``
                    cuts it).
``gpt-oss-120b``    GPT-OSS-120B's shape: hidden 2880, 128 experts, top-4 (softmax over the top-4 logits),
                    expert intermediate 2880 with SGLang's clamped SwiGLU (``swiglu_limit`` 7, alpha
                    1.702) and biases, 64 query / 8 KV heads of 64 with attention sinks, sliding
                    window 128 on every other layer, YaRN rope, vocab 201088 (36 layers). Weights in
                    bf16 (49.8 MB per expert, 6.4 GB of experts per layer), not the released MXFP4:
                    one 80 GB GPU holds about 10 layers, a 141 GB one about 18. Its router,
                    attention projections and experts have biases, which the serving benchmark
                    zeroes after SGLang's dummy initialisation (:data:`ZERO_BIASES`).
``deepseek-v3-mini`` a DeepSeek-V3 layout scaled to hidden 2048 (``% 512 == 0`` for DeepEP's
                    low-latency kernels): MLA attention, 256 routed experts in 8 groups (top-4
                    groups), top-8 sigmoid routing, routed scaling 2.5, expert intermediate 512,
                    one shared expert, first layer dense, vocab 129280. *Without* V3's
                    correction bias (``topk_method`` ``group_limited_greedy``, not ``noaux_tc``):
                    SGLang's dummy weights are uniform in +-1e-3, RMSNorm weights included, so
                    the router's sigmoid scores differ by ~1e-6 between experts and a +-1e-3 bias
                    decides the routing alone: every token picks the same ~9 experts (8.5 distinct
                    of 256 per layer for 16 tokens, measured in a server:
                    ``bench/results/serve_dsv3mini_tp2ep2_ab.md``). Without it the ranking follows
                    the logits, as with real weights.

With dummy weights the scores are near uniform among a token's chosen experts (the logits are
~1e-5), so the policies' mass statistics reduce to counting tokens per expert: these presets
measure the speed of a given expert cut, not the quality of the choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "ZERO_BIASES", "write_model", "write_tokenizer"]

#: Presets with biases (GPT-OSS: router, attention projections, experts): SGLang's dummy loader
#: draws the same +-1e-3 bias vector for every layer, whose sum swamps the residual stream, so every
#: token would route to the same top-k. The serving benchmark zeroes every bias in its servers
#: (``bench/dummy_routing/sitecustomize.py``).
ZERO_BIASES = frozenset({"gpt-oss-120b"})

#: What every preset shares: bf16 weights, untied LM head, SiLU experts, token 0 as EOS.
_COMMON: dict[str, Any] = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
                           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": None,
                           "eos_token_id": 0}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        **_COMMON,
    },
    "gpt-oss-120b": {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "num_hidden_layers": 36,
        "layer_types": None,  # filled per layer count by write_model: sliding, full, sliding, ...
        "sliding_window": 128,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "swiglu_limit": 7.0,
        "vocab_size": 201088,
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "router_aux_loss_coef": 0.9,
        "output_router_logits": False,
        **_COMMON,
        "rms_norm_eps": 1e-5,
        "attention_bias": True,
    },
    "deepseek-v3-mini": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 512,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "group_limited_greedy",  # no correction bias: see the module docstring
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 768,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": 129280,
        "max_position_embeddings": 16384,
        "rope_theta": 10000.0,
        **_COMMON,
    },
}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of ``vocab_size`` tokens ``<t0> .. <t{n-1}>`` (``<t0>`` is EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t1>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<t0>", "pad_token": "<t0>", "unk_token": "<t1>",
        "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def write_model(folder: str | Path, preset: str, layers: int | None = None) -> Path:
    """Write ``config.json`` (+ tokenizer, generation config) of ``preset`` into ``folder``.

    Args:
        folder: output folder (created).
        preset: a key of :data:`PRESETS`.
        layers: number of decoder layers (default: the preset's).

    Returns:
        the folder, ready for ``--model-path FOLDER --load-format dummy``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(PRESETS[preset])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        cfg["num_hidden_layers"] = int(layers)
    if "layer_types" in cfg:  # GPT-OSS alternates sliding-window and full attention, sliding first
        cfg["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(cfg["num_hidden_layers"])]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}) + "\n")
    if not (out / "tokenizer.json").is_file():
        write_tokenizer(out, cfg["vocab_size"])
    return out
