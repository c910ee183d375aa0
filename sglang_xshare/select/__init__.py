"""The select stage: router logits -> which experts each token uses (the one new pipeline stage).

Public API: :class:`Selector` (configured stage), :class:`SelectionOutput` (its result),
:func:`get_policy` (registry), and the contract types in :mod:`.contract`.
"""

from .contract import BatchContext, Scores, SelectionOutput
from .registry import PolicyEntry, get_policy, register_kernel
from .scoring import compute_scores
from .selector import Selector, valid_mask

__all__ = [
    "BatchContext",
    "Scores",
    "SelectionOutput",
    "PolicyEntry",
    "get_policy",
    "register_kernel",
    "compute_scores",
    "Selector",
    "valid_mask",
]
