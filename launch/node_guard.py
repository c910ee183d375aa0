"""Process guard run on each node: ``python .../launch/node_guard.py -- CMD ...``.

The node actor starts this guard as the leader of a new process group (session) and the
guard starts ``CMD`` inside that group. Its one job: nothing in the group outlives the node
actor, nor ``CMD`` itself.

* If the node actor disappears (``ray.kill``, a crashed worker, a lost raylet, the launcher
  killed with ``SIGKILL``), the guard notices that its parent changed and kills the group.
* The guard may itself be ``SIGKILL``-ed -- Ray kills a dying worker's direct children -- so
  it first forks a *watcher* (same group, signals ignored, no stdio) that kills the group as
  soon as the guard is gone, whether the guard was killed or simply exited after ``CMD``
  (then it removes what ``CMD`` left behind in the group).

Otherwise it is transparent: ``CMD`` inherits stdout/stderr, a ``SIGTERM``/``SIGINT`` sent
to the group reaches ``CMD`` directly (the guard itself keeps waiting for it), and the guard
exits with ``CMD``'s exit code (``128 + signal`` when ``CMD`` was killed by a signal, after
printing one line that says which).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["main"]

_POLL_S = 0.2


def _kill_group() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)  # the caller dies with its group


def _watch(guard_pid: int) -> None:
    """Forked watcher: wait until the guard is gone (re-parented), then kill the group."""
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # do not hold the node's output pipe open
        while os.getppid() == guard_pid:
            time.sleep(_POLL_S)
        _kill_group()
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Run the guarded command; see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("node_guard: usage: python -m sglang_xshare.launch.node_guard -- CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    guard_pid = os.getpid()
    if os.fork() == 0:
        _watch(guard_pid)
    # A Python-level handler (not SIG_IGN, which exec would pass on to the child): the group
    # signal reaches the child itself; the guard keeps waiting so it can report its exit code.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    try:
        child = subprocess.Popen(args)
    except OSError as e:
        print(f"node_guard: cannot start {args[0]!r}: {e}", file=sys.stderr, flush=True)
        return 127
    while True:
        try:
            rc = child.wait(timeout=_POLL_S)
            break
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                print("node_guard: node actor is gone; killing the process group", file=sys.stderr, flush=True)
                _kill_group()
                time.sleep(1.0)
                return 137
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        print(f"node_guard: process {child.pid} was killed by {name}", file=sys.stderr, flush=True)
        return 128 - rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
