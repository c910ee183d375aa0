"""Run one command per node on a Ray placement group and watch it until it ends.

:class:`NodeGroup` is the life cycle of a launch:

1. :meth:`NodeGroup.place` -- reserve the placement group (one bundle per node,
   ``STRICT_SPREAD``), put a :class:`~sglang_xshare.launch.node_actor.NodeProcess` actor in
   each bundle, learn each node's IP and pick a free port on node 0
   (-> one :class:`~sglang_xshare.launch.commands.NodeContext` per node);
2. :meth:`NodeGroup.start` -- start every node's command;
3. :meth:`NodeGroup.watch` -- stream output with ``[node R]`` prefixes, probe the health URL,
   and return an :class:`Outcome` as soon as a node fails (non-zero exit, an unexpected exit
   of a server, a dead actor or an unresponsive node) or every node finished with 0;
4. :meth:`NodeGroup.teardown` -- stop every process group (``SIGTERM``, grace, ``SIGKILL``),
   drain the last output, kill the actors and remove the placement group. Idempotent.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import health
from .commands import NodeContext
from .logs import NodeLogs, say
from .node_actor import guard_source, remote_class
from .placement_group import BundleSpec, PlacementGroup, bundle_node_ids, release, reserve

__all__ = ["NodeGroup", "NodeInfo", "Outcome"]

_HEALTH_EVERY_S = 2.0


@dataclass(frozen=True)
class NodeInfo:
    """Where node ``rank``'s actor runs (from :meth:`NodeProcess.info`)."""

    rank: int
    ip: str
    node_id: str
    hostname: str
    python: str
    resources: Mapping[str, float]
    cuda_visible_devices: str | None

    def describe(self) -> str:
        """``"IP (host HOSTNAME, ray node 1234abcd...)"``."""
        return f"{self.ip} (host {self.hostname}, ray node {self.node_id[:12]})"


@dataclass(frozen=True)
class Outcome:
    """How a watched launch ended.

    Attributes:
        ok: every node finished with exit code 0 (command mode).
        failed_rank: the node that failed first, or ``None`` (success, or a launch-wide
            failure such as a health timeout).
        reason: human-readable cause (``"exited with code 1"``, ``"node actor died: ..."``).
    """

    ok: bool
    failed_rank: int | None = None
    reason: str = ""


def _exit_reason(rc: int) -> str:
    if rc > 128 and (rc - 128) in signal.valid_signals():
        return f"exited with code {rc} (killed by {signal.Signals(rc - 128).name})"
    return f"exited with code {rc}"


