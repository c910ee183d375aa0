"""Install the plugin into SGLang 0.5.23's MoE routing, without editing SGLang.

The production path, top-down:

1. :func:`install` (or SGLang's plugin loader through :func:`sglang_plugin`, in every SGLang
   process) starts the process's :class:`~.runtime.Runtime` and registers, for each SGLang module
   the plugin depends on, a callback run when the module is imported (at once if it is);
2. the callback checks the module against :mod:`.sglang_surface` (every name the plugin patches
   or reads, with its signature), then applies the module's patches (:mod:`.patches`: thin named
   wrappers of SGLang's functions);
3. the patched ``forward_context`` declares each running batch (:mod:`.context`);
4. the patched ``select_experts`` builds the layer's :class:`~.layer.LayerPolicy` at its first
   call and decides its path (:mod:`.route`: ``sglang`` / ``fast`` / ``general`` / ``legacy``);
5. the path runs the layer's :class:`~sglang_xshare.select.Selector` (one Triton launch on the
   fast path, :mod:`sglang_xshare.kernels`) and hands SGLang the routing.

Measurement (``--xshare-ab-switch``, :mod:`.measure`) and telemetry (``--xshare-metrics``,
``--xshare-record-trace``, :mod:`.telemetry`) are loaded only when configured.
"""

from __future__ import annotations

import logging
import types

from . import context, runtime, sglang_surface
from .config import ENV_VAR, XShareServerConfig
from .patches import PATCHES
from .patching import Patch, post_import_hooks
from .sglang_surface import SGLangSurfaceError, check_module

__all__ = ["install", "installed_config", "installed_patches", "sglang_plugin", "uninstall"]

logger = logging.getLogger("sglang_xshare.serving")

_PATCHES: list[Patch] = []


def installed_config() -> XShareServerConfig | None:
    """The config of the installed plugin, or ``None``."""
    rt = runtime.current()
    return None if rt is None else rt.cfg


def installed_patches() -> list[Patch]:
    """The plugin's patches (applied once their module is imported); ``[]`` when not installed."""
    return list(_PATCHES)


def _on_import(module: types.ModuleType) -> None:
    """An SGLang module the plugin depends on is imported: check its surface, apply its patches.
    A mismatch raises :class:`~.sglang_surface.SGLangSurfaceError`, or, with
    ``--xshare-sglang-mismatch fallback``, warns and removes the plugin from this process."""
    if not _PATCHES:
        return
    try:
        check_module(module)
    except SGLangSurfaceError as e:
        rt = runtime.current()
        fallback = rt is not None and rt.cfg.sglang_mismatch == "fallback"
        uninstall()
        if not fallback:
            raise
        logger.warning("xshare: %s\nxshare: --xshare-sglang-mismatch fallback: the plugin is off in this process; "
                       "SGLang's own routing serves", e)
        return
    for p in _PATCHES:
        if p.module == module.__name__:
            p.apply()


def install(cfg: XShareServerConfig) -> bool:
    """Install the plugin for ``cfg`` in this process; return whether anything was installed.

    Idempotent; a second call replaces the config. ``policy="off"`` without metrics or trace
    installs nothing (SGLang's routing stays bit-identical). SGLang modules not imported yet are
    checked and patched when they are imported. Raises
    :class:`~.sglang_surface.SGLangSurfaceError` when an imported SGLang module differs from the
    one the plugin is written for (unless ``cfg.sglang_mismatch == "fallback"``).
    """
    cfg.validate()
    if not cfg.active:
        uninstall()
        return False
    rt = runtime.current()
    if rt is not None and rt.cfg == cfg and _PATCHES:
        return True  # e.g. SGLang's plugin loader after the launcher's __mp_main__ fallback
    rt = runtime.start(cfg)
    context.set_step_end_listener(rt.on_step_end)
    if not _PATCHES:
        _PATCHES.extend(Patch(module, attr, wrapper) for module, attr, wrapper in PATCHES)
        for module in sglang_surface.modules():
            post_import_hooks.register(module, _on_import)
            if not _PATCHES:  # a mismatch removed the plugin (fallback)
                return False
    logger.info("xshare: plugin installed (policy=%s, metrics=%s, trace=%s)", cfg.policy, cfg.metrics, cfg.record_trace)
    return True


def uninstall() -> None:
    """Remove every patch and forget the state (SGLang is exactly as before)."""
    runtime.stop()
    context.set_step_end_listener(None)
    for p in reversed(_PATCHES):
        p.revert()
    _PATCHES.clear()
    post_import_hooks.clear()
    context.clear()


def sglang_plugin() -> None:
    """Entry point of SGLang's plugin group ``sglang.srt.plugins`` (run in every SGLang process).

    Installs the plugin when :data:`~.config.ENV_VAR` carries an active config; does nothing
    otherwise, so having sglang_xshare installed never changes SGLang by itself.
    """
    cfg = XShareServerConfig.from_env()
    if cfg is None or not cfg.active:
        return
    if install(cfg):
        logger.info("xshare: plugin active in this process (%s)", ENV_VAR)
