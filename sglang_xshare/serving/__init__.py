"""SGLang integration: ``--xshare-*`` flags, the routing hook, live metrics, the trace recorder.

* :mod:`.flags` -- parse / validate the flags next to SGLang's ``ServerArgs``;
* :mod:`.hook` -- the hook into ``sglang.srt.layers.moe.topk`` (and SGLang's plugin entry point);
* :mod:`.slots` -- empty (``-1``) slots per MoE backend;
* :mod:`.api` -- :func:`enable` for ``sglang.Engine`` users;
* :mod:`.metrics`, :mod:`.recorder` -- live metrics and ``--xshare-record-trace``.

Importing this package does not import SGLang.
"""

from .api import disable, enable
from .flags import ENV_VAR, XShareServerConfig, parse_server_argv, split_xshare_argv
from .slots import fill_empty_slots

__all__ = ["ENV_VAR", "XShareServerConfig", "parse_server_argv", "split_xshare_argv", "enable", "disable",
           "fill_empty_slots"]
