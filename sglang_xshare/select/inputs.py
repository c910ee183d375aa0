"""Router-logit generators for the exactness checks and benchmarks (tests, ``bench/``).

* ``"randn"`` -- clustered random logits: each token leans to one of three preferred expert
  groups, as real routers do (batches then share experts, which is what the policies exploit);
* ``"ties"`` -- few integer levels and duplicated rows: many exactly equal scores and masses;
* ``"nonfinite"`` -- NaN rows, ``-inf`` rows, ``+inf`` entries, partly NaN / ``-inf`` rows.
"""

from __future__ import annotations

import torch

__all__ = ["KINDS", "make_logits"]

KINDS = ("randn", "ties", "nonfinite")


def make_logits(kind: str, T: int, E: int, seed: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``[T, E]`` router logits of ``kind`` (see the module docstring), deterministic in ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, E, generator=g) * 2.5
    x = centers[torch.randint(0, 3, (T,), generator=g)] + torch.randn(T, E, generator=g)
    if kind == "ties":
        x = torch.randint(0, 4, (T, E), generator=g).float()
        if T >= 2:
            x[T // 2:] = x[: T - T // 2]
    elif kind == "nonfinite" and T >= 6:
        x[0, :] = float("nan")
        x[1, :] = float("-inf")
        x[2, 3] = float("inf")
        x[2, 5] = float("inf")
        x[3, ::2] = float("nan")
        x[4, 1::3] = float("-inf")
        x[5, 7] = float("inf")
        x[5, 8] = float("nan")
    return x.to(dtype=dtype, device=device)
