"""Shared fixtures: random router logits with the cluster structure real routers have."""

from __future__ import annotations

import logging

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


class _Warnings(logging.Handler):
    """Messages of WARNING and above that reach one logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def warnings_of():
    """``warnings_of(name)`` -> a handler collecting that logger's warnings until the test ends.

    pytest's ``caplog`` is off under ``-p no:logging``, which is how ``make test`` runs the suite."""
    attached: list[tuple[logging.Logger, _Warnings]] = []

    def attach(name: str) -> _Warnings:
        log, handler = logging.getLogger(name), _Warnings()
        log.addHandler(handler)
        attached.append((log, handler))
        return handler

    yield attach
    for log, handler in attached:
        log.removeHandler(handler)
