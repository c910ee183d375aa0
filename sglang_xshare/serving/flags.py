"""The ``--xshare-*`` server flags: parse, validate, carry to SGLang's child processes.

SGLang's own flags stay SGLang's: :func:`parse_server_argv` splits ``argv`` into the xshare part
and the SGLang part, hands the SGLang part to SGLang's own ``prepare_server_args`` (so ``--config``,
logging set-up and every SGLang check behave exactly as under ``sglang serve``) and parses the
xshare part here. :func:`build_parser` puts both sets of flags on one parser for ``--help``.

Errors are :class:`~sglang_xshare.config.XShareConfigError` (a ``ValueError``, like the errors of
SGLang's ``ServerArgs``) whose message starts with the offending flag::

    --xshare-budget: cannot parse budget 'lots'; use an expert count (24), a fraction (0.6) or mass:0.9

The validated :class:`XShareServerConfig` travels to every process SGLang spawns as JSON in the
environment variable :data:`ENV_VAR` (children inherit the environment under ``spawn``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import GLOBAL_POLICIES, PRESETS, POLICY_NAMES, Budget, BudgetSchedule, RoutingSpec, SelectionConfig, XShareConfigError, resolve_preset

__all__ = [
    "AB_IDLE_ARMS",
    "ENV_VAR",
    "SERVER_POLICIES",
    "XShareServerConfig",
    "arm_spec",
    "arm_spec_argv",
    "add_xshare_args",
    "build_parser",
    "split_xshare_argv",
    "parse_xshare_argv",
    "parse_server_argv",
    "check_against_server_args",
    "routing_from_model_config",
]

logger = logging.getLogger(__name__)

#: Environment variable carrying the JSON of :class:`XShareServerConfig` to child processes.
ENV_VAR = "SGLANG_XSHARE_CONFIG"

#: ``--xshare-policy`` choices: ``off`` (SGLang untouched) and every core policy.
SERVER_POLICIES: tuple[str, ...] = ("off",) + POLICY_NAMES

_PREFIX = "--xshare-"


#: ``--xshare-ab-idle-arms``: what the A/B switch's arms it does not route by do (see :mod:`.abswitch`).
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
            for ``cap``; decided per captured batch size, so it costs nothing at run time.
        ep_global: when SGLang gives each EP rank only part of the batch (DP attention, DeepEP's
            scattered layout), ``oea`` / ``xshare`` / ``xshare_ep`` choose one expert set from all
            ranks' tokens: an all-reduce of the batch statistics over the MoE EP group inside the
            layer (every rank joins it on every MoE call of the target model).
        metrics: keep per-layer metrics on device and flush them every ``metrics_interval`` steps.
        metrics_interval: decode steps between two metric flushes.
        record_trace: path of a trace file (``.npz``) to write router logits to, or ``None``.
        record_trace_steps: decode steps to record before the trace is written.
        ab_switch: in-server A/B measurement (:mod:`.abswitch`): a file whose content picks, at run
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
    """

    policy: str = "off"
    budget: str | None = None
    warmup_k0: int = 1
    request_budget: str | None = None
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

    # ---- derived ------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether anything needs hooking (a policy, metrics or the trace recorder)."""
        return self.policy != "off" or self.metrics or self.record_trace is not None

    @property
    def selects(self) -> bool:
        """Whether a policy replaces SGLang's routing (``policy != "off"``)."""
        return self.policy != "off"

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
            cap=self.cap,
            min_score=self.min_score,
            mass_source=self.mass_source,  # type: ignore[arg-type]
            fill_to_peak=self.fill_to_peak,
            hard_cap=self.hard_cap,
        )
        return cfg.validate(routing) if routing is not None else cfg

    def arm_configs(self, routing: RoutingSpec | None = None, *, check_paths: bool = True) -> list["XShareServerConfig"]:
        """The switch's policy arms: ``[self]`` then one config per ``--xshare-ab-arm`` (its policy
        flags over this config's other flags; ``--xshare-ep-global`` kept where the arm's policy has
        batch statistics), each validated (against the model too, given ``routing``). Raises
        :class:`XShareConfigError` naming ``--xshare-ab-arm``."""
        out = [self]
        for spec in self.ab_arms:
            argv = arm_spec_argv(spec)
            try:
                arm = parse_xshare_argv(argv)
            except XShareConfigError as e:
                raise XShareConfigError("--xshare-ab-arm", f"{spec!r}: {e}") from None
            if not arm.selects or arm.policy == "topk":
                raise XShareConfigError("--xshare-ab-arm", f"{spec!r}: an arm needs a policy other than off / topk "
                                        "(SGLang's routing is arm 0 already)")
            fields = {f: getattr(arm, f) for f in ARM_FIELDS}
            merged = dataclasses.replace(self, ab_arms=(), record_trace=None, **fields,
                                         ep_global=self.ep_global and arm.policy in GLOBAL_POLICIES)
            try:
                out.append(merged.validate(routing, check_paths=check_paths))
            except XShareConfigError as e:
                raise XShareConfigError("--xshare-ab-arm", f"{spec!r}: {e}") from None
        return out

    # ---- validation ---------------------------------------------------------------------
    def validate(self, routing: RoutingSpec | None = None, *, check_paths: bool = True) -> "XShareServerConfig":
        """Check every flag (and, with ``routing``, against the model); return ``self``.
        ``check_paths=False``: skip the checks of directories on this machine (a launcher whose
        nodes resolve the paths in their own working directory, and check them at start)."""
        if self.policy not in SERVER_POLICIES:
            raise XShareConfigError("--xshare-policy", f"unknown policy {self.policy!r}; choose from {', '.join(SERVER_POLICIES)}")
        if self.warmup_k0 < 1:
            raise XShareConfigError("--xshare-warmup-k0", f"k0 must be >= 1, got {self.warmup_k0}")
        if self.cap is not None and self.cap < 1:
            raise XShareConfigError("--xshare-cap", f"k' must be >= 1, got {self.cap}")
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
        if self.ep_global and self.policy not in GLOBAL_POLICIES:
            raise XShareConfigError("--xshare-ep-global", f"policy {self.policy} has no batch statistics to share "
                                    "across ranks (oea, oea_simple, xshare, xshare_ep)")
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
            if self.policy in ("off", "topk"):
                raise XShareConfigError("--xshare-ab-switch", f"compares a policy with SGLang's routing; policy "
                                        f"{self.policy} routes like SGLang")
            parent = Path(self.ab_switch).expanduser().resolve().parent
            if check_paths and not parent.is_dir():
                raise XShareConfigError("--xshare-ab-switch", f"directory {str(parent)!r} does not exist")
        if self.ab_idle_arms not in AB_IDLE_ARMS:
            raise XShareConfigError("--xshare-ab-idle-arms", f"{self.ab_idle_arms!r}: choose one of {', '.join(AB_IDLE_ARMS)}")
        if self.ab_arms:
            if self.ab_switch is None:
                raise XShareConfigError("--xshare-ab-arm", "arms are picked by the A/B switch: add --xshare-ab-switch PATH")
            self.arm_configs(routing, check_paths=check_paths)
        # Flags that mean nothing for the chosen policy (or without their feature) are an error, not
        # silently ignored.
        for flag, given, needs, present in (
                ("--xshare-ab-idle-arms", self.ab_idle_arms != "skip", "--xshare-ab-switch", self.ab_switch is not None),
                ("--xshare-metrics-interval", self.metrics_interval != _default("metrics_interval"), "--xshare-metrics",
                 self.metrics),
                ("--xshare-record-trace-steps", self.record_trace_steps != _default("record_trace_steps"),
                 "--xshare-record-trace",
                 self.record_trace is not None)):
            if given and not present:
                raise XShareConfigError(flag, f"has no effect without {needs}")
        for flag, given in (("--xshare-hard-cap", self.hard_cap), ("--xshare-no-fill-to-peak", not self.fill_to_peak)):
            if given and self.policy != "xshare_ep":
                raise XShareConfigError(flag, f"only policy xshare_ep balances EP ranks; policy {self.policy} ignores it")
        budgeted = self.policy in ("xshare", "xshare_ep", "xshare_spec")
        if self.policy == "off":
            for flag, value in (("--xshare-budget", self.budget), ("--xshare-request-budget", self.request_budget),
                                ("--xshare-cap", self.cap), ("--xshare-layer-budgets", self.layer_budgets)):
                if value is not None:
                    raise XShareConfigError(flag, "has no effect with --xshare-policy off; choose a policy")
            return self
        if not budgeted and self.budget is not None:
            raise XShareConfigError("--xshare-budget", f"policy {self.policy} takes no batch budget")
        if not budgeted and self.layer_budgets is not None:
            raise XShareConfigError("--xshare-layer-budgets", f"policy {self.policy} takes no batch budget")
        if self.policy != "xshare_spec" and self.request_budget is not None:
            raise XShareConfigError("--xshare-request-budget", "only policy xshare_spec takes a per-request budget")
        if self.policy != "cap" and self.cap is not None:
            raise XShareConfigError("--xshare-cap", "only policy cap takes a per-token cap")
        # Parses every budget (raising naming its flag) and checks the policy's requirements.
        cfg = self.selection_config(None)
        if self.policy in ("xshare", "xshare_ep", "xshare_spec") and cfg.budget is None:
            raise XShareConfigError("--xshare-budget", f"policy {self.policy} needs a batch budget, e.g. --xshare-budget 0.6")
        if self.policy == "xshare_spec" and cfg.request_budget is None:
            raise XShareConfigError("--xshare-request-budget", "policy xshare_spec needs a per-request budget, e.g. --xshare-request-budget 12")
        if self.policy == "cap" and self.cap is None:
            raise XShareConfigError("--xshare-cap", "policy cap needs --xshare-cap K' (experts kept per token)")
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


