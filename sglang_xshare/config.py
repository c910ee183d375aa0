"""Configuration of the select stage: what the model routes, and what the policy may keep.

Everything here is validated once, at configuration time, and raises
:class:`XShareConfigError` naming the offending flag. Nothing here runs per layer.

Two objects:

* :class:`RoutingSpec` -- how the *model* routes (fixed by its checkpoint):
  ``num_experts``, ``top_k``, scoring function, renormalisation, DeepSeek-style grouped
  top-k and correction bias.
* :class:`SelectionConfig` -- what the *policy* does: its name, the warm-up floor ``k0``,
  the batch budget ``m_l`` (:class:`Budget`, per layer via :class:`BudgetSchedule`), the
  per-request budget ``m_r`` of speculative decoding, the per-token cap of ``cap``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

__all__ = [
    "XShareConfigError",
    "Budget",
    "BudgetSchedule",
    "RoutingSpec",
    "SelectionConfig",
    "POLICY_NAMES",
    "Preset",
    "PRESETS",
    "resolve_preset",
]

#: Every policy the registry knows, in the order tables print them.
POLICY_NAMES: tuple[str, ...] = ("topk", "cap", "oea", "oea_simple", "xshare", "xshare_ep", "xshare_spec")

BudgetMode = Literal["count", "fraction", "mass"]


def unknown_policy(name: str, choices: Sequence[str]) -> str:
    """The message for a policy name that is not one of ``choices``; a name that is a budget
    preset (:data:`PRESETS`, ``auto``) or parses as a :class:`Budget` (``0.7``, ``mass:0.9``,
    ``24``) gets the flags that mean it."""
    msg = f"unknown policy {name!r}; choose from {', '.join(choices)}"
    try:
        is_budget = name.strip().lower() in PRESETS or Budget.parse(name) is not None
    except XShareConfigError:
        is_budget = False
    if is_budget:
        msg += f" ({name!r} is a batch budget: --xshare-policy xshare --xshare-budget {name})"
    return msg


class XShareConfigError(ValueError):
    """A configuration value is invalid. The message starts with the flag that carries it."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        self.detail = message
        super().__init__(f"{flag}: {message}")

    def renamed(self, names: Mapping[str, str]) -> "XShareConfigError":
        """The same error naming the flag as a front-end spells it (``names``: core -> front-end,
        e.g. ``{"--xshare-budget": "--budget"}``); flags not in ``names`` are kept."""
        detail = self.detail
        for core, front in names.items():  # flags named inside the message too ("--xshare-budget auto sets ...")
            detail = re.sub(re.escape(core) + r"(?![\w-])", front, detail)
        return XShareConfigError(names.get(self.flag, self.flag), detail)


