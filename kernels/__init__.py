"""Triton fast paths of the selection policies (``import sglang_xshare.kernels``).

:mod:`.select` exports one ``KernelFn`` per policy (see :mod:`sglang_xshare.select.registry`);
the Triton code lives in small modules, one stage each: :mod:`._core` (keys, scoring, per-token
top-k), :mod:`._tile` (what a program does to its tile: scan, request picks, refinement),
:mod:`._pick` (budgets and picks), :mod:`._batch` (the one-launch batch kernel and its grid
barrier), :mod:`._refine` (refinement as its own launch), :mod:`._spec` (``xshare_spec`` for
arbitrary request ids), :mod:`.workspace` (launch plans, buffers). Importing this package needs
Triton; the registry imports it lazily.
"""
