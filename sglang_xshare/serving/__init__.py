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

from .._lazy import lazy_attributes

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

__getattr__ = lazy_attributes(__name__, _LAZY, globals())
