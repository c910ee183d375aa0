"""``python -m sglang_xshare.launch_server`` / ``sglang-xshare-launch-server``: SGLang's server with xshare.

Accepts every ``sglang.launch_server`` / ``sglang serve`` flag plus the ``--xshare-*`` flags
(:mod:`sglang_xshare.serving.cli_flags`), validates them, then starts SGLang's own ``run_server``
unchanged with the routing hook active in this process and in every process SGLang spawns:

* primary: SGLang's plugin loader (``load_plugins()`` runs at the start of every scheduler /
  TP / EP / DP-controller process) loads the ``sglang.srt.plugins`` entry point ``xshare``
  (:func:`sglang_xshare.serving.install.sglang_plugin`), which reads the config from the
  environment variable ``SGLANG_XSHARE_CONFIG`` this launcher exports;
* fallback when the entry point is not installed: ``multiprocessing``'s ``spawn`` re-imports the
  parent's main module (this one) as ``__mp_main__`` in every child, and the module body below
  installs the hook from the same environment variable.

Exit status 2 and ``error: --xshare-...: ...`` on a bad flag (argparse's convention).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from sglang_xshare.config import XShareConfigError
from sglang_xshare.serving.config import XShareServerConfig

PROG = "sglang-xshare-launch-server"


def _install_in_spawned_child() -> None:
    """The ``__mp_main__`` fallback: install from the environment if SGLang's plugin did not."""
    cfg = XShareServerConfig.from_env()
    if cfg is not None and cfg.active:
        from sglang_xshare.serving.install import install

        install(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, export the config, start SGLang. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from sglang_xshare.serving.cli_flags import build_parser

        build_parser(PROG).print_help()
        return 0
    from sglang_xshare.serving.cli_flags import parse_server_argv

    try:
        server_args, cfg = parse_server_argv(argv)
    except XShareConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from sglang_xshare.serving.api import activate

    activate(cfg, via_launcher=True)

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__mp_main__":
    _install_in_spawned_child()

if __name__ == "__main__":
    sys.exit(main())
