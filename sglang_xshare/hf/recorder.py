"""Trace recorder: router logits + request ids of real decode steps of the HF model, written in the
:mod:`sglang_xshare.trace` format (``logits [S, L, T, E] fp16``, ``request_ids [S, T] int32``).

Each batch of ``B`` sequences of length ``S_pos`` gives ``S_pos // g`` decode steps of ``T = B * g``
tokens (see :class:`~.hook.StepLayout`); batches are appended along the step axis. Request ids are
global sequence indices (stable across the steps of one batch), dataset ids index ``meta["datasets"]``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ..select import Selector
from ..trace import Trace
from .hook import RoutingHook, StepLayout
from .model import routing_spec_of

__all__ = ["record_trace"]


@torch.inference_mode()
def record_trace(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 layout: StepLayout = StepLayout(), selector: Selector | None = None,
                 datasets: tuple[str, ...] = (), source: str = "", model_name: str = "") -> Trace:
    """Run ``batches`` teacher-forced and record every MoE layer's router logits per decode step.

    Args:
        model: transformers >= 5 MoE LM.
        batches: ``(tokens [B, S + 1] int64, dataset_ids [B] int64)`` (all with the same ``B``).
        layout: ``tokens_per_request`` (1, or 1 + drafts for speculative traces).
        selector: policy the model runs under while recording (``None``: its own top-k).
        datasets: names for ``dataset_ids``.
        source / model_name: provenance stored in ``meta``.

    Returns:
        the :class:`~sglang_xshare.trace.Trace` (``logits [S, L, T, E]`` float16).
    """
    g = layout.tokens_per_request
    per_batch_logits: list[np.ndarray] = []
    rids: list[np.ndarray] = []
    dids: list[np.ndarray] = []
    seq_offset = 0
    T_expected: int | None = None
    for tokens, ds in batches:
        layers: dict[int, torch.Tensor] = {}

        def rec(layer: int, steps: torch.Tensor, rid: torch.Tensor) -> None:
            layers[layer] = steps.to(torch.float16).cpu()  # [S//g, B*g, E]

        with RoutingHook(model, selector, layout, recorder=rec):
            model(input_ids=tokens[:, :-1])
        B = tokens.shape[0]
        T = B * g
        if T_expected is None:
            T_expected = T
        elif T != T_expected:
            raise ValueError(f"every batch must have the same size; got T={T} after T={T_expected}")
        lg = torch.stack([layers[i] for i in sorted(layers)], dim=1)  # [S//g, L, T, E]
        n_steps = lg.shape[0]
        rid = (torch.arange(B).repeat_interleave(g) + seq_offset).to(torch.int32)
        did = ds.to(torch.int32).repeat_interleave(g)
        per_batch_logits.append(lg.numpy())
        rids.append(rid.expand(n_steps, T).numpy())
        dids.append(did.expand(n_steps, T).numpy())
        seq_offset += B
    if not per_batch_logits:
        raise ValueError("no batches to record")
    routing = routing_spec_of(model.config)
    L = per_batch_logits[0].shape[1]
    meta = {
        "num_experts": routing.num_experts,
        "top_k": routing.top_k,
        "scoring": routing.scoring,
        "renormalize": routing.renormalize,
        "layer_ids": list(range(L)),
        "model": model_name,
        "source": source,
        "datasets": list(datasets),
        "tokens_per_request": g,
        "policy_while_recording": "topk" if selector is None else selector.config.policy,
    }
    return Trace(
        logits=np.concatenate(per_batch_logits).astype(np.float16),
        request_ids=np.concatenate(rids).astype(np.int32),
        meta=meta,
        dataset_ids=np.concatenate(dids).astype(np.int32),
    )
