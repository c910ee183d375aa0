"""Launch plans and preallocated buffers of the selection kernels (host side, no device sync).

Buffers live in the ``workspace`` dict the :class:`~sglang_xshare.select.Selector` owns, keyed
by the call's shape: the first (eager) call of a shape allocates them, every later call -- a
CUDA-graph capture and its replays included -- reuses them and allocates nothing but its
outputs (``torch.empty``; during capture they come from the graph's private pool).
``workspace["reuse_outputs"] = True`` makes the outputs workspace buffers too (then a call
overwrites the previous call's outputs of the same shape).

Tuning knobs (``workspace`` keys, for benchmarks): ``"num_warps"``, ``"tile_elems"`` (elements
of one ``[BT, BLOCK_E]`` tile), ``"sync"`` (force 1 = grid barrier or 2 = two launches),
``"programs"`` (grid cap; 1 = one program for any batch: no grid synchronisation at all -- with
``"sync": 1`` that one program still runs the grid-barrier code path, trivially satisfied),
``"pair_chunk"`` (keys per step of the pick), ``"two_stage"`` (force the two-stage grid
reduction on / off), ``"cooperative"`` (launch grid-barrier plans cooperatively, default True on
CUDA: the driver guarantees co-residency or fails the launch), ``"max_spins"`` (barrier polls
before a program gives up and routes by top-k), ``"interpreter_barrier"`` (plan the grid barrier
under the interpreter too, which runs programs one after another: every program but the last
gives up -- the CPU test of that fallback), ``"plan_as_gpu"`` (plan as on a GPU where the tensors are not on one: ahead-of-time compile checks).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import torch

from sglang_xshare.config import Budget, RoutingSpec
from sglang_xshare.placement import Placement, PlacementTables
from sglang_xshare.placement import placement_tables as _device_tables
from sglang_xshare.select.common import MASS_SLACK
from sglang_xshare.select.policies.xshare_ep import tensor_parallel
from sglang_xshare.select.registry import get_policy

__all__ = ["Plan", "plan", "Buffers", "buffers", "budget_args", "placement_tables", "routing_constexprs",
           "fault_counter", "MAX_PROGRAMS", "TILE_ELEMS", "TILE_ELEMS_MAX", "TWO_STAGE_ELEMS", "max_programs", "interpreting"]

#: Default elements of one ``[BT, BLOCK_E]`` tile (BT = 8 rows at E = 64, 2 at E = 256; measured on
#: an H100: smaller tiles = shorter unrolled code), for batches that need more than one tile; a
#: smaller batch gets a tile of its own size.
TILE_ELEMS = 512
#: Largest tile: a batch is cut into at most :func:`max_programs` tiles while tiles stay under this.
TILE_ELEMS_MAX = 16384
#: Upper bound on the grid of the one-launch batch kernel (all its programs must be resident);
#: beyond it tiles grow.
MAX_PROGRAMS = 128
#: Elements of one tile of partial rows read per reduction step.
REDUCE_ELEMS = 4096
#: The grid barrier reduces in two stages from this many partial elements (``NB * BLOCK_E``) on.
TWO_STAGE_ELEMS = 8192
#: Default warps per program.
NUM_WARPS = 4
#: ``eps`` of the fraction budget, ``ceil(n * f - 1e-6)``.
_FRACTION_EPS = 1e-6


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (programs run one after another there)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SM_COUNT: dict[str, int] = {}
_FAULTS: dict[str, torch.Tensor] = {}


def fault_counter(device: torch.device) -> torch.Tensor:
    """``[1] int64`` on ``device``: grid-barrier waits that did not fill (each such program routed
    its tokens by their own top-k instead). Shared by every selector on the device; read it off
    the hot path (the serving hook copies it asynchronously at step ends and warns when it grows)."""
    key = str(device)
    t = _FAULTS.get(key)
    if t is None:
        t = _FAULTS[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


def max_programs(device: torch.device) -> int:
    """Grid cap of the grid-barrier mode: :data:`MAX_PROGRAMS`, at most the multiprocessor count
    (read once per device: config time, not per call)."""
    key = str(device)
    if key not in _SM_COUNT:
        n = MAX_PROGRAMS
        if device.type == "cuda":
            n = min(n, torch.cuda.get_device_properties(device).multi_processor_count)
        _SM_COUNT[key] = max(1, n)
    return _SM_COUNT[key]


@dataclass(frozen=True)
class Plan:
    """Launch geometry of a ``[T, E]`` batch.

    Attributes:
        block_e: ``E`` padded to a power of two; bt: rows per tile; gp: rows per request
            (request groups; 1 otherwise); nb: grid; chunks: tiles per program; sync: 0 one
            program, 1 grid barrier, 2 two launches; rb: partial rows per reduction step; ch:
            keys per pairwise step; num_warps: warps per program; two_stage: grid-barrier
            reduction in two stages, ``cw`` columns and ``rb2`` rows per step each.
    """

    block_e: int
    bt: int
    gp: int
    nb: int
    chunks: int
    sync: int
    rb: int
    ch: int
    num_warps: int
    two_stage: bool = False
    cw: int = 1
    rb2: int = 1


def plan(T: int, E: int, *, group: int = 0, spin: bool = True, programs: int = MAX_PROGRAMS,
         tile_elems: int = TILE_ELEMS, num_warps: int = NUM_WARPS, sync: int | None = None,
         pair_chunk: int | None = None, two_stage: bool | None = None, heavy_pick: bool = False) -> Plan:
    """The :class:`Plan` of ``T`` tokens over ``E`` experts (a pure function of its arguments).

    Args:
        group: tokens per request when requests are contiguous groups (``xshare_spec``), else 0.
        spin: the grid barrier may be used (False under the interpreter).
        programs: grid cap of the grid barrier (:func:`max_programs`); 1 = one program loops
            over every tile (no grid synchronisation at all; with ``sync=1`` it still takes the
            barrier path, a barrier of one program -- what the CPU tests run of it).
        tile_elems: target elements per tile; the tile never exceeds the batch.
        sync: force a synchronisation mode (1 or 2) when the batch needs several tiles.
        pair_chunk: keys compared per step of the pick (:func:`~._pick.pairwise`); default by T
            and ``heavy_pick`` (the pick keeps per-rank counts too: ``xshare_ep``).
        two_stage: force the two-stage grid reduction on / off (default: grids of at least
            :data:`TWO_STAGE_ELEMS` partial elements).
    """
    block_e = max(16, _pow2(E))
    gp = _pow2(group) if group else 1
    units = -(-T // group) if group else T  # requests or tokens
    per = max(1, tile_elems // (block_e * gp))
    per = min(per, _pow2(max(units, 1)))
    tiles = max(1, -(-units // per))
    rb = max(1, REDUCE_ELEMS // block_e)  # a function of E only: no variant per batch size
    if pair_chunk is None:  # measured on an H100 (bench_select sweep): few pickable experts -> short steps
        pair_chunk = 16 if T <= 2 else (64 if T <= 64 and not heavy_pick else 32)
    ch = min(block_e, _pow2(pair_chunk))

    def done(mode: int, nb: int, chunks: int) -> Plan:
        two = mode == 1 and nb * block_e >= (TWO_STAGE_ELEMS if two_stage is None else (0 if two_stage else 1 << 62))
        cw = max(1, _pow2(-(-block_e // nb)))
        return Plan(block_e, per * gp, gp, nb, chunks, mode, rb, ch, num_warps, two, cw,
                    max(1, min(_pow2(nb), REDUCE_ELEMS // cw)))

    if programs == 1 and sync == 1:
        # one program that still meets at the grid barrier (trivially satisfied: it is the whole
        # grid): the barrier mode's partials, tickets and reductions, runnable in the interpreter
        return done(1, 1, tiles)
    if tiles == 1 or programs == 1:
        return done(0, 1, tiles)
    mode = sync or (1 if spin else 2)
    if mode == 2:
        return done(2, tiles, 1)
    while tiles > programs and per * 2 * block_e * gp <= TILE_ELEMS_MAX:
        per *= 2
        tiles = -(-units // per)
    if tiles == 1:
        return done(0, 1, 1)
    chunks = max(1, -(-tiles // programs))
    return done(1, -(-tiles // chunks), chunks)


class Buffers:
    """Scratch of one shape. All ``int32`` unless noted; ``BE`` = ``plan.block_e``.

    Attributes:
        part_mass: ``[rows, BE] int64``, part_flags: ``[rows, BE]``, part_tot: ``[rows] int64``
            (fixed-point masses, :func:`sglang_xshare.select.common.mass_units`)
            (``rows`` = grid, or ``T`` for the general ``xshare_spec`` path); sync: ``[2] int64``
            launch tickets (they only grow); sel: ``[BE]``; req: ``[T, BE] int8`` (``xshare_spec``,
            else ``[1, BE]``); dummy: ``[1]``;
            pk_scr / val_scr: ``[rows, BE]`` int64 / int64 pick scratch, one row per program;
            tot_mass / tot_flags / tot_tot: ``[BE]`` int64 / int32 and ``[1]`` int64 two-stage totals;
            rk_scr / rv_scr: ``[rows * requests per tile, BE]`` int64 / int64 request-pick scratch.
        contrib / tflags: ``[T, BE]`` int64 / int32 (general ``xshare_spec`` path).
        out_ids / out_w / out_phys: ``[T, k]`` outputs when ``reuse_outputs``.
    """

    def __init__(self, p: Plan, T: int, k: int, device: torch.device, general_spec: bool,
                 spec_groups: bool = False) -> None:
        i32, i64 = torch.int32, torch.int64
        be = p.block_e
        rows = max(T, 1) if general_spec else p.nb
        self.plan = p
        self.part_mass = torch.zeros(rows, be, dtype=i64, device=device)
        self.part_flags = torch.zeros(rows, be, dtype=i32, device=device)
        self.part_tot = torch.zeros(rows, dtype=i64, device=device)
        self.sync = torch.zeros(2, dtype=torch.int64, device=device)
        self.okv = torch.ones(max(p.nb, 1), dtype=i32, device=device)
        self.stats = torch.zeros(2, be, dtype=torch.int64, device=device)
        self.sel = torch.full((be,), -1, dtype=i32, device=device)
        # each token's request set: read only by xshare_spec's two-launch and arbitrary-id paths
        self.req = torch.zeros(max(T, 1) if spec_groups or general_spec else 1, be, dtype=torch.int8, device=device)
        self.dummy = torch.zeros(1, dtype=i32, device=device)
        self.tot_mass = torch.zeros(be, dtype=i64, device=device)
        self.tot_flags = torch.zeros(be, dtype=i32, device=device)
        self.tot_tot = torch.zeros(1, dtype=i64, device=device)
        self.pk_scr = torch.zeros(rows, be, dtype=i64, device=device)
        self.val_scr = torch.zeros(rows, be, dtype=i64, device=device)
        per = p.bt // p.gp if p.gp > 1 or spec_groups else 1
        self.rk_scr = torch.zeros(rows * per, be, dtype=i64, device=device)
        self.rv_scr = torch.zeros(rows * per, be, dtype=i64, device=device)
        if general_spec:
            self.contrib = torch.zeros(max(T, 1), be, dtype=i64, device=device)
            self.tflags = torch.zeros(max(T, 1), be, dtype=i32, device=device)
        self.out_ids = torch.empty(T, k, dtype=i32, device=device)
        self.out_w = torch.empty(T, k, dtype=torch.float32, device=device)
        self.out_phys = torch.empty(T, k, dtype=i32, device=device)
        self._metrics: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.device = device

    def metrics_scratch(self, num_units: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(used [pow2(U)] int32, top [BE] int32, ticket [1] int64)`` of the fused metrics
        (:mod:`._metrics`), zeroed once; the kernels clear the sets after each call. Per shape,
        so the ticket counts one grid size."""
        sc = self._metrics.get(num_units)
        if sc is None:
            sc = (torch.zeros(max(16, _pow2(num_units)), dtype=torch.int32, device=self.device),
                  torch.zeros(self.plan.block_e, dtype=torch.int32, device=self.device),
                  torch.zeros(1, dtype=torch.int64, device=self.device))
            self._metrics[num_units] = sc
        return sc


