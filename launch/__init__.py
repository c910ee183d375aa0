"""Multi-node launch helpers for SGLang servers with xshare (import path ``sglang_xshare.launch``).

* :mod:`sglang_xshare.launch.ray_launcher` -- ``sglang-xshare-ray``: one command that reserves
  one bundle per node on a Ray cluster and starts ``python -m sglang_xshare.launch_server``
  (or any ``--command``) on every node with the right ``--nnodes/--node-rank/--dist-init-addr``.

Nothing here imports Ray at module import time except the modules that need it
(:mod:`.placement_group`, :mod:`.node_actor`, :mod:`.supervisor`), so the command builders
can be used and tested without a cluster.
"""
