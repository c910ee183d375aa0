"""``sglang-xshare-ray``: start an N-node SGLang server with xshare (or any per-node command) on Ray.

Usage::

    sglang-xshare-ray --nnodes 2 --gpus-per-node 8 [launcher options] -- \\
        --model-path deepseek-ai/DeepSeek-V3 --moe-a2a-backend deepep --xshare-policy xshare

    sglang-xshare-ray --nnodes 2 --gpus-per-node 8 --command \\
        'torchrun --nnodes {nnodes} --node-rank {node_rank} --master-addr {master_addr} \\
         --master-port {master_port} --nproc-per-node {gpus_per_node} bench/ep_moe.py'

Flags after ``--`` (and flags the launcher does not know) are SGLang flags and ``--xshare-*``
flags; every node runs ``python -m sglang_xshare.launch_server <SGLang flags> --nnodes N
--node-rank R --dist-init-addr IP:PORT --tp-size T [--ep-size E] <--xshare-* flags>``.
``--dry-run`` prints every node's command and exits: with the real addresses when a cluster
answers at ``--address``, else (or with ``--node-ips``) from the flags alone, without Ray.
Exit status: 0 when every node of a ``--command`` finished with 0, and after ``--dry-run``;
1 when a node failed (or the health URL never answered); 2 for bad flags, no reachable
cluster, or a placement that cannot be satisfied; 130 after Ctrl-C, 143 after SIGTERM.
A server launch runs until a node fails or the launcher is interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Sequence

from sglang_xshare.config import XShareConfigError

from .args import LaunchArgs, node_commands, parse_args, planned_contexts
from .commands import NodeContext, format_shell, health_url, render_command
from .logs import say

__all__ = ["main", "run"]

EXIT_FAILED = 1
EXIT_CONFIG = 2


class _Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _health(args: LaunchArgs, head: NodeContext) -> str | None:
    if args.health_url is not None:
        return render_command(args.health_url, head, flag="--health-url")
    if args.command is None:
        return health_url(head.master_addr, args.sglang_flags)
    return None


def _reachable(address: str, timeout_s: float = 10.0) -> str | None:
    """``None`` if ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP connection, else why not.

    ``ray.init`` retries an unreachable GCS for minutes; this fails fast instead. ``auto`` and
    other forms are left to Ray.
    """
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        return f"{hostport} does not accept connections ({e})"
    return None


def _install_signal_handlers() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def print_plan(args: LaunchArgs, cwd: str, why: str) -> int:
    """``--dry-run`` without a cluster: each node's command from the flags alone (exit 0)."""
    ctxs = planned_contexts(args, sys.executable)
    where = "--node-ips" if args.node_ips else "placeholders (pass --node-ips to fill them in)"
    say(f"dry run without placing ({why}): node addresses from {where}, rendezvous port {ctxs[0].master_port}, "
        f"python {sys.executable} on every node")
    argvs, envs = node_commands(args, ctxs)
    for ctx, argv, env in zip(ctxs, argvs, envs):
        print(f"# node {ctx.node_rank} at {ctx.node_ip}")
        print(format_shell(argv, env, cwd), flush=True)
    return 0


def run(args: LaunchArgs) -> int:
    """Connect, place, start, watch, tear down; returns the exit status."""
    cwd = args.cwd or os.getcwd()
    if args.dry_run and args.node_ips:
        return print_plan(args, cwd, "--node-ips given")
    import ray

    from .logs import NodeLogs
    from .placement_group import BundleSpec, PlacementUnsatisfiable
    from .supervisor import NodeGroup

    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    node_log_dir = os.path.abspath(args.node_log_dir or f"/tmp/sglang-xshare-ray/{run_id}")
    unreachable = _reachable(args.address)
    if unreachable is not None:
        if args.dry_run:
            return print_plan(args, cwd, f"no Ray cluster at --address {args.address!r}: {unreachable}")
        say(f"cannot connect to the Ray cluster at --address {args.address!r}: {unreachable}")
        return EXIT_CONFIG
    try:
        ray.init(address=args.address, log_to_driver=False, logging_level="ERROR", namespace="sglang-xshare-ray")
    except (ConnectionError, RuntimeError, ValueError) as e:
        if args.dry_run:
            return print_plan(args, cwd, f"no Ray cluster at --address {args.address!r}: {str(e).splitlines()[0]}")
        say(f"cannot connect to the Ray cluster at --address {args.address!r}: {e}")
        return EXIT_CONFIG
    _install_signal_handlers()  # after ray.init, which sets its own SIGTERM handler (sys.exit)
    spec = BundleSpec(args.nnodes, args.gpu_resource, args.gpus_per_node, args.cpus_per_node)
    logs = NodeLogs(args.nnodes, tail_lines=args.tail_lines, log_dir=args.log_dir)
    group = NodeGroup(spec, logs, node_log_dir=node_log_dir, name=f"sglang-xshare-{run_id}")
    status = EXIT_FAILED
    try:
        say(f"reserving {args.nnodes} x {spec.bundle()} (STRICT_SPREAD) ...")
        ctxs = group.place(args.placement_timeout, args.master_port)
        for info in group.infos:
            say(f"node {info.rank}: {info.describe()} resources {dict(info.resources)}")
        argvs, envs = node_commands(args, ctxs)
        if args.dry_run:
            for ctx, argv, env in zip(ctxs, argvs, envs):
                print(f"# node {ctx.node_rank} at {group.infos[ctx.node_rank].describe()}")
                print(format_shell(argv, env, cwd), flush=True)
            return 0
        say(f"dist-init-addr {ctxs[0].dist_init_addr}; node logs on each node under {node_log_dir}")
        group.start(argvs, envs, cwd)
        url = _health(args, ctxs[0])

        def on_healthy(u: str, seconds: float) -> None:
            from .health import base_url

            say(f"server is up after {seconds:.0f} s: {base_url(u)}  (health: {u})")

        outcome = group.watch(
            server_mode=args.command is None,
            health_url=url,
            health_timeout_s=args.health_timeout,
            unresponsive_s=args.node_timeout,
            on_healthy=on_healthy,
        )
        _ignore_signals()
        group.teardown(args.stop_grace)
        if outcome.ok:
            say(f"all {args.nnodes} nodes finished with exit code 0")
            status = 0
        else:
            group.report_failure(outcome, args.tail_lines)
            status = EXIT_FAILED
    except PlacementUnsatisfiable as e:
        say(str(e))
        status = EXIT_CONFIG
    except XShareConfigError as e:
        say(f"error: {e}")
        status = EXIT_CONFIG
    except RuntimeError as e:
        say(f"error: {e}")
        status = EXIT_FAILED
    except KeyboardInterrupt:
        say("interrupted (Ctrl-C): stopping every node ...")
        status = 128 + signal.SIGINT
    except _Terminated as t:
        say(f"received {signal.Signals(t.signum).name}: stopping every node ...")
        status = 128 + t.signum
    finally:
        _ignore_signals()
        group.teardown(args.stop_grace)
        logs.close()
        if status in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP):
            say("every node stopped; placement group removed")
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``sglang-xshare-ray``."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except XShareConfigError as e:
        say(f"error: {e}")
        return EXIT_CONFIG
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
