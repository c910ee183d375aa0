"""Reserve one bundle per node on a Ray cluster (``STRICT_SPREAD``), or fail clearly in time.

A bundle is ``{RESOURCE: gpus_per_node, "CPU": cpus_per_node}`` where ``RESOURCE`` is
``GPU`` by default and any custom node resource otherwise (``ray start --resources
'{"fake_gpu": 2}'`` in tests, or a site-specific accelerator name). ``STRICT_SPREAD``
puts every bundle on a different node; bundle ``r`` hosts node rank ``r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

__all__ = ["BundleSpec", "PlacementUnsatisfiable", "reserve", "bundle_node_ids", "release"]


class PlacementUnsatisfiable(RuntimeError):
    """The placement group did not become ready within the timeout."""


@dataclass(frozen=True)
class BundleSpec:
    """What each node's bundle reserves.

    Attributes:
        nnodes: number of bundles (= nodes), >= 1.
        resource: accelerator resource name (``"GPU"`` or a custom node resource).
        per_node: amount of ``resource`` per bundle, > 0.
        cpus: CPUs per bundle (the node actor's own share; the command uses what it likes).
    """

    nnodes: int
    resource: str
    per_node: float
    cpus: float = 1.0

    def bundle(self) -> dict[str, float]:
        """The resource dict of one bundle."""
        b = {self.resource: float(self.per_node)}
        if self.cpus > 0:
            b["CPU"] = float(self.cpus)
        return b

    def actor_options(self) -> dict[str, Any]:
        """Options for a node actor that takes its whole bundle.

        With ``resource == "GPU"`` the actor asks ``num_gpus``, so Ray sets
        ``CUDA_VISIBLE_DEVICES`` to the bundle's devices and the node's command inherits it.
        """
        if self.resource == "GPU":
            return {"num_cpus": self.cpus, "num_gpus": self.per_node}
        return {"num_cpus": self.cpus, "num_gpus": 0, "resources": {self.resource: self.per_node}}


def _shortfall(spec: BundleSpec, timeout_s: float) -> str:
    bundle = spec.bundle()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in bundle.items())]
    lines = [
        f"placement group of {spec.nnodes} bundles {bundle} (STRICT_SPREAD: one per node) was not ready "
        f"within {timeout_s:g} s (--placement-timeout).",
        f"{len(fits)} of {len(nodes)} alive nodes have these resources in total (need {spec.nnodes}, "
        f"each free of other reservations):",
    ]
    for n in nodes:
        res = n.get("Resources", {})
        have = ", ".join(f"{k}={res.get(k, 0.0):g}" for k in bundle)
        lines.append(f"  node {n.get('NodeManagerAddress')} ({n.get('NodeID', '')[:12]}): {have}")
    lines.append(
        "Fix: fewer --nnodes, a smaller --gpus-per-node, the right --gpu-resource, or add nodes to the cluster."
    )
    return "\n".join(lines)


def reserve(spec: BundleSpec, timeout_s: float, name: str = "") -> PlacementGroup:
    """Create the placement group and wait until it is ready.

    Raises:
        PlacementUnsatisfiable: not ready within ``timeout_s``; the group is removed and the
            message lists what the alive nodes have.
    """
    pg = placement_group([spec.bundle() for _ in range(spec.nnodes)], strategy="STRICT_SPREAD", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        message = _shortfall(spec, timeout_s)
        remove_placement_group(pg)
        raise PlacementUnsatisfiable(message)
    return pg


def bundle_node_ids(pg: PlacementGroup) -> list[str]:
    """Ray node id hosting each bundle, by bundle index."""
    table = placement_group_table(pg)
    mapping = table["bundles_to_node_id"]
    return [mapping[i] for i in range(len(mapping))]


def release(pg: PlacementGroup | None) -> None:
    """Remove the placement group (idempotent; a lost connection is ignored)."""
    if pg is None:
        return
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - teardown must go on
        pass
