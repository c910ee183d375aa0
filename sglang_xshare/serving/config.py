"""The server configuration of xshare: one frozen dataclass, its validation and its transport.

:class:`XShareServerConfig` holds everything the ``--xshare-*`` flags set (their registration on
an ``argparse`` parser is :mod:`.cli_flags`). :meth:`~XShareServerConfig.validate` checks every
field at configuration time; policy traits come from the policy registry's capabilities
(:class:`~sglang_xshare.select.registry.PolicyEntry`), not from policy names.

Errors are :class:`~sglang_xshare.config.XShareConfigError` (a ``ValueError``, like the errors of
SGLang's ``ServerArgs``) whose message starts with the offending flag::

    --xshare-budget: cannot parse budget 'lots'; use an expert count (24), a fraction (0.6) or mass:0.9

The validated config travels to every process SGLang spawns as JSON in the environment variable
:data:`ENV_VAR` (children inherit the environment under ``spawn``); the plugin entry point reads it
there (:meth:`XShareServerConfig.from_env`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (POLICY_NAMES, Budget, BudgetSchedule, RoutingSpec, SelectionConfig, XShareConfigError,
                      resolve_preset, unknown_policy)
from ..select.traits import PolicyTraits, policies_with, policy_traits

__all__ = ["AB_IDLE_ARMS", "ENV_VAR", "SERVER_POLICIES", "SGLANG_MISMATCH", "XShareServerConfig", "default_of"]

#: Environment variable carrying the JSON of :class:`XShareServerConfig` to child processes.
ENV_VAR = "SGLANG_XSHARE_CONFIG"

#: ``--xshare-policy`` choices: ``off`` (SGLang untouched) and every core policy.
SERVER_POLICIES: tuple[str, ...] = ("off",) + POLICY_NAMES

#: ``--xshare-sglang-mismatch``: what an SGLang that differs from the supported one gets.
SGLANG_MISMATCH = ("error", "fallback")



#: ``--xshare-ab-idle-arms``: what the A/B switch's arms it does not route by do (see :mod:`.measure.switch`).
AB_IDLE_ARMS = ("skip", "compute")


@dataclass(frozen=True)
class XShareServerConfig:
    """Everything the ``--xshare-*`` flags set (validated by :meth:`validate`).

    Attributes:
        policy: ``"off"`` or a core policy name (:data:`~sglang_xshare.config.POLICY_NAMES`).
        budget: batch budget ``m_l`` as typed (``"24"``, ``"0.6"``, ``"mass:0.9"``), a preset name
            (``"auto"``: budget, ``k0`` and ``warmup_p`` together, see
            :data:`~sglang_xshare.config.PRESETS`) or ``None``.
        warmup_k0: warm-up floor ``k0`` (each token keeps its own top-``k0``); with a preset, the
            default 1 means "the preset's".
        request_budget: per-request budget ``m_r`` (``xshare_spec``) or ``None``.
        verify_guard: verify-row guard ``K`` (0 = off): in target-verify batches (where
            :func:`~.context.request_group` gives ``g >= 2``) each request's target row keeps its
            own top-``K`` (:attr:`~sglang_xshare.config.SelectionConfig.verify_guard`); decode
            batches are unaffected.
        verify_budget: batch budget of target-verify batches (``"0.9"``, ``"40"``, ``"mass:0.95"``;
            no preset) in every layer instead of ``budget``, or ``None`` (``budget`` there too).
        cap: per-token cap ``k'`` of ``cap`` or ``None``.
        layer_budgets: per-layer overrides ``"LAYER:BUDGET,..."`` or ``None``.
        min_score: refinement floor on gate weights beyond ``k0`` (0 keeps all).
        mass_source: ``"topk"`` or ``"full"`` (what the aggregated mass sums).
        fill_to_peak: ``xshare_ep``: let every rank fill up to the busiest rank's load.
        hard_cap: ``xshare_ep``: the budget is a hard cap, at most ``max(m_l, |warm-up set|)``
            distinct experts per layer and batch.
        warmup_p: nucleus warm-up (0 = off; with a preset, 0 means "the preset's").
        apply_to_draft: also apply the policy to the draft model's MoE layers.
        apply_to_prefill: also apply it to prefill / extend / mixed batches (default: decode and
            target-verify batches only).
        empty_slots: how a ``-1`` slot reaches the MoE backend: ``"minus_one"`` (backend drops
            it), ``"fill"`` (same expert as the token's first slot, weight 0), ``"distinct"``
            (another expert the batch already uses, weight 0), ``"auto"`` (per backend, see
            :mod:`sglang_xshare.serving.slots`).
        min_tokens: smallest batch (tokens) a policy is applied to; smaller batches keep SGLang's
            routing. ``"auto"``: 2 for the batch policies (one token has nothing to share with), 1
            for ``cap``; with a count budget ``m`` (``xshare``, ``xshare_spec`` without a request
            budget) at least ``m // top_k + 1`` (a smaller batch cannot activate more than ``m``
            experts); decided per captured batch size, so it costs nothing at run time.
        ep_global: when SGLang gives each EP rank only part of the batch (DP attention, DeepEP's
            scattered layout), ``oea`` / ``xshare`` / ``xshare_ep`` choose one expert set from all
            ranks' tokens: an all-reduce of the batch statistics over the MoE EP group inside the
            layer (every rank joins it on every MoE call of the target model).
        metrics: keep per-layer metrics on device and flush them every ``metrics_interval`` steps.
        metrics_interval: decode steps between two metric flushes.
        record_trace: path of a trace file (``.npz``) to write router logits to, or ``None``.
        record_trace_steps: decode steps to record before the trace is written.
        ab_switch: in-server A/B measurement (:mod:`.measure`): a file whose content picks, at run
            time, whether the experts get the policy's routing (``1``) or SGLang's (``0``); SGLang's
            is computed in every layer the policy applies to, the policy's as ``ab_idle_arms`` says.
            ``None``: off.
        ab_arms: more arms for the switch (``--xshare-ab-arm``, repeated): each a policy spec
            ``KEY=VALUE,...`` of the policy flags without ``--xshare-`` (``policy=oea,warmup-k0=4``,
            ``policy=cap,cap=6``); arm ``i + 2`` of the switch file, so one server compares several
            policies on the same load.
        ab_idle_arms: what the policy arms the switch does not route by do on the fast path:
            ``skip`` (their kernels read the switch's device flag and return at once, so each arm
            pays its own selection and SGLang's arm pays none: the A/B ratio is net of the
            selection, less a few empty launches per layer) or ``compute`` (every arm selects in
            every layer: all arms pay every selection, so the ratio is the expert cut alone).
        sglang_mismatch: what happens when the installed SGLang lacks a name the plugin patches or
            reads, or its signature changed (:mod:`.sglang_surface`): ``error`` (default; the SGLang
            process stops with an error naming the version and the name) or ``fallback`` (a
            warning, and the plugin stays off in that process: SGLang's own routing).
    """

    policy: str = "off"
    budget: str | None = None
    warmup_k0: int = 1
    request_budget: str | None = None
    verify_guard: int = 0
    verify_budget: str | None = None
    cap: int | None = None
    layer_budgets: str | None = None
    min_score: float = 0.0
    mass_source: str = "topk"
    fill_to_peak: bool = True
    hard_cap: bool = False
    warmup_p: float = 0.0
    apply_to_draft: bool = False
    apply_to_prefill: bool = False
    empty_slots: str = "auto"
    min_tokens: str = "auto"
    ep_global: bool = False
    metrics: bool = False
    metrics_interval: int = 200
    record_trace: str | None = None
    record_trace_steps: int = 256
    ab_switch: str | None = None
    ab_arms: tuple[str, ...] = ()
    ab_idle_arms: str = "skip"
    sglang_mismatch: str = "error"

    # ---- derived ------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether anything needs hooking (a policy, metrics or the trace recorder)."""
        return self.policy != "off" or self.metrics or self.record_trace is not None

    @property
    def selects(self) -> bool:
        """Whether a policy replaces SGLang's routing (``policy != "off"``)."""
        return self.policy != "off"

    @property
    def entry(self) -> PolicyTraits | None:
        """The policy's capabilities, ``None`` for ``off``."""
        return None if self.policy == "off" else policy_traits(self.policy)

    @property
    def measures(self) -> bool:
        """Whether the in-server A/B measurement is on (``--xshare-ab-switch``)."""
        return self.ab_switch is not None

    def budget_schedule(self) -> BudgetSchedule | None:
        """The parsed batch budget with its per-layer overrides (``None`` without ``--xshare-budget``)."""
        if self.budget is None:
            if self.layer_budgets:
                raise XShareConfigError("--xshare-layer-budgets", "per-layer budgets need a default --xshare-budget")
            return None
        budget, _, _ = self._resolved()
        return BudgetSchedule.parse(budget, self.layer_budgets)

    def _resolved(self) -> tuple[str | None, int, float]:
        """``(budget, k0, warmup_p)`` with a preset (``--xshare-budget auto``) expanded."""
        b, k0, p = resolve_preset(self.budget, None if self.warmup_k0 == 1 else self.warmup_k0,
                                  None if self.warmup_p == 0.0 else self.warmup_p, self.layer_budgets)
        return b, k0, p  # type: ignore[return-value]

    def selection_config(self, routing: RoutingSpec | None = None) -> SelectionConfig:
        """The core :class:`SelectionConfig`; validated against ``routing`` when given.

        Raises :class:`XShareConfigError` naming the flag. ``policy`` must not be ``"off"``.
        """
        if self.policy == "off":
            raise XShareConfigError("--xshare-policy", "policy 'off' has no selection config")
        _, k0, warmup_p = self._resolved()
        cfg = SelectionConfig(
            policy=self.policy,
            k0=k0,
            warmup_p=warmup_p,
            budget=self.budget_schedule(),
            request_budget=None if self.request_budget is None else Budget.parse(self.request_budget, "--xshare-request-budget"),
            verify_guard=self.verify_guard,
            verify_budget=None if self.verify_budget is None else Budget.parse(self.verify_budget, "--xshare-verify-budget"),
            cap=self.cap,
            min_score=self.min_score,
            mass_source=self.mass_source,  # type: ignore[arg-type]
            fill_to_peak=self.fill_to_peak,
            hard_cap=self.hard_cap,
        )
        return cfg.validate(routing) if routing is not None else cfg

    # ---- validation ---------------------------------------------------------------------
    def validate(self, routing: RoutingSpec | None = None, *, check_paths: bool = True) -> "XShareServerConfig":
        """Check every flag (and, with ``routing``, against the model); return ``self``.
        ``check_paths=False``: skip the checks of directories on this machine (a launcher whose
        nodes resolve the paths in their own working directory, and check them at start)."""
        if self.policy not in SERVER_POLICIES:
            raise XShareConfigError("--xshare-policy", unknown_policy(self.policy, SERVER_POLICIES))
        if self.warmup_k0 < 1:
            raise XShareConfigError("--xshare-warmup-k0", f"k0 must be >= 1, got {self.warmup_k0}")
        if self.cap is not None and self.cap < 1:
            raise XShareConfigError("--xshare-cap", f"k' must be >= 1, got {self.cap}")
        if self.verify_guard < 0:
            raise XShareConfigError("--xshare-verify-guard", f"K must be >= 0 (0 = off), got {self.verify_guard}")
        if not (0.0 <= self.min_score < 1.0) or math.isnan(self.min_score):
            raise XShareConfigError("--xshare-min-score", f"must be in [0, 1), got {self.min_score}")
        if not (0.0 <= self.warmup_p <= 1.0) or math.isnan(self.warmup_p):
            raise XShareConfigError("--xshare-warmup-p", f"must be in [0, 1], got {self.warmup_p}")
        if self.warmup_p > 0.0:
            raise XShareConfigError("--xshare-warmup-p", "the nucleus warm-up is not served yet: the Triton kernels do "
                                    "not implement it, and the PyTorch reference in every MoE layer would cost more than "
                                    "it saves. Evaluate it offline (bench/quality.py, sglang-xshare replay --warmup-p)")
        if self.mass_source not in ("topk", "full"):
            raise XShareConfigError("--xshare-mass-source", f"must be 'topk' or 'full', got {self.mass_source!r}")
        if self.empty_slots not in ("auto", "minus_one", "fill", "distinct"):
            raise XShareConfigError("--xshare-empty-slots", f"must be auto, minus_one, fill or distinct, got {self.empty_slots!r}")
        mt = str(self.min_tokens)
        if self.min_tokens != "auto" and not (mt.isascii() and mt.isdigit() and int(mt) >= 1):
            raise XShareConfigError("--xshare-min-tokens", f"must be 'auto' or an integer >= 1, got {self.min_tokens!r}")
        entry = self.entry
        if self.ep_global and not (entry is not None and entry.ep_global):
            raise XShareConfigError("--xshare-ep-global", f"policy {self.policy} has no batch statistics to share "
                                    f"across ranks ({', '.join(policies_with('ep_global'))})")
        if self.metrics_interval < 1:
            raise XShareConfigError("--xshare-metrics-interval", f"must be >= 1, got {self.metrics_interval}")
        if self.record_trace_steps < 1:
            raise XShareConfigError("--xshare-record-trace-steps", f"must be >= 1, got {self.record_trace_steps}")
        if self.record_trace is not None and check_paths:
            parent = Path(self.record_trace).expanduser().resolve().parent
            if not parent.is_dir():
                raise XShareConfigError("--xshare-record-trace", f"directory {str(parent)!r} does not exist")
            if not os.access(parent, os.W_OK):
                raise XShareConfigError("--xshare-record-trace", f"directory {str(parent)!r} is not writable")
        if self.ab_switch is not None:
            if entry is None or entry.plain_topk:
                raise XShareConfigError("--xshare-ab-switch", f"compares a policy with SGLang's routing; policy "
                                        f"{self.policy} routes like SGLang")
            parent = Path(self.ab_switch).expanduser().resolve().parent
            if check_paths and not parent.is_dir():
                raise XShareConfigError("--xshare-ab-switch", f"directory {str(parent)!r} does not exist")
        if self.sglang_mismatch not in SGLANG_MISMATCH:
            raise XShareConfigError("--xshare-sglang-mismatch", f"{self.sglang_mismatch!r}: choose one of "
                                    f"{', '.join(SGLANG_MISMATCH)}")
        if self.ab_idle_arms not in AB_IDLE_ARMS:
            raise XShareConfigError("--xshare-ab-idle-arms", f"{self.ab_idle_arms!r}: choose one of {', '.join(AB_IDLE_ARMS)}")
        if self.ab_arms:
            if self.ab_switch is None:
                raise XShareConfigError("--xshare-ab-arm", "arms are picked by the A/B switch: add --xshare-ab-switch PATH")
            from .measure.arms import arm_configs  # the arm mini-language: only with --xshare-ab-arm

            arm_configs(self, routing, check_paths=check_paths)
        # Flags that mean nothing for the chosen policy (or without their feature) are an error, not
        # silently ignored.
        for flag, given, needs, present in (
                ("--xshare-ab-idle-arms", self.ab_idle_arms != "skip", "--xshare-ab-switch", self.ab_switch is not None),
                ("--xshare-metrics-interval", self.metrics_interval != default_of("metrics_interval"), "--xshare-metrics",
                 self.metrics),
                ("--xshare-record-trace-steps", self.record_trace_steps != default_of("record_trace_steps"),
                 "--xshare-record-trace",
                 self.record_trace is not None)):
            if given and not present:
                raise XShareConfigError(flag, f"has no effect without {needs}")
        for flag, given in (("--xshare-hard-cap", self.hard_cap), ("--xshare-no-fill-to-peak", not self.fill_to_peak)):
            if given and not (entry is not None and entry.uses_placement):
                raise XShareConfigError(flag, f"only policy {' / '.join(policies_with('uses_placement'))} balances EP "
                                        f"ranks; policy {self.policy} ignores it")
        if entry is None:
            for flag, value in (("--xshare-budget", self.budget), ("--xshare-request-budget", self.request_budget),
                                ("--xshare-cap", self.cap), ("--xshare-layer-budgets", self.layer_budgets),
                                ("--xshare-verify-guard", self.verify_guard or None),
                                ("--xshare-verify-budget", self.verify_budget)):
                if value is not None:
                    raise XShareConfigError(flag, "has no effect with --xshare-policy off; choose a policy")
            return self
        if not entry.budgeted and self.budget is not None:
            raise XShareConfigError("--xshare-budget", f"policy {self.policy} takes no batch budget")
        if not entry.budgeted and self.verify_budget is not None:
            raise XShareConfigError("--xshare-verify-budget", f"policy {self.policy} takes no batch budget")
        if not entry.budgeted and self.layer_budgets is not None:
            raise XShareConfigError("--xshare-layer-budgets", f"policy {self.policy} takes no batch budget")
        if not entry.uses_requests and self.request_budget is not None:
            raise XShareConfigError("--xshare-request-budget", f"only policy {' / '.join(policies_with('uses_requests'))} "
                                    "takes a per-request budget")
        if not entry.per_token_cap and self.cap is not None:
            raise XShareConfigError("--xshare-cap", f"only policy {' / '.join(policies_with('per_token_cap'))} takes a "
                                    "per-token cap")
        if self.verify_guard and not entry.verify_guard:
            raise XShareConfigError("--xshare-verify-guard", f"policy {self.policy} has no warm-up floor to raise; the "
                                    f"guard needs one of {' / '.join(policies_with('verify_guard'))}")
        if self.verify_guard and self.verify_guard <= self._resolved()[1]:
            raise XShareConfigError("--xshare-verify-guard", f"K={self.verify_guard} changes nothing: every row keeps its "
                                    f"top-k0 (k0={self._resolved()[1]}) already; give k0 < K <= top_k, or 0 = off")
        # Parses every budget (raising naming its flag) and checks the policy's requirements.
        cfg = self.selection_config(None)
        if entry.budgeted and cfg.budget is None:
            raise XShareConfigError("--xshare-budget", f"policy {self.policy} needs a batch budget, e.g. --xshare-budget 0.6")
        if entry.per_token_cap and self.cap is None:
            raise XShareConfigError("--xshare-cap", f"policy {self.policy} needs --xshare-cap K' (experts kept per token)")
        if routing is not None:
            self.selection_config(routing)
        return self

    # ---- transport ----------------------------------------------------------------------
    def to_json(self) -> str:
        """JSON of every field (the :data:`ENV_VAR` payload)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "XShareServerConfig":
        """Inverse of :meth:`to_json`; unknown keys raise (a version mismatch between processes)."""
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(XShareServerConfig)}
        unknown = set(data) - names
        if unknown:
            raise XShareConfigError(ENV_VAR, f"unknown keys {sorted(unknown)} (sglang_xshare versions differ?)")
        if "ab_arms" in data:
            data["ab_arms"] = tuple(data["ab_arms"])  # JSON has lists
        return XShareServerConfig(**data).validate()

    @staticmethod
    def from_env(environ: dict[str, str] | None = None) -> "XShareServerConfig | None":
        """The config carried by :data:`ENV_VAR`, or ``None`` when it is unset or empty."""
        text = (os.environ if environ is None else environ).get(ENV_VAR, "")
        return XShareServerConfig.from_json(text) if text.strip() else None

    def export_env(self, environ: dict[str, str] | None = None) -> None:
        """Write :data:`ENV_VAR` (``os.environ`` by default) so spawned children see this config."""
        (os.environ if environ is None else environ)[ENV_VAR] = self.to_json()


def default_of(field_name: str) -> Any:
    """A flag's default (the :class:`XShareServerConfig` field's)."""
    return XShareServerConfig.__dataclass_fields__[field_name].default
