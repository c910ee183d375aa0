"""Serving configurations of the benchmark: ``NAME[@BUDGET][+KEY=VALUE...]`` -> server flags.

Examples::

    off                      SGLang's routing (the hook is not installed)
    plain                    SGLang's own launcher (python -m sglang.launch_server), no xshare at all
    topk                     the hook installed, policy topk (SGLang's routing)
    xshare@0.7               --xshare-policy xshare --xshare-budget 0.7
    xshare_ep@0.7            GPU-aware
    oea+k0=4                 --xshare-policy oea --xshare-warmup-k0 4
    cap+cap=6                --xshare-policy cap --xshare-cap 6
    xshare_spec@0.7+rb=0.75  --xshare-request-budget 0.75
    xshare@0.7+min=1         --xshare-min-tokens 1
    xshare@0.7+vb=0.9        --xshare-verify-budget 0.9 (speculative verify batches)
    oea+k0=1+guard=8         --xshare-verify-guard 8
    xshare_ep@0.7+global     EP-global selection (--xshare-ep-global)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServeConfig", "one_server", "parse_config", "parse_configs"]

_KEYS = {"k0": "--xshare-warmup-k0", "cap": "--xshare-cap", "rb": "--xshare-request-budget",
         "min": "--xshare-min-tokens", "empty": "--xshare-empty-slots", "vb": "--xshare-verify-budget",
         "guard": "--xshare-verify-guard"}
_SWITCHES = {"global": "--xshare-ep-global"}


@dataclass(frozen=True)
class ServeConfig:
    """One configuration: its label, whether it uses SGLang's own launcher, and its xshare flags."""

    label: str
    policy: str
    plain: bool = False
    flags: tuple[str, ...] = field(default=())
    #: one server, several policies (``--xshare-ab-arm``): the labels of switch arms 1, 2, ... (else empty)
    arms: tuple[str, ...] = field(default=())

    @property
    def selects(self) -> bool:
        return self.policy not in ("off", "plain", "topk")


def parse_config(text: str) -> ServeConfig:
    """``NAME[@BUDGET][+KEY=VALUE|+SWITCH...]`` -> :class:`ServeConfig` (``ValueError`` if malformed)."""
    head, *opts = text.strip().split("+")
    name, _, budget = head.partition("@")
    if not name:
        raise ValueError(f"empty configuration in {text!r}")
    if name == "plain":
        if budget or opts:
            raise ValueError("'plain' takes no budget or options")
        return ServeConfig(text.strip(), "plain", plain=True)
    flags: list[str] = []
    if name != "off":
        flags += ["--xshare-policy", name]
    elif budget or opts:
        raise ValueError("'off' takes no budget or options")
    if budget:
        flags += ["--xshare-budget", budget]
    for o in opts:
        k, eq, v = o.partition("=")
        if eq:
            if k not in _KEYS:
                raise ValueError(f"unknown option {k!r} in {text!r}; known: {', '.join(_KEYS)}")
            flags += [_KEYS[k], v]
        elif k in _SWITCHES:
            flags.append(_SWITCHES[k])
        else:
            raise ValueError(f"unknown switch {k!r} in {text!r}; known: {', '.join(_SWITCHES)}")
    return ServeConfig(text.strip(), name, False, tuple(flags))


def one_server(configs: list[ServeConfig]) -> ServeConfig:
    """Policy configurations as the arms of one A/B server: the first is the server's policy (switch
    arm 1), each other one a ``--xshare-ab-arm`` (arms 2, 3, ...); arm 0 is SGLang's routing.
    ``+global`` must be on all of them or none (it is the server's flag)."""
    from sglang_xshare.serving.measure.arms import arm_spec

    if not configs or any(not c.selects for c in configs):
        raise ValueError("one server's arms are policies; SGLang's routing (off / plain / topk) is arm 0 already")
    if len({"--xshare-ep-global" in c.flags for c in configs}) > 1:
        raise ValueError("+global is a server flag: give it to every configuration or to none")
    flags = list(configs[0].flags)
    for c in configs[1:]:
        flags += ["--xshare-ab-arm", arm_spec([f for f in c.flags if f != "--xshare-ep-global"])]
    return ServeConfig(" | ".join(c.label for c in configs), configs[0].policy, False, tuple(flags),
                       tuple(c.label for c in configs))


def parse_configs(text: str) -> list[ServeConfig]:
    """Comma-separated configurations."""
    out = [parse_config(t) for t in text.split(",") if t.strip()]
    if not out:
        raise ValueError("no configuration given")
    return out
