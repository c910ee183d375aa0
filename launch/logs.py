"""Node output on the launcher's side: ``[node R]`` prefixes, per-node tails, optional files.

:class:`NodeLogs` receives the lines each node actor buffered (``poll``), prints them with
the node prefix, keeps the last ``tail_lines`` of every node for the failure report (so the
tail survives a lost node), and mirrors them to ``LOG_DIR/node<R>.log`` when asked.
:func:`say` prints the launcher's own messages, prefixed ``[sglang-xshare-ray]``, to stderr.
"""

from __future__ import annotations

import collections
import os
import sys
from typing import IO, Sequence, TextIO

__all__ = ["NodeLogs", "say", "PREFIX"]

PREFIX = "[sglang-xshare-ray]"


def say(message: str, stream: TextIO | None = None) -> None:
    """Print a launcher message (each line prefixed) to stderr."""
    out = stream or sys.stderr
    for line in message.splitlines() or [""]:
        print(f"{PREFIX} {line}", file=out, flush=True)


class NodeLogs:
    """Prefixing printer and tail keeper for ``nnodes`` nodes.

    Args:
        nnodes: number of nodes.
        tail_lines: lines kept per node for :meth:`tail`.
        out: where node lines go (stdout by default).
        log_dir: directory for ``node<R>.log`` copies on the launcher's machine, or ``None``.
    """

    def __init__(self, nnodes: int, tail_lines: int = 40, out: TextIO | None = None, log_dir: str | None = None) -> None:
        self.nnodes = nnodes
        self._out = out or sys.stdout
        self._tails = [collections.deque(maxlen=max(1, tail_lines)) for _ in range(nnodes)]
        self._files: list[IO[str] | None] = [None] * nnodes
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._files = [open(os.path.join(log_dir, f"node{r}.log"), "a", encoding="utf-8") for r in range(nnodes)]

    def emit(self, rank: int, lines: Sequence[str], dropped: int = 0) -> None:
        """Print ``lines`` of node ``rank`` as ``[node R] line``; note lines the node dropped."""
        if dropped:
            lines = [f"[... {dropped} lines dropped: the launcher fell behind ...]", *lines]
        if not lines:
            return
        prefix = f"[node {rank}] "
        text = "".join(prefix + line + "\n" for line in lines)
        self._out.write(text)
        self._out.flush()
        self._tails[rank].extend(lines)
        f = self._files[rank]
        if f is not None:
            f.write("".join(line + "\n" for line in lines))
            f.flush()

    def tail(self, rank: int) -> list[str]:
        """The last lines received from node ``rank``."""
        return list(self._tails[rank])

    def close(self) -> None:
        """Close the log files."""
        for f in self._files:
            if f is not None:
                f.close()
        self._files = [None] * self.nnodes