# ---- argparse ---------------------------------------------------------------------------

def add_xshare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--xshare-*`` flags (one argument group) to ``parser``; return ``parser``.

    Values are kept as strings where the core parses them (budgets), so that every error names
    its flag through :meth:`XShareServerConfig.validate`.
    """
    d = XShareServerConfig()
    g = parser.add_argument_group("XShare expert selection (sglang_xshare)")
    g.add_argument("--xshare-policy", type=str, default=d.policy, metavar="{" + ",".join(SERVER_POLICIES) + "}",
                   help="Expert-selection policy applied to every target MoE layer of decode batches. "
                        "'off' leaves SGLang's routing bit-identical.")
    g.add_argument("--xshare-budget", type=str, default=None,
                   help="Batch budget m_l of xshare/xshare_ep/xshare_spec: an expert count (24), a fraction "
                        "of the experts plain top-k would activate (0.6 or frac:0.6), a gating-mass target (mass:0.9) "
                        f"or a measured preset ({', '.join(PRESETS)}: budget, warm-up k0 and nucleus p together).")
    g.add_argument("--xshare-warmup-k0", type=int, default=d.warmup_k0,
                   help="Warm-up floor k0: every token keeps its own top-k0 experts (1 <= k0 <= top_k).")
    g.add_argument("--xshare-warmup-p", type=float, default=d.warmup_p,
                   help="Nucleus warm-up: every token keeps its best experts until they hold this fraction of its "
                        "own top-k gate weight (at least k0), then the batch budget fills by mass; 0 = off. "
                        "Not served yet (the Triton kernels lack it): offline evaluation only.")
    g.add_argument("--xshare-request-budget", type=str, default=None,
                   help="Per-request budget m_r of xshare_spec (draft tokens of one request share it).")
    g.add_argument("--xshare-cap", type=int, default=None, help="Per-token cap k' of policy cap.")
    g.add_argument("--xshare-layer-budgets", type=str, default=None,
                   help="Per-layer budget overrides 'LAYER:BUDGET,...', e.g. '0:32,5:mass:0.95'.")
    g.add_argument("--xshare-min-score", type=float, default=d.min_score,
                   help="Drop a slot beyond k0 whose gate weight is below this value (0 keeps all).")
    g.add_argument("--xshare-mass-source", type=str, default=d.mass_source,
                   help="What the aggregated mass sums: 'topk' (each token's top-k gate weights) or 'full'.")
    g.add_argument("--xshare-no-fill-to-peak", dest="xshare_fill_to_peak", action="store_false",
                   help="xshare_ep: do not let the other ranks fill up to the busiest rank's load.")
    g.add_argument("--xshare-hard-cap", action="store_true",
                   help="xshare_ep: make the budget a hard cap on distinct experts (at most max(m_l, warm-up set)); "
                        "by default the per-rank budget ceil(m_l / EP) and filling to the peak may activate more.")
    g.add_argument("--xshare-apply-to-draft", action="store_true",
                   help="Also apply the policy to the draft model's MoE layers (speculative decoding).")
    g.add_argument("--xshare-apply-to-prefill", action="store_true",
                   help="Also apply the policy to prefill/extend batches (default: decode and target-verify only).")
    g.add_argument("--xshare-empty-slots", type=str, default=d.empty_slots,
                   help="How an empty (-1) slot reaches the MoE backend: 'minus_one', 'fill' (an expert the "
                        "token already uses, weight 0), 'distinct' (another expert the batch already uses, weight 0) "
                        "or 'auto' (per backend).")
    g.add_argument("--xshare-min-tokens", type=str, default=d.min_tokens,
                   help="Smallest decode batch (tokens) the policy is applied to; smaller batches keep SGLang's own "
                        "routing at no cost. 'auto': 2 for batch policies (a single token has nothing to share), "
                        "1 for cap.")
    g.add_argument("--xshare-ep-global", action="store_true",
                   help="When each EP rank routes only part of the batch (DP attention, DeepEP), choose one expert "
                        "set from all ranks' tokens (an all-reduce of the batch statistics in every target MoE layer).")
    g.add_argument("--xshare-metrics", action="store_true",
                   help="Live per-layer metrics counted inside the selection kernel (distinct experts vs plain "
                        "top-k, busiest EP rank, tokens, short tokens), logged and exported to Prometheus "
                        "(cumulative, sglang_xshare_*{layer,rank}) every --xshare-metrics-interval steps or 1 s.")
    g.add_argument("--xshare-metrics-interval", type=int, default=d.metrics_interval,
                   help="Decode steps between two metric flushes.")
    g.add_argument("--xshare-record-trace", type=str, default=None, metavar="PATH",
                   help="Record router logits of decode batches to PATH (sglang_xshare.trace .npz format).")
    g.add_argument("--xshare-record-trace-steps", type=int, default=d.record_trace_steps,
                   help="Decode steps to record before the trace file is written.")
    g.add_argument("--xshare-ab-switch", type=str, default=None, metavar="PATH",
                   help="Measurement mode: every MoE layer the policy applies to computes both SGLang's routing "
                        "and the policy's, and the file PATH picks at run time which one the experts get ('1' = "
                        "the policy, anything else or no file = SGLang's; read at decode-step ends), so "
                        "alternating them inside one server compares them on one server's state (bench/serve.py "
                        "--ab). What the arms pay: --xshare-ab-idle-arms.")
    g.add_argument("--xshare-ab-arm", action="append", default=None, metavar="SPEC",
                   help="Another policy arm of --xshare-ab-switch (repeat for more): its policy flags without "
                        "'--xshare-', e.g. 'policy=oea,warmup-k0=4' or 'policy=cap,cap=6'; the switch file's '2' "
                        "picks the first, '3' the second, ..., so one server compares "
                        "several policies on the same batches (bench/serve.py --ab --ab-one-server).")
    g.add_argument("--xshare-ab-idle-arms", choices=AB_IDLE_ARMS, default=d.ab_idle_arms,
                   help="The policy arms the A/B switch does not route by: 'skip' (default; their selection "
                        "kernels read the switch on the device and return at once, so each arm pays only its own "
                        "selection and the A/B ratio is net of it) or 'compute' (every arm selects in every layer; "
                        "the ratio is the expert cut alone, as the runs before this flag measured).")
    return parser


def _config_from_namespace(ns: argparse.Namespace) -> XShareServerConfig:
    return XShareServerConfig(
        policy=ns.xshare_policy,
        budget=ns.xshare_budget,
        warmup_k0=ns.xshare_warmup_k0,
        request_budget=ns.xshare_request_budget,
        cap=ns.xshare_cap,
        layer_budgets=ns.xshare_layer_budgets,
        min_score=ns.xshare_min_score,
        mass_source=ns.xshare_mass_source,
        fill_to_peak=ns.xshare_fill_to_peak,
        hard_cap=ns.xshare_hard_cap,
        warmup_p=ns.xshare_warmup_p,
        apply_to_draft=ns.xshare_apply_to_draft,
        apply_to_prefill=ns.xshare_apply_to_prefill,
        empty_slots=ns.xshare_empty_slots,
        min_tokens=ns.xshare_min_tokens,
        ep_global=ns.xshare_ep_global,
        metrics=ns.xshare_metrics,
        metrics_interval=ns.xshare_metrics_interval,
        record_trace=ns.xshare_record_trace,
        record_trace_steps=ns.xshare_record_trace_steps,
        ab_switch=ns.xshare_ab_switch,
        ab_arms=tuple(ns.xshare_ab_arm or ()),
        ab_idle_arms=ns.xshare_ab_idle_arms,
    )


def _default(field_name: str) -> Any:
    """A flag's default (the :class:`XShareServerConfig` field's)."""
    return XShareServerConfig.__dataclass_fields__[field_name].default


#: The fields an arm (``--xshare-ab-arm``) sets; the others come from the server's own flags.
ARM_FIELDS = ("policy", "budget", "warmup_k0", "request_budget", "cap", "layer_budgets", "min_score", "mass_source",
              "fill_to_peak", "hard_cap", "warmup_p", "min_tokens")


def arm_spec_argv(spec: str) -> list[str]:
    """``'policy=oea,warmup-k0=4'`` -> ``['--xshare-policy', 'oea', '--xshare-warmup-k0', '4']`` (a bare
    key is a switch: ``hard-cap`` -> ``--xshare-hard-cap``). Only the policy flags (:data:`ARM_FIELDS`)."""
    allowed = {"--xshare-" + f.replace("_", "-") for f in ARM_FIELDS if f != "fill_to_peak"} | {"--xshare-no-fill-to-peak"}
    argv: list[str] = []
    # split at the commas that start a key (``key=`` or a bare switch): a value may hold commas
    # (``layer-budgets=0:4,1:6``)
    for part in (p.strip() for p in re.split(r",(?=\s*[a-z][a-z0-9-]*\s*(?:=|,|$))", spec)):
        if not part:
            continue
        key, eq, value = part.partition("=")
        flag = "--xshare-" + key.strip()
        if flag not in allowed:
            raise XShareConfigError("--xshare-ab-arm", f"{spec!r}: {key.strip()!r} is not a policy flag; an arm takes "
                                    f"{', '.join(sorted(a[len('--xshare-'):] for a in allowed))}")
        argv += [flag, value.strip()] if eq else [flag]
    return argv


def arm_spec(xshare_argv: Sequence[str]) -> str:
    """Inverse of :func:`arm_spec_argv`: policy flags -> ``'policy=oea,warmup-k0=4'``."""
    takes = _takes_value()
    parts, i, argv = [], 0, list(xshare_argv)
    while i < len(argv):
        key = argv[i][len("--xshare-"):]
        if takes.get(argv[i], False):
            parts.append(f"{key}={argv[i + 1]}")
            i += 2
        else:
            parts.append(key)
            i += 1
    return ",".join(parts)


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`XShareConfigError` instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        flag = next((w.rstrip(":,") for w in message.split() if w.startswith(_PREFIX)), "--xshare-*")
        raise XShareConfigError(flag, message)


def _xshare_parser() -> argparse.ArgumentParser:
    return add_xshare_args(_RaisingParser(prog="sglang-xshare", add_help=False))


def _takes_value() -> dict[str, bool]:
    """``{flag: whether it consumes a value}`` for every ``--xshare-*`` option string."""
    out: dict[str, bool] = {}
    for action in _xshare_parser()._actions:
        for s in action.option_strings:
            out[s] = action.nargs != 0
    return out


def split_xshare_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a command line into ``(sglang_argv, xshare_argv)``.

    Accepts ``--xshare-x V`` and ``--xshare-x=V``; an unknown ``--xshare-*`` flag raises
    :class:`XShareConfigError` (SGLang would otherwise report it as its own unknown argument).
    """
    takes = _takes_value()
    sg: list[str] = []
    xs: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a.startswith(_PREFIX):
            name = a.split("=", 1)[0]
            if name not in takes:
                raise XShareConfigError(name, f"unknown flag; known: {', '.join(sorted(takes))}")
            xs.append(a)
            if takes[name] and "=" not in a:
                if i + 1 >= len(argv):
                    raise XShareConfigError(name, "expected a value")
                xs.append(argv[i + 1])
                i += 1
        else:
            sg.append(a)
        i += 1
    return sg, xs


