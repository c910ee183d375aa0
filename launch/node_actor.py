"""The per-node worker of a launch: a Ray actor that owns one process group on its node.

:class:`NodeProcess` is a plain class; :func:`remote_class` wraps it as a threaded Ray actor
(so ``poll`` answers while ``stop`` waits). One actor is placed in each bundle of the
placement group; it

* reports where it runs (:meth:`NodeProcess.info`: IP, Ray node id, assigned resources);
* picks a window of free TCP ports on its node (:meth:`NodeProcess.free_port`, node 0);
* starts the node's command under :mod:`sglang_xshare.launch.node_guard` in a new process
  group, stdout and stderr merged into one pipe (:meth:`NodeProcess.start`);
  the guard's source travels with the actor and is written next to the node's log;
* buffers that output line by line for the launcher and mirrors it to a log file on the
  node (:meth:`NodeProcess.poll` returns new lines and, once the output is drained, the
  exit code);
* stops the group: ``SIGTERM``, a grace period, then ``SIGKILL`` to every process left in
  it (:meth:`NodeProcess.stop`).

If the actor itself dies, the guard kills the group, so nothing outlives it.

:func:`remote_class` ships this module *by value* (cloudpickle), so a node needs Ray but not
``sglang_xshare`` to run a ``--command`` (and its Ray worker does not import the package and
torch just to host the actor); a server launch needs ``sglang_xshare`` on every node anyway.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, Mapping, Sequence

__all__ = ["NodeProcess", "remote_class", "guard_source"]

_GUARD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_guard.py")
_MAX_PARTIAL_LINE = 65536
_EXIT_DRAIN_S = 2.0


class NodeProcess:
    """Owns the process group of one node (see the module docstring).

    Args:
        node_rank: rank of this node, used in messages only.
        log_path: file on the node that receives every output line (its directory also
            receives the guard script).
        guard_source: Python source of :mod:`sglang_xshare.launch.node_guard` (see
            :func:`guard_source`), written to a file on the node at :meth:`start`.
        max_buffered_lines: lines kept for :meth:`poll` between two polls; older ones are
            dropped and counted.
    """

    def __init__(
        self, node_rank: int, log_path: str, guard_source: str, max_buffered_lines: int = 20000
    ) -> None:
        self.node_rank = node_rank
        self.log_path = log_path
        self._guard_source = guard_source
        self._lines: collections.deque[str] = collections.deque()
        self._max_lines = max_buffered_lines
        self._dropped = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._eof = threading.Event()
        self._exit_seen_at: float | None = None

    # -- where am I --------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """``{"ip", "node_id", "hostname", "pid", "python", "resources", "cuda_visible_devices"}``."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "ip": ray.util.get_node_ip_address(),
            "node_id": ctx.get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "python": sys.executable,
            "resources": dict(ctx.get_assigned_resources()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def free_port(self, span: int = 16) -> int:
        """A TCP port ``P`` such that ``P .. P+span-1`` are all free on this node right now.

        SGLang derives several more ports from ``--dist-init-addr``'s port (``port+1`` ..
        ``port+6`` in 0.5.x), so the whole window must be free, not just ``P``.
        """
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", 0))
                port = int(s.getsockname()[1])
            if port + span <= 65536 and all(_port_free(q) for q in range(port, port + span)):
                return port
        raise RuntimeError(f"node {self.node_rank}: no window of {span} free TCP ports found")

    # -- run ---------------------------------------------------------------------------
    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> dict[str, int]:
        """Start ``argv`` under the guard in a new process group; returns ``{"pid", "pgid"}``.

        ``env`` is added to this worker's environment. An empty ``CUDA_VISIBLE_DEVICES``
        that Ray set because the actor holds no ``GPU`` resource is removed (the bundle
        then reserves a custom resource and the devices are the node's business).
        """
        if self._proc is not None:
            raise RuntimeError(f"node {self.node_rank}: process already started")
        if cwd is not None and not os.path.isdir(cwd):
            raise FileNotFoundError(f"node {self.node_rank}: --cwd {cwd!r} does not exist on this node")
        full_env = dict(os.environ)
        if full_env.get("CUDA_VISIBLE_DEVICES") == "":
            full_env.pop("CUDA_VISIBLE_DEVICES")
        full_env.update(env)
        guard_dir = os.path.dirname(os.path.abspath(self.log_path))
        os.makedirs(guard_dir, exist_ok=True)
        guard_path = os.path.join(guard_dir, f"node{self.node_rank}_guard.py")
        with open(guard_path, "w", encoding="utf-8") as f:
            f.write(self._guard_source)
        guard = [sys.executable, guard_path, "--", *argv]
        self._proc = subprocess.Popen(
            guard,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            bufsize=0,
        )
        self._reader = threading.Thread(target=self._read, name=f"node{self.node_rank}-reader", daemon=True)
        self._reader.start()
        return {"pid": self._proc.pid, "pgid": self._proc.pid}

    def _append(self, text: str, log: IO[str]) -> None:
        with self._lock:
            self._lines.append(text)
            if len(self._lines) > self._max_lines:
                self._lines.popleft()
                self._dropped += 1
        log.write(text + "\n")
        log.flush()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        log = open(self.log_path, "a", encoding="utf-8")
        buf = b""
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                *full, buf = buf.split(b"\n")
                for raw in full:
                    self._append(raw.decode("utf-8", errors="replace").rstrip("\r"), log)
                if len(buf) > _MAX_PARTIAL_LINE:
                    self._append(buf.decode("utf-8", errors="replace"), log)
                    buf = b""
            if buf:
                self._append(buf.decode("utf-8", errors="replace"), log)
        finally:
            log.close()
            self._eof.set()

    def poll(self, max_lines: int = 5000) -> dict[str, Any]:
        """New output since the last poll and the exit code once the process is done.

        Returns ``{"lines": list[str], "dropped": int, "returncode": int | None}``.
        ``returncode`` stays ``None`` until the output pipe is drained (or, if a leftover
        process keeps it open, for at most 2 s after the guard exited), so every line is
        delivered before the exit is reported.
        """
        with self._lock:
            n = min(max_lines, len(self._lines))
            lines = [self._lines.popleft() for _ in range(n)]
            dropped, self._dropped = self._dropped, 0
            more = bool(self._lines)
        rc = None
        if self._proc is not None and not more:
            code = self._proc.poll()
            if code is not None:
                if self._exit_seen_at is None:
                    self._exit_seen_at = time.monotonic()
                if self._eof.is_set() or time.monotonic() - self._exit_seen_at > _EXIT_DRAIN_S:
                    rc = code
        return {"lines": lines, "dropped": dropped, "returncode": rc}

    def stop(self, grace_s: float = 10.0) -> int | None:
        """``SIGTERM`` the group, wait up to ``grace_s``, then ``SIGKILL`` whatever is left in it.

        Returns the guard's exit code (``None`` if nothing was started).
        """
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGKILL)  # leftovers of a finished command too
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            pass
        self._eof.wait(timeout=2.0)
        return proc.returncode


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def guard_source() -> str:
    """Source text of the process guard (:mod:`sglang_xshare.launch.node_guard`)."""
    with open(_GUARD_FILE, encoding="utf-8") as f:
        return f.read()


def remote_class() -> Any:
    """:class:`NodeProcess` as a Ray actor class with concurrent methods, pickled by value."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray.remote(max_concurrency=8)(NodeProcess)
