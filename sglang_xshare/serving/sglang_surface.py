"""Every SGLang name the plugin patches or reads, and the check that the installed SGLang has them.

The plugin is written against SGLang 0.5.23 (:data:`SGLANG_VERSION`). :data:`SURFACE` lists each
SGLang function it wraps (with its parameter names: the wrappers forward arguments by position
and name), each module flag, function and class field it reads. :func:`check_module` runs when an
SGLang module of the list is imported (or at install, if it already is), before the module's
patches are applied: a missing name or changed signature raises :class:`SGLangSurfaceError`
naming the installed SGLang version and the name -- or, with ``--xshare-sglang-mismatch fallback``,
logs a warning and the plugin leaves SGLang's own routing in place (:mod:`.install`). Never a
silently wrong path.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["SGLANG_VERSION", "SURFACE", "SGLangName", "SGLangSurfaceError", "TOPK_MODULE", "FORWARD_CONTEXT_MODULE",
           "EPLB_MODULE", "check_module", "installed_sglang_version", "modules", "problems"]

#: The SGLang release the plugin is written for.
SGLANG_VERSION = "0.5.23"

TOPK_MODULE = "sglang.srt.layers.moe.topk"
FORWARD_CONTEXT_MODULE = "sglang.srt.model_executor.forward_context"
EPLB_MODULE = "sglang.srt.eplb.expert_location"
MOE_UTILS_MODULE = "sglang.srt.layers.moe.utils"
RUNTIME_CONTEXT_MODULE = "sglang.srt.runtime_context"


@dataclass(frozen=True)
class SGLangName:
    """One SGLang name the plugin depends on.

    Attributes:
        module: dotted module name.
        attr: ``"name"`` or ``"Class.name"``.
        params: the callable's parameter names, exactly and in order (``inspect.signature``), or
            ``None`` (presence only).
        members: names the object must have (class fields, properties, attributes), or ``()``.
        use: what the plugin does with it (for the error message).
    """

    module: str
    attr: str
    params: tuple[str, ...] | None = None
    members: tuple[str, ...] = ()
    use: str = "read"


_TOPK_CONFIG_FIELDS = ("top_k", "use_grouped_topk", "topk_group", "num_expert_group", "renormalize",
                       "custom_routing_function", "correction_bias", "torch_native", "routed_scaling_factor",
                       "output_format", "runner_backend", "scoring_func", "sqrtsoftplus_log1p",
                       "allow_routed_experts_capture", "num_shared_topk_slots")

SURFACE: tuple[SGLangName, ...] = (
    # patched (the wrappers in .patches forward these parameters)
    SGLangName(TOPK_MODULE, "select_experts", ("hidden_states", "router_logits", "topk_config", "layer_id",
               "num_token_non_padded", "expert_location_dispatch_info", "dynamic_expert_bias",
               "router_logits_partials"), use="patched"),
    SGLangName(TOPK_MODULE, "_post_process_topk_ids", ("topk_ids", "topk_weights", "topk_config", "router_logits",
               "layer_id", "num_token_non_padded", "expert_location_dispatch_info", "padded_rows_masked"),
               use="patched"),
    SGLangName(TOPK_MODULE, "TopK.__init__", None, use="patched"),
    SGLangName(TOPK_MODULE, "TopK.bind_runner_backend", ("self", "runner_backend", "routing_method_type"),
               use="patched"),
    SGLangName(TOPK_MODULE, "TopK.empty_topk_output", ("self", "device", "layer_id"), use="patched"),
    SGLangName(FORWARD_CONTEXT_MODULE, "forward_context", ("ctx", "forward_batch"), use="patched"),
    SGLangName(EPLB_MODULE, "ExpertLocationMetadata.update", ("self", "other", "update_layer_ids"), use="patched"),
    # read
    SGLangName(TOPK_MODULE, "_is_hip"),
    SGLangName(TOPK_MODULE, "_use_aiter"),
    SGLangName(TOPK_MODULE, "envs", members=("SGLANG_SIMULATE_UNIFORM_EXPERTS", "SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS")),
    SGLangName(TOPK_MODULE, "TopKConfig", members=_TOPK_CONFIG_FIELDS),
    SGLangName(TOPK_MODULE, "StandardTopKOutput", members=("topk_weights", "topk_ids", "router_logits")),
    SGLangName(TOPK_MODULE, "get_global_expert_distribution_recorder", ()),
    SGLangName(TOPK_MODULE, "get_global_experts_capturer", ()),
    SGLangName(TOPK_MODULE, "capture_routed_experts_if_allowed", ("topk_config", "layer_id", "topk_ids")),
    SGLangName(TOPK_MODULE, "is_routed_scaling_factor_fused_in_topk", ("topk_config",)),
    SGLangName(EPLB_MODULE, "get_global_expert_location_metadata", ()),
    SGLangName(EPLB_MODULE, "ExpertLocationMetadata", members=("physical_to_logical_map",
               "physical_to_logical_map_cpu", "num_logical_experts", "num_layers", "ep_size")),
    SGLangName(MOE_UTILS_MODULE, "get_moe_a2a_backend", ()),
    SGLangName(MOE_UTILS_MODULE, "get_speculative_moe_a2a_backend", ()),
    SGLangName(MOE_UTILS_MODULE, "is_moe_input_scattered_across_dp_ranks", ()),
    SGLangName(RUNTIME_CONTEXT_MODULE, "get_parallel", ()),
)


class SGLangSurfaceError(RuntimeError):
    """The installed SGLang lacks a name the plugin patches or reads, or its signature changed."""


def installed_sglang_version() -> str:
    """The installed SGLang's version (``"unknown"`` when its metadata is missing)."""
    try:
        return version("sglang")
    except PackageNotFoundError:
        return str(getattr(sys.modules.get("sglang"), "__version__", "unknown"))