def idle_stats(E: int, device: torch.device) -> torch.Tensor:
    """Zeros shaped as the batch statistics a selecting call all-reduces under global selection
    (``Buffers.stats``: ``[2, BLOCK_E] int64``, ``BLOCK_E`` independent of the batch): what a call
    with no tokens joins the collective with, so that every rank runs the same collectives."""
    return torch.zeros(2, plan(1, E).block_e, dtype=torch.int64, device=device)


def buffers(workspace: dict, policy: str, T: int, E: int, k: int, device: torch.device, dtype: torch.dtype,
            group: int = 0, general_spec: bool = False, two_launch: bool = False) -> Buffers:
    """The :class:`Buffers` (and plan) of this call's shape, allocated on first use
    (``two_launch``: the one-tile-per-program geometry of the two-launch modes, any device)."""
    knobs = (int(workspace.get("num_warps", NUM_WARPS)), int(workspace.get("tile_elems", TILE_ELEMS)),
             2 if two_launch else workspace.get("sync"), workspace.get("programs"), workspace.get("pair_chunk"),
             workspace.get("two_stage"))
    key = ("buffers", policy, T, E, k, str(device), dtype, group, general_spec, knobs, two_launch)
    buf = workspace.get(key)
    if buf is None:
        spin = (device.type == "cuda" or bool(workspace.get("plan_as_gpu"))) and not interpreting() \
            or bool(workspace.get("interpreter_barrier")) or two_launch
        programs = max_programs(device) if knobs[3] is None else min(int(knobs[3]), max_programs(device))
        forced = knobs[2] if spin or knobs[3] == 1 else None  # a one-program barrier also runs in the interpreter
        p = plan(T, E, group=group, spin=spin, programs=programs, tile_elems=knobs[1],
                 num_warps=knobs[0], sync=forced, pair_chunk=knobs[4], two_stage=knobs[5],
                 heavy_pick=get_policy(policy).uses_placement)
        buf = Buffers(p, T, k, device, general_spec, spec_groups=group > 0)
        workspace[key] = buf
    return buf