class NodeGroup:
    """One launch on a Ray cluster (see the module docstring).

    Args:
        spec: what each node's bundle reserves.
        logs: printer/tail keeper for node output.
        node_log_dir: directory *on each node* for ``node<R>.log`` (and the guard script).
        name: placement group name (shows in ``ray status``/the dashboard).
    """

    def __init__(self, spec: BundleSpec, logs: NodeLogs, node_log_dir: str, name: str = "") -> None:
        self.spec = spec
        self.logs = logs
        self.node_log_dir = node_log_dir
        self.name = name
        self.pg: PlacementGroup | None = None
        self.actors: list[Any] = []
        self.infos: list[NodeInfo] = []
        self._dead: set[int] = set()
        self._torn_down = False

    # -- 1. place ----------------------------------------------------------------------
    def place(self, timeout_s: float, master_port: int | None = None) -> list[NodeContext]:
        """Reserve the bundles, start the actors, and return each node's context (rendezvous on
        node 0 at ``master_port``, default a free port found there).

        Raises:
            PlacementUnsatisfiable: the bundles could not be placed within ``timeout_s``.
            RuntimeError: a bundle's actor did not come up within ``timeout_s``.
        """
        self.pg = reserve(self.spec, timeout_s, name=self.name)
        cls = remote_class()
        guard = guard_source()
        opts = self.spec.actor_options()
        for rank in range(self.spec.nnodes):
            log_path = f"{self.node_log_dir}/node{rank}.log"
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank, placement_group_capture_child_tasks=False
            )
            self.actors.append(cls.options(scheduling_strategy=strategy, **opts).remote(rank, log_path, guard))
        refs = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            raise RuntimeError(f"node actors did not start within {timeout_s:g} s (--placement-timeout)")
        raw = ray.get(refs)
        expected = bundle_node_ids(self.pg)
        for rank, r in enumerate(raw):
            if r["node_id"] != expected[rank]:
                raise RuntimeError(f"node {rank}: actor runs on ray node {r['node_id']}, bundle is on {expected[rank]}")
        self.infos = [
            NodeInfo(rank, r["ip"], r["node_id"], r["hostname"], r["python"], r["resources"], r["cuda_visible_devices"])
            for rank, r in enumerate(raw)
        ]
        port = master_port or int(ray.get(self.actors[0].free_port.remote(), timeout=timeout_s))
        master = self.infos[0].ip
        return [
            NodeContext(
                node_rank=i.rank,
                nnodes=self.spec.nnodes,
                master_addr=master,
                master_port=port,
                node_ip=i.ip,
                gpus_per_node=int(self.spec.per_node),
                python=i.python,
            )
            for i in self.infos
        ]

    # -- 2. start ----------------------------------------------------------------------
    def start(self, argvs: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], cwd: str | None) -> None:
        """Start node ``r``'s ``argvs[r]`` with ``envs[r]`` added to its environment.

        Raises:
            RuntimeError: a node could not start its command (e.g. ``cwd`` missing there).
        """
        refs = [a.start.remote(list(argv), dict(env), cwd) for a, argv, env in zip(self.actors, argvs, envs)]
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=120)
            except ray.exceptions.RayTaskError as e:
                raise RuntimeError(f"node {rank} could not start its command: {getattr(e, 'cause', e)}") from None

    # -- 3. watch ----------------------------------------------------------------------
    def watch(
        self,
        *,
        server_mode: bool,
        health_url: str | None = None,
        health_timeout_s: float = 1800.0,
        unresponsive_s: float = 120.0,
        poll_interval_s: float = 0.25,
        on_healthy: Callable[[str, float], None] | None = None,
    ) -> Outcome:
        """Stream output until a node fails or (command mode) every node exits with 0.

        In ``server_mode`` any exit, even with 0, is a failure: a server should run until it
        is stopped. ``health_url`` (if given) is probed every 2 s until it answers 200, then
        ``on_healthy(url, seconds)`` is called once; no answer within ``health_timeout_s``
        ends the watch with a failure.
        """
        n = self.spec.nnodes
        pending: dict[int, tuple[Any, float]] = {}
        finished: dict[int, int] = {}
        t0 = time.monotonic()
        healthy = health_url is None
        next_probe = t0
        while True:
            now = time.monotonic()
            for rank in range(n):
                if rank not in pending and rank not in finished:
                    pending[rank] = (self.actors[rank].poll.remote(), now)
            refs = [ref for ref, _ in pending.values()]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=poll_interval_s)
            ready_set = set(ready)
            for rank in sorted(pending):
                ref, issued = pending[rank]
                if ref not in ready_set:
                    if time.monotonic() - issued > unresponsive_s:
                        self._dead.add(rank)
                        return Outcome(False, rank, f"node did not answer for {unresponsive_s:g} s (--node-timeout); node lost?")
                    continue
                del pending[rank]
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayError as e:
                    self._dead.add(rank)
                    return Outcome(False, rank, f"node actor died ({type(e).__name__}): the node or its Ray worker was lost")
                self.logs.emit(rank, res["lines"], res["dropped"])
                rc = res["returncode"]
                if rc is None:
                    continue
                finished[rank] = rc
                if rc != 0:
                    return Outcome(False, rank, _exit_reason(rc))
                if server_mode:
                    return Outcome(False, rank, "exited with code 0, but a server node must keep running")
            if len(finished) == n:
                return Outcome(True)
            now = time.monotonic()
            if not healthy and now >= next_probe:
                assert health_url is not None
                if health.probe(health_url):
                    healthy = True
                    if on_healthy is not None:
                        on_healthy(health_url, now - t0)
                elif now - t0 > health_timeout_s:
                    return Outcome(False, None, f"{health_url} did not answer 200 within {health_timeout_s:g} s (--health-timeout)")
                next_probe = now + _HEALTH_EVERY_S
            spent = time.monotonic() - now
            if not pending and spent < poll_interval_s:
                time.sleep(poll_interval_s - spent)

    # -- 4. teardown -------------------------------------------------------------------
    def teardown(self, grace_s: float = 15.0) -> None:
        """Stop every node's process group, print what they still said, free the cluster."""
        if self._torn_down:
            return
        self._torn_down = True
        live = [r for r in range(len(self.actors)) if r not in self._dead]
        stops = {r: self.actors[r].stop.remote(grace_s) for r in live}
        if stops:
            ray.wait(list(stops.values()), num_returns=len(stops), timeout=grace_s + 20.0)
        for r in live:
            self._drain(r)
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
        release(self.pg)
        self.pg = None

    def _drain(self, rank: int) -> None:
        try:
            while True:
                res = ray.get(self.actors[rank].poll.remote(), timeout=5.0)
                self.logs.emit(rank, res["lines"], res["dropped"])
                if not res["lines"]:
                    return
        except Exception:  # noqa: BLE001 - a lost node has nothing more to say
            return

    def report_failure(self, outcome: Outcome, tail_lines: int) -> None:
        """Print which node failed, why, and the tail of its log."""
        if outcome.failed_rank is None:
            say(f"launch failed: {outcome.reason}")
            return
        r = outcome.failed_rank
        where = self.infos[r].describe() if r < len(self.infos) else "?"
        say(f"node {r} at {where} failed: {outcome.reason}; the other nodes were stopped.")
        tail = self.logs.tail(r)[-tail_lines:]
        say(f"last {len(tail)} lines of node {r} (full log on that node: {self.node_log_dir}/node{r}.log):")
        for line in tail:
            say(f"  | {line}")
