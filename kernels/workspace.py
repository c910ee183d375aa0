"""Launch plans and preallocated buffers of the selection kernels (host side, no device sync).

Buffers live in the ``workspace`` dict the :class:`~sglang_xshare.select.Selector` owns, keyed
by ``(policy, T, E, k, device, logits dtype)``: the first (eager) call of a shape allocates
them, every later call -- a CUDA-graph capture and its replays included -- reuses them and
allocates nothing but its outputs (``torch.empty``; during capture they come from the graph's
private pool). ``workspace["reuse_outputs"] = True`` makes the outputs workspace buffers too
(then a call overwrites the previous call's outputs of the same shape).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from sglang_xshare.config import Budget, RoutingSpec
from sglang_xshare.placement import Placement
from sglang_xshare.select.policies.xshare_ep import copies_table

__all__ = ["Plan", "plan", "Buffers", "buffers", "budget_args", "placement_tables", "routing_constexprs",
           "MAX_PROGRAMS", "FUSE_TILES", "TILE_ELEMS"]

#: Elements of one ``[BT, BLOCK_E]`` tile (BT: 32 rows at E=64, 8 at E=256, 4 at E=384; 4096 measured slower at T=1).
TILE_ELEMS = 2048
#: A batch of at most this many tiles runs as one fused program (one launch in all); the fused
#: program keeps its single tile in registers, so only 1 is supported.
FUSE_TILES = 1
#: Upper bound on the batch pass's grid; beyond it a program scores several tiles.
MAX_PROGRAMS = 128
#: Elements of one tile of partial rows read by the reducing program.
REDUCE_ELEMS = 4096
#: ``eps`` of the fraction budget, ``ceil(n * f - 1e-6)``.
_FRACTION_EPS = 1e-6


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Plan:
    """Launch geometry for ``T`` tokens and ``E`` experts.

    Attributes:
        block_e: ``E`` padded to a power of two; bt: tokens per tile; tiles: ``cdiv(T, bt)``;
        chunks: tiles per program of the batch pass; nb: its grid; fused: one program does
        everything; rb: partial rows per reduction step.
    """

    block_e: int
    bt: int
    tiles: int
    chunks: int
    nb: int
    fused: bool
    rb: int


def plan(T: int, E: int, fuse_tiles: int = FUSE_TILES) -> Plan:
    """The :class:`Plan` of a ``[T, E]`` batch (pure function of the shape and ``fuse_tiles``)."""
    block_e = max(16, _pow2(E))
    bt = max(1, min(64, TILE_ELEMS // block_e))
    tiles = max(1, -(-T // bt))
    rb = max(1, REDUCE_ELEMS // block_e)
    if tiles <= min(fuse_tiles, 1):
        return Plan(block_e, bt, tiles, tiles, 1, True, rb)
    chunks = max(1, -(-tiles // MAX_PROGRAMS))
    nb = -(-tiles // chunks)
    # rb is a function of E only: a T-dependent constexpr would compile a variant per batch size
    return Plan(block_e, bt, tiles, chunks, nb, False, rb)


class Buffers:
    """Scratch of one shape. All ``int32`` unless noted; ``BE`` = ``plan.block_e``.

    Attributes:
        part_mass: ``[nb, BE] float32``; part_flags: ``[nb, BE]``; ticket: ``[1]`` (zero);
        sel_buf / order_buf: ``[BE]``; pk_buf ``[BE] int64`` / val_buf ``[BE] float32`` (pick
        scratch); dummy: ``[1]``. ``xshare_spec`` adds ``contrib [T, BE]
        float32``, ``tflags [T, BE] int8``, ``chosen_r [T, BE] int8``, ``gmass [T, BE] float32``,
        ``gflags [T, BE]``, ``gtot [T] float32``, ``gne [T]``, ``glist [T]``, ``gpk [T, BE] int64``,
        ``gval [T, BE] float32``, ``ticket_g [1]``.
        out_ids / out_w / out_phys: ``[T, k]`` outputs when ``reuse_outputs``.
    """

    def __init__(self, p: Plan, T: int, k: int, device: torch.device, spec: bool) -> None:
        i32, f32 = torch.int32, torch.float32
        be = p.block_e
        self.plan = p
        self.part_mass = torch.zeros(p.nb, be, dtype=f32, device=device)
        self.part_flags = torch.zeros(p.nb, be, dtype=i32, device=device)
        self.ticket = torch.zeros(1, dtype=i32, device=device)
        self.sel_buf = torch.full((be,), -1, dtype=i32, device=device)
        self.order_buf = torch.zeros(be, dtype=i32, device=device)
        self.pk_buf = torch.zeros(be, dtype=torch.int64, device=device)
        self.val_buf = torch.zeros(be, dtype=f32, device=device)
        self.dummy = torch.zeros(1, dtype=i32, device=device)
        self.valid_all = torch.ones(max(T, 1), dtype=torch.uint8, device=device)
        if spec:
            self.contrib = torch.zeros(T, be, dtype=f32, device=device)
            self.tflags = torch.zeros(T, be, dtype=torch.int8, device=device)
            self.chosen_r = torch.zeros(T, be, dtype=torch.int8, device=device)
            self.gmass = torch.zeros(T, be, dtype=f32, device=device)
            self.gflags = torch.zeros(T, be, dtype=i32, device=device)
            self.gtot = torch.zeros(T, dtype=f32, device=device)
            self.gne = torch.zeros(T, dtype=i32, device=device)
            self.glist = torch.zeros(T, dtype=i32, device=device)
            self.gpk = torch.zeros(T, be, dtype=torch.int64, device=device)
            self.gval = torch.zeros(T, be, dtype=f32, device=device)
            self.ticket_g = torch.zeros(1, dtype=i32, device=device)
        self.out_ids = torch.empty(T, k, dtype=i32, device=device)
        self.out_w = torch.empty(T, k, dtype=f32, device=device)
        self.out_phys = torch.empty(T, k, dtype=i32, device=device)


def buffers(workspace: dict, policy: str, T: int, E: int, k: int, device: torch.device, dtype: torch.dtype) -> Buffers:
    """The :class:`Buffers` of this shape, allocated on first use (``workspace["fuse_tiles"]``
    overrides :data:`FUSE_TILES`, for tuning)."""
    fuse = int(workspace.get("fuse_tiles", FUSE_TILES))
    key = (policy, T, E, k, str(device), dtype, fuse)
    buf = workspace.get(key)
    if buf is None:
        buf = Buffers(plan(T, E, fuse), T, k, device, spec=policy == "xshare_spec")
        workspace[key] = buf
    return buf


def _double_bits(x: float) -> int:
    """IEEE-754 bit pattern of a float64 as a (positive, > 2**31) Python int."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def budget_args(budget: Budget | None) -> tuple[int, int, int, int, float, float]:
    """``(MODE, count, frac_bits, eps_bits, mass_x, 1 - 1e-6)`` kernel arguments of a budget."""
    if budget is None:
        budget = Budget("count", 1.0)
    mode = {"count": 0, "fraction": 1, "mass": 2}[budget.mode]
    count = int(budget.value) if budget.mode == "count" else 0
    frac = budget.value if budget.mode == "fraction" else 1.0
    mass = budget.value if budget.mode == "mass" else 1.0
    return mode, count, _double_bits(frac), _double_bits(_FRACTION_EPS), float(mass), 1.0 - 1e-6


