"""``sglang-xshare-ray`` on a real local Ray cluster (CPU, loopback only).

The cluster: ``ray start --head`` on 127.0.0.2 and a raylet on 127.0.0.3, both with a custom
resource ``fake_gpu: 2`` that stands for the GPUs, plus a raylet on 127.0.0.4 with
``crash_gpu: 2`` (as has the head) that the killed-node test kills. Ray rewrites 127.0.0.1 to
the machine's public address; the rest of 127.0.0.0/8 is loopback and kept as given, which
also gives every node its own IP. Every ``ray start`` runs in its own session and temp dir;
the module finalizer kills exactly those process groups and their descendants, by pid
(``ray stop --force`` would kill every Ray process on the machine, other users' included).

Real workloads go through the launcher as a subprocess (the console entry point's module):
a shell/python one-liner per node, a torch.distributed gloo all_reduce across both nodes
with torchrun, and SGLang command lines checked by SGLang's own parser.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the launcher tests need Ray (extra 'ray')")
psutil = pytest.importorskip("psutil", reason="process checks need psutil (a Ray dependency)")

from sglang_xshare.config import XShareConfigError  # noqa: E402
from sglang_xshare.launch import commands as C  # noqa: E402
from sglang_xshare.launch.args import parse_args  # noqa: E402
from sglang_xshare.serving.cli_flags import parse_xshare_argv  # noqa: E402

pytestmark = pytest.mark.ray

RAY_BIN = str(Path(sys.executable).with_name("ray"))
HEAD_IP, NODE_B_IP, NODE_C_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
BASE_ENV = {
    **os.environ,
    "RAY_USAGE_STATS_ENABLED": "0",
    # Node-death detection in ~2 s instead of ~30 s (read by the GCS on the head).
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "0",
    "PYTHONUNBUFFERED": "1",
}


# ---------------------------------------------------------------------------------------
# A local multi-raylet Ray cluster
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRayCluster:
    """Raylets started with ``ray start``, each in its own session (pgid = ``ray start``'s pid)."""

    temp_dir: str  # prefix; the i-th ``ray start`` uses f"{temp_dir}-{i}"
    gcs_port: int = 0
    pgids: dict[str, int] = field(default_factory=dict)  # node ip -> pgid of its live session
    sessions: list[int] = field(default_factory=list)  # every session started (for shutdown)
    _next_worker_port: int = 30100

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    def _ports(self) -> list[str]:
        lo = self._next_worker_port
        self._next_worker_port += 300
        return [
            "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
            "--min-worker-port", str(lo), "--max-worker-port", str(lo + 299),
        ]

    def _spawn(self, ip: str, resources: str, head: bool) -> subprocess.Popen[str]:
        cmd = [RAY_BIN, "start", "--node-ip-address", ip, "--num-cpus", "1", "--num-gpus", "0",
               "--resources", resources, "--object-store-memory", str(80 * 1024 * 1024),
               "--include-log-monitor", "false", "--disable-usage-stats", *self._ports()]
        # One temp dir per node: raylets on one host that start together would otherwise race
        # for the same socket file names.
        cmd += ["--temp-dir", f"{self.temp_dir}-{len(self.sessions)}"]
        if head:
            self.gcs_port = _free_port()
            cmd += ["--head", "--port", str(self.gcs_port), "--ray-client-server-port", str(_free_port()),
                    "--include-dashboard", "false", "--dashboard-port", str(_free_port())]
        else:
            cmd += ["--address", self.address]
        proc = subprocess.Popen(cmd, env=BASE_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.pgids[ip] = proc.pid
        self.sessions.append(proc.pid)
        return proc

    def start(self, head: tuple[str, str], others: list[tuple[str, str]]) -> None:
        """Start the head (ip, resources JSON), then the other nodes together once its GCS
        listens. A node whose start fails (a busy machine can miss Ray's fixed 30 s
        registration window) is killed and started once more."""
        procs = {head[0]: (self._spawn(*head, head=True), head)}
        self._wait_gcs()
        procs.update({ip: (self._spawn(ip, res, head=False), (ip, res)) for ip, res in others})
        for ip, (proc, spec) in procs.items():
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0 and ip != HEAD_IP:
                self.kill_raylet(ip)
                proc = self._spawn(*spec, head=False)
                out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{shlex.join(proc.args)} failed:\n{out}"

    def _wait_gcs(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                socket.create_connection((HEAD_IP, self.gcs_port), timeout=1).close()
                return
            except OSError:
                assert time.time() < deadline, "the head's GCS never opened its port"
                time.sleep(0.25)

    @staticmethod
    def _group_pids(pgid: int) -> set[int]:
        pids = set()
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == pgid:
                    pids.add(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return pids

    def kill_raylet(self, ip: str) -> None:
        """Kill the raylet of node ``ip`` and its agents (its session), as if the node crashed.

        Its Ray workers (other sessions) notice and exit on their own; what they started is
        the launcher's business.
        """
        for pid in self._group_pids(self.pgids[ip]):
            _kill(pid)

    def shutdown(self) -> None:
        """Kill every process of every session started, and their descendants, by pid."""
        pids: set[int] = set()
        for pgid in self.sessions:
            pids |= self._group_pids(pgid)
        for pid in list(pids):
            try:
                pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.Error:
                pass
        for pid in pids:
            _kill(pid)


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (127.0.0.2) and a raylet on 127.0.0.3 with ``fake_gpu: 2`` each; a third raylet on
    127.0.0.4 with ``crash_gpu: 2`` (as has the head) for the killed-node test. This process
    connects as a driver to inspect placement groups."""
    temp_dir = f"/tmp/rtx-{os.getpid()}"  # short: Ray's unix socket paths must fit 107 bytes
    c = LocalRayCluster(temp_dir=temp_dir)
    try:
        c.start((HEAD_IP, '{"fake_gpu": 2, "crash_gpu": 2}'),
                [(NODE_B_IP, '{"fake_gpu": 2}'), (NODE_C_IP, '{"crash_gpu": 2}')])
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False, namespace="test-ray-launcher")
        deadline = time.time() + 60
        while sum(1 for n in ray.nodes() if n["Alive"]) < 3:
            assert time.time() < deadline, "the second raylet never joined"
            time.sleep(0.5)
        yield c
    finally:
        try:
            ray.shutdown()
        finally:
            c.shutdown()
            for i in range(len(c.sessions)):
                shutil.rmtree(f"{temp_dir}-{i}", ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Running the launcher
# ---------------------------------------------------------------------------------------
class Launcher:
    """``python -m sglang_xshare.launch.ray_launcher ...`` as a subprocess with a line reader."""

    def __init__(self, args: list[str], cwd: str | None = None) -> None:
        self.cmd = [sys.executable, "-u", "-m", "sglang_xshare.launch.ray_launcher", *args]
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=BASE_ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._eof = False
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """First line (seen so far or later) matching ``pattern``."""
        rx = re.compile(pattern)
        for line in self.lines:
            if (m := rx.search(line)):
                return m
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
                break
            self.lines.append(line)
            if (m := rx.search(line)):
                return m
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 90.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("launcher did not exit; output:\n" + "\n".join(self.lines))
        while not self._eof:
            line = self._q.get(timeout=10)
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)
        return rc

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def launch(cluster, tmp_path):
    """Start launchers against the cluster; kill any still running at the end of the test."""
    started: list[Launcher] = []

    def _launch(*args: str, cwd: str | None = None) -> Launcher:
        node_logs = tmp_path / f"node-logs-{len(started)}"
        la = Launcher(["--address", cluster.address, "--node-log-dir", str(node_logs), *args], cwd=cwd)
        started.append(la)
        return la

    yield _launch
    for la in started:
        if la.proc.poll() is None:
            la.kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_dead(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _placement_groups_removed() -> bool:
    from ray.util.placement_group import placement_group_table

    return all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def _wait_pgs_removed(timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not _placement_groups_removed():
        assert time.time() < deadline, f"placement groups left: {ray.util.placement_group_table()}"
        time.sleep(0.2)


def _node_lines(text: str) -> dict[int, tuple[str, str]]:
    """``{rank: (ip, ray node id prefix)}`` from the launcher's ``node R: IP (...)`` lines."""
    out = {}
    for m in re.finditer(r"\] node (\d+): (\S+) \(host \S+, ray node ([0-9a-f]+)\)", text):
        out[int(m.group(1))] = (m.group(2), m.group(3))
    return out


# A per-node workload: prints its rank/env, starts a grandchild in the same process group,
# then sleeps. Braces are doubled for the launcher's placeholders.
WORKLOAD = (
    "{python} -c 'import os, subprocess, sys, time; "
    "g = subprocess.Popen([\"sleep\", \"300\"]); "
    "e = os.environ; "
    "print(\"ready rank={node_rank} nnodes={nnodes} master={master_addr}:{master_port} ip={node_ip} \" "
    "+ \"env_rank=\" + e[\"SGLANG_XSHARE_NODE_RANK\"] + \" env_master=\" + e[\"SGLANG_XSHARE_MASTER_ADDR\"] "
    "+ \" foo=\" + e.get(\"FOO\", \"-\") + \" nccl=\" + e.get(\"NCCL_NVLS_ENABLE\", \"-\") "
    "+ \" pid=%d grandchild=%d pgid=%d\" % (os.getpid(), g.pid, os.getpgid(0)), flush=True); "
    "[print(\"tick\", i, flush=True) or time.sleep(0.5) for i in range(600)]'"
)
READY = r"\[node {r}\] ready rank={r} nnodes=2 master=(\S+):(\d+) ip=(\S+) env_rank={r} env_master=(\S+) foo=(\S+) nccl=(\S+) pid=(\d+) grandchild=(\d+) pgid=(\d+)"


# ---------------------------------------------------------------------------------------
# Flag handling (no cluster)
# ---------------------------------------------------------------------------------------
def test_flag_errors_name_the_flag():
    with pytest.raises(XShareConfigError, match=r"^--env"):
        parse_args(["--nnodes", "2", "--env", "NOEQUALS", "--command", "true"])
    with pytest.raises(XShareConfigError, match=r"^--tp-size"):
        parse_args(["--nnodes", "2", "--gpus-per-node", "8", "--tp-size", "15", "--", "--model-path", "m"])
    with pytest.raises(XShareConfigError, match=r"^--tp-size: 32 needs 16"):
        parse_args(["--nnodes", "2", "--gpus-per-node", "8", "--tp-size", "32", "--", "--model-path", "m"])
    with pytest.raises(XShareConfigError, match=r"^--node-rank"):
        parse_args(["--nnodes", "2", "--", "--model-path", "m", "--node-rank", "1"])
    with pytest.raises(XShareConfigError, match=r"^--tensor-parallel-size: .*pass --tp-size to sglang-xshare-ray"):
        parse_args(["--nnodes", "2", "--", "--model-path", "m", "--tensor-parallel-size", "16"])
    # SGLang's parser takes abbreviations (argparse allow_abbrev): the launcher's own flags would win
    # on the node command line and the user's value would vanish
    for typed, full in (("--tp", "--tp-size"), ("--node-r", "--node-rank"), ("--dist-init", "--dist-init-addr"),
                        ("--nnode", "--nnodes")):
        with pytest.raises(XShareConfigError, match=rf"^{typed}: .*SGLang reads it as {full}"):
            parse_args(["--nnodes", "2", "--", "--model-path", "m", typed, "1"])
    with pytest.raises(XShareConfigError, match=r"^--xshare-budget"):
        parse_args(["--nnodes", "2", "--", "--model-path", "m", "--xshare-policy", "xshare", "--xshare-budget", "lots"])
    # a path is the node's (relative to --cwd there; each node checks it at start), not the launcher's
    trace = ["--xshare-record-trace", "no/such/dir/t.npz"]
    a = parse_args(["--nnodes", "2", "--cwd", "/srv/x", "--", "--model-path", "m", *trace])
    assert a.xshare_flags == trace
    with pytest.raises(XShareConfigError, match=r"^--xshare-record-trace: directory .* does not exist"):
        parse_xshare_argv(trace)  # what the node's own launch_server runs
    with pytest.raises(XShareConfigError, match=r"^--command"):
        parse_args(["--nnodes", "2", "--command", "true", "--", "--model-path", "m"])
    with pytest.raises(XShareConfigError, match=r"^--command: unknown placeholder \{rank\}"):
        parse_args(["--nnodes", "2", "--command", "echo {rank}"])
    with pytest.raises(XShareConfigError, match=r"^--health-url: unknown placeholder \{head\}"):
        parse_args(["--nnodes", "2", "--command", "true", "--health-url", "http://{head}:1/health"])
    ctx = C.NodeContext(0, 2, "10.0.0.1", 1234, "10.0.0.1", 8, "python")
    assert C.render_command("echo {node_rank}/{nnodes} {dist_init_addr} ${{HOME}}", ctx) == "echo 0/2 10.0.0.1:1234 ${HOME}"
    # tp defaults to every reserved GPU; unknown flags and flags after -- both pass through
    a = parse_args(["--nnodes", "2", "--gpus-per-node", "8", "--model-path", "m", "--", "--xshare-policy", "xshare",
                    "--xshare-budget=0.6", "--port", "1"])
    assert a.tp_size == 16 and a.ep_size is None
    assert (a.sglang_flags, a.xshare_flags) == (["--model-path", "m", "--port", "1"], ["--xshare-policy", "xshare", "--xshare-budget=0.6"])


def test_launcher_flag_abbreviations_match_sglangs_parser():
    """The launcher refuses abbreviations of the flags it sets without importing SGLang (it stays
    light): checked here against SGLang's own parser. Every prefix SGLang reads as one of those
    flags is refused as that flag, and no option SGLang has is taken for one it is not."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    assert set(C.LAUNCHER_SET_FLAGS) <= options
    for o in options:
        assert (C._as_sglang_reads(o) in C.LAUNCHER_SET_FLAGS) == (o in C.LAUNCHER_SET_FLAGS), o
    checked = 0
    for flag in C.LAUNCHER_SET_FLAGS:
        for n in range(4, len(flag)):
            hits = [o for o in options if o.startswith(flag[:n])]
            if flag[:n] not in options and len(hits) == 1:  # argparse reads the prefix as hits[0]
                assert C._as_sglang_reads(flag[:n]) == hits[0], flag[:n]
                checked += 1
    assert checked > 20


def _plan(*argv: str) -> subprocess.CompletedProcess:
    """The launcher's console module as a subprocess, without any cluster."""
    env = {**BASE_ENV, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "sglang_xshare.launch.ray_launcher", *argv], env=env,
                          capture_output=True, text=True, timeout=120)


def _plan_nodes(text: str) -> dict[int, tuple[str, list[str]]]:
    return {int(m.group(1)): (m.group(2), shlex.split(m.group(3)))
            for m in re.finditer(r"^# node (\d+) at (\S+)\n(.*)$", text, re.M)}


@pytest.mark.timeout(120)
def test_dry_run_without_a_cluster_prints_the_plan():
    """--dry-run needs no Ray cluster: with --node-ips the plan is complete, without it (and no
    cluster answering) the addresses are placeholders; both exit 0 and start nothing."""
    flags = ["--nnodes", "2", "--gpus-per-node", "8", "--tp-size", "16", "--ep-size", "16", "--dry-run"]
    server = ["--", "--model-path", "m", "--xshare-policy", "xshare_ep", "--xshare-budget", "0.6"]
    p = _plan(*flags, "--node-ips", "10.1.0.1,10.1.0.2", "--master-port", "5000", *server)
    assert p.returncode == 0, p.stderr
    nodes = _plan_nodes(p.stdout)
    assert sorted(nodes) == [0, 1] and [nodes[r][0] for r in (0, 1)] == ["10.1.0.1", "10.1.0.2"]
    for r, (_, words) in nodes.items():
        argv = words[words.index("-m") + 2:]
        assert words[words.index("-m") + 1] == "sglang_xshare.launch_server"
        for flag, value in (("--nnodes", "2"), ("--node-rank", str(r)), ("--dist-init-addr", "10.1.0.1:5000"),
                            ("--tp-size", "16"), ("--ep-size", "16"), ("--xshare-policy", "xshare_ep")):
            assert argv[argv.index(flag) + 1] == value
        assert f"SGLANG_XSHARE_NODE_RANK={r}" in words
    # no --node-ips and nothing listening at --address: placeholders, still exit 0
    port = _free_port()
    p = _plan(*flags, "--address", f"127.0.0.1:{port}", *server)
    assert p.returncode == 0, p.stderr
    nodes = _plan_nodes(p.stdout)
    assert [nodes[r][0] for r in (0, 1)] == ["<node0-ip>", "<node1-ip>"]
    assert "--node-ips" in p.stderr and "<node0-ip>:29500" in p.stdout
    # a launch without a cluster still fails (exit 2), naming the address
    p = _plan("--nnodes", "2", "--address", f"127.0.0.1:{port}", "--command", "true")
    assert p.returncode == 2 and "cannot connect" in p.stderr


def test_node_ips_flag_errors():
    with pytest.raises(XShareConfigError, match=r"^--node-ips: expected 2 addresses"):
        parse_args(["--nnodes", "2", "--dry-run", "--node-ips", "10.0.0.1", "--command", "true"])
    with pytest.raises(XShareConfigError, match=r"^--node-ips: only describes"):
        parse_args(["--nnodes", "1", "--node-ips", "10.0.0.1", "--command", "true"])
    with pytest.raises(XShareConfigError, match=r"^--master-port"):
        parse_args(["--nnodes", "1", "--master-port", "0", "--command", "true"])


# ---------------------------------------------------------------------------------------
# On the cluster
# ---------------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_dry_run_sglang_commands_parse_with_sglang_server_args(launch, cluster):
    la = launch("--nnodes", "2", "--gpus-per-node", "2", "--gpu-resource", "fake_gpu", "--tp-size", "4",
                "--ep-size", "4", "--env", "NCCL_NVLS_ENABLE=0", "--dry-run", "--",
                "--model-path", "/models/does-not-exist", "--moe-a2a-backend", "deepep", "--port", "31000",
                "--xshare-policy", "xshare", "--xshare-budget", "0.7", "--xshare-warmup-k0", "1", "--xshare-metrics")
    # SGLang's parser is slow to import: overlap it with the launcher's run.
    from sglang.srt.server_args import prepare_server_args

    from sglang_xshare.serving.cli_flags import parse_xshare_argv, split_xshare_argv

    assert la.finish() == 0, la.text
    nodes = _node_lines(la.text)
    assert sorted(nodes) == [0, 1] and len({v[1] for v in nodes.values()}) == 2, la.text
    cmds = {int(m.group(1)): m.group(2) for m in re.finditer(r"^# node (\d+) at .*\n(.*)$", la.text, re.M)}
    assert sorted(cmds) == [0, 1], la.text
    dist = set()
    for rank, line in cmds.items():
        words = shlex.split(line)
        assert words[:2] == ["cd", os.getcwd()] and words[2] == "&&" and words[3] == "env"
        env = dict(w.split("=", 1) for w in words[4: words.index("-m") - 1])
        assert env["SGLANG_XSHARE_NODE_RANK"] == str(rank) and env["NCCL_NVLS_ENABLE"] == "0"
        argv = words[words.index("-m") + 2:]
        assert words[words.index("-m") + 1] == "sglang_xshare.launch_server"
        sg, xs = split_xshare_argv(argv)
        assert xs == ["--xshare-policy", "xshare", "--xshare-budget", "0.7", "--xshare-warmup-k0", "1", "--xshare-metrics"]
        assert argv[-len(xs):] == xs  # xshare flags last
        sa = prepare_server_args(sg)  # SGLang's own parser and checks
        assert (sa.nnodes, sa.node_rank, sa.tp_size, sa.ep_size) == (2, rank, 4, 4)
        assert (sa.host, sa.port, sa.moe_a2a_backend, sa.model_path) == ("0.0.0.0", 31000, "deepep", "/models/does-not-exist")
        dist.add(sa.dist_init_addr)
        cfg = parse_xshare_argv(xs)
        assert (cfg.policy, cfg.budget, cfg.warmup_k0, cfg.metrics) == ("xshare", "0.7", 1, True)
    assert len(dist) == 1, dist  # every node rendezvouses at node 0
    host, port = dist.pop().rsplit(":", 1)
    assert host == nodes[0][0] and 1024 <= int(port) < 65536
    _wait_pgs_removed()


@pytest.mark.timeout(150)
def test_ranks_env_logs_and_teardown_after_a_killed_process(launch, cluster):
    la = launch("--nnodes", "2", "--gpus-per-node", "2", "--gpu-resource", "fake_gpu", "--env", "FOO=bar",
                "--env", "NCCL_NVLS_ENABLE=0", "--stop-grace", "3", "--tail-lines", "5", "--command", WORKLOAD)
    info = {}
    for r in (0, 1):
        m = la.wait_for(READY.format(r=r), timeout=60)
        master, port, ip, env_master, foo, nccl, pid, grandchild, pgid = m.groups()
        info[r] = dict(master=master, port=port, ip=ip, env_master=env_master, foo=foo, nccl=nccl,
                       pid=int(pid), grandchild=int(grandchild), pgid=int(pgid))
    nodes = _node_lines(la.text)
    # STRICT_SPREAD: one bundle per node, each on its own raylet and IP; node 0 holds the rendezvous.
    assert {nodes[0][0], nodes[1][0]} == {HEAD_IP, NODE_B_IP} and nodes[0][1] != nodes[1][1]
    for r in (0, 1):
        assert info[r]["ip"] == nodes[r][0]
        assert info[r]["master"] == info[r]["env_master"] == nodes[0][0]
        assert (info[r]["foo"], info[r]["nccl"]) == ("bar", "0")
        assert info[r]["pgid"] != os.getpgid(0)  # its own process group
    assert info[0]["port"] == info[1]["port"]
    la.wait_for(r"\[node 1\] tick 2")
    _kill(info[1]["pid"])  # node 1's workload dies
    rc = la.finish()
    assert rc == 1, la.text
    assert re.search(r"node 1 at \S+ .*failed: exited with code 137 \(killed by SIGKILL\); the other nodes were stopped", la.text), la.text
    report = la.text[la.text.index("failed: exited with code 137"):]
    assert re.search(r"last 5 lines of node 1 .*\n(.*\n)*.*\| tick \d+", report), report
    node_log = Path(re.search(r"full log on that node: (\S+)\)", report).group(1))
    assert node_log.read_text().startswith("ready rank=1 ")  # every line, on the node itself
    left = _wait_dead([info[r][k] for r in (0, 1) for k in ("pid", "grandchild")])
    assert not left, f"processes left running: {left}"
    _wait_pgs_removed()


@pytest.mark.timeout(150)
def test_torchrun_gloo_all_reduce_across_nodes(launch, cluster, tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        r, w = dist.get_rank(), dist.get_world_size()
        t = torch.tensor([float(r + 1)])
        dist.all_reduce(t)
        line = (f"rank={r} world={w} local={os.environ['LOCAL_RANK']} node={os.environ['GROUP_RANK']} "
                f"sum={t.item():g} master={os.environ['MASTER_ADDR']}\\n")
        os.write(1, line.encode())  # one write: two ranks of a node share the pipe
        dist.destroy_process_group()
    """))
    la = launch("--nnodes", "2", "--gpus-per-node", "2", "--gpu-resource", "fake_gpu",
                "--env", "GLOO_SOCKET_IFNAME=lo", "--env", "OMP_NUM_THREADS=1", "--cwd", str(tmp_path), "--command",
                "{python} -m torch.distributed.run --nnodes {nnodes} --node-rank {node_rank} --master-addr {master_addr} "
                "--master-port {master_port} --nproc-per-node {gpus_per_node} allreduce.py")
    rc = la.finish(timeout=120)
    assert rc == 0, la.text
    nodes = _node_lines(la.text)
    seen = {}
    for m in re.finditer(r"\[node (\d)\] rank=(\d) world=4 local=(\d) node=(\d) sum=(\S+) master=(\S+)", la.text):
        node, rank, local, group, total, master = m.groups()
        seen[int(rank)] = (int(node), int(local), int(group), total, master)
    assert sorted(seen) == [0, 1, 2, 3], la.text
    for rank, (node, local, group, total, master) in seen.items():
        assert node == group == rank // 2 and local == rank % 2
        assert total == "10" and master == nodes[0][0]
    _wait_pgs_removed()


@pytest.mark.timeout(150)
def test_health_url_then_sigterm_leaves_nothing_running(launch, cluster, tmp_path):
    (tmp_path / "health").write_text("ok\n")  # http.server answers GET /health with 200
    port = _free_port()
    cmd = ("if [ {node_rank} = 0 ]; then {python} -m http.server %d --bind {node_ip} >/dev/null 2>&1 & fi; " % port
           + WORKLOAD)  # (its request log would interleave with the workload's lines)
    la = launch("--nnodes", "2", "--gpus-per-node", "2", "--gpu-resource", "fake_gpu", "--cwd", str(tmp_path),
                "--health-url", "http://{master_addr}:%d/health" % port, "--health-timeout", "60",
                "--stop-grace", "3", "--command", cmd)
    pids = []
    for r in (0, 1):
        m = la.wait_for(READY.format(r=r), timeout=60)
        pids += [int(m.group(7)), int(m.group(8))]
    m = la.wait_for(r"server is up after \d+ s: (http://\S+)", timeout=60)
    master = _node_lines(la.text)[0][0]
    assert m.group(1) == f"http://{master}:{port}"
    http_server = [p.pid for p in psutil.process_iter(["cmdline"]) if "http.server" in (p.info["cmdline"] or [])
                   and str(port) in (p.info["cmdline"] or [])]
    assert len(http_server) == 1
    la.wait_for(r"\[node 1\] tick 1")
    la.proc.send_signal(signal.SIGTERM)
    rc = la.finish()
    assert rc == 128 + signal.SIGTERM, la.text
    assert "received SIGTERM: stopping every node" in la.text
    assert "every node stopped; placement group removed" in la.text
    left = _wait_dead(pids + http_server)
    assert not left, f"processes left running: {left}"
    _wait_pgs_removed()


@pytest.mark.timeout(60)
def test_unsatisfiable_placement_fails_clearly_in_time(launch, cluster):
    t0 = time.time()
    la = launch("--nnodes", "3", "--gpus-per-node", "2", "--gpu-resource", "fake_gpu", "--placement-timeout", "3",
                "--command", "true")
    rc = la.finish(timeout=45)
    assert rc == 2, la.text
    assert time.time() - t0 < 40
    assert re.search(r"placement group of 3 bundles \{'fake_gpu': 2\.0, 'CPU': 1\.0\} \(STRICT_SPREAD: one per node\) "
                     r"was not ready within 3 s \(--placement-timeout\)", la.text), la.text
    assert re.search(r"2 of \d+ alive nodes have these resources", la.text), la.text
    assert "[node" not in la.text
    _wait_pgs_removed()


@pytest.mark.timeout(60)
def test_missing_cwd_on_a_node_fails_clearly(launch, cluster, tmp_path):
    la = launch("--nnodes", "2", "--gpus-per-node", "2", "--gpu-resource", "fake_gpu",
                "--cwd", str(tmp_path / "missing"), "--command", "echo never")
    assert la.finish(timeout=45) == 1, la.text
    assert re.search(r"error: node \d could not start its command: node \d: --cwd '\S+/missing' does not exist on this node",
                     la.text), la.text
    assert "never" not in la.text
    _wait_pgs_removed()


@pytest.mark.timeout(150)
def test_lost_node_stops_the_others_and_its_processes_die(launch, cluster):
    try:
        la = launch("--nnodes", "2", "--gpus-per-node", "2", "--gpu-resource", "crash_gpu", "--stop-grace", "3",
                    "--command", WORKLOAD)
        pids = {}
        for r in (0, 1):
            m = la.wait_for(READY.format(r=r), timeout=60)
            pids[r] = [int(m.group(7)), int(m.group(8))]
        nodes = _node_lines(la.text)
        assert {nodes[0][0], nodes[1][0]} == {HEAD_IP, NODE_C_IP}
        lost = 0 if nodes[0][0] == NODE_C_IP else 1
        la.wait_for(rf"\[node {lost}\] tick 1")
        cluster.kill_raylet(NODE_C_IP)
        rc = la.finish(timeout=90)
        assert rc == 1, la.text
        assert re.search(rf"node {lost} at {re.escape(NODE_C_IP)} .*failed: node actor died .*the other nodes were stopped",
                         la.text), la.text
        assert re.search(rf"last \d+ lines of node {lost} .*\n(.*\n)*.*\| tick \d+", la.text), la.text
        # the surviving node was stopped by the launcher, the lost node's processes by their guard
        left = _wait_dead(pids[0] + pids[1], timeout=30)
        assert not left, f"processes left running: {left}"
        _wait_pgs_removed()
    finally:
        cluster.kill_raylet(NODE_C_IP)
