"""Router-logit generators for the exactness checks and benchmarks (tests, ``bench/``).

* ``"randn"`` -- clustered random logits: each token leans to one of three preferred expert
  groups, as real routers do (batches then share experts, which is what the policies exploit);
* ``"ties"`` -- few integer levels and duplicated rows: many exactly equal scores and masses;
* ``"nonfinite"`` -- NaN rows, ``-inf`` rows, ``+inf`` entries, partly NaN / ``-inf`` rows;
* ``"range"`` -- gates over the whole dynamic range (``1e-30`` to 1): random logits in
  ``[-69, 0]``, the second half of the rows mirroring the first with two pairs of experts
  swapped (each pair's masses tie exactly), and "dust" rows adding gates of ``~1e-17`` to one of
  the first pair (below the masses' ``2**-40`` resolution: the tie must survive, in any token
  order) and of ``~1e-11`` to the higher id of the second pair (above it: that one must win);
* ``"underflow"`` -- as ``"randn"``, but every other row below ``-110``: sigmoid gates that
  all underflow to 0 (renormalised weights then fall back to uniform over the kept slots);
* ``"midpoint"`` -- the counter-example of a float64-accumulated mass (``T = 6``, ``E = 8``,
  top-2): experts 2 and 5 get the same two gates ``a, b`` (rows 0/1 and 4/5), expert 5 also two
  gates of ``~5e-17`` (rows 2/3); ``a + b`` is a float32 rounding midpoint, so a float64 sum
  rounds to float32 differently depending on the order the tiny gates are added in. Fixed-point
  masses drop the tiny gates: experts 2 and 5 tie, 2 wins;
* ``"dust"`` -- masses made of tiny gates only, around the ``2**-40`` resolution (``T = 6``,
  ``E >= 8``, top-2, experts 6 / 7 first): expert 1 gets two gates of ``~1e-10`` (~112 units
  each), expert 0 two of ``~5e-12`` (5 units each), expert 3 two of ``~9e-14`` (0 units: never
  picked, though a float sum would rank it next).
* ``"swapties"`` -- exact ties at the budget boundary, made of *different* gates (``E >= 16``):
  two tied pairs ``(0, s)`` and ``(1, s + 1)`` (``s = 8`` for ``E < 32``, else 16) and two warm
  experts ``2`` / ``3`` (logit 0, every token's top-1). Each row holds its warm expert and one
  pair with logits ``(u, v)`` in ``[-4, -0.5]`` (every other logit ``-200``: gate 0); its twin row
  holds ``(v, u)``. Both experts of a pair get the same gates in another token order, so their
  masses tie exactly while a float sum of them depends on the order. The paired columns meet
  first in a 8- or 16-lane row sum, so a twin's softmax denominator is the same float. Rows in
  random order. With ``k0 = 1`` a count budget of 3 (5) puts the boundary inside the heavier
  (lighter) pair.
"""

from __future__ import annotations

import torch

__all__ = ["KINDS", "make_logits"]

KINDS = ("randn", "ties", "nonfinite", "range", "underflow", "midpoint", "dust", "swapties")


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
    elif kind == "range":
        x = _dynamic_range(T, E, g)
    elif kind == "midpoint":
        x = _midpoint(T, E)
    elif kind == "dust":
        x = _dust(T, E)
    elif kind == "swapties":
        x = _swapped_pairs(T, E, g)
    elif kind == "underflow":
        x[::2] = x[::2] - 130.0
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


def _dynamic_range(T: int, E: int, g: torch.Generator) -> torch.Tensor:
    x = -torch.rand(T, E, generator=g) * 69.0  # exp(-69) ~ 1e-30
    if E < 4 or T < 2:
        return x
    i, j, i2, j2 = torch.randperm(E, generator=g)[:4].tolist()
    half = T // 2
    x[half: 2 * half] = x[:half]
    x[half: 2 * half, [i, j, i2, j2]] = x[:half, [j, i, j2, i2]]  # mirrored rows: exact ties within each pair
    others = [e for e in range(E) if e not in (i, j, i2, j2)] or [0]
    for n, r in enumerate(range(2 * half, T)):  # dust rows: one dominant expert, a dust gate second
        x[r] = -100.0
        x[r, others[n % len(others)]] = 0.0
        if n % 2 == 0:
            x[r, i] = -38.0  # ~3e-17 < 2^-40: counts 0, the (i, j) tie survives
        else:
            x[r, max(i2, j2)] = -25.0  # ~1.4e-11 > 2^-40: the higher id of (i2, j2) wins
    return x


def _midpoint_rows(l0: float, l1: float) -> torch.Tensor:
    x = torch.full((6, 8), -30.0)
    x[0, 6], x[0, 5] = 0.0, l0
    x[1, 6], x[1, 5] = 0.0, l1
    x[2:4] = -100.0
    x[2:4, 7], x[2:4, 5] = 0.0, -37.6
    x[4:6] = x[0:2]
    x[4:6, [2, 5]] = x[0:2, [5, 2]]
    return x


def _midpoint(T: int, E: int) -> torch.Tensor:
    if T < 6 or E < 8:
        raise ValueError("the 'midpoint' inputs need T >= 6 and E >= 8")
    l0, l1 = -0.4268, -0.3191
    for _ in range(1000):  # nudge l1 until a + b is a float32 midpoint (odd multiple of its half-ulp)
        gate = torch.softmax(_midpoint_rows(l0, l1), dim=-1)
        s = gate[0, 5].double() + gate[1, 5].double()
        if s.float().double() != s:
            break
        l1 = float(torch.nextafter(torch.tensor(l1), torch.tensor(0.0)))
    x = torch.full((T, E), -30.0)
    x[:, 6] = 0.0  # rows past 6: expert 6, and expert 0 with a gate ~1e-13
    x[:6, :8] = _midpoint_rows(l0, l1)
    if E > 8:
        x[:6, 8:] = -100.0
    return x


def _dust(T: int, E: int) -> torch.Tensor:
    if T < 6 or E < 8:
        raise ValueError("the 'dust' inputs need T >= 6 and E >= 8")
    x = torch.full((T, E), -100.0)
    x[:, 6] = 0.0
    x[2:4, 6], x[2:4, 7] = -100.0, 0.0
    x[0:2, 1] = -23.0  # gate ~1.0e-10: ~112 units
    x[2:4, 0] = -26.0  # ~5.1e-12: 5 units
    x[4:6, 3] = -30.0  # ~9.4e-14: 0 units
    return x


def _swapped_pairs(T: int, E: int, g: torch.Generator) -> torch.Tensor:
    if E < 16 or T % 2:
        raise ValueError("the 'swapties' inputs need E >= 16 and an even T")
    s = 8 if E < 32 else 16
    pairs, warm = ((0, s), (1, s + 1)), (2, 3)
    x = torch.full((T, E), -200.0)
    uv = -0.5 - 3.5 * torch.rand(T // 2, 2, generator=g)
    for r in range(T // 2):
        i, j = pairs[r % 2]
        u, v = uv[r].tolist()
        x[2 * r, warm[r % 2]] = x[2 * r + 1, warm[r % 2]] = 0.0
        x[2 * r, i], x[2 * r, j] = u, v
        x[2 * r + 1, i], x[2 * r + 1, j] = v, u
    return x[torch.randperm(T, generator=g)]
