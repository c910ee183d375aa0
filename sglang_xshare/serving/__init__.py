"""SGLang integration: the xshare plugin for SGLang 0.5.23's MoE routing.

The production path, top-down (see :mod:`.install`):

* :mod:`.install` -- install / uninstall, SGLang's plugin entry point (:mod:`.hook` names it);
* :mod:`.sglang_surface` -- every SGLang name the plugin patches or reads, checked at install;
* :mod:`.patches` -- the named wrappers of SGLang's functions (:mod:`.patching` applies them);
* :mod:`.context` -- which batch SGLang's model runner is running;
* :mod:`.runtime` -- the process state (config, built layers, telemetry);
* :mod:`.layer` -- one MoE layer's policy and paths;
* :mod:`.route`, :mod:`.route_general` -- the ``sglang`` / ``fast`` / ``general`` / ``legacy`` paths;
* :mod:`.slots` -- empty (``-1``) slots per MoE backend.

Configuration: :mod:`.config` (the validated dataclass, carried to child processes in
:data:`~.config.ENV_VAR`), :mod:`.cli_flags` (the ``--xshare-*`` flags next to SGLang's
``ServerArgs``), :mod:`.api` (:func:`enable` for ``sglang.Engine`` users). Add-ons loaded only
when configured: :mod:`.telemetry` (live metrics, trace recorder) and :mod:`.measure` (the
in-server A/B switch).

Importing this package imports neither SGLang nor torch: the names below are resolved on first
use, so the launcher and flag parsing stay light.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "ENV_VAR": "config",
    "XShareServerConfig": "config",
    "parse_server_argv": "cli_flags",
    "split_xshare_argv": "cli_flags",
    "enable": "api",
    "disable": "api",
    "fill_empty_slots": "slots",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY, globals())