@dataclass
class PlacementTables:
    """Device tables of a placement (``int32``).

    Attributes:
        rank / copy: ``[E]`` rank and physical slot of each logical expert (replica-free);
        copies / slot_rank: ``[E, block_c]`` physical slots (ascending, -1 padded) and their ranks;
        num_ranks, experts_per_rank, replicated, block_c, block_r.
    """

    placement: Placement
    rank: torch.Tensor
    copy: torch.Tensor
    copies: torch.Tensor
    slot_rank: torch.Tensor
    num_ranks: int
    experts_per_rank: int
    replicated: bool
    block_c: int
    block_r: int


def placement_tables(workspace: dict, placement: Placement | None, E: int, device: torch.device) -> PlacementTables:
    """Build (once per placement object and device) the tables :mod:`._pick` reads."""
    placement = placement or workspace.get(("tp_placement", E)) or Placement.tensor_parallel(E)
    workspace[("tp_placement", E)] = workspace.get(("tp_placement", E), placement)
    key = ("placement", id(placement), str(device))
    tab = workspace.get(key)
    if tab is not None and tab.placement is placement:
        return tab
    table = copies_table(placement)  # [E, C] int64, -1 padded (host, config time)
    C = table.shape[1]
    block_c = max(2, _pow2(C))
    copies = torch.full((E, block_c), -1, dtype=torch.int64)
    copies[:, :C] = table
    slot_rank = torch.where(copies >= 0, copies.clamp(min=0) // placement.experts_per_rank, torch.zeros_like(copies))
    tab = PlacementTables(
        placement=placement,
        rank=slot_rank[:, 0].to(device=device, dtype=torch.int32),
        copy=copies[:, 0].to(device=device, dtype=torch.int32),
        copies=copies.to(device=device, dtype=torch.int32).contiguous(),
        slot_rank=slot_rank.to(device=device, dtype=torch.int32).contiguous(),
        num_ranks=placement.num_ranks,
        experts_per_rank=placement.experts_per_rank,
        replicated=placement.has_replicas,
        block_c=block_c,
        block_r=max(2, _pow2(placement.num_ranks)),
    )
    workspace[key] = tab
    return tab


def routing_constexprs(routing: RoutingSpec, has_bias: bool) -> dict:
    """Scoring constexprs: ``SIGMOID, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G``."""
    g = routing.num_expert_group or 0
    return dict(
        SIGMOID=routing.scoring == "sigmoid",
        HAS_BIAS=bool(has_bias),
        N_GROUP=g,
        TOPK_GROUP=routing.topk_group or 0,
        GROUP_SIZE=routing.num_experts // g if g else 1,
        BLOCK_G=max(2, _pow2(g)) if g else 2,
    )
