"""The A/B switch's policy arms (``--xshare-ab-arm SPEC``): the arm mini-language and the arms' configs.

An arm is a policy spec ``KEY=VALUE,...`` of the policy flags without ``--xshare-``
(``policy=oea,warmup-k0=4``, ``policy=cap,cap=6``, a bare key is a switch: ``hard-cap``); arm
``i + 2`` of the switch file. Its policy flags replace the server's, every other flag is the
server's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from ...config import RoutingSpec, XShareConfigError
from ..cli_flags import parse_xshare_argv, takes_value
from ..config import XShareServerConfig

__all__ = ["ARM_FIELDS", "arm_configs", "arm_spec", "arm_spec_argv"]

#: The fields an arm (``--xshare-ab-arm``) sets; the others come from the server's own flags.
ARM_FIELDS = ("policy", "budget", "warmup_k0", "request_budget", "cap", "layer_budgets", "min_score", "mass_source",
              "fill_to_peak", "hard_cap", "warmup_p", "min_tokens", "verify_guard",
              "verify_budget")


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
    takes = takes_value()
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



def arm_configs(cfg: XShareServerConfig, routing: RoutingSpec | None = None, *,
                check_paths: bool = True) -> list[XShareServerConfig]:
    """The switch's policy arms: ``[cfg]`` then one config per ``--xshare-ab-arm`` (its policy
    flags over ``cfg``'s other flags; ``--xshare-ep-global`` kept where the arm's policy has batch
    statistics to share), each validated (against the model too, given ``routing``). Raises
    :class:`XShareConfigError` naming ``--xshare-ab-arm``."""
    out = [cfg]
    for spec in cfg.ab_arms:
        try:
            arm = parse_xshare_argv(arm_spec_argv(spec))
        except XShareConfigError as e:
            raise XShareConfigError("--xshare-ab-arm", f"{spec!r}: {e}") from None
        if arm.entry is None or arm.entry.plain_topk:
            raise XShareConfigError("--xshare-ab-arm", f"{spec!r}: an arm needs a policy other than off / topk "
                                    "(SGLang's routing is arm 0 already)")
        fields = {f: getattr(arm, f) for f in ARM_FIELDS}
        merged = dataclasses.replace(cfg, ab_arms=(), record_trace=None, **fields,
                                     ep_global=cfg.ep_global and arm.entry.ep_global)
        try:
            out.append(merged.validate(routing, check_paths=check_paths))
        except XShareConfigError as e:
            raise XShareConfigError("--xshare-ab-arm", f"{spec!r}: {e}") from None
    return out