def _lookup(module: Any, attr: str) -> tuple[bool, Any]:
    owner: Any = module
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p, None)
        if owner is None:
            return False, None
    if isinstance(owner, type):
        try:
            return True, inspect.getattr_static(owner, name)
        except AttributeError:
            return False, None
    return (True, getattr(owner, name)) if hasattr(owner, name) else (False, None)


def _has_member(obj: Any, member: str) -> bool:
    if dataclasses.is_dataclass(obj) and member in {f.name for f in dataclasses.fields(obj)}:
        return True
    if isinstance(obj, type) and member in getattr(obj, "_fields", ()):  # NamedTuple
        return True
    try:
        inspect.getattr_static(obj, member)
        return True
    except AttributeError:
        return False


def problems(module: Any, names: tuple[SGLangName, ...] = SURFACE) -> list[str]:
    """What of ``names`` (those of ``module``, an imported module) the module lacks or changed."""
    out = []
    for n in names:
        if n.module != module.__name__:
            continue
        found, obj = _lookup(module, n.attr)
        what = f"{n.module}.{n.attr} ({n.use} by sglang_xshare)"
        if not found:
            out.append(f"{what} is missing")
            continue
        if n.params is not None:
            fn = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
            try:
                got = tuple(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                got = None
            if got != n.params:
                out.append(f"{what} has parameters {got}, expected {n.params}")
        missing = [m for m in n.members if not _has_member(obj, m)]
        if missing:
            out.append(f"{what} lacks {', '.join(missing)}")
    return out


def modules(names: tuple[SGLangName, ...] = SURFACE) -> tuple[str, ...]:
    """The SGLang modules of ``names``, in first-use order."""
    return tuple(dict.fromkeys(n.module for n in names))


def check_module(module: Any, names: tuple[SGLangName, ...] = SURFACE) -> None:
    """Raise :class:`SGLangSurfaceError` when ``module`` lacks or changed a name of ``names``."""
    found = problems(module, names)
    if found:
        raise SGLangSurfaceError(
            f"sglang_xshare is written for SGLang {SGLANG_VERSION}, but SGLang {installed_sglang_version()} is "
            f"installed and differs: {'; '.join(found)}. Install sglang=={SGLANG_VERSION}, or start with "
            "--xshare-sglang-mismatch fallback to serve with SGLang's own routing instead.")
