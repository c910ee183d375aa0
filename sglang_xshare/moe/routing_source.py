"""Router logits for EP benchmarks: a recorded trace when one fits, else a documented generator.

:class:`SyntheticRouter` -- the generator used when no trace matches the benchmark's ``E``.
Per layer ``l`` it draws an expert popularity bias ``b_l ~ N(0, 1.2^2) [E]`` and ``C = 8`` topic
centroids ``c_{l,j} ~ N(0, 1) [E]``; a token of topic ``j ~ U{0..C-1}`` gets logits
``b_l + c_{l,j} + N(0, 1) [E]``. The constants were fitted (``seed 0``, 200 batches) to what the
routing of a small trained MoE (32 experts, top-4) measured: a decode batch
of 16 tokens activates 19.0 distinct experts (measured 16.6-20.9; independent uniform routing: 28.2)
and the expert-load entropy is 0.84 of uniform (measured 0.78-0.88). For other ``E`` the same
constants are used (an extrapolation: per-expert statistics are kept, not batch statistics).

:func:`trace_batch` -- ``T`` rows of one layer of a :class:`~sglang_xshare.trace.Trace`, taken from
consecutive steps' valid slots (decode batches of the recorded model, re-batched to size ``T``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..trace import Trace

__all__ = ["SyntheticRouter", "trace_batch", "RoutingSource"]


class SyntheticRouter:
    """The documented generator (see the module docstring).

    Args:
        num_experts: ``E``. num_layers: distinct layers (each its own bias and topics).
        topics / bias_std / topic_std / noise_std: the generator's constants.
        seed: base seed; every (layer, batch index) draws from its own generator.
    """

    def __init__(self, num_experts: int, num_layers: int = 8, topics: int = 8, bias_std: float = 1.2,
                 topic_std: float = 1.0, noise_std: float = 1.0, seed: int = 0) -> None:
        self.num_experts, self.num_layers, self.topics = num_experts, num_layers, topics
        self.bias_std, self.topic_std, self.noise_std, self.seed = bias_std, topic_std, noise_std, seed
        g = torch.Generator().manual_seed(seed)
        self.bias = torch.randn(num_layers, num_experts, generator=g) * bias_std
        self.centroids = torch.randn(num_layers, topics, num_experts, generator=g) * topic_std

    def logits(self, num_tokens: int, layer: int, index: int) -> torch.Tensor:
        """``[num_tokens, E] float32`` router logits of batch ``index`` at ``layer`` (CPU)."""
        l = layer % self.num_layers
        g = torch.Generator().manual_seed(self.seed * 7919 + l * 104729 + index * 15485863 + num_tokens)
        topic = torch.randint(0, self.topics, (num_tokens,), generator=g)
        noise = torch.randn(num_tokens, self.num_experts, generator=g) * self.noise_std
        return self.bias[l] + self.centroids[l, topic] + noise

    def describe(self) -> str:
        return (f"synthetic router (sglang_xshare.moe.routing_source.SyntheticRouter: E={self.num_experts}, "
                f"{self.topics} topics, bias std {self.bias_std}, topic std {self.topic_std}, noise std {self.noise_std}, seed {self.seed})")


def trace_batch(trace: Trace, num_tokens: int, layer: int, index: int) -> torch.Tensor:
    """``[num_tokens, E] float32``: valid rows of ``layer`` from consecutive steps, starting at a
    step chosen by ``index`` (wrapping around the trace)."""
    S = trace.num_steps
    rows: list[np.ndarray] = []
    have = 0
    s = (index * 7) % S
    for _ in range(S):
        n = int((trace.request_ids[s] >= 0).sum())
        rows.append(trace.logits[s, layer % trace.num_layers, :n])
        have += n
        if have >= num_tokens:
            break
        s = (s + 1) % S
    out = np.concatenate(rows)
    if out.shape[0] < num_tokens:  # a tiny trace: repeat it
        out = np.resize(out, (num_tokens, out.shape[1]))
    return torch.from_numpy(out[:num_tokens].astype(np.float32))


class RoutingSource:
    """A trace if its ``E`` and ``k`` match, else :class:`SyntheticRouter`; says which it uses.

    Args:
        num_experts / top_k: the benchmark's ``E`` and ``k``.
        trace_path: a trace file (``None``: the packaged default trace, if any).
        seed: generator seed.
    """

    def __init__(self, num_experts: int, top_k: int, trace_path: str | None = None, seed: int = 0) -> None:
        from pathlib import Path

        from ..trace import default_trace_path

        self.trace: Trace | None = None
        path = Path(trace_path) if trace_path else default_trace_path()
        note = ""
        if path.exists():
            tr = Trace.load(path)
            if tr.logits.shape[-1] == num_experts and int(tr.meta["top_k"]) == top_k:
                self.trace = tr
            else:
                note = f" (trace {path} has E={tr.logits.shape[-1]}, k={tr.meta['top_k']}: does not match E={num_experts}, k={top_k})"
        else:
            note = f" (no trace at {path})"
        self.path = path
        self.synthetic = None if self.trace is not None else SyntheticRouter(num_experts, seed=seed)
        self.description = (f"trace {path} ({self.trace.meta.get('model', '?')}, {self.trace.num_steps} steps, "
                             f"{self.trace.num_layers} layers)" if self.trace is not None else self.synthetic.describe() + note)

    @property
    def num_layers(self) -> int:
        return self.trace.num_layers if self.trace is not None else self.synthetic.num_layers

    def batch(self, num_tokens: int, layer: int, index: int) -> torch.Tensor:
        """``[num_tokens, E] float32`` router logits (CPU)."""
        if self.trace is not None:
            return trace_batch(self.trace, num_tokens, layer, index)
        return self.synthetic.logits(num_tokens, layer, index)
