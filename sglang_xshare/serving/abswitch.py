"""In-server A/B switch (``--xshare-ab-switch PATH``): the policy and SGLang's routing in one server.

Servers differ from start to start by as much as the policy's gain (``bench/results/serve_*``),
so comparing two servers cannot tell a few percent apart. With the switch, every MoE layer the
policy applies to computes *both* SGLang's routing and the policy's, and a one-element device
flag picks which of the two the experts get (``torch.where`` on ids and weights, inside the
captured CUDA graph). Both arms run the same kernels; only the experts the MoE layer reads differ,
so alternating the arms within one server measures the expert cut alone. (What the policy's
kernel costs beside SGLang's top-k is measured separately, ``bench/hook_overhead.py``.)

The flag follows the file ``PATH``: ``1`` / ``on`` / ``policy`` -> the policy's routing, anything
else or no file -> SGLang's. It is read at the end of decode / verify steps and of a DP rank's idle
steps (outside CUDA graphs) whenever the file's modification time changes, and written to the device
flag with ``fill_`` on the current stream, so the next step's graph replay reads it. Each process
(TP / EP rank) polls on its own, so for one step around a flip the ranks may route by different
arms: switch between measured runs (``bench/serve.py --ab`` flips, then sends one short request,
then measures). A measurement mode:
it costs SGLang's top-k plus two ``where`` kernels per MoE layer in both arms, and SGLang's expert
distribution recorder sees both routings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

__all__ = ["ABSwitch", "read_arm"]

logger = logging.getLogger("sglang_xshare")

_ON = {"1", "on", "policy", "true", "yes"}


def read_arm(path: str | os.PathLike) -> bool:
    """Whether the file selects the policy's routing (``False`` when missing or unreadable)."""
    try:
        return Path(path).read_text().strip().lower() in _ON
    except OSError:
        return False


class ABSwitch:
    """The device flags of one process and the file that sets them.

    Args:
        path: the switch file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.on = read_arm(self.path)
        self._mtime = self._stat()
        self._flags: dict[torch.device, torch.Tensor] = {}
        self.flips = 0

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def flag(self, device: torch.device) -> torch.Tensor:
        """``[1] bool`` on ``device``: True = the policy's routing (allocated once per device)."""
        f = self._flags.get(device)
        if f is None:
            f = torch.full((1,), self.on, dtype=torch.bool, device=device)
            self._flags[device] = f
        return f

    def poll(self) -> bool:
        """Re-read the file if it changed; set every flag. Returns whether the arm changed."""
        m = self._stat()
        if m == self._mtime:
            return False
        self._mtime = m
        on = read_arm(self.path)
        if on == self.on:
            return False
        self.on = on
        for f in self._flags.values():
            f.fill_(on)
        self.flips += 1
        logger.info("xshare: A/B switch -> %s routing", "policy" if on else "SGLang's")
        return True

    def choose(self, policy_ids: torch.Tensor, policy_w: torch.Tensor, sglang_ids: torch.Tensor,
               sglang_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The arm's routing.

        Args:
            policy_ids / policy_w: the policy's ``[T, k]`` ids (int32) and weights (float32).
            sglang_ids / sglang_w: SGLang's ``[T, k]`` ids and weights (any int / float dtype).

        Returns:
            ``(ids, weights)`` in SGLang's dtypes, ``[T, k]``.
        """
        f = self.flag(policy_ids.device)
        ids = torch.where(f[:, None], policy_ids.to(sglang_ids.dtype), sglang_ids)
        w = torch.where(f[:, None], policy_w.to(sglang_w.dtype), sglang_w)
        return ids, w
