"""The project's trained MoE (transformers ``Qwen3MoeForCausalLM``) and its held-out eval set.

Kept in the repository under ``bench/data/model/`` (not in the wheel; see ``docs/quality.md`` for how it is built):

* ``config.json`` + ``model.safetensors`` -- 6 layers, 64 experts, top-8, hidden 256, bf16
* ``tokenizer.json`` -- byte-level BPE (8192), trained with ``tokenizers``
* ``eval_tokens.npy`` -- ``[n_datasets, n_seq, seq_len + 1] uint16`` held-out windows
* ``eval_meta.json`` -- dataset names in row order
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checkout import DATA_DIR, data_hint
from ..config import RoutingSpec

__all__ = ["default_model_dir", "load_model", "routing_spec_of", "EvalSet", "load_eval_set", "moe_blocks"]


def default_model_dir() -> Path:
    """Folder of the evaluation checkpoint, tokenizer, eval set and traces (``bench/data/model`` of the checkout)."""
    return DATA_DIR / "model"


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load the MoE causal LM (eval mode, eager experts on CPU so runs are deterministic).

    Args:
        path: checkpoint folder (default: the evaluation model).
        dtype: compute dtype (``float32`` on CPU: bf16 matmuls are slow there).
        device: where to put it.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path) if path is not None else default_model_dir()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {p}" + ("" if path is not None else
                                f": {data_hint('the evaluation model', 'its folder')}"))
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    model.to(device).eval()
    if not moe_blocks(model):
        raise ValueError(f"{p}: model has no MoE blocks with a .gate router and .experts")
    return model


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks of a transformers >= 5 MoE model, in layer order.

    A block is a module with a ``gate`` router returning ``(logits, weights, ids)`` and an
    ``experts`` module called as ``experts(hidden, ids, weights)`` (Qwen3-MoE, Mixtral, ...).
    """
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")
            and isinstance(m.gate, torch.nn.Module) and isinstance(m.experts, torch.nn.Module)]


def routing_spec_of(config: object) -> RoutingSpec:
    """:class:`RoutingSpec` of a Qwen3-MoE / Mixtral config (softmax scoring)."""
    E = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
    return RoutingSpec(
        num_experts=int(E),
        top_k=int(config.num_experts_per_tok),  # type: ignore[attr-defined]
        scoring="softmax",
        renormalize=bool(getattr(config, "norm_topk_prob", True)),
    )


@dataclass(frozen=True)
class EvalSet:
    """Held-out evaluation windows.

    Attributes:
        tokens: ``[n_datasets, n_seq, seq_len + 1] int64``.
        datasets: names, one per row of ``tokens``.
        window_index: ``[n_datasets, n_seq] int64`` position of each window in its dataset's token
            stream (:func:`~.text.load_text_eval_set`), or ``None``.
        min_gap: stream neighbours are at least this many places apart in ``tokens`` (``None``:
            no guarantee); :func:`~.evaluate.make_batches` refuses batches that could hold both.
    """

    tokens: torch.Tensor
    datasets: tuple[str, ...]
    window_index: torch.Tensor | None = None
    min_gap: int | None = None

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[2]) - 1


def load_eval_set(path: str | Path | None = None) -> EvalSet:
    """Load ``eval_tokens.npy`` + ``eval_meta.json`` (default: the committed held-out set)."""
    p = Path(path) if path is not None else default_model_dir()
    meta = json.loads((p / "eval_meta.json").read_text())
    arr = np.load(p / "eval_tokens.npy").astype(np.int64)
    if arr.ndim != 3 or arr.shape[0] != len(meta["datasets"]):
        raise ValueError(f"eval_tokens.npy shape {arr.shape} does not match datasets {meta['datasets']}")
    return EvalSet(torch.from_numpy(arr), tuple(meta["datasets"]))
