"""Compile selection-kernel variants for Hopper (sm_90) on a machine without a GPU and report
registers, spills, shared memory and the SASS instruction mix -- no GPU needed.

Triton compiles for a target it is told (a stand-in driver answers "CUDA, sm_90"), using the
``ptxas`` / ``cuobjdump`` / ``nvdisasm`` its wheel ships; nothing is launched. The kernels are
reached through :mod:`bench_select`'s cases, so every variant is exactly the one the benchmark
(and SGLang) would run for that model, policy and batch size. Use the Triton version the GPU
machine has (3.6 there) for numbers that carry over.

    python bench/compile_report.py --models dsv3-256x8-grp-bias --policies xshare oea --T 1 16 256
    python bench/compile_report.py --knobs '{"tile_elems": 1024}'

Columns: ``reg`` registers per thread, ``stack`` stack frame bytes (spills land here), ``sass``
instructions, then counts of barriers, shuffles, shared-memory and global loads / stores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
OPS = ("BAR", "SHFL", "LDS", "STS", "LDG", "STG", "ATOMG", "ISETP", "SEL", "MUFU", "BRA")


class _Hopper:
    """The parts of Triton's active driver that compiling needs: an sm_90 target, device 0."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


COMPILED: list[tuple[str, tuple, object]] = []


def _compile_only(self: JITFunction, grid):
    """``kernel[grid](...)`` that compiles (``warmup=True``) and records instead of launching."""

    def run(*args, **kwargs):
        k = self.run(*args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, grid, k))
        return k

    return run


def resources(kernel) -> dict:
    """Registers, stack, shared memory and the SASS instruction mix of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        op = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if op:
            ops[op.group(1)] += 1
    return {"reg": int(m[1]), "stack": int(m[2]), "shared": int(m[3]), "sass": sum(ops.values()),
            **{o: ops.get(o, 0) for o in OPS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["olmoe-64x8", "dsv3-256x8-grp-bias"])
    ap.add_argument("--policies", nargs="*", default=None)
    ap.add_argument("--T", nargs="*", type=int, default=[1, 16, 256])
    ap.add_argument("--knobs", default="{}", help="kernel workspace knobs, JSON")
    args = ap.parse_args()
    driver.set_active(_Hopper())
    JITFunction.__getitem__ = _compile_only
    import bench_select as bs

    knobs = {"plan_as_gpu": True, **json.loads(args.knobs)}
    print(f"triton {triton.__version__}, target sm_90; " + " ".join(f"{k}" for k in ("reg", "stack", "sass", *OPS)))
    for model in args.models:
        for policy in args.policies or bs.POLICIES:
            for T in args.T:
                COMPILED.clear()
                case = bs.Case(model, policy, T, torch.device("cpu"), knobs=knobs)
                case.run_kernel()
                for name, grid, k in COMPILED:
                    r = resources(k)
                    print(f"{model:20s} {policy:15s} T={T:<5d} {name:17s} grid={grid[0]:<4d} {case.plan()} "
                          + " ".join(f"{key}={val}" for key, val in r.items()), flush=True)


if __name__ == "__main__":
    main()
