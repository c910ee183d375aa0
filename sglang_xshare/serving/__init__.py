"""SGLang integration: ``--xshare-*`` flags, the routing hook, live metrics, the trace recorder.

* :mod:`.flags` -- parse / validate the flags next to SGLang's ``ServerArgs``;
* :mod:`.hook` -- the hook into ``sglang.srt.layers.moe.topk`` (and SGLang's plugin entry point);
* :mod:`.slots` -- empty (``-1``) slots per MoE backend;
* :mod:`.api` -- :func:`enable` for ``sglang.Engine`` users;
* :mod:`.metrics`, :mod:`.recorder` -- live metrics and ``--xshare-record-trace``.

Importing this package imports neither SGLang nor torch: the names below are resolved on first
use, so the launcher and flag parsing (:mod:`.flags`) stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ENV_VAR": "flags",
    "XShareServerConfig": "flags",
    "parse_server_argv": "flags",
    "split_xshare_argv": "flags",
    "enable": "api",
    "disable": "api",
    "fill_empty_slots": "slots",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
