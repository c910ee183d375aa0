"""Batch-aware teacher-forced evaluation: the CE cost of a selection policy on the real model.

For one operating point (a :class:`~sglang_xshare.select.Selector`, a batch size ``B``, a
:class:`~.hook.StepLayout`) every batch of ``B`` held-out sequences is run teacher-forced with
the policy deciding, per layer and decode step, which experts the ``B`` (or ``B * g``) tokens of
that step use. The reference is plain top-k on the same sequences; per-token routing makes the
top-k result independent of how sequences are batched, so one reference pass serves every ``B``.

Metrics (:class:`PointResult`): CE delta vs top-k (absolute, relative, 95% CI over batches),
distinct experts per layer and step, retained gating mass, MoE-output relative error.
This is an offline harness: it syncs with the host freely (it is not the serving hot path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
import torch.nn.functional as F

from ..benchio import t_quantile_975
from ..select import Selector
from .hook import RoutingHook, StepLayout
from .model import EvalSet

__all__ = ["Composition", "make_batches", "sequence_ce", "sequence_ce_argmax", "PointResult", "evaluate_point", "t_quantile_975"]

Composition = Literal["mixed", "homogeneous"]


def make_batches(ev: EvalSet, batch_size: int, num_batches: int, composition: Composition = "mixed",
                 seq_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pick ``num_batches`` batches of ``batch_size`` held-out sequences (deterministic).

    ``mixed``: sequences of all datasets interleaved round-robin (every batch mixes datasets
    when ``batch_size > 1``); ``homogeneous``: each batch from one dataset, datasets taking turns.

    Returns:
        list of ``(tokens [B, S + 1] int64, dataset_ids [B] int64)``.
    """
    n_ds, n_seq, w = ev.tokens.shape
    S = (w - 1) if seq_len is None else seq_len
    if S > w - 1:
        raise ValueError(f"seq_len {S} exceeds the eval windows' {w - 1}")
    toks = ev.tokens[:, :, : S + 1]
    need = batch_size * num_batches
    if composition == "mixed":
        order = [(i % n_ds, i // n_ds) for i in range(need)]
    elif composition == "homogeneous":
        order = [(b % n_ds, (b // n_ds) * batch_size + j) for b in range(num_batches) for j in range(batch_size)]
    else:
        raise ValueError(f"composition must be 'mixed' or 'homogeneous', got {composition!r}")
    run = -(-batch_size // n_ds) if composition == "mixed" else batch_size  # windows of one dataset per batch
    if ev.min_gap is not None and run > ev.min_gap:
        raise ValueError(f"a batch takes {run} windows of one dataset, more than the eval set's min_gap {ev.min_gap}: "
                         "it could hold neighbouring windows of one document")
    if max(s for _, s in order) >= n_seq:
        raise ValueError(f"{num_batches} batches of {batch_size} need more than {n_seq} sequences per dataset")
    out = []
    for b in range(num_batches):
        sel = order[b * batch_size : (b + 1) * batch_size]
        out.append((torch.stack([toks[d, s] for d, s in sel]), torch.tensor([d for d, _ in sel])))
    return out


@torch.inference_mode()
def sequence_ce_argmax(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean next-token CE and the greedy next token at every position.

    ``tokens [B, S + 1]`` -> ``(ce [B] float64, argmax [B, S] int64)`` (the model's argmax over
    the vocabulary at positions ``0 .. S-1``: what greedy decoding would emit there).
    """
    tokens = tokens.to(next(model.parameters()).device)
    logits = model(input_ids=tokens[:, :-1]).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return ce.view(tokens.shape[0], -1).double().mean(-1), logits.argmax(-1)


def sequence_ce(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token CE (nats): ``tokens [B, S + 1]`` -> ``[B] float64``."""
    return sequence_ce_argmax(model, tokens)[0]


@dataclass
class PointResult:
    """One operating point's metrics.

    Attributes:
        ce / ce_ref: mean CE of the policy / of top-k over the batches (nats per token).
        delta / delta_rel: ``ce - ce_ref`` and ``delta / ce_ref``.
        ci95: half-width of the 95% CI of the mean per-batch delta (t interval).
        batch_deltas: per-batch CE deltas (the unit of the CI: the sequences of one batch share
            their routing decisions, so they are not independent).
        seq_deltas: per-sequence CE deltas, batch by batch (``B`` per batch).
        distinct / distinct_topk: mean distinct experts per layer and decode step (policy / top-k).
        retained_mass: kept gate mass / top-k gate mass (mean over layers, token-weighted).
        moe_rel_err: MoE-output relative error vs top-k routing (mean over layers).
        per_layer: per-layer summaries.
    """

    ce: float
    ce_ref: float
    delta: float
    delta_rel: float
    ci95: float
    batch_deltas: list[float]
    distinct: float
    distinct_topk: float
    retained_mass: float
    moe_rel_err: float
    per_layer: list[dict[str, float]]
    tokens: int
    seq_deltas: list[float] = field(default_factory=list)
    batch_distinct: list[float] = field(default_factory=list)


def evaluate_point(model: torch.nn.Module, selector: Selector | None,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   ref_ce: list[torch.Tensor] | None = None, layout: StepLayout = StepLayout(),
                   measure_output_error: bool = True, progress: object | None = None,
                   vectorize: bool = True) -> PointResult:
    """Run every batch under ``selector`` and compare with top-k.

    Args:
        model: the MoE LM (eval mode).
        selector: the policy (``None`` = the model's own top-k, e.g. for the reference).
        batches: from :func:`make_batches`.
        ref_ce: per batch ``[B] float64`` top-k per-sequence CE; computed here when ``None``.
        layout: decode-step grouping (``tokens_per_request > 1``: speculative verification).
        measure_output_error: measure the MoE-output relative error.
        progress: optional tqdm bar, advanced once per batch.
        vectorize: one vmapped selector call per layer and forward (see :class:`~.hook.RoutingHook`).
    """
    batches = list(batches)
    if ref_ce is None:
        ref_ce = [sequence_ce(model, t) for t, _ in batches]
    if len(ref_ce) != len(batches):
        raise ValueError("ref_ce must have one entry per batch")
    deltas, ces, refs, tokens, seq_deltas, batch_distinct = [], [], [], 0, [], []
    with RoutingHook(model, selector, layout, measure_output_error=measure_output_error, vectorize=vectorize) as hook:
        for (tok, _), ref in zip(batches, ref_ce):
            before = sum(s.distinct for s in hook.stats), sum(s.steps for s in hook.stats)
            ce = sequence_ce(model, tok)
            ces.append(float(ce.mean()))
            refs.append(float(ref.mean()))
            deltas.append(ces[-1] - refs[-1])
            seq_deltas.extend((ce - ref.to(ce.device)).tolist())
            after = sum(s.distinct for s in hook.stats), sum(s.steps for s in hook.stats)
            batch_distinct.append((after[0] - before[0]) / max(after[1] - before[1], 1))
            tokens += tok.shape[0] * (tok.shape[1] - 1)
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
        per_layer = [s.summary() for s in hook.stats]
        raw = hook.stats
    n = len(deltas)
    mean_d = sum(deltas) / n
    sd = math.sqrt(sum((d - mean_d) ** 2 for d in deltas) / (n - 1)) if n > 1 else float("nan")
    ci = t_quantile_975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    ce_ref = sum(refs) / n
    L = len(per_layer)
    return PointResult(
        ce=sum(ces) / n, ce_ref=ce_ref, delta=mean_d, delta_rel=mean_d / ce_ref, ci95=ci,
        batch_deltas=deltas,
        distinct=sum(p["distinct"] for p in per_layer) / L,
        distinct_topk=sum(p["distinct_topk"] for p in per_layer) / L,
        retained_mass=sum(s.kept_mass for s in raw) / max(sum(s.topk_mass for s in raw), 1e-30),
        moe_rel_err=sum(p["moe_rel_err"] for p in per_layer) / L,
        per_layer=per_layer, tokens=tokens, seq_deltas=seq_deltas, batch_distinct=batch_distinct,
    )
