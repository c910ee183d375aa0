"""Triton fast paths of the selection policies (``import sglang_xshare.kernels``).

:mod:`.select` exports one ``KernelFn`` per policy (see :mod:`sglang_xshare.select.registry`);
the Triton code lives in small modules: :mod:`._core` (keys, scoring, per-token top-k),
:mod:`._pick` (budgets and picks), :mod:`._mass` (batch pass), :mod:`._refine`
(refinement), :mod:`._spec` (two-level speculative pick), :mod:`.workspace` (plans, buffers).
Importing this package needs Triton; the registry imports it lazily.
"""