@dataclass(frozen=True)
class Budget:
    """How many distinct experts a batch (or one request) may activate in one layer.

    Three modes, parsed from a string by :meth:`parse`:

    * ``"24"`` -> ``count``: at most 24 distinct experts (an absolute ``m``).
    * ``"0.6"`` or ``"frac:0.6"`` -> ``fraction``: ``m = ceil(0.6 * n_topk - 1e-6)`` where
      ``n_topk`` is the number of distinct experts plain top-k would activate for the same
      tokens (computed per batch and layer, on device).
    * ``"mass:0.9"`` -> ``mass``: the smallest set (warm-up experts first, then by
      descending aggregated mass) that keeps at least 90 % of the batch's top-k gating mass.

    In every mode the warm-up floor wins: if the tokens' top-``k0`` experts already exceed
    ``m``, all of them are kept (``m_eff = max(m, |warm-up set|)``).
    """

    mode: BudgetMode
    value: float

    @staticmethod
    def parse(text: str | int | float | "Budget", flag: str = "--xshare-budget") -> "Budget":
        """Parse ``"24"``, ``"0.6"``, ``"frac:0.6"`` or ``"mass:0.9"``; raise naming ``flag``."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, bool):
            raise XShareConfigError(flag, f"expected a budget, got {text!r}")
        if isinstance(text, int):
            return Budget._count(text, flag)
        if isinstance(text, float):
            return Budget._fraction(text, flag)
        s = str(text).strip().lower()
        if s.startswith("mass:"):
            v = Budget._number(s[5:], flag)
            if not (0.0 < v <= 1.0):
                raise XShareConfigError(flag, f"mass:X needs 0 < X <= 1, got {v}")
            return Budget("mass", v)
        if s.startswith("frac:"):
            return Budget._fraction(Budget._number(s[5:], flag), flag)
        if s.startswith("count:"):  # an explicit count: an integer, never a fraction
            v = Budget._number(s[6:], flag)
            if not v.is_integer():
                raise XShareConfigError(flag, f"count:N needs an integer number of experts, got {s[6:]!r}")
            return Budget._count(int(v), flag)
        v = Budget._number(s, flag)
        if v.is_integer() and ("." not in s and "e" not in s):
            return Budget._count(int(v), flag)
        return Budget._fraction(v, flag)

    @staticmethod
    def _number(s: str, flag: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise XShareConfigError(
                flag, f"cannot parse budget {s!r}; use an expert count (24), a fraction (0.6) or mass:0.9"
            ) from None
        if not math.isfinite(v):
            raise XShareConfigError(flag, f"budget must be finite, got {s!r}")
        return v

    @staticmethod
    def _count(v: int, flag: str) -> "Budget":
        if v < 1:
            raise XShareConfigError(flag, f"an expert count must be >= 1, got {v}")
        return Budget("count", float(v))

    @staticmethod
    def _fraction(v: float, flag: str) -> "Budget":
        if not (0.0 < v <= 1.0):
            raise XShareConfigError(flag, f"a fraction must be in (0, 1], got {v}")
        return Budget("fraction", float(v))

    def validate(self, num_experts: int, flag: str) -> None:
        """Raise if a ``count`` budget exceeds the number of experts."""
        if self.mode == "count" and self.value > num_experts:
            raise XShareConfigError(flag, f"budget {int(self.value)} exceeds the model's {num_experts} experts")

    def __str__(self) -> str:
        if self.mode == "count":
            return str(int(self.value))
        if self.mode == "fraction":
            return f"frac:{self.value:g}"
        return f"mass:{self.value:g}"


@dataclass(frozen=True)
class Preset:
    """A named operating point of the xshare policies, chosen from measurements.

    ``--xshare-budget NAME`` (``BudgetSchedule.parse(NAME)``) selects it: it sets the batch budget,
    the warm-up floor ``k0`` and the nucleus warm-up ``warmup_p`` together.

    Attributes:
        name: what ``--xshare-budget`` takes.
        budget: the batch budget (``Budget.parse`` text).
        k0: warm-up floor.
        warmup_p: nucleus warm-up (0 = off).
        bound_rel: the CE bound it was chosen for (CE delta / top-k CE at every batch size);
            ``tests/test_quality_default.py`` checks it on a fixed held-out slice.
        source: the results file it was chosen from.
    """

    name: str
    budget: str
    k0: int
    warmup_p: float
    bound_rel: float
    source: str


#: ``auto``: picked on the training split only (``bench/quality.py --pick-default``), validated on
#: held-out text; figures in ``bench/results/quality_default.md``.
PRESETS: dict[str, Preset] = {
    "auto": Preset("auto", budget="0.8", k0=3, warmup_p=0.0, bound_rel=0.005,
                   source="bench/results/quality_default.json"),
}


def resolve_preset(budget: str | int | float | Budget | None, k0: int | None, warmup_p: float | None,
                   layer_budgets: object = None, flag: str = "--xshare-budget") -> tuple[object, int, float]:
    """``(budget, k0, warmup_p)`` with a preset name (``auto``) expanded; other budgets pass through.

    ``k0`` / ``warmup_p``: ``None`` = not given (1 / 0 without a preset). A preset owns its k0 and
    nucleus: giving another value, or per-layer overrides, with it raises naming the flag.
    """
    name = budget.strip().lower() if isinstance(budget, str) else None
    if name not in PRESETS:
        return budget, 1 if k0 is None else k0, 0.0 if warmup_p is None else warmup_p
    pre = PRESETS[name]
    if k0 is not None and k0 != pre.k0:
        raise XShareConfigError("--xshare-warmup-k0", f"{flag} {name} sets k0={pre.k0}; do not give another")
    if warmup_p is not None and warmup_p != pre.warmup_p:
        raise XShareConfigError("--xshare-warmup-p", f"{flag} {name} sets warmup_p={pre.warmup_p}; do not give another")
    if layer_budgets:
        raise XShareConfigError("--xshare-layer-budgets", f"{flag} {name} is one preset for every layer")
    return pre.budget, pre.k0, pre.warmup_p


@dataclass(frozen=True)
class BudgetSchedule:
    """A default :class:`Budget` plus per-layer overrides (``{layer_id: Budget}``)."""

    default: Budget
    per_layer: Mapping[int, Budget] = field(default_factory=dict)

    def for_layer(self, layer_id: int | None) -> Budget:
        """The budget of ``layer_id`` (the default when the layer has no override)."""
        if layer_id is not None and layer_id in self.per_layer:
            return self.per_layer[layer_id]
        return self.default

    @staticmethod
    def parse(default: str | Budget, overrides: str | Mapping[int, str] | None = None,
              flag: str = "--xshare-budget", override_flag: str = "--xshare-layer-budgets") -> "BudgetSchedule":
        """``overrides`` is ``"0:32,5:mass:0.95"`` (layer:budget, comma separated) or a mapping.

        A preset name (``auto``, :data:`PRESETS`) gives the preset's budget; its ``k0`` and
        ``warmup_p`` are applied by :func:`resolve_preset` (the flags, the replay CLI do).
        """
        if isinstance(default, str) and default.strip().lower() in PRESETS:
            default, _, _ = resolve_preset(default, None, None, overrides, flag)
        per: dict[int, Budget] = {}
        if isinstance(overrides, str) and overrides.strip():
            for item in overrides.split(","):
                layer, sep, value = item.strip().partition(":")
                if not sep:
                    raise XShareConfigError(override_flag, f"expected LAYER:BUDGET, got {item!r}")
                try:
                    lid = int(layer)
                except ValueError:
                    raise XShareConfigError(override_flag, f"layer id must be an integer, got {layer!r}") from None
                if lid < 0:
                    raise XShareConfigError(override_flag, f"layer id must be >= 0, got {lid}")
                if lid in per:
                    raise XShareConfigError(override_flag, f"layer {lid} is given twice")
                per[lid] = Budget.parse(value, override_flag)
        elif isinstance(overrides, Mapping):
            per = {int(k): Budget.parse(v, override_flag) for k, v in overrides.items()}
        return BudgetSchedule(Budget.parse(default, flag), per)

    def validate(self, num_experts: int, flag: str = "--xshare-budget",
                 override_flag: str = "--xshare-layer-budgets") -> None:
        self.default.validate(num_experts, flag)
        for b in self.per_layer.values():
            b.validate(num_experts, override_flag)


@dataclass(frozen=True)
class RoutingSpec:
    """How the model routes each token (read from its config; never changed by a policy).

    Attributes:
        num_experts: logical routed experts ``E`` (shared experts excluded).
        top_k: experts per token ``k`` of the model's own router.
        scoring: ``"softmax"`` (Mixtral, Qwen3-MoE, GPT-OSS) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: whether the kept weights are divided by their sum (``norm_topk_prob``).
        num_expert_group / topk_group: DeepSeek grouped top-k (``n_group`` / ``topk_group``);
            ``None`` for ungrouped routers.
        has_correction_bias: DeepSeek-V3's ``e_score_correction_bias`` is added to the scores
            for *choosing* experts, not for their weights.
    """

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None
    topk_group: int | None = None
    has_correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise XShareConfigError("num_experts", f"must be >= 1, got {self.num_experts}")
        if not (1 <= self.top_k <= self.num_experts):
            raise XShareConfigError("top_k", f"need 1 <= top_k <= num_experts ({self.num_experts}), got {self.top_k}")
        if self.scoring not in ("softmax", "sigmoid"):
            raise XShareConfigError("scoring", f"must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise XShareConfigError("num_expert_group", "num_expert_group and topk_group go together")
        if self.num_expert_group is not None:
            g, tg = self.num_expert_group, self.topk_group
            assert tg is not None
            if g < 1 or self.num_experts % g:
                raise XShareConfigError("num_expert_group", f"{self.num_experts} experts do not split into {g} groups")
            if not (1 <= tg <= g):
                raise XShareConfigError("topk_group", f"need 1 <= topk_group <= {g}, got {tg}")
            if tg * (self.num_experts // g) < self.top_k:
                raise XShareConfigError("topk_group", f"{tg} groups of {self.num_experts // g} experts hold fewer than top_k={self.top_k}")


@dataclass(frozen=True)
class SelectionConfig:
    """What the select stage does, validated against a :class:`RoutingSpec` by :meth:`validate`.

    Attributes:
        policy: one of :data:`POLICY_NAMES`.
        k0: warm-up floor -- every non-padded token keeps its own top-``k0`` experts (``1 <= k0 <= k``).
        budget: batch budget ``m_l`` per layer (``xshare``, ``xshare_ep``, ``xshare_spec``).
        request_budget: per-request budget ``m_r`` (``xshare_spec`` only). ``None`` (the default): no
            request stage -- ``xshare_spec`` is then ``xshare`` over the union of the requests' tokens
            (measured: a request budget never beat the plain batch budget at equal expert ratio on the
            evaluation model, ``docs/policies.md``).
        cap: per-token cap ``k'`` of the ``cap`` policy (``1 <= k' <= k``).
        min_score: refinement floor -- a slot beyond the first ``k0`` is kept only if its gate
            weight (probability before renormalisation) is at least this value. 0 keeps all.
        mass_source: what "aggregated gating mass" sums: ``"topk"`` (each token's gate weights of
            its own top-k experts: the objective is then exactly the retained top-k mass) or
            ``"full"`` (each token's whole distribution over all experts).
        fill_to_peak: ``xshare_ep`` only -- once the busiest rank sets the peak, let the other
            ranks fill up to that peak (free for latency, more mass kept).
        hard_cap: ``xshare_ep`` only -- the budget is a hard cap on distinct experts: at most
            ``max(m_l, |warm-up set|)`` (by default the per-rank budget ``ceil(m_l / R)`` on every
            rank, and ``fill_to_peak``, may activate more than ``m_l``). The other budgeted
            policies never exceed ``max(m_l, |warm-up set|)``.
        warmup_p: nucleus warm-up (``oea`` and the xshare policies; 0 = off): every valid token
            keeps its best experts until they hold this fraction of its own top-k gate weight (at
            least ``k0``, at most ``k``), then the batch budget fills by mass. Reference path only
            (the Triton kernels do not implement it; :class:`~sglang_xshare.select.Selector` then
            runs the reference).
        verify_guard: verify-row guard ``K`` (0 = off): in speculative verify batches (requests of
            ``g >= 2`` consecutive rows) the first row of every request -- the target row -- keeps
            its own top-``K`` (its warm-up floor raised from ``k0`` to ``K``), the draft rows keep
            ``k0``; the budget applies on top. ``k0 < K <= k``; policies with a warm-up floor only
            (:attr:`~sglang_xshare.select.traits.PolicyTraits.verify_guard`). Other batches are
            unaffected (:class:`~sglang_xshare.select.Selector` sets ``BatchContext.guard_k`` only
            for calls with ``request_group >= 2``).
        verify_budget: the batch budget of speculative verify batches (calls with
            ``request_group >= 2``) in every layer, instead of ``budget``; ``None`` (the default):
            ``budget`` there too. Budgeted policies only. A milder cut for verify batches keeps
            the draft's acceptance (the measured lever: ``bench/results/quality_spec.md``).
    """

    policy: str = "xshare"
    k0: int = 1
    budget: BudgetSchedule | None = None
    request_budget: Budget | None = None
    cap: int | None = None
    min_score: float = 0.0
    mass_source: Literal["topk", "full"] = "topk"
    fill_to_peak: bool = True
    hard_cap: bool = False
    warmup_p: float = 0.0
    verify_guard: int = 0
    verify_budget: Budget | None = None

    def validate(self, routing: RoutingSpec) -> "SelectionConfig":
        """Check this config against the model; return ``self``. Raises :class:`XShareConfigError`."""
        if self.policy not in POLICY_NAMES:
            raise XShareConfigError("--xshare-policy", unknown_policy(self.policy, POLICY_NAMES))
        from .select.traits import policy_traits  # the traits module imports this one

        entry = policy_traits(self.policy)
        k = routing.top_k
        if not (1 <= self.k0 <= k):
            raise XShareConfigError("--xshare-warmup-k0", f"k0 must be in [1, top_k={k}], got {self.k0}")
        if entry.budgeted:
            if self.budget is None:
                raise XShareConfigError("--xshare-budget", f"policy {self.policy} needs a batch budget")
            self.budget.validate(routing.num_experts)
        if entry.uses_requests and self.request_budget is not None:
            self.request_budget.validate(routing.num_experts, "--xshare-request-budget")
        if entry.per_token_cap:
            if self.cap is None or not (1 <= self.cap <= k):
                raise XShareConfigError("--xshare-cap", f"{self.policy} needs 1 <= k' <= top_k={k}, got {self.cap}")
        if not (0.0 <= self.min_score < 1.0) or math.isnan(self.min_score):
            raise XShareConfigError("--xshare-min-score", f"must be in [0, 1), got {self.min_score}")
        if self.mass_source not in ("topk", "full"):
            raise XShareConfigError("--xshare-mass-source", f"must be 'topk' or 'full', got {self.mass_source!r}")
        if not (0.0 <= self.warmup_p <= 1.0) or math.isnan(self.warmup_p):
            raise XShareConfigError("--xshare-warmup-p", f"must be in [0, 1], got {self.warmup_p}")
        if self.warmup_p > 0 and not entry.warmup:
            raise XShareConfigError("--xshare-warmup-p", f"policy {self.policy} has no warm-up")
        if self.verify_guard:
            from .select.traits import policies_with

            if not entry.verify_guard:
                raise XShareConfigError("--xshare-verify-guard", f"policy {self.policy} has no warm-up floor to raise; "
                                        f"the guard needs one of {', '.join(policies_with('verify_guard'))}")
            if not (self.k0 < self.verify_guard <= k):
                raise XShareConfigError("--xshare-verify-guard", f"K must be in (k0={self.k0}, top_k={k}] (every row "
                                        f"keeps its top-k0 already; 0 = off), got {self.verify_guard}")
        if self.verify_budget is not None:
            if not entry.budgeted:
                raise XShareConfigError("--xshare-verify-budget", f"policy {self.policy} takes no batch budget")
            self.verify_budget.validate(routing.num_experts, "--xshare-verify-budget")
        return self
