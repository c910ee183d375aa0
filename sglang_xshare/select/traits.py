"""What each policy is and needs: its capabilities, asked for by callers instead of its name.

Torch-free (flag parsing and the launchers read it); the registry's
:class:`~.registry.PolicyEntry` extends :class:`PolicyTraits` with the implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import POLICY_NAMES

__all__ = ["PolicyTraits", "TRAITS", "policy_traits", "policies_with"]


@dataclass(frozen=True)
class PolicyTraits:
    """A policy's capabilities.

    Attributes:
        name: registry name.
        budgeted: it takes (and needs) a batch budget ``m_l``.
        uses_requests: it reads the requests of the batch (``request_ids`` / ``request_group``) and
            takes a per-request budget ``m_r`` (optional: none = the batch budget over the union):
            speculative target-verify batches.
        uses_placement: it reads the placement, balances the EP ranks (``hard_cap``,
            ``fill_to_peak``) and chooses physical copies (returns ``physical_ids``).
        batch_aware: its choice for one token depends on the other tokens of the batch (a
            one-token batch has nothing to share with).
        ep_global: it has batch statistics that an all-reduce over ranks can share
            (``stats_reduce``: one expert set chosen from every rank's tokens).
        per_token_cap: it takes (and needs) a per-token cap ``k'``.
        plain_topk: it routes exactly as the model's own top-k (SGLang's routing).
        warmup: it has a warm-up floor ``k0`` (and can take the nucleus warm-up ``warmup_p``).
        verify_guard: it takes the verify-row guard ``guard_k`` (speculative verify batches: each
            request's target row warms up with its own top-``guard_k``; it raises a warm-up floor,
            so only policies with one).
    """

    name: str
    budgeted: bool = False
    uses_requests: bool = False
    uses_placement: bool = False
    batch_aware: bool = False
    ep_global: bool = False
    per_token_cap: bool = False
    plain_topk: bool = False
    warmup: bool = True
    verify_guard: bool = True


TRAITS: dict[str, PolicyTraits] = {
    t.name: t
    for t in (
        PolicyTraits("topk", plain_topk=True, warmup=False, verify_guard=False),
        PolicyTraits("cap", per_token_cap=True, warmup=False, verify_guard=False),
        PolicyTraits("oea", batch_aware=True, ep_global=True),
        PolicyTraits("oea_simple", batch_aware=True, ep_global=True),
        PolicyTraits("xshare", budgeted=True, batch_aware=True, ep_global=True),
        PolicyTraits("xshare_ep", budgeted=True, uses_placement=True, batch_aware=True, ep_global=True),
        PolicyTraits("xshare_spec", budgeted=True, uses_requests=True, batch_aware=True),
    )
}
assert tuple(TRAITS) == POLICY_NAMES

_CAPABILITIES = tuple(f.name for f in fields(PolicyTraits) if f.name != "name")


def policy_traits(name: str) -> PolicyTraits:
    """The capabilities of ``name``; ``KeyError`` lists the known names."""
    try:
        return TRAITS[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(TRAITS)}") from None


def policies_with(capability: str) -> tuple[str, ...]:
    """The names of the policies that have ``capability``, in registry order (messages, choices)."""
    if capability not in _CAPABILITIES:
        raise AttributeError(f"no policy capability {capability!r}; known: {', '.join(_CAPABILITIES)}")
    return tuple(n for n, t in TRAITS.items() if getattr(t, capability))
