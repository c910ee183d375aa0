"""The in-server A/B switch (``--xshare-ab-switch PATH``): the policy and SGLang's routing in one server.

Servers differ from start to start by as much as the policy's gain (``bench/results/serve_*``),
so comparing two servers cannot tell a few percent apart. With the switch, every MoE layer the
policy applies to computes SGLang's routing and the policy's, and a one-element device flag picks
which of the two the experts get (``torch.where`` on ids and weights, inside the captured CUDA
graph), so alternating the arms within one server compares them on one server's state.

What each arm pays (``--xshare-ab-idle-arms``):

``skip`` (default)  a policy's selection kernel reads the same flag and returns at once unless the
                    switch routes by that policy (fast path): SGLang's arm pays SGLang's top-k and one
                    empty launch per policy; a policy's arm pays SGLang's top-k too, its own selection
                    and the others' empty launches. The A/B ratio is then net of the selection (and
                    slightly conservative: the policy's arm also runs SGLang's top-k, which a server
                    with only the policy would not).
``compute``         every arm selects in every layer, whichever routes the experts: all arms pay every
                    selection, so the ratio is the expert cut alone.
                    What the selection costs is then measured separately (``bench/hook_overhead.py``).

The flag follows the file ``PATH``: ``1`` / ``on`` / ``policy`` -> the policy's routing, ``2``, ``3``,
... -> the arms of ``--xshare-ab-arm`` (other policies), anything else or no file -> SGLang's (arm
``0``). It is read at the end of decode / verify steps and of a DP rank's idle steps (outside CUDA
graphs) whenever the file's modification time changes, and written to the device flag with ``fill_``
on the current stream, so the next step's graph replay reads it. Each process (TP / EP rank) polls on
its own, so for one step around a flip the ranks may route by different arms: switch between measured
runs (``bench/serve.py --ab`` flips, then sends one short request, then measures). A measurement mode:
besides the selections it costs two ``where`` kernels per MoE layer (with extra arms a stack and a
gather on the arm index), and SGLang's expert distribution recorder sees the chosen routing and, on
the fast path, SGLang's own as well (its ``select_experts`` runs for the SGLang arm and records): do
not let EPLB rebalance from statistics recorded under the switch.
Collectives are never skipped: under ``--xshare-ep-global`` every arm joins its all-reduce on every
rank, as the ranks must run the same collectives.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

__all__ = ["ABSwitch", "read_arm"]

logger = logging.getLogger("sglang_xshare")

_ON = {"1", "on", "policy", "true", "yes"}


def read_arm(path: str | os.PathLike, num_arms: int = 1) -> int:
    """The arm the file selects: ``0`` = SGLang's routing (also when missing, unreadable or out of
    range), ``1`` = the policy (``1`` / ``on`` / ``policy``), ``2 .. num_arms`` = the extra arms."""
    try:
        text = Path(path).read_text().strip().lower()
    except OSError:
        return 0
    if text in _ON:
        return 1
    if text.isdigit() and int(text) <= num_arms:
        return int(text)
    return 0


class ABSwitch:
    """The device flags of one process and the file that sets them.

    Args:
        path: the switch file.
        num_arms: policy arms (1 + the number of ``--xshare-ab-arm``); arm 0 is SGLang's routing.
    """

    def __init__(self, path: str | os.PathLike, num_arms: int = 1) -> None:
        self.path = Path(path).expanduser()  # as validated (the shell may not have expanded a '~')
        self.num_arms = int(num_arms)
        self.arm = read_arm(self.path, self.num_arms)
        self._mtime = self._stat()
        self._flags: dict[torch.device, torch.Tensor] = {}
        self._on: dict[torch.device, torch.Tensor] = {}
        self.flips = 0

    @property
    def on(self) -> bool:
        """Whether a policy arm (not SGLang's routing) is selected."""
        return self.arm != 0

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def flag(self, device: torch.device) -> torch.Tensor:
        """``[1] int64`` on ``device``: the selected arm (allocated once per device)."""
        if device not in self._flags:
            self._flags[device] = torch.full((1,), self.arm, dtype=torch.int64, device=device)
        return self._flags[device]

    def on_flag(self, device: torch.device) -> torch.Tensor:
        """``[1] bool`` on ``device``: a policy arm is selected (one arm: a ``where`` picks it)."""
        if device not in self._on:
            self._on[device] = torch.full((1,), self.on, dtype=torch.bool, device=device)
        return self._on[device]

    def poll(self) -> bool:
        """Re-read the file if it changed; set every flag. Returns whether the arm changed."""
        m = self._stat()
        if m == self._mtime:
            return False
        self._mtime = m
        arm = read_arm(self.path, self.num_arms)
        if arm == self.arm:
            return False
        self.arm = arm
        for f in self._flags.values():
            f.fill_(arm)
        for f in self._on.values():
            f.fill_(arm != 0)
        self.flips += 1
        logger.info("xshare: A/B switch -> %s", "SGLang's routing" if arm == 0 else
                    ("the policy's routing" if arm == 1 else f"arm {arm}"))
        return True

    def choose(self, sglang_ids: torch.Tensor, sglang_w: torch.Tensor,
               arms: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected arm's routing (a gather on the device flag: no host sync, graph-capturable).

        Args:
            sglang_ids / sglang_w: SGLang's ``[T, k]`` ids and weights (any int / float dtype): arm 0.
            arms: the policy arms' ``(ids, weights)``, ``[T, k]`` each (any dtypes): arms 1, 2, ...

        Returns:
            ``(ids, weights)`` in SGLang's dtypes, ``[T, k]``.
        """
        if len(arms) == 1:  # two where on a bool flag
            on = self.on_flag(sglang_ids.device)[:, None]
            return (torch.where(on, arms[0][0].to(sglang_ids.dtype), sglang_ids),
                    torch.where(on, arms[0][1].to(sglang_w.dtype), sglang_w))
        f = self.flag(sglang_ids.device)
        ids = torch.stack([sglang_ids] + [a.to(sglang_ids.dtype) for a, _ in arms])
        w = torch.stack([sglang_w] + [b.to(sglang_w.dtype) for _, b in arms])
        return ids.index_select(0, f)[0], w.index_select(0, f)[0]
