"""sglang-xshare: batch-aware expert selection for SGLang's expert-parallel MoE decode.

Pipeline: router logits -> **select** (:mod:`sglang_xshare.select`) -> dispatch
(:mod:`sglang_xshare.dispatch`: DeepEP | NCCL) -> experts -> combine.

Names are imported lazily so that light entry points (the Ray launcher, flag parsing) do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "POLICY_NAMES": "config",
    "Budget": "config",
    "BudgetSchedule": "config",
    "RoutingSpec": "config",
    "SelectionConfig": "config",
    "XShareConfigError": "config",
    "Placement": "placement",
    "SelectionOutput": "select",
    "Selector": "select",
    "get_policy": "select",
}

__all__ = [*_LAZY, "enable"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable(*args: Any, **kwargs: Any) -> Any:
    """Install xshare into SGLang in this process and its children (see :func:`sglang_xshare.serving.api.enable`)."""
    from .serving.api import enable as _enable

    return _enable(*args, **kwargs)
