"""``sglang_xshare.enable(...)``: xshare for ``sglang.Engine`` users (no launcher).

>>> import sglang_xshare
>>> sglang_xshare.enable(policy="xshare", budget="0.6", warmup_k0=1)
>>> import sglang as sgl
>>> llm = sgl.Engine(model_path="Qwen/Qwen3-30B-A3B", tp_size=2, ep_size=2)

``enable`` validates the flags, exports them in :data:`~.config.ENV_VAR` (inherited by the
scheduler / TP / EP processes ``sgl.Engine`` spawns, where SGLang's plugin loader runs
:func:`~.install.sglang_plugin`) and installs the hook in the calling process too.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from typing import Any

from .config import ENV_VAR, XShareServerConfig
from .install import install, uninstall

__all__ = ["enable", "disable", "plugin_registered", "PLUGIN_GROUP", "PLUGIN_NAME"]

logger = logging.getLogger("sglang_xshare.serving")

#: SGLang's general plugin entry-point group and this package's plugin name in it.
PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "xshare"


def plugin_registered() -> bool:
    """Whether the installed distribution declares the ``sglang.srt.plugins`` entry point."""
    return any(ep.name == PLUGIN_NAME and ep.value.startswith("sglang_xshare.") for ep in entry_points(group=PLUGIN_GROUP))


def _allow_plugin_in_whitelist(environ: dict[str, str]) -> None:
    """SGLang's ``SGLANG_PLUGINS`` whitelist, when set, must name this plugin."""
    allowed = environ.get("SGLANG_PLUGINS", "")
    if allowed.strip():
        names = [x.strip() for x in allowed.split(",") if x.strip()]
        if PLUGIN_NAME not in names:
            environ["SGLANG_PLUGINS"] = ",".join(names + [PLUGIN_NAME])


def activate(cfg: XShareServerConfig, environ: dict[str, str] | None = None,
             via_launcher: bool = False) -> XShareServerConfig:
    """Validate ``cfg``, export it for child processes and install it here.

    ``via_launcher``: called by :mod:`sglang_xshare.launch_server`, whose ``__mp_main__``
    fallback reaches the children even without the plugin entry point.
    """
    env = os.environ if environ is None else environ
    cfg.validate()
    if not cfg.active:
        env.pop(ENV_VAR, None)
        uninstall()
        return cfg
    cfg.export_env(env)
    _allow_plugin_in_whitelist(env)
    if not plugin_registered():
        if via_launcher:
            logger.warning("xshare: the SGLang plugin entry point (%s: %s) is not installed; child processes get "
                           "the hook from the launcher module instead (multiprocessing re-imports it as __mp_main__)",
                           PLUGIN_GROUP, PLUGIN_NAME)
        else:
            logger.warning(
                "xshare: the SGLang plugin entry point (%s: %s) is not installed, so SGLang's child processes will "
                "not load the hook; reinstall sglang_xshare (pip install -e .) or start the server with "
                "python -m sglang_xshare.launch_server", PLUGIN_GROUP, PLUGIN_NAME)
    install(cfg)
    return cfg


def enable(policy: str = "xshare", budget: str | int | float | None = None, warmup_k0: int = 1,
           request_budget: str | int | float | None = None, cap: int | None = None,
           layer_budgets: str | dict[int, Any] | None = None, **options: Any) -> XShareServerConfig:
    """Turn xshare on for SGLang in this process and every process it spawns afterwards.

    Args mirror the ``--xshare-*`` flags: ``policy`` (``off`` | ``topk`` | ``cap`` | ``oea`` |
    ``oea_simple`` | ``xshare`` | ``xshare_ep`` | ``xshare_spec``), ``budget`` (``24``, ``0.6``,
    ``"mass:0.9"``), ``warmup_k0``, ``request_budget``, ``cap``, ``layer_budgets``
    (``"0:32,5:mass:0.95"`` or ``{0: 32}``) and, as keywords, every other
    :class:`~.config.XShareServerConfig` field (``metrics=True``, ``record_trace="t.npz"``,
    ``apply_to_draft=True``, ``empty_slots="fill"``, ...).

    Returns:
        the validated config. Raises :class:`~sglang_xshare.config.XShareConfigError` naming the flag.
    """
    if isinstance(layer_budgets, dict):
        layer_budgets = ",".join(f"{int(k)}:{v}" for k, v in layer_budgets.items())
    cfg = XShareServerConfig(
        policy=policy,
        budget=None if budget is None else str(budget),
        warmup_k0=int(warmup_k0),
        request_budget=None if request_budget is None else str(request_budget),
        cap=cap,
        layer_budgets=layer_budgets,
        **options,
    )
    return activate(cfg)


def disable() -> None:
    """Undo :func:`enable` in this process (children already started keep their hook)."""
    os.environ.pop(ENV_VAR, None)
    uninstall()
