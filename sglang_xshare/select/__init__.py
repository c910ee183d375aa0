"""The select stage: router logits -> which experts each token uses (the one new pipeline stage).

Public API: :class:`Selector` (configured stage), :class:`SelectionOutput` (its result),
:func:`get_policy` (registry), :func:`policy_traits` (a policy's capabilities, torch-free), and
the contract types in :mod:`.contract`.

Importing this package imports no torch: the names below are resolved on first use, so that
flag parsing can read :mod:`.traits`.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "BatchContext": "contract",
    "Scores": "contract",
    "SelectionOutput": "contract",
    "PolicyEntry": "registry",
    "get_policy": "registry",
    "register_kernel": "registry",
    "PolicyTraits": "traits",
    "policy_traits": "traits",
    "policies_with": "traits",
    "compute_scores": "scoring",
    "Selector": "selector",
    "valid_mask": "selector",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY, globals())