def parse_xshare_argv(xshare_argv: Sequence[str], *, check_paths: bool = True) -> XShareServerConfig:
    """Parse and validate ``--xshare-*`` flags only (no model known yet); ``check_paths``: see
    :meth:`XShareServerConfig.validate`."""
    ns = _xshare_parser().parse_args(list(xshare_argv))
    return _config_from_namespace(ns).validate(check_paths=check_paths)


def build_parser(prog: str = "sglang-xshare-launch-server") -> argparse.ArgumentParser:
    """SGLang's own ``ServerArgs.add_cli_args`` parser plus the ``--xshare-*`` group (for ``--help``)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog=prog)
    ServerArgs.add_cli_args(parser)
    return add_xshare_args(parser)


def parse_server_argv(argv: Sequence[str]) -> tuple[Any, XShareServerConfig]:
    """``argv`` (without the program name) -> ``(ServerArgs, XShareServerConfig)``.

    The SGLang part goes through SGLang's ``prepare_server_args`` unchanged; the xshare part is
    validated here, then against the model's ``config.json`` when ``--model-path`` is a local
    directory, then against the server arguments (:func:`check_against_server_args`).
    Raises :class:`XShareConfigError` naming the flag.
    """
    sg_argv, xs_argv = split_xshare_argv(argv)
    cfg = parse_xshare_argv(xs_argv)
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(sg_argv)
    routing = None
    if cfg.selects:
        routing = routing_from_model_config(getattr(server_args, "model_path", None))
        if routing is not None:
            cfg.validate(routing)
    check_against_server_args(cfg, server_args, routing)
    return server_args, cfg


def check_against_server_args(cfg: XShareServerConfig, server_args: Any, routing: RoutingSpec | None = None) -> None:
    """Reject flag combinations that cannot work with the SGLang configuration (raw ``ServerArgs``),
    for the policy and every A/B arm; ``routing``: the model's, when known."""
    spec = getattr(server_args, "speculative_algorithm", None)
    if cfg.apply_to_draft and not spec:
        raise XShareConfigError("--xshare-apply-to-draft", "there is no draft model without --speculative-algorithm")
    for i, c in enumerate(cfg.arm_configs() if cfg.ab_arms else [cfg]):
        flag = "--xshare-policy" if i == 0 else "--xshare-ab-arm"
        if c.policy == "xshare_spec" and not spec:
            raise XShareConfigError(
                flag,
                "xshare_spec groups the draft tokens of each request in target-verify batches; "
                "it needs speculative decoding (--speculative-algorithm EAGLE|EAGLE3|NEXTN|...)",
            )
        if c.policy != "xshare_ep":
            continue
        ep = getattr(server_args, "ep_size", 1) or 1
        if ep <= 1:
            logger.warning("xshare_ep with --ep-size 1: one balance group, it behaves like xshare")
        mapped = (getattr(server_args, "ep_num_redundant_experts", 0) or 0) > 0 \
            or getattr(server_args, "init_expert_location", "trivial") not in (None, "trivial")
        if routing is not None and ep > 1 and routing.num_experts % ep and not mapped:
            raise XShareConfigError("--ep-size", f"{routing.num_experts} experts are not divisible by EP size {ep} and "
                                    "no placement map is given (--init-expert-location / --ep-num-redundant-experts): "
                                    "xshare_ep cannot place the experts on ranks")


_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token")


def routing_from_model_config(model_path: str | None) -> RoutingSpec | None:
    """Best-effort :class:`RoutingSpec` from a local ``config.json`` (``None`` if unknown).

    Used only to validate budgets against the model before SGLang starts; the hook builds the
    authoritative spec from SGLang's own ``TopK`` configuration at model load.
    """
    if not model_path:
        return None
    path = Path(model_path).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    E = next((cfg[k] for k in _EXPERT_KEYS if isinstance(cfg.get(k), int)), None)
    k = next((cfg[k] for k in _TOPK_KEYS if isinstance(cfg.get(k), int)), None)
    if not E or not k or k > E:
        return None
    return RoutingSpec(num_experts=int(E), top_k=int(k))
