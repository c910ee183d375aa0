"""A server process the benchmark owns: start, wait until it serves, stop with nothing left behind.

The server runs in a session of its own (``start_new_session``), its output goes to a log file,
and every process it starts inherits a marker in its environment (:data:`MARK_ENV`). Stopping
sends SIGTERM to the session's process group, waits, then SIGKILL, then kills any process that
still carries the marker (a child that left the group) -- and reports what it had to kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Sequence

__all__ = ["Server", "ServerDied", "MARK_ENV", "marked_processes", "http_get"]

#: Environment variable set (to a fresh id) in the server's environment, inherited by its children.
MARK_ENV = "XSHARE_SERVE_BENCH_RUN"


class ServerDied(RuntimeError):
    """The server exited (or never became ready); the message holds the log's tail."""


def http_get(url: str, timeout: float = 5.0, json_body: dict | None = None) -> tuple[int, str]:
    """``(status, body)`` of a GET, or of a POST of ``json_body`` (status 0 when nothing answers)."""
    req: str | urllib.request.Request = url
    if json_body is not None:
        req = urllib.request.Request(url, data=json.dumps(json_body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, ""


def marked_processes(mark: str) -> list[int]:
    """PIDs whose environment holds ``MARK_ENV=mark`` (Linux ``/proc``)."""
    needle = f"{MARK_ENV}={mark}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.append(int(d.name))
    return out


class Server:
    """One server process.

    Args:
        cmd: the command line (e.g. ``python -m sglang_xshare.launch_server ...``).
        port: the HTTP port it listens on.
        log: log file (stdout and stderr).
        env: extra environment variables.
        host: address to probe.
        ready_path: GET path that answers 200 once the server serves (SGLang: ``/health_generate``
            runs one generation; ``/health`` only says the process is up).
    """

    def __init__(self, cmd: Sequence[str], port: int, log: str | Path, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", ready_path: str = "/health_generate") -> None:
        self.cmd = list(cmd)
        self.port = int(port)
        self.log = Path(log)
        self.env = dict(os.environ, **(env or {}))
        self.mark = uuid.uuid4().hex
        self.env[MARK_ENV] = self.mark
        self.base_url = f"http://{host}:{self.port}"
        self.ready_path = ready_path
        self.proc: subprocess.Popen | None = None
        self.killed: list[int] = []
        self.startup_s: float | None = None

    def start(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_f = open(self.log, "ab")
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log_f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 600.0, poll: float = 1.0) -> float:
        """Block until ``ready_path`` answers 200; returns the start-up time (s). Raises
        :class:`ServerDied` if the process exits or ``timeout`` passes."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerDied(f"server exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            code, _ = http_get(self.base_url + self.ready_path, timeout=30.0)
            if code == 200:
                self.startup_s = time.monotonic() - self._t0
                return self.startup_s
            time.sleep(poll)
        raise ServerDied(f"server not ready after {timeout:.0f} s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> list[int]:
        """Stop the server and everything it started; returns the PIDs that had to be SIGKILLed."""
        killed: list[int] = []
        if self.proc is not None:
            pgid = self.proc.pid
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                if sig == signal.SIGKILL:
                    killed.append(pgid)
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
                if not _group_alive(pgid):
                    break
                time.sleep(0.5)
                if not _group_alive(pgid):
                    break
        deadline = time.monotonic() + 10.0
        left = marked_processes(self.mark)
        while left and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
            left = marked_processes(self.mark)
        if left:
            raise RuntimeError(f"processes of the server survive SIGKILL: {left}")
        if getattr(self, "_log_f", None) is not None:
            self._log_f.close()
            self._log_f = None
        self.killed = sorted(set(killed))
        return self.killed

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
