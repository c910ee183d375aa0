"""Shared fixtures: random router logits with the cluster structure real routers have."""

from __future__ import annotations

import pytest
import torch


def clustered_logits(T: int, E: int, seed: int, clusters: int = 3, spread: float = 2.5) -> torch.Tensor:
    """``[T, E] float32`` logits: each token leans to one of ``clusters`` preferred expert groups."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, E, generator=g) * spread
    which = torch.randint(0, clusters, (T,), generator=g)
    return centers[which] + torch.randn(T, E, generator=g)


@pytest.fixture
def logits_factory():
    return clustered_logits