def _double_bits(x: float) -> int:
    """IEEE-754 bit pattern of a float64 as a (positive, > 2**31) Python int."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def budget_args(budget: Budget | None) -> tuple[int, int, int, int, int, int]:
    """``(MODE, count, frac_bits, eps_bits, mass_bits, slack_bits)`` kernel arguments of a budget:
    the float64 values travel as their IEEE-754 bit patterns (``mass:X``'s ``X`` and ``1 - 1e-6``,
    see :func:`sglang_xshare.select.common.mass_threshold`), so nothing is rounded to float32."""
    if budget is None:
        budget = Budget("count", 1.0)
    mode = {"count": 0, "fraction": 1, "mass": 2}[budget.mode]
    count = int(budget.value) if budget.mode == "count" else 0
    frac = budget.value if budget.mode == "fraction" else 1.0
    mass = budget.value if budget.mode == "mass" else 1.0
    return mode, count, _double_bits(frac), _double_bits(_FRACTION_EPS), _double_bits(mass), _double_bits(MASS_SLACK)


def placement_tables(workspace: dict, placement: Placement | None, E: int, device: torch.device) -> PlacementTables:
    """The device tables :mod:`._pick` reads: the placement's own
    (:func:`sglang_xshare.placement.placement_tables`, shared with the reference and refreshed in
    place by :func:`sglang_xshare.placement.refresh_tables_`); pure TP when ``placement`` is None."""
    return _device_tables(placement or tensor_parallel(E), device)


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
