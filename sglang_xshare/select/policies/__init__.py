"""Reference implementations, one module per policy: plain vectorised PyTorch, the test oracle.

Each exposes ``reference(scores: Scores, ctx: BatchContext) -> SelectionOutput``.
"""
