"""sglang-xshare: batch-aware expert selection for SGLang's expert-parallel MoE decode.

Pipeline: router logits -> **select** (:mod:`sglang_xshare.select`) -> dispatch
(:mod:`sglang_xshare.dispatch`: DeepEP | NCCL) -> experts -> combine.
"""

from .config import POLICY_NAMES, Budget, BudgetSchedule, RoutingSpec, SelectionConfig, XShareConfigError
from .placement import Placement
from .select import SelectionOutput, Selector, get_policy

__version__ = "0.1.0"

__all__ = [
    "POLICY_NAMES",
    "Budget",
    "BudgetSchedule",
    "RoutingSpec",
    "SelectionConfig",
    "XShareConfigError",
    "Placement",
    "SelectionOutput",
    "Selector",
    "get_policy",
    "enable",
]


def enable(*args, **kwargs):
    """Install xshare into SGLang in this process and its children (see :func:`sglang_xshare.serving.api.enable`)."""
    from .serving.api import enable as _enable

    return _enable(*args, **kwargs)
