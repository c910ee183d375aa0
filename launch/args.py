"""Flags of ``sglang-xshare-ray``: the launcher's own, and the SGLang / ``--xshare-*`` ones it passes on.

:func:`parse_args` validates everything that can be checked before a cluster is touched
(raising :class:`~sglang_xshare.config.XShareConfigError` naming the flag): the launcher's
numbers, ``--env`` pairs, ``--tp-size``/``--ep-size`` against the reserved GPUs, SGLang flags
the launcher sets itself, and the ``--xshare-*`` values (through the project's own parser,
:mod:`sglang_xshare.serving.cli_flags`). :func:`node_commands` turns the parsed flags and the
placed nodes into each node's argv and environment.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from sglang_xshare.config import XShareConfigError

from .commands import (
    PLACEHOLDERS,
    NodeContext,
    build_sglang_argv,
    check_no_launcher_flags,
    node_env,
    parse_env_pairs,
    render_command,
)

__all__ = ["LaunchArgs", "build_parser", "parse_args", "node_commands", "planned_contexts", "PLAN_PORT"]

#: Rendezvous port of a plan printed without a cluster (torch.distributed's usual default).
PLAN_PORT = 29500


def build_parser() -> argparse.ArgumentParser:
    """The launcher's own flags (SGLang and ``--xshare-*`` flags are passed through)."""
    p = argparse.ArgumentParser(
        prog="sglang-xshare-ray",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start an N-node SGLang server with xshare (or any per-node --command) on a Ray cluster.",
        epilog="Placeholders for --command and --health-url:\n"
        + "\n".join(f"  {{{k}}}: {v}" for k, v in PLACEHOLDERS.items())
        + "\nEverything after -- (and unknown flags) goes to sglang_xshare.launch_server.",
    )
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto = the local cluster / RAY_ADDRESS)")
    p.add_argument("--nnodes", type=int, required=True, help="number of nodes (one placement-group bundle each)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="accelerators reserved per node (default 8)")
    p.add_argument("--gpu-resource", default="GPU", help="Ray resource name of an accelerator (default GPU)")
    p.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs the node actor reserves (default 1)")
    p.add_argument("--tp-size", type=int, default=None, help="SGLang --tp-size (default nnodes * gpus-per-node)")
    p.add_argument("--ep-size", type=int, default=None, help="SGLang --ep-size (default: not passed)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="environment for every node (repeat)")
    p.add_argument("--cwd", default=None, help="working directory on every node (default: the launcher's)")
    p.add_argument("--command", default=None, help="run this shell command on every node instead of the server")
    p.add_argument("--health-url", default=None, help="health URL template (server default: http://{master_addr}:PORT/health)")
    p.add_argument("--health-timeout", type=float, default=1800.0, help="seconds to wait for the health URL (default 1800)")
    p.add_argument("--placement-timeout", type=float, default=120.0, help="seconds to wait for the placement group (default 120)")
    p.add_argument("--node-timeout", type=float, default=120.0, help="seconds a node may not answer before it counts as lost")
    p.add_argument("--stop-grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL at teardown (default 15)")
    p.add_argument("--tail-lines", type=int, default=40, help="lines of a failed node's log to print (default 40)")
    p.add_argument("--log-dir", default=None, help="also write node<R>.log files here, on the launcher's machine")
    p.add_argument("--node-log-dir", default=None, help="log directory on each node (default /tmp/sglang-xshare-ray/<run>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each node's exact command and exit: on a reachable cluster after reserving the "
                        "placement (real node addresses); without one (or with --node-ips) from the flags alone")
    p.add_argument("--node-ips", default=None, metavar="IP,IP,...",
                   help="--dry-run: the nodes' addresses (node 0 first: it holds the rendezvous); the plan is then "
                        "printed without contacting Ray (default: placeholders <node0-ip>, ... when no cluster answers)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port on node 0 (default: a free port found on node 0; 29500 in a plan printed "
                        "without a cluster)")
    return p


class LaunchArgs(argparse.Namespace):
    """Parsed launcher flags plus the passed-through ``sglang_flags`` and ``xshare_flags``
    (``node_ips``: the parsed ``--node-ips`` list or ``None``)."""

    sglang_flags: list[str]
    xshare_flags: list[str]
    node_ips: list[str] | None


def parse_args(argv: Sequence[str]) -> LaunchArgs:
    """Parse and validate; raises :class:`XShareConfigError` naming the flag."""
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    ns, unknown = build_parser().parse_known_args(argv, namespace=LaunchArgs())
    ns.sglang_flags, ns.xshare_flags = list(unknown + rest), []
    if ns.nnodes < 1:
        raise XShareConfigError("--nnodes", f"must be >= 1, got {ns.nnodes}")
    if ns.gpus_per_node < 1:
        raise XShareConfigError("--gpus-per-node", f"must be >= 1, got {ns.gpus_per_node}")
    if ns.tail_lines < 1:
        raise XShareConfigError("--tail-lines", f"must be >= 1, got {ns.tail_lines}")
    if ns.cpus_per_node < 0:
        raise XShareConfigError("--cpus-per-node", f"must be >= 0, got {ns.cpus_per_node}")
    for flag, val in (("--placement-timeout", ns.placement_timeout), ("--health-timeout", ns.health_timeout),
                      ("--node-timeout", ns.node_timeout), ("--stop-grace", ns.stop_grace)):
        if not val > 0:
            raise XShareConfigError(flag, f"must be > 0 seconds, got {val}")
    parse_env_pairs(ns.env)
    if ns.node_ips is not None:
        if not ns.dry_run:
            raise XShareConfigError("--node-ips", "only describes the nodes of a --dry-run plan (a launch places them with Ray)")
        ips = [x.strip() for x in ns.node_ips.split(",") if x.strip()]
        if len(ips) != ns.nnodes:
            raise XShareConfigError("--node-ips", f"expected {ns.nnodes} addresses (--nnodes), got {len(ips)}: {ips}")
        ns.node_ips = ips
    if ns.master_port is not None and not (1 <= ns.master_port <= 65535):
        raise XShareConfigError("--master-port", f"must be in [1, 65535], got {ns.master_port}")
    # Templates fail now, not after the placement: render them once for a stand-in node.
    probe = NodeContext(0, ns.nnodes, "10.0.0.1", 29500, "10.0.0.1", ns.gpus_per_node, "python")
    if ns.command is not None:
        render_command(ns.command, probe)
    if ns.health_url is not None:
        render_command(ns.health_url, probe, flag="--health-url")
    if ns.command is not None:
        if ns.sglang_flags:
            raise XShareConfigError("--command", f"runs its own command; unexpected server flags {ns.sglang_flags}")
        if ns.tp_size is not None or ns.ep_size is not None:
            raise XShareConfigError("--command", "--tp-size/--ep-size are server flags; put them in the command")
    else:
        # The project's own --xshare-* parser (imported here: it pulls in torch, --command does not need it).
        from sglang_xshare.serving.cli_flags import parse_xshare_argv, split_xshare_argv

        ns.sglang_flags, ns.xshare_flags = split_xshare_argv(ns.sglang_flags)
        check_no_launcher_flags(ns.sglang_flags)
        # bad --xshare-* values fail here, before any node starts; paths are the nodes' (relative to
        # --cwd there), each node checks them when its server starts
        parse_xshare_argv(ns.xshare_flags, check_paths=False)
        if ns.tp_size is None:
            ns.tp_size = ns.nnodes * ns.gpus_per_node
        if ns.tp_size < ns.nnodes or ns.tp_size % ns.nnodes:
            raise XShareConfigError("--tp-size", f"{ns.tp_size} must be a positive multiple of --nnodes {ns.nnodes}")
        if ns.tp_size // ns.nnodes > ns.gpus_per_node:
            raise XShareConfigError(
                "--tp-size", f"{ns.tp_size} needs {ns.tp_size // ns.nnodes} GPUs per node, --gpus-per-node is {ns.gpus_per_node}"
            )
        if ns.ep_size is not None and (ns.ep_size < 1 or ns.tp_size % ns.ep_size):
            raise XShareConfigError("--ep-size", f"{ns.ep_size} must divide --tp-size {ns.tp_size}")
    return ns


def node_commands(args: LaunchArgs, ctxs: Sequence[NodeContext]) -> tuple[list[list[str]], list[dict[str, str]]]:
    """Per-node argv and added environment for the parsed flags and the placed nodes."""
    user_env = parse_env_pairs(args.env)
    argvs: list[list[str]] = []
    for ctx in ctxs:
        if args.command is not None:
            argvs.append(["/bin/sh", "-c", render_command(args.command, ctx)])
        else:
            argvs.append(build_sglang_argv(ctx, args.sglang_flags, args.xshare_flags, tp_size=args.tp_size, ep_size=args.ep_size))
    envs = [node_env(ctx, user_env) for ctx in ctxs]
    return argvs, envs


def planned_contexts(args: LaunchArgs, python: str) -> list[NodeContext]:
    """The nodes of a ``--dry-run`` plan made without a cluster: ``--node-ips`` or placeholders
    ``<nodeR-ip>``, port ``--master-port`` or :data:`PLAN_PORT`, ``python`` on every node."""
    ips = args.node_ips or [f"<node{r}-ip>" for r in range(args.nnodes)]
    port = args.master_port or PLAN_PORT
    return [NodeContext(r, args.nnodes, ips[0], port, ips[r], args.gpus_per_node, python) for r in range(args.nnodes)]
