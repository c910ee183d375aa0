"""Shared set-up of the tests that run the hook inside real SGLang 0.5.23 routing objects on a CPU:
the layer's sizes, clustered router logits, SGLang's CPU runtime context and the install fixture."""

from __future__ import annotations

import pytest
import torch

from sglang_xshare.serving import install
from sglang_xshare.serving.config import XShareServerConfig

#: Experts, top-k, tokens of a batch, hidden size of the test layer.
E, K, T, HIDDEN = 32, 4, 24, 16


def _logits(seed: int, n: int = T, e: int = E) -> torch.Tensor:
    """``[n, e] float32`` router logits leaning to one of three expert groups per token."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, e, generator=g) * 2.5
    return centers[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, e, generator=g)


@pytest.fixture(scope="module")
def sg():
    """Import SGLang once and publish a CPU runtime context (as SGLang's own tests do)."""
    from sglang.srt.layers.moe import topk
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    reset_context()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    yield topk
    reset_context()


@pytest.fixture
def installed():
    """Install a config for one test; always uninstall."""
    def _install(**kw):
        cfg = XShareServerConfig(**kw)
        install.install(cfg)
        return cfg
    yield _install
    install.uninstall()


def _topk(sg, **kw):
    """SGLang's real ``TopK`` of the test layer (layer 3 unless given)."""
    kw.setdefault("layer_id", 3)
    return sg.TopK(top_k=K, renormalize=kw.pop("renormalize", True), **kw)
