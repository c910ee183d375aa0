"""Replay a routing trace through several policies and compare them (offline, any device).

Every step and layer of the trace is one decode batch; each policy selects experts for it with
its :class:`~sglang_xshare.select.Selector`, and :func:`~sglang_xshare.metrics.selection_metrics`
measures the result. Figures are means over (step, layer) batches; ratios are to ``topk``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .benchio import markdown_table
from .config import Budget, BudgetSchedule, RoutingSpec, SelectionConfig, resolve_preset
from .metrics import METRIC_NAMES, selection_metrics
from .placement import Placement
from .select import Selector, compute_scores, get_policy
from .trace import Trace

__all__ = ["PolicyRun", "ReplayResult", "standard_runs", "replay"]


@dataclass(frozen=True)
class PolicyRun:
    """One row of the comparison: a label and the config it runs."""

    label: str
    config: SelectionConfig


@dataclass
class ReplayResult:
    """Aggregated metrics per run (means over every step x layer batch) and per layer.

    Attributes:
        overall: ``{label: {metric: mean}}`` (plus ``rank_experts`` / ``rank_tokens`` lists).
        per_layer: ``{label: {layer_id: {metric: mean}}}``.
        batches: number of (step, layer) batches replayed.
        info: trace / placement facts for the report.
    """

    overall: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_layer: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    batches: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown comparison table (ours vs topk vs the baselines, as ratios to topk)."""
        base = self.overall.get("topk")
        headers = ["policy", "distinct experts", "vs topk", "peak rank experts", "vs topk", "peak/mean",
                   "retained mass", "kept mass", "tokens < k"]
        rows = []
        for label, m in self.overall.items():
            rows.append([
                label,
                m["distinct"],
                m["distinct"] / base["distinct"] if base else float("nan"),
                m["peak_experts"],
                m["peak_experts"] / base["peak_experts"] if base else float("nan"),
                m["peak_over_mean"],
                m["retained_mass"],
                m["kept_mass"],
                m["short_fraction"],
            ])
        return markdown_table(headers, rows)


