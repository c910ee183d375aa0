"""sglang-xshare: batch-aware expert selection for SGLang's expert-parallel MoE decode.

Pipeline: router logits -> **select** (:mod:`sglang_xshare.select`) -> dispatch -> experts -> combine.
Served through SGLang (:mod:`sglang_xshare.serving`, the ``sglang.srt.plugins`` entry point), the
package adds the select stage and SGLang's MoE layer does the rest. :mod:`sglang_xshare.moe` and
:mod:`sglang_xshare.dispatch` are a standalone EP MoE layer (DeepEP | NCCL) that the EP benchmark
(``bench/ep_moe.py``) and its tests run; serving does not use them.

Names are imported lazily so that light entry points (the Ray launcher, flag parsing) do not
pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from ._checkout import map_subpackages
from ._lazy import lazy_attributes

map_subpackages()

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

__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def enable(*args: Any, **kwargs: Any) -> Any:
    """Install xshare into SGLang in this process and its children (see :func:`sglang_xshare.serving.api.enable`)."""
    from .serving.api import enable as _enable

    return _enable(*args, **kwargs)
