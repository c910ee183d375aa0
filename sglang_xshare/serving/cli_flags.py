"""The ``--xshare-*`` command line: ``argparse`` registration, splitting and parsing next to SGLang's flags.

SGLang's own flags stay SGLang's: :func:`parse_server_argv` splits ``argv`` into the xshare part
and the SGLang part, hands the SGLang part to SGLang's own ``prepare_server_args`` (so ``--config``,
logging set-up and every SGLang check behave exactly as under ``sglang serve``) and parses the
xshare part here into an :class:`~.config.XShareServerConfig` (validated there). :func:`build_parser`
puts both sets of flags on one parser for ``--help``. Errors are
:class:`~sglang_xshare.config.XShareConfigError` naming the flag.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..config import PRESETS, RoutingSpec, XShareConfigError
from .config import AB_IDLE_ARMS, SERVER_POLICIES, SGLANG_MISMATCH, XShareServerConfig

__all__ = [
    "add_xshare_args",
    "build_parser",
    "split_xshare_argv",
    "parse_xshare_argv",
    "parse_server_argv",
    "check_against_server_args",
    "routing_from_model_config",
    "takes_value",
]

logger = logging.getLogger(__name__)

_PREFIX = "--xshare-"

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
                   help="Per-request budget m_r of xshare_spec (draft tokens of one request share it); without it "
                        "xshare_spec selects as xshare over the verify batch (the measured default).")
    g.add_argument("--xshare-verify-guard", type=int, default=d.verify_guard, metavar="K",
                   help="Verify-row guard (speculative decoding): in target-verify batches the first row of every "
                        "request -- the target row, whose prediction decides whether the first draft token is "
                        "accepted -- keeps its own top-K experts (its warm-up floor raised from k0 to K), the draft "
                        "rows keep k0; the batch budget applies on top (more experts where the target rows' top-K "
                        "exceed it). Decode batches are unaffected. 0 = off; k0 < K <= top_k; policies with a "
                        "warm-up floor (oea, oea_simple, xshare, xshare_ep, xshare_spec). Measured offline in "
                        "bench/results/quality_guard.md.")
    g.add_argument("--xshare-verify-budget", type=str, default=None, metavar="B",
                   help="Batch budget of speculative target-verify batches (a count, a fraction or mass:X; no "
                        "preset), in every layer instead of --xshare-budget; decode batches keep --xshare-budget. "
                        "A milder cut for verify batches keeps the draft's acceptance (offline, budget 0.9 instead "
                        "of 0.8 at 7 draft tokens: oracle acceptance 0.72-0.78 -> 0.85-0.88, "
                        "bench/results/quality_spec.md). Budgeted policies (xshare, xshare_ep, xshare_spec).")
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
                        "1 for cap; with a count budget m (xshare, xshare_spec without a request budget) at least "
                        "m // top_k + 1, since smaller batches cannot activate more than m experts.")
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
                        "the ratio is the expert cut alone).")
    g.add_argument("--xshare-sglang-mismatch", choices=SGLANG_MISMATCH, default=d.sglang_mismatch,
                   help="When the installed SGLang lacks a function, flag or field the plugin patches or reads, or "
                        "a signature changed: 'error' (default; the process stops, naming the SGLang version and "
                        "the name) or 'fallback' (a warning, and SGLang's own routing in that process).")
    return parser


def _config_from_namespace(ns: argparse.Namespace) -> XShareServerConfig:
    return XShareServerConfig(
        policy=ns.xshare_policy,
        budget=ns.xshare_budget,
        warmup_k0=ns.xshare_warmup_k0,
        request_budget=ns.xshare_request_budget,
        verify_guard=ns.xshare_verify_guard,
        verify_budget=ns.xshare_verify_budget,
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
        sglang_mismatch=ns.xshare_sglang_mismatch,
    )



class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`XShareConfigError` instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        flag = next((w.rstrip(":,") for w in message.split() if w.startswith(_PREFIX)), "--xshare-*")
        raise XShareConfigError(flag, message)


def _xshare_parser() -> argparse.ArgumentParser:
    return add_xshare_args(_RaisingParser(prog="sglang-xshare", add_help=False))


def takes_value() -> dict[str, bool]:
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
    takes = takes_value()
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
    configs = [cfg]
    if cfg.ab_arms:
        from .measure.arms import arm_configs  # the arm mini-language: only with --xshare-ab-arm

        configs = arm_configs(cfg)
    for i, c in enumerate(configs):
        flag = "--xshare-policy" if i == 0 else "--xshare-ab-arm"
        traits = c.entry
        if traits is None:
            continue
        if c.verify_guard and not spec:
            raise XShareConfigError(
                "--xshare-verify-guard" if i == 0 else flag,
                "guards the target rows of speculative target-verify batches; there are none without "
                "--speculative-algorithm (EAGLE|EAGLE3|NEXTN|...)",
            )
        if c.verify_budget is not None and not spec:
            raise XShareConfigError(
                "--xshare-verify-budget" if i == 0 else flag,
                "is the budget of speculative target-verify batches; there are none without "
                "--speculative-algorithm (EAGLE|EAGLE3|NEXTN|...)",
            )
        if traits.uses_requests and not spec:
            raise XShareConfigError(
                flag,
                f"{c.policy} groups the draft tokens of each request in target-verify batches; "
                "it needs speculative decoding (--speculative-algorithm EAGLE|EAGLE3|NEXTN|...)",
            )
        if not traits.uses_placement:
            continue
        ep = getattr(server_args, "ep_size", 1) or 1
        if ep <= 1:
            logger.warning("%s with --ep-size 1: one balance group, it behaves like xshare", c.policy)
        mapped = (getattr(server_args, "ep_num_redundant_experts", 0) or 0) > 0 \
            or getattr(server_args, "init_expert_location", "trivial") not in (None, "trivial")
        if routing is not None and ep > 1 and routing.num_experts % ep and not mapped:
            raise XShareConfigError("--ep-size", f"{routing.num_experts} experts are not divisible by EP size {ep} and "
                                    "no placement map is given (--init-expert-location / --ep-num-redundant-experts): "
                                    f"{c.policy} cannot place the experts on ranks")


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