def standard_runs(routing: RoutingSpec, policy: str, budget: str, k0: int = 1, cap: int | None = None,
                  request_budget: str | None = None, layer_budgets: str | None = None,
                  extra: Sequence[str] = (), hard_cap: bool = False, warmup_p: float = 0.0,
                  verify_budget: str | None = None, verify_guard: int = 0) -> list[PolicyRun]:
    """``topk`` + ``cap`` + ``oea`` baselines, then ``policy`` (ours) and any ``extra`` policies.

    ``cap`` defaults to ``ceil(k / 2)``; budgeted policies share ``budget`` (and per-layer
    overrides); ``hard_cap`` makes ``xshare_ep``'s budget a hard cap on distinct experts. A preset
    budget (``auto``) sets the budgeted policies' ``k0`` and ``warmup_p`` too (``k0=1`` and
    ``warmup_p=0`` mean "not given"); the baselines keep ``k0``. ``verify_budget`` and
    ``verify_guard`` (speculative verify batches: steps of a trace with request groups) apply to
    ``policy`` and ``extra``, not to the baselines. Configuration errors name the core flags
    (``--xshare-budget``, ...).
    """
    k = routing.top_k
    cap = cap if cap is not None else max(1, -(-k // 2))
    budget_r, k0_r, p_r = resolve_preset(budget, None if k0 == 1 else k0, None if warmup_p == 0 else warmup_p,
                                         layer_budgets)
    sched = BudgetSchedule.parse(budget_r, layer_budgets)  # type: ignore[arg-type]
    rb = Budget.parse(request_budget, "--xshare-request-budget") if request_budget is not None else None
    vb = Budget.parse(verify_budget, "--xshare-verify-budget") if verify_budget is not None else None
    ours = {policy, *extra}

    def make(name: str) -> tuple[str, SelectionConfig]:
        traits = get_policy(name)
        if traits.plain_topk:
            return name, SelectionConfig(policy=name)
        if traits.per_token_cap:
            return f"{name}(k'={cap})", SelectionConfig(policy=name, cap=cap)
        if not traits.budgeted:
            return f"{name}(k0={k0})", SelectionConfig(policy=name, k0=k0)
        nucleus = f", p={p_r:g}" if p_r else ""
        if traits.uses_requests:
            cfg = SelectionConfig(policy=name, k0=k0_r, budget=sched, request_budget=rb, warmup_p=p_r)
            m_r = rb if rb is not None else "none"  # none: the batch budget over the union (= xshare)
            return f"{name}(m_r={m_r}, m_l={sched.default}, k0={k0_r}{nucleus})", cfg
        if traits.uses_placement and hard_cap:
            cfg = SelectionConfig(policy=name, k0=k0_r, budget=sched, hard_cap=True, warmup_p=p_r)
            return f"{name}(m={sched.default}, k0={k0_r}{nucleus}, hard cap)", cfg
        return f"{name}(m={sched.default}, k0={k0_r}{nucleus})", SelectionConfig(policy=name, k0=k0_r, budget=sched,
                                                                               warmup_p=p_r)

    def run(name: str) -> PolicyRun:
        label, cfg = make(name)
        if name in ours and (vb is not None or verify_guard):
            cfg = replace(cfg, verify_budget=vb, verify_guard=verify_guard)
            label = label[:-1] + (f", verify m={vb}" if vb is not None else "") + \
                (f", guard={verify_guard}" if verify_guard else "") + ")"
        return PolicyRun(label, cfg.validate(routing))

    names = ["topk", "cap", "oea", policy, *extra]
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return [run(n) for n in seen]


def replay(trace: Trace, runs: Sequence[PolicyRun], placement: Placement | None = None,
           device: str | torch.device = "cpu", progress: bool = True) -> ReplayResult:
    """Replay every (step, layer) batch of ``trace`` through every run.

    Args:
        trace: the routing trace.
        runs: the policies to compare (include ``topk`` for ratios).
        placement: EP placement for per-rank loads and ``xshare_ep`` (default: pure TP).
        device: where to run the selection.
        progress: show a tqdm bar over steps.
    """
    routing = trace.routing
    selectors = {r.label: Selector(routing, r.config, placement, backend="reference" if torch.device(device).type == "cpu" else "auto") for r in runs}
    sums: dict[str, dict[str, torch.Tensor]] = {r.label: {} for r in runs}
    layer_sums: dict[str, dict[int, dict[str, float]]] = {r.label: {} for r in runs}
    n_batches = 0
    layer_ids = [int(x) for x in trace.meta["layer_ids"]]
    bar = tqdm(trace.steps(device), total=trace.num_steps, desc="replay", unit="step", disable=not progress)
    for step in bar:
        valid = torch.arange(trace.batch_slots, device=device) < step.num_valid
        if step.num_valid == 0:
            continue
        for li, layer_id in enumerate(layer_ids):
            logits = step.logits[li]
            scores = compute_scores(logits, routing)
            n_batches += 1
            for label, sel in selectors.items():
                out = sel(logits, layer_id=layer_id, num_token_non_padded=step.num_valid, **step.requests())
                m = selection_metrics(out, scores, valid, routing.top_k, placement)
                acc = sums[label]
                for key, val in m.items():
                    acc[key] = acc[key] + val if key in acc else val.clone()
                lay = layer_sums[label].setdefault(layer_id, {"n": 0.0})
                lay["n"] += 1
                for key in ("distinct", "peak_experts", "retained_mass"):
                    lay[key] = lay.get(key, 0.0) + float(m[key])
    result = ReplayResult(batches=n_batches)
    for label, acc in sums.items():
        if not acc:
            continue
        means = {k: float(acc[k]) / n_batches for k in METRIC_NAMES}
        means["short_fraction"] = float(acc["short_tokens"]) / max(float(acc["valid_tokens"]), 1.0)
        means["rank_experts"] = (acc["rank_experts"] / n_batches).tolist()
        means["rank_tokens"] = (acc["rank_tokens"] / n_batches).tolist()
        result.overall[label] = means
        result.per_layer[label] = {
            lid: {k: v / d["n"] for k, v in d.items() if k != "n"} for lid, d in layer_sums[label].items()
        }
    result.info = {
        "trace_steps": trace.num_steps,
        "layers": len(layer_ids),
        "batch_slots": trace.batch_slots,
        "num_experts": routing.num_experts,
        "top_k": routing.top_k,
        "ep_ranks": placement.num_ranks if placement else 1,
        "model": trace.meta.get("model", "unknown"),
        "source": trace.meta.get("source", "unknown"),
    }
    return result
