"""Placement device tables (``xshare_ep``): built without host sync, graph-safe, refreshed in place.

SGLang's EPLB rewrites ``physical_to_logical_map`` in place on a rebalance; the placement's map
is a view of it. :func:`refresh_tables_` recomputes the tables the reference and the Triton
kernel read, with device ops only. The kernel side of the refresh runs in Triton's interpreter
(``tests/test_kernels.py``, cases ``refresh-*``).
"""

from __future__ import annotations

import torch

from sglang_xshare import BudgetSchedule, Placement, RoutingSpec, SelectionConfig, Selector
from sglang_xshare.placement import placement_tables, refresh_tables_

from .conftest import clustered_logits

E, K = 8, 2


def _selector(placement: Placement, hard: bool = False) -> Selector:
    cfg = SelectionConfig(policy="xshare_ep", k0=1, budget=BudgetSchedule.parse("4"), hard_cap=hard)
    return Selector(RoutingSpec(E, K), cfg, placement, backend="reference")


def test_tables_match_the_map():
    placement = Placement.from_map(E, 2, [3, 0, 1, 2, 3, 7, 4, 5, 6, 0])
    t = placement_tables(placement, "cpu")
    assert t is placement_tables(placement, "cpu"), "built once per placement and device"
    assert t.slot_expert.tolist() == [3, 0, 1, 2, 3, 7, 4, 5, 6, 0] + [-1] * 6
    assert t.slot_rank.tolist()[:10] == [0] * 5 + [1] * 5
    assert t.copy.tolist() == [1, 2, 3, 0, 6, 7, 8, 5]  # lowest slot of each expert
    assert t.rank.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_xshare_ep_with_replicas_compiles_fullgraph():
    """No ``.cpu()`` / ``.tolist()`` / ``.item()`` on the replica path: torch.compile(fullgraph=True)
    traces the whole selection (and a refresh) without a graph break, and gives the eager bits."""
    placement = Placement.from_map(E, 2, list(range(E)) + [0, 5])
    for hard in (False, True):
        sel = _selector(placement, hard)
        x = clustered_logits(6, E, seed=3)
        eager = sel(x)
        compiled = torch.compile(lambda logits: sel(logits), fullgraph=True, backend="eager")
        out = compiled(x)
        assert torch.equal(out.topk_ids, eager.topk_ids) and torch.equal(out.physical_ids, eager.physical_ids)
    tables = placement_tables(placement, "cpu")
    torch.compile(refresh_tables_, fullgraph=True, backend="eager")(tables)


def test_xshare_ep_with_replicas_reads_nothing_on_the_host():
    """The whole selection -- tables built, refreshed, every budget mode, hard cap -- runs on the
    *meta* device, map included: any ``.cpu()`` / ``.tolist()`` / ``.item()`` (a host sync on a
    GPU) would raise there."""
    placement = Placement(E, 2, torch.tensor(list(range(E)) + [0, 5], device="meta"))  # meta map: no host copy
    x = torch.empty(6, E, device="meta")
    for budget in ("4", "0.6", "mass:0.9"):
        for hard in (False, True):
            cfg = SelectionConfig(policy="xshare_ep", k0=1, budget=BudgetSchedule.parse(budget), hard_cap=hard)
            out = Selector(RoutingSpec(E, K), cfg, placement, backend="reference")(x)
            assert out.physical_ids.device.type == "meta" and out.physical_ids.shape == (6, K)
    refresh_tables_(placement_tables(placement, "meta"))


def _remap(placement: Placement, new_map: list[int]) -> None:
    """What EPLB does: rewrite the map tensor in place (same storage, new contents)."""
    placement.physical_to_logical.copy_(torch.tensor(new_map))


def test_refresh_follows_an_in_place_rebalance():
    old = [0, 1, 2, 3, 0, 4, 5, 6, 7, 5]
    new = [4, 6, 2, 3, 7, 0, 1, 5, 6, 4]  # every expert moved, other experts replicated
    placement = Placement.from_map(E, 2, old)
    sel = _selector(placement)
    x = clustered_logits(12, E, seed=1)
    before = sel(x)
    _remap(placement, new)
    stale = sel(x)  # tables are a snapshot until refreshed
    assert torch.equal(stale.physical_ids, before.physical_ids)
    sel.refresh_placement_()
    after = sel(x)
    fresh = _selector(Placement.from_map(E, 2, new))(x)
    assert torch.equal(after.topk_ids, fresh.topk_ids) and torch.equal(after.physical_ids, fresh.physical_ids)
    kept = after.topk_ids >= 0
    assert torch.all(torch.tensor(new)[after.physical_ids[kept].long()] == after.topk_ids[kept].long())
    assert not torch.equal(after.physical_ids, before.physical_ids)
