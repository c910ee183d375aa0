"""The Triton kernels against the PyTorch reference, exactly, on CPU (``TRITON_INTERPRET=1``).

Triton's interpreter must be switched on before ``triton`` is imported, so the cases run in
one subprocess (this file run as a script) and each pytest case checks its line of the
subprocess' JSON report; nothing leaks into the other test files. Same ids and physical ids,
weights within fp32 rounding, bit-identical outputs on a second call (deterministic, the
workspace reused), on random and adversarial inputs (ties, NaN / inf rows, padding, all
padded, T = 0) for every policy, grouped top-k with correction bias, xshare_ep with and
without replicas, xshare_spec with request groups. Small shapes: the interpreter is slow.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> case. routing: (E, k, scoring, renormalize, n_group, topk_group, bias)
ROUTINGS = {
    "olmoe": (64, 8, "softmax", True, None, None, False),
    "dsv2": (160, 6, "softmax", True, 8, 3, False),
    "dsv3": (256, 8, "sigmoid", True, 8, 4, True),
    "kimi": (384, 8, "sigmoid", True, None, None, True),
    "e128k2": (128, 2, "softmax", False, None, None, False),
    "sig64": (64, 4, "sigmoid", True, 4, 2, False),
    "e8k2": (8, 2, "softmax", True, None, None, False),
    "e16k4": (16, 4, "softmax", True, None, None, False),
    "sig16": (16, 4, "sigmoid", True, None, None, False),
}


def _case(policy, routing, T, inputs="randn", dtype="float32", k0=1, budget="0.6", request_budget="0.8",
          n_valid=None, ep=1, replicas=0, rid="groups", min_score=0.0, mass_source="topk", fill=True, seed=0,
          group=None, knobs=None, perms=0, hard=False, refresh=False, expect=None, output=None, ranks=None,
          gate=False, guard=0):
    """One case. ``rid``: "groups" (request_ids = t // 4), "shuffled", "none"; ``group``: pass
    ``request_group`` instead (the fused path); ``knobs``: kernel workspace knobs (launch plan);
    ``perms``: also check that many random token orders (requests and their tokens for
    ``group``) give the same outputs, permuted, in kernel and reference; ``hard``: hard cap;
    ``refresh``: then rewrite the placement's map in place (an EPLB rebalance), refresh its device
    tables, and check kernel and reference against a placement built from the new map;
    ``expect``: launch-plan attributes the call must have used (e.g. ``{"sync": 1}``);
    ``output``: an output epilogue ``dict(ids, empty, scale, metrics_ep)`` (``OutputSpec``; the
    padding count then reaches the kernel as a device tensor, as SGLang passes it); ``ranks``: the
    batch split over two ranks whose statistics are summed (EP-global selection); ``gate``: with
    ``output``, the launches gated on a device flag (the in-server A/B's idle arms); ``guard``: the
    verify-row guard ``K`` (with ``group``: the target rows keep their top-``K``)."""
    return dict(policy=policy, routing=routing, T=T, inputs=inputs, dtype=dtype, k0=k0, budget=budget,
                request_budget=request_budget, n_valid=n_valid, ep=ep, replicas=replicas, rid=rid,
                min_score=min_score, mass_source=mass_source, fill=fill, seed=seed, group=group, knobs=knobs or {},
                perms=perms, hard=hard, refresh=refresh, expect=expect or {}, output=output, ranks=ranks,
                gate=gate, guard=guard)


def _out(ids="logical", empty="minus_one", scale=None, metrics_ep=4):
    return dict(ids=ids, empty=empty, scale=scale, metrics_ep=metrics_ep)


CASES = {
    # plain top-k / cap: scoring paths, dtypes, grouped + bias, adversarial rows
    "topk-olmoe-bf16": _case("topk", "olmoe", 20, dtype="bfloat16"),
    "topk-dsv3-grouped-bias": _case("topk", "dsv3", 9, seed=1),
    "topk-dsv2-grouped-ties": _case("topk", "dsv2", 12, inputs="ties", seed=2),
    "topk-e128k2-nonfinite": _case("topk", "e128k2", 12, inputs="nonfinite", n_valid=10, seed=3),
    "topk-T0": _case("topk", "olmoe", 0),
    "cap-sig64-fp16": _case("cap", "sig64", 17, dtype="float16", seed=4),
    "cap-kimi-minscore": _case("cap", "kimi", 6, min_score=0.2, seed=5),
    # OEA
    "oea-olmoe": _case("oea", "olmoe", 40, seed=6),
    "oea-dsv3-k0-2": _case("oea", "dsv3", 10, k0=2, seed=7),
    "oea_simple-olmoe-ties": _case("oea_simple", "olmoe", 24, inputs="ties", seed=8),
    "oea_simple-kimi-padded": _case("oea_simple", "kimi", 11, n_valid=7, seed=9),
    # XShare: budget modes, fused and two-launch paths, adversarial inputs
    "xshare-olmoe-frac-fused": _case("xshare", "olmoe", 30, budget="0.6", seed=10),
    "xshare-olmoe-frac-multi": _case("xshare", "olmoe", 70, budget="0.5", seed=11),
    "xshare-dsv3-count-bias": _case("xshare", "dsv3", 20, budget="24", k0=2, seed=12),
    "xshare-dsv2-mass": _case("xshare", "dsv2", 15, budget="mass:0.9", seed=13),
    "xshare-kimi-mass-full": _case("xshare", "kimi", 13, budget="mass:0.8", mass_source="full", seed=14),
    "xshare-e128k2-minscore": _case("xshare", "e128k2", 33, budget="0.7", min_score=0.3, seed=15),
    "xshare-olmoe-ties": _case("xshare", "olmoe", 36, inputs="ties", budget="0.5", seed=16),
    "xshare-olmoe-nonfinite": _case("xshare", "olmoe", 20, inputs="nonfinite", n_valid=17, seed=17),
    "xshare-olmoe-allpad": _case("xshare", "olmoe", 8, n_valid=0, seed=18),
    "xshare-olmoe-allpad-multi": _case("xshare", "olmoe", 70, n_valid=0, seed=19),
    "xshare-sig64-bf16": _case("xshare", "sig64", 25, dtype="bfloat16", budget="12", seed=20),
    "xshare-T0": _case("xshare", "olmoe", 0),
    # GPU-aware XShare: no placement (TP), EP partitions, replicas, fill_to_peak off
    "ep-olmoe-tp": _case("xshare_ep", "olmoe", 16, budget="0.6", seed=21),
    "ep-olmoe-ep8": _case("xshare_ep", "olmoe", 30, budget="0.5", ep=8, seed=22),
    "ep-olmoe-ep8-multi-nofill": _case("xshare_ep", "olmoe", 70, budget="0.5", ep=8, fill=False, seed=23),
    "ep-dsv3-ep8-mass": _case("xshare_ep", "dsv3", 12, budget="mass:0.9", ep=8, seed=24),
    "ep-olmoe-ep8-replicas": _case("xshare_ep", "olmoe", 30, budget="0.5", ep=8, replicas=2, seed=25),
    "ep-olmoe-ep4-replicas-nofill": _case("xshare_ep", "olmoe", 40, budget="20", ep=4, replicas=3, fill=False, seed=26),
    "ep-dsv2-ep4-replicas-multi": _case("xshare_ep", "dsv2", 40, budget="0.6", ep=4, replicas=1, seed=27),
    "ep-olmoe-ep8-ties": _case("xshare_ep", "olmoe", 24, inputs="ties", budget="0.5", ep=8, seed=28),
    # Speculative: request groups, each token its own request, padding, budget modes
    "spec-olmoe-groups": _case("xshare_spec", "olmoe", 24, budget="0.7", request_budget="0.8", seed=29),
    "spec-olmoe-none": _case("xshare_spec", "olmoe", 10, rid="none", seed=30),
    "spec-dsv3-shuffled-mass": _case("xshare_spec", "dsv3", 12, budget="mass:0.9", request_budget="mass:0.95",
                                     rid="shuffled", seed=31),
    "spec-sig64-count-padded": _case("xshare_spec", "sig64", 20, budget="14", request_budget="6", n_valid=15,
                                     seed=32),
    "spec-olmoe-ties": _case("xshare_spec", "olmoe", 16, inputs="ties", seed=33),
    "spec-T0": _case("xshare_spec", "olmoe", 0),
    # larger E on the multi-program path, more dtypes
    "cap-dsv3-multi": _case("cap", "dsv3", 40, seed=34),
    "oea-olmoe-multi-nonfinite": _case("oea", "olmoe", 70, inputs="nonfinite", n_valid=60, seed=35),
    "xshare-kimi-multi-fp16": _case("xshare", "kimi", 20, dtype="float16", budget="0.5", seed=36),
    "ep-kimi-ep8-replicas": _case("xshare_ep", "kimi", 9, budget="0.6", ep=8, replicas=1, seed=37),
    "ep-T0": _case("xshare_ep", "olmoe", 0, ep=8),
    # xshare_spec without a request budget (the default): exactly xshare over the union, fused and general paths
    "specdefault-olmoe-g4": _case("xshare_spec", "olmoe", 24, budget="0.7", request_budget=None, group=4, n_valid=21,
                                  seed=61),
    "specdefault-dsv3-rid-mass": _case("xshare_spec", "dsv3", 12, budget="mass:0.9", request_budget=None, seed=62),
    "spec-kimi-full-bf16": _case("xshare_spec", "kimi", 10, dtype="bfloat16", mass_source="full", seed=38),
    # xshare_spec fused path: requests are runs of `group` consecutive tokens (SGLang verify batches)
    "specg-olmoe-g4": _case("xshare_spec", "olmoe", 24, budget="0.7", request_budget="0.8", group=4, seed=39),
    "specg-olmoe-g3-ragged": _case("xshare_spec", "olmoe", 22, group=3, seed=40),
    "specg-dsv3-g4-mass-bias": _case("xshare_spec", "dsv3", 12, budget="mass:0.9", request_budget="mass:0.95",
                                     group=4, seed=41),
    "specg-sig64-g2-count-padded": _case("xshare_spec", "sig64", 20, budget="14", request_budget="6", n_valid=15,
                                         group=2, seed=42),
    "specg-olmoe-g4-ties": _case("xshare_spec", "olmoe", 16, inputs="ties", group=4, seed=43),
    "specg-olmoe-g4-multi": _case("xshare_spec", "olmoe", 80, budget="0.6", request_budget="0.75", group=4, seed=44),
    "specg-kimi-g4-full-bf16": _case("xshare_spec", "kimi", 10, dtype="bfloat16", mass_source="full", group=4,
                                     seed=45),
    "specg-olmoe-g1-nonfinite": _case("xshare_spec", "olmoe", 12, inputs="nonfinite", n_valid=10, group=1, seed=46),
    "specg-olmoe-g4-allpad": _case("xshare_spec", "olmoe", 8, n_valid=0, group=4, seed=47),
    # launch plans: one program looping over many tiles (chunk loops), many one-row programs
    "xshare-olmoe-oneprog-chunks": _case("xshare", "olmoe", 70, budget="0.5", knobs={"programs": 1}, seed=48),
    "ep-olmoe-ep8-replicas-chunks": _case("xshare_ep", "olmoe", 70, budget="0.5", ep=8, replicas=2,
                                          knobs={"programs": 1}, seed=49),
    "specg-olmoe-g4-chunks": _case("xshare_spec", "olmoe", 70, group=4, knobs={"programs": 1, "tile_elems": 512},
                                   seed=50),
    "oea_simple-dsv3-rowtiles": _case("oea_simple", "dsv3", 12, knobs={"tile_elems": 256}, seed=51),
    "ep-dsv3-ep4-rowtiles-mass": _case("xshare_ep", "dsv3", 9, budget="mass:0.8", ep=4, knobs={"tile_elems": 256},
                                       seed=52),
    # exact masses: the float64 counter-example and gates from 1e-30 to 1, in any token order
    "xshare-midpoint-perms": _case("xshare", "e8k2", 6, inputs="midpoint", budget="3", perms=6, seed=53),
    "xshare-midpoint-multi-perms": _case("xshare", "e8k2", 6, inputs="midpoint", budget="3", perms=3,
                                         knobs={"tile_elems": 16}, seed=54),
    "ep-midpoint-perms": _case("xshare_ep", "e8k2", 6, inputs="midpoint", budget="3", ep=2, perms=4, seed=55),
    "spec-midpoint-none-perms": _case("xshare_spec", "e8k2", 6, inputs="midpoint", budget="3", request_budget="2",
                                      rid="none", perms=4, seed=56),
    "xshare-dust-perms": _case("xshare", "e8k2", 6, inputs="dust", budget="5", perms=4, seed=81),
    "ep-dust-multi-perms": _case("xshare_ep", "e8k2", 6, inputs="dust", budget="5", ep=2, perms=3,
                                 knobs={"tile_elems": 16}, seed=82),
    "specg-dust-g1-mass-perms": _case("xshare_spec", "e8k2", 6, inputs="dust", budget="mass:1", request_budget="2",
                                      group=1, perms=3, seed=83),
    "xshare-range-mass-perms": _case("xshare", "e16k4", 24, inputs="range", budget="mass:0.9", perms=3, seed=57),
    "xshare-range-sig-multi-perms": _case("xshare", "sig16", 40, inputs="range", budget="0.5", perms=2,
                                          knobs={"tile_elems": 64}, seed=58),
    "oea-range-perms": _case("oea", "e16k4", 24, inputs="range", perms=2, seed=59),
    "ep-range-replicas-perms": _case("xshare_ep", "e16k4", 24, inputs="range", budget="mass:0.95", ep=4, replicas=1,
                                     perms=3, seed=60),
    "ep-range-multi-perms": _case("xshare_ep", "e16k4", 40, inputs="range", budget="0.6", ep=4, perms=2,
                                  knobs={"tile_elems": 64}, seed=61),
    "spec-range-shuffled-perms": _case("xshare_spec", "e16k4", 24, inputs="range", budget="mass:0.9",
                                       request_budget="mass:0.9", rid="shuffled", perms=3, seed=62),
    "specg-range-g4-perms": _case("xshare_spec", "e16k4", 24, inputs="range", budget="0.6", request_budget="3",
                                  group=4, perms=3, seed=63),
    "specg-range-g4-multi-perms": _case("xshare_spec", "sig16", 32, inputs="range", budget="mass:0.9",
                                        request_budget="mass:0.8", group=4, perms=2, knobs={"tile_elems": 64},
                                        seed=64),
    # exact ties of different gates at the budget boundary (two experts get the same gates in another
    # token order): any token order, any reduction order must give the reference's pick (lower id);
    # a float sum of the masses breaks these ties by summation order
    "xshare-swapties-softmax-perms": _case("xshare", "e16k4", 32, inputs="swapties", budget="3", perms=4, seed=90),
    "xshare-swapties-softmax-m5-multi-perms": _case("xshare", "e16k4", 32, inputs="swapties", budget="5", perms=3,
                                                    knobs={"tile_elems": 64}, seed=91),
    "xshare-swapties-sigmoid-perms": _case("xshare", "sig16", 32, inputs="swapties", budget="3", perms=4, seed=92),
    "xshare-swapties-sig-grouped-perms": _case("xshare", "sig64", 32, inputs="swapties", budget="5", perms=4,
                                               seed=93),
    "xshare-swapties-softmax-grouped-perms": _case("xshare", "dsv2", 32, inputs="swapties", budget="3", perms=3,
                                                   seed=95),
    # sigmoid gates that all underflow: renormalised weights are uniform over the kept slots
    "topk-sig64-underflow": _case("topk", "sig64", 10, inputs="underflow", seed=71),
    "xshare-sig16-underflow-minscore": _case("xshare", "sig16", 12, inputs="underflow", min_score=0.1, seed=72),
    "ep-dsv3-underflow-bias": _case("xshare_ep", "dsv3", 8, inputs="underflow", ep=4, seed=73),
    # xshare_ep's hard cap (distinct experts <= max(m, |warm|)), one and many programs
    "ep-olmoe-ep8-hard": _case("xshare_ep", "olmoe", 30, budget="0.5", ep=8, hard=True, seed=65),
    "ep-olmoe-ep8-hard-multi-nofill": _case("xshare_ep", "olmoe", 70, budget="20", ep=8, hard=True, fill=False,
                                            seed=66),
    "ep-olmoe-ep8-replicas-hard": _case("xshare_ep", "olmoe", 30, budget="0.5", ep=8, replicas=2, hard=True, seed=67),
    "ep-dsv3-ep4-replicas-hard-mass": _case("xshare_ep", "dsv3", 12, budget="mass:0.9", ep=4, replicas=3, hard=True,
                                            fill=False, seed=68),
    # the grid-barrier mode (sync=1: partial rows, tickets, one- and two-stage reductions, the pick
    # on every program) as a barrier of one program, the only one the sequential interpreter can
    # satisfy; what it cannot run (several programs spinning at once) only the GPU bench covers
    "barrier-xshare-onechunk": _case("xshare", "olmoe", 6, budget="0.5", knobs={"programs": 1, "sync": 1},
                                     expect={"sync": 1, "chunks": 1}, seed=74),
    "barrier-xshare-chunks-mass": _case("xshare", "olmoe", 70, budget="mass:0.9", knobs={"programs": 1, "sync": 1},
                                        expect={"sync": 1, "two_stage": False}, seed=75),
    "barrier-xshare-twostage": _case("xshare", "olmoe", 40, budget="0.5",
                                     knobs={"programs": 1, "sync": 1, "two_stage": True},
                                     expect={"sync": 1, "two_stage": True}, seed=76),
    "barrier-ep-replicas-twostage": _case("xshare_ep", "olmoe", 40, budget="0.6", ep=8, replicas=2,
                                          knobs={"programs": 1, "sync": 1, "two_stage": True},
                                          expect={"sync": 1, "two_stage": True}, seed=77),
    "barrier-ep-hard": _case("xshare_ep", "dsv3", 10, budget="0.5", ep=4, hard=True, knobs={"programs": 1, "sync": 1},
                             expect={"sync": 1}, seed=78),
    "barrier-specg-g4-twostage": _case("xshare_spec", "olmoe", 24, group=4,
                                       knobs={"programs": 1, "sync": 1, "two_stage": True, "tile_elems": 512},
                                       expect={"sync": 1, "two_stage": True}, seed=79),
    "barrier-oea-simple": _case("oea_simple", "kimi", 9, knobs={"programs": 1, "sync": 1}, expect={"sync": 1},
                                seed=80),
    # EPLB rebalance: the map rewritten in place, tables refreshed (kernel and reference follow)
    "refresh-ep-replicas": _case("xshare_ep", "e16k4", 20, budget="0.6", ep=4, replicas=2, refresh=True, seed=69),
    "refresh-ep-permuted": _case("xshare_ep", "e16k4", 20, budget="0.6", ep=4, refresh=True, seed=70),
    # output epilogue (serving): padding count on device, -1 / fill, routed scale, EPLB static map,
    # xshare_ep's physical copies, fused metrics on every launch plan
    "out-topk-fill-scale": _case("topk", "olmoe", 12, n_valid=9, seed=53, output=_out(empty="fill", scale=2.5)),
    "out-cap-mapped-fill": _case("cap", "dsv3", 10, n_valid=8, seed=54, output=_out(ids="mapped", empty="fill")),
    "out-xshare-fused-nopad": _case("xshare", "olmoe", 30, budget="0.6", seed=55, output=_out(scale=0.5)),
    "out-xshare-multi": _case("xshare", "olmoe", 70, budget="0.5", n_valid=61, seed=56, output=_out(empty="fill")),
    "out-xshare-chunks": _case("xshare", "olmoe", 70, budget="0.5", n_valid=64, knobs={"programs": 1}, seed=57,
                               output=_out()),
    "out-ep-physical-fill": _case("xshare_ep", "olmoe", 30, budget="0.5", ep=8, replicas=2, n_valid=27, seed=58,
                                  output=_out(ids="physical", empty="fill", metrics_ep=8)),
    "out-ep-mapped": _case("xshare_ep", "olmoe", 20, budget="0.6", ep=4, n_valid=20, seed=59,
                           output=_out(ids="mapped", metrics_ep=4)),
    "out-specg-g4": _case("xshare_spec", "olmoe", 24, group=4, n_valid=20, seed=60, output=_out(empty="fill")),
    "out-oea-allpad": _case("oea", "olmoe", 16, n_valid=0, seed=61, output=_out()),
    # gated launches (the in-server A/B's arms the switch does not route by): nothing written while the
    # flag holds another arm, the exact routing once it holds this one
    "gate-cap-mapped": _case("cap", "dsv3", 10, n_valid=8, seed=81, output=_out(ids="mapped", empty="fill"), gate=True),
    "gate-xshare": _case("xshare", "olmoe", 30, budget="0.6", n_valid=27, seed=82, output=_out(), gate=True),
    "gate-xshare-barrier": _case("xshare", "olmoe", 40, budget="0.5", seed=83, output=_out(), gate=True,
                                 knobs={"programs": 1, "sync": 1}),
    "gate-ep-physical": _case("xshare_ep", "olmoe", 30, budget="0.5", ep=8, replicas=2, n_valid=27, seed=84,
                              output=_out(ids="physical", empty="fill", metrics_ep=8), gate=True),
    "gate-specg-g4": _case("xshare_spec", "olmoe", 24, group=4, n_valid=20, seed=85, output=_out(), gate=True),
    # the grid barrier (sync=1, the GPU's default plan) under the interpreter, which runs programs one
    # after another: every program but the last times out and must route its tiles by top-k (never
    # partial sums); the last sees every arrival and picks exactly; the fault counter counts the rest
    # EP-global selection: the batch split over 2 "ranks", statistics summed between them (the all-reduce)
    "global-xshare-2ranks": _case("xshare", "olmoe", 40, budget="0.5", seed=64, ranks=(17, 23)),
    "global-ep-replicas-2ranks": _case("xshare_ep", "olmoe", 30, budget="0.6", ep=4, replicas=2, seed=65,
                                       ranks=(12, 18)),
    "global-oea-dsv3-2ranks": _case("oea", "dsv3", 16, k0=2, seed=66, ranks=(9, 7)),
    "barrier-timeout-xshare": _case("xshare", "olmoe", 70, budget="0.5", n_valid=66, seed=62,
                                    knobs={"interpreter_barrier": True, "sync": 1, "max_spins": 40}),
    "barrier-timeout-ep-twostage": _case("xshare_ep", "olmoe", 70, budget="0.5", ep=8, seed=63,
                                         knobs={"interpreter_barrier": True, "sync": 1, "max_spins": 40,
                                                "two_stage": True}),
    # the verify-row guard: rows t % g == 0 (each request's target row) keep their top-guard_k; every
    # policy with a warm-up, guard_k = k and < k, several g (ragged last request), ties, NaN rows,
    # padding, min_score, every launch plan; g = 1 is no verify batch (the guard is a no-op)
    "guard-xshare-olmoe-g4-k8": _case("xshare", "olmoe", 24, budget="0.6", group=4, guard=8, seed=100),
    "guard-xshare-olmoe-g8-k4-padded": _case("xshare", "olmoe", 40, budget="0.5", group=8, guard=4, n_valid=35,
                                             seed=101),
    "guard-xshare-olmoe-g3-ties": _case("xshare", "olmoe", 22, inputs="ties", budget="0.5", group=3, guard=8,
                                        seed=102),
    "guard-xshare-olmoe-g4-nonfinite-k0-2": _case("xshare", "olmoe", 20, inputs="nonfinite", k0=2, n_valid=18, group=4,
                                                  guard=6, seed=103),
    "guard-xshare-olmoe-g4-minscore": _case("xshare", "olmoe", 24, budget="0.7", min_score=0.05, group=4, guard=8,
                                            seed=104),
    "guard-xshare-dsv2-g2-mass": _case("xshare", "dsv2", 16, budget="mass:0.9", group=2, guard=6, seed=105),
    "guard-xshare-dsv3-g4-count-bias": _case("xshare", "dsv3", 16, budget="16", group=4, guard=8, seed=106),
    "guard-oea-dsv3-g2": _case("oea", "dsv3", 12, group=2, guard=8, seed=107),
    "guard-oea_simple-kimi-g3-padded": _case("oea_simple", "kimi", 11, n_valid=10, group=3, guard=5, seed=108),
    "guard-ep-olmoe-ep8-g4": _case("xshare_ep", "olmoe", 24, budget="0.5", ep=8, group=4, guard=8, seed=109),
    "guard-ep-olmoe-ep8-replicas-g4-hard": _case("xshare_ep", "olmoe", 24, budget="0.5", ep=8, replicas=2, hard=True,
                                                 group=4, guard=4, seed=110),
    "guard-spec-olmoe-g4-mr": _case("xshare_spec", "olmoe", 24, budget="0.7", request_budget="0.8", group=4, guard=8,
                                    seed=111),
    "guard-spec-olmoe-g8-mr-ties": _case("xshare_spec", "olmoe", 32, inputs="ties", budget="0.6", request_budget="12",
                                         group=8, guard=4, seed=112),
    "guard-specdefault-olmoe-g8": _case("xshare_spec", "olmoe", 32, budget="0.7", request_budget=None, group=8, guard=8,
                                        n_valid=29, seed=113),
    "guard-xshare-olmoe-g4-chunks": _case("xshare", "olmoe", 72, budget="0.5", group=4, guard=8,
                                          knobs={"programs": 1}, seed=114),
    "guard-spec-olmoe-g4-chunks": _case("xshare_spec", "olmoe", 72, group=4, guard=8,
                                        knobs={"programs": 1, "tile_elems": 512}, seed=115),
    "guard-barrier-xshare-g4": _case("xshare", "olmoe", 40, budget="0.5", group=4, guard=8,
                                     knobs={"programs": 1, "sync": 1}, expect={"sync": 1}, seed=116),
    "guard-barrier-ep-g4-twostage": _case("xshare_ep", "olmoe", 40, budget="0.6", ep=8, group=4, guard=8,
                                          knobs={"programs": 1, "sync": 1, "two_stage": True},
                                          expect={"sync": 1, "two_stage": True}, seed=117),
    "guard-xshare-range-g4-perms": _case("xshare", "e16k4", 24, inputs="range", budget="0.5", group=4, guard=4, perms=3,
                                         seed=118),
    "guard-out-xshare-g4": _case("xshare", "olmoe", 24, budget="0.6", group=4, guard=8, n_valid=21, seed=119,
                                 output=_out(empty="fill")),
    "guard-xshare-olmoe-g1-noop": _case("xshare", "olmoe", 16, budget="0.5", group=1, guard=8, seed=120),
}


# ---------------------------------------------------------------- subprocess side



def build(case):
    """(selector, logits, request_ids, n_valid, bias) of a case."""
    import torch

    from sglang_xshare.config import Budget, BudgetSchedule, RoutingSpec, SelectionConfig
    from sglang_xshare.placement import Placement
    from sglang_xshare.select import Selector
    from sglang_xshare.select.inputs import make_logits

    E, k, scoring, renorm, ng, tg, has_bias = ROUTINGS[case["routing"]]
    routing = RoutingSpec(E, k, scoring=scoring, renormalize=renorm, num_expert_group=ng, topk_group=tg,
                          has_correction_bias=has_bias)
    g = torch.Generator().manual_seed(1000 + case["seed"])
    bias = (torch.randn(E, generator=g) * 0.05) if has_bias else None
    policy = case["policy"]
    kw = {}
    if policy == "cap":
        kw["cap"] = max(1, k // 2)
    if policy in ("xshare", "xshare_ep", "xshare_spec"):
        kw["budget"] = BudgetSchedule.parse(case["budget"])
    if policy == "xshare_spec" and case["request_budget"] is not None:  # None: the default (no request stage)
        kw["request_budget"] = Budget.parse(case["request_budget"], "--xshare-request-budget")
    cfg = SelectionConfig(policy=policy, k0=case["k0"], min_score=case["min_score"], mass_source=case["mass_source"],
                          fill_to_peak=case["fill"], hard_cap=case["hard"], verify_guard=case["guard"], **kw)
    placement = None
    R = case["ep"]
    if R > 1 and case["replicas"] == 0:
        placement = Placement.expert_parallel(E, R)
    elif R > 1:
        per = E // R
        p2l = []
        for r in range(R):
            own = list(range(r * per, (r + 1) * per))
            extra = torch.randint(0, E, (case["replicas"],), generator=g).tolist()
            p2l += own + extra
        placement = Placement.from_map(E, R, p2l)
    sel = Selector(routing, cfg, placement, backend="reference", correction_bias=bias)
    T = case["T"]
    dtype = getattr(torch, case["dtype"])
    x = make_logits(case["inputs"], T, E, case["seed"], dtype)
    rid = None
    if policy == "xshare_spec" and case["group"] is None and case["rid"] != "none":
        rid = torch.arange(T) // 4
        if case["rid"] == "shuffled":
            rid = rid[torch.randperm(T, generator=g)] * 2 % max(T, 1)
    return sel, x, rid, case["n_valid"], bias


def compare(ref, out) -> str:
    """'' when equal (ids exactly, weights within fp32 rounding), else what differs."""
    import torch

    if out.topk_ids.shape != ref.topk_ids.shape or out.topk_ids.dtype != torch.int32:
        return f"ids shape/dtype {tuple(out.topk_ids.shape)} {out.topk_ids.dtype}"
    if out.topk_weights.dtype != torch.float32:
        return f"weights dtype {out.topk_weights.dtype}"
    bad = (out.topk_ids != ref.topk_ids).any(dim=1)
    if bad.any():
        t = int(bad.nonzero()[0])
        return f"ids differ on {int(bad.sum())} tokens, first {t}: kernel {out.topk_ids[t].tolist()} ref {ref.topk_ids[t].tolist()}"
    if not torch.allclose(out.topk_weights, ref.topk_weights, rtol=2e-6 * 8, atol=1e-7):
        d = (out.topk_weights - ref.topk_weights).abs().max().item()
        return f"weights differ, max abs {d:.3g}"
    if (ref.physical_ids is None) != (out.physical_ids is None):
        return "physical_ids presence differs"
    if ref.physical_ids is not None and not torch.equal(ref.physical_ids, out.physical_ids):
        return f"physical ids differ: kernel {out.physical_ids.tolist()[:3]} ref {ref.physical_ids.tolist()[:3]}"
    return ""


def _output_specs(case, sel, E: int):
    """Two :class:`OutputSpec` of a case (kernel, reference), with their own accumulators."""
    import torch

    from sglang_xshare.placement import Placement
    from sglang_xshare.select.output import MetricsSink, OutputSpec

    o = case["output"]
    g = torch.Generator().manual_seed(7 + case["seed"])
    dmap = torch.randperm(E, generator=g).to(torch.int32) if o["ids"] == "mapped" else None
    place = sel.placement if sel.placement is not None and o["ids"] == "physical" else \
        Placement.expert_parallel(E, o["metrics_ep"])
    specs = []
    for _ in range(2):
        acc = torch.zeros(8, dtype=torch.int64)
        sink = MetricsSink.for_placement(acc, place, o["ids"], torch.device("cpu"))
        specs.append(OutputSpec(o["ids"], o["empty"], o["scale"], dmap, sink))
    return specs


def run_output_case(case) -> str:
    """The epilogue: kernel with ``OutputSpec`` vs the reference Selector with the same spec, on
    two different batches in a row; the fused metrics' counts exactly (the second call must not
    see the first's marks: the kernel clears its scratch sets)."""
    import torch

    from sglang_xshare.select.inputs import make_logits

    sel, x, rid, n_valid, bias = build(case)
    nv = None if n_valid is None else torch.tensor(n_valid, dtype=torch.int32)
    spec_k, spec_r = _output_specs(case, sel, sel.routing.num_experts)
    ctx = sel.context(x.shape[0], x.device, 0, nv, rid, case["group"], mask=False)
    if nv is not None and ctx.valid is not None:
        return "kernel context materialised a valid mask"
    sel.workspace.update(case["knobs"])
    fn = sel.entry.kernel()
    x2 = make_logits(case["inputs"], x.shape[0], x.shape[1], case["seed"] + 100, x.dtype)
    for batch in (x, x2):
        ref = sel(batch, 0, nv, rid, case["group"], output=spec_r)
        out = fn(batch, sel.routing, ctx, bias, sel.workspace, spec_k)
        msg = compare(ref, out)
        if msg:
            return msg
    if not torch.equal(spec_k.metrics.acc, spec_r.metrics.acc):
        return f"metrics differ: kernel {spec_k.metrics.acc.tolist()} reference {spec_r.metrics.acc.tolist()}"
    if int(spec_r.metrics.acc[0]) != 2 or (x.shape[0] and int(spec_r.metrics.acc[3]) == 0 and case["n_valid"] != 0):
        return f"reference metrics look empty: {spec_r.metrics.acc.tolist()}"
    return ""


def run_gate_case(case) -> str:
    """The launch condition ``gate=(flag, 2)``: while the flag holds another arm the launches write
    nothing (outputs, fused metrics, barrier tickets and statistics stay as they were); once it holds
    2, the same call routes exactly like the reference and counts once in the metrics."""
    import torch

    sel, x, rid, n_valid, bias = build(case)
    nv = None if n_valid is None else torch.tensor(n_valid, dtype=torch.int32)
    spec_k, spec_r = _output_specs(case, sel, sel.routing.num_experts)
    sel.workspace.update(case["knobs"], reuse_outputs=True)
    fn = sel.entry.kernel()
    flag = torch.zeros(1, dtype=torch.int64)
    ctx = sel.context(x.shape[0], x.device, 0, nv, rid, case["group"], mask=False)
    out = fn(x, sel.routing, ctx, bias, sel.workspace, spec_k, gate=(flag, 2))  # allocates the workspace, writes nothing
    bufs = [b for key, b in sel.workspace.items() if isinstance(key, tuple) and key[0] == "buffers"]
    if len(bufs) != 1:
        return f"expected one workspace buffer set, got {len(bufs)}"
    buf = bufs[0]
    watched = {"ids": buf.out_ids, "weights": buf.out_w, "physical": buf.out_phys, "tickets": buf.sync,
               "stats": buf.stats, "selected set": buf.sel, "metrics": spec_k.metrics.acc}
    for i, k in enumerate(("ids", "weights", "physical", "stats", "selected set")):  # (the tickets must stay
        watched[k].copy_(torch.full_like(watched[k], 7 + i))                    # multiples of the grid)
    if int(spec_k.metrics.acc.abs().sum()) != 0:
        return f"a gated call counted in the metrics: {spec_k.metrics.acc.tolist()}"
    before = {k: t.clone() for k, t in watched.items()}
    for arm in (0, 1, 3):
        flag.fill_(arm)
        fn(x, sel.routing, ctx, bias, sel.workspace, spec_k, gate=(flag, 2))
        for k, t in watched.items():
            if not torch.equal(t, before[k]):
                return f"flag {arm} (gate 2): the launch wrote the {k}"
    flag.fill_(2)
    ref = sel(x, 0, nv, rid, case["group"], output=spec_r)
    out = fn(x, sel.routing, ctx, bias, sel.workspace, spec_k, gate=(flag, 2))
    if out.topk_ids.data_ptr() != buf.out_ids.data_ptr():
        return "the outputs are not the workspace's (reuse_outputs ignored)"
    msg = compare(ref, out)
    if msg:
        return "open gate: " + msg
    if not torch.equal(spec_k.metrics.acc, spec_r.metrics.acc) or int(spec_r.metrics.acc[0]) != 1:
        return f"open gate: metrics {spec_k.metrics.acc.tolist()} vs reference {spec_r.metrics.acc.tolist()}"
    try:
        fn(x, sel.routing, ctx, bias, sel.workspace, spec_k, gate=(flag.to(torch.int32), 2))
    except TypeError:
        return ""
    return "an int32 flag was accepted"


def run_barrier_case(case) -> str:
    """Barrier timeouts: tokens of programs that gave up get their own top-k, the rest the policy."""
    import torch

    from sglang_xshare.config import SelectionConfig
    from sglang_xshare.kernels.workspace import buffers, fault_counter
    from sglang_xshare.select import Selector, compute_scores

    sel, x, rid, n_valid, bias = build(case)
    sel.workspace.update(case["knobs"])
    ctx = sel.context(x.shape[0], x.device, 0, n_valid, rid, case["group"])
    T, E = x.shape
    p = buffers(sel.workspace, case["policy"], T, E, sel.routing.top_k, x.device, x.dtype).plan
    if p.sync != 1 or p.nb < 3:
        return f"plan is not a grid barrier of several programs: {p}"
    faults = fault_counter(x.device)
    before = int(faults)
    out = sel.entry.kernel()(x, sel.routing, ctx, bias, sel.workspace)
    scores = compute_scores(x, sel.routing, bias)
    ref = sel.entry.reference(scores, ctx)
    topk = Selector(sel.routing, SelectionConfig(policy="topk"), backend="reference", correction_bias=bias)
    plain = topk.entry.reference(scores, topk.context(T, x.device, 0, n_valid))
    last = (p.nb - 1) * p.chunks * p.bt  # first row of the last program (it arrives last: everyone arrived)
    gave_up = p.nb if p.two_stage else p.nb - 1  # two-stage: the others' poisoned slices reach everyone
    exact_rows = torch.arange(T) >= (T if p.two_stage else last)
    want_ids = torch.where(exact_rows[:, None], ref.topk_ids, plain.topk_ids)
    if not torch.equal(out.topk_ids, want_ids):
        bad = int((out.topk_ids != want_ids).any(dim=1).nonzero()[0])
        return f"row {bad}: kernel {out.topk_ids[bad].tolist()} want {want_ids[bad].tolist()} (last program from {last})"
    if int(faults) - before != gave_up:
        return f"fault counter grew by {int(faults) - before}, want {gave_up}"
    return ""


def run_global_case(case) -> str:
    """Two ranks hold parts of one batch; each selects with the other's statistics added (what the
    all-reduce gives): the kernel equals the reference on every rank, and together they equal the
    plain policy on the whole batch."""
    import torch

    sel, x, rid, n_valid, bias = build(case)
    a, b = case["ranks"]
    parts = [x[:a], x[a:a + b]]
    ref_sel = type(sel)(sel.routing, sel.config, sel.placement, backend="reference", correction_bias=bias)
    ker_sel = type(sel)(sel.routing, sel.config, sel.placement, backend="kernel", correction_bias=bias)
    outs = {}
    for name, s_ in (("reference", ref_sel), ("kernel", ker_sel)):
        got = [None, None]
        s_(parts[0], stats_reduce=lambda st: got.__setitem__(0, st.clone()) or st)  # phase 1: own statistics
        s_(parts[1], stats_reduce=lambda st: got.__setitem__(1, st.clone()) or st)
        outs[name] = [s_(parts[r], stats_reduce=lambda st, r=r: st + got[1 - r]) for r in (0, 1)]
    whole = ref_sel(x)
    for r in (0, 1):
        msg = compare(outs["reference"][r], outs["kernel"][r])
        if msg:
            return f"rank {r}: kernel vs reference: {msg}"
    joined = type(whole)(*(torch.cat([outs["reference"][0][i], outs["reference"][1][i]]) if whole[i] is not None
                           else None for i in range(3)))
    msg = compare(whole, joined)
    return f"ranks joined vs one batch: {msg}" if msg else ""


def token_permutation(case, T: int, n_valid, g):
    """A random token order: requests and the tokens inside them for ``group``, else the valid
    tokens (padding stays last)."""
    import torch

    if case["group"]:
        gs = case["group"]
        assert T % gs == 0, "perms with request groups need whole requests"
        req = torch.randperm(T // gs, generator=g)
        within = torch.stack([torch.randperm(gs, generator=g) if not case["guard"] else torch.arange(gs)  # the guard:
                              for _ in range(T // gs)])                                # each target row stays first
        return (req[:, None] * gs + within).flatten()
    nv = T if n_valid is None else n_valid
    return torch.cat([torch.randperm(nv, generator=g), torch.arange(nv, T)])


def same_permuted(base, out, p) -> str:
    """'' when ``out`` (of the permuted inputs) is ``base`` permuted by ``p``, bit for bit."""
    import torch

    if not torch.equal(out.topk_ids, base.topk_ids[p]):
        return "ids"
    if not torch.equal(out.topk_weights, base.topk_weights[p]):
        return "weights"
    if base.physical_ids is not None and not torch.equal(out.physical_ids, base.physical_ids[p]):
        return "physical ids"
    return ""


def run_refresh(case, sel, x, n_valid, bias, fn, before) -> str:
    """Rewrite ``sel.placement``'s map in place, refresh, and compare with a fresh placement."""
    import torch

    from sglang_xshare.placement import Placement
    from sglang_xshare.select import Selector, compute_scores

    pl = sel.placement
    g = torch.Generator().manual_seed(3000 + case["seed"])
    E, P = pl.num_experts, pl.num_physical
    new = torch.cat([torch.randperm(E, generator=g), torch.randint(0, E, (P - E,), generator=g)])
    new = new[torch.randperm(P, generator=g)]
    pl.physical_to_logical.copy_(new)  # what EPLB does to SGLang's map
    pl.refresh_tables_()
    fresh = Selector(sel.routing, sel.config, Placement.from_map(E, pl.num_ranks, new.clone()), backend="reference",
                     correction_bias=bias)
    fresh.workspace.update(case["knobs"])
    ctx, ctx_f = (s.context(x.shape[0], x.device, 0, n_valid) for s in (sel, fresh))
    ref = sel.entry.reference(compute_scores(x, sel.routing, bias), ctx)
    want = fresh.entry.reference(compute_scores(x, sel.routing, bias), ctx_f)
    out = fn(x, sel.routing, ctx, bias, sel.workspace)  # the same workspace: its tables were refreshed
    want_k = fn(x, sel.routing, ctx_f, bias, fresh.workspace)
    for name, got, exp in (("reference", ref, want), ("kernel", out, want_k)):
        what = same_permuted(exp, got, torch.arange(x.shape[0]))
        if what:
            return f"after the refresh the {name}'s {what} differ from a placement built from the new map"
    if torch.equal(want.physical_ids, before.physical_ids):
        return "the new map did not change the physical ids (the case tests nothing)"
    return ""


def swapped_pairs_tie(gate) -> bool:
    """Whether both experts of each ``"swapties"`` pair get the same gates (``gate [T, E] float32``)."""
    s = 8 if gate.shape[1] < 32 else 16
    return all(bool((gate[:, i].sort().values == gate[:, i + s].sort().values).all()) and bool(gate[:, i].sum() > 0)
               for i in (0, 1))


def check_guard(case, sel, x, n_valid, bias, ref) -> str:
    """The verify-row guard in the reference (which the kernel matched): with ``group >= 2`` every
    valid target row (``t % g == 0``) routes first to its own top-``guard`` experts, best first, and
    the selection differs from the unguarded one (the case tests something); with ``g = 1`` it is
    the unguarded selection (no verify batch)."""
    import dataclasses

    import torch

    from sglang_xshare.select import Selector, compute_scores
    from sglang_xshare.select.common import token_order

    T = x.shape[0]
    scores = compute_scores(x, sel.routing, bias)
    plain = Selector(sel.routing, dataclasses.replace(sel.config, verify_guard=0), sel.placement, backend="reference",
                     correction_bias=bias)
    off = plain.entry.reference(scores, plain.context(T, x.device, 0, n_valid, None, case["group"]))
    same = torch.equal(off.topk_ids, ref.topk_ids) and torch.equal(off.topk_weights, ref.topk_weights)
    if case["group"] < 2:
        return "" if same else "g = 1: the guard changed the selection"
    if same:
        return "the guard did not change the selection (the case tests nothing)"
    order = token_order(scores.sel)
    gk, nv = case["guard"], T if n_valid is None else n_valid
    for t in range(0, nv, case["group"]):
        if not torch.equal(ref.topk_ids[t, :gk].long(), order[t, :gk]):
            return f"target row {t}: {ref.topk_ids[t].tolist()} lacks its top-{gk} {order[t, :gk].tolist()}"
    return ""


def run_case(case) -> str:
    import torch

    from sglang_xshare.select import compute_scores

    if case["gate"]:
        return run_gate_case(case)
    if case["output"] is not None:
        return run_output_case(case)
    if case["ranks"] is not None:
        return run_global_case(case)
    if case["knobs"].get("interpreter_barrier"):
        return run_barrier_case(case)
    sel, x, rid, n_valid, bias = build(case)
    ctx = sel.context(x.shape[0], x.device, 0, n_valid, rid, case["group"])
    sel.workspace.update(case["knobs"])
    ref = sel.entry.reference(compute_scores(x, sel.routing, bias), ctx)
    if case["inputs"] == "swapties" and not swapped_pairs_tie(compute_scores(x, sel.routing, bias).gate):
        return "the swapped pairs' gates do not tie (the case tests nothing)"
    fn = sel.entry.kernel()  # the registry's own lookup of the fast path
    if fn is None:
        return f"registry has no loadable kernel for {case['policy']}"
    out = fn(x, sel.routing, ctx, bias, sel.workspace)
    msg = compare(ref, out)
    if msg:
        return msg
    if case["guard"]:
        msg = check_guard(case, sel, x, n_valid, bias, ref)
        if msg:
            return msg
    if case["policy"] == "xshare_spec" and case["request_budget"] is None:  # the default is xshare, bit for bit
        plain = build(dict(case, policy="xshare"))[0]
        ref_x = plain.entry.reference(compute_scores(x, plain.routing, bias),
                                      plain.context(x.shape[0], x.device, 0, n_valid, None, case["group"]))
        if not (torch.equal(ref_x.topk_ids, ref.topk_ids) and torch.equal(ref_x.topk_weights, ref.topk_weights)):
            return "xshare_spec's reference without a request budget differs from xshare's"
        msg = compare(ref_x, out)
        if msg:
            return "xshare_spec's kernel without a request budget vs xshare's reference: " + msg
    if case["expect"]:
        plans = [b.plan for key, b in sel.workspace.items() if isinstance(key, tuple) and key[0] == "buffers"]
        got = {k: getattr(plans[0], k) for k in case["expect"]} if len(plans) == 1 else plans
        if got != case["expect"]:
            return f"launch plan {got}, expected {case['expect']}"
    again = fn(x, sel.routing, ctx, bias, sel.workspace)  # reused workspace, bit-identical
    if not (torch.equal(again.topk_ids, out.topk_ids) and torch.equal(again.topk_weights, out.topk_weights)):
        return "second call differs (nondeterministic or stale workspace)"
    if case["refresh"]:
        return run_refresh(case, sel, x, n_valid, bias, fn, out)
    g = torch.Generator().manual_seed(2000 + case["seed"])
    for i in range(case["perms"]):
        p = token_permutation(case, x.shape[0], n_valid, g)
        ctx_p = sel.context(x.shape[0], x.device, 0, n_valid, None if rid is None else rid[p], case["group"])
        ref_p = sel.entry.reference(compute_scores(x[p], sel.routing, bias), ctx_p)
        out_p = fn(x[p], sel.routing, ctx_p, bias, sel.workspace)
        for name, a, b in (("reference", ref, ref_p), ("kernel", out, out_p)):
            what = same_permuted(a, b, p)
            if what:
                return f"token order {i} changes the {name}'s {what}"
    return ""


def main(names) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(1)
    for name in names:
        try:
            msg = run_case(CASES[name])
        except Exception:  # report, do not stop the other cases
            msg = "exception: " + traceback.format_exc(limit=6)
        print("RESULT " + json.dumps({"name": name, "msg": msg}), flush=True)


# ---------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def interpreter_results(request):
    """The selected cases' results (``-k`` / node ids pick the cases the subprocess runs)."""
    pytest.importorskip("triton")
    from tests._subprocess_cases import run_cases

    names = [item.callspec.params["name"] for item in request.session.items
             if getattr(item, "originalname", None) == "test_kernel_matches_reference"]
    return {name: r["msg"] for name, r in run_cases(__file__, names, {"TRITON_INTERPRET": "1"}).items()}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(interpreter_results, name):
    assert name in interpreter_results, "case did not run (subprocess died?)"
    assert interpreter_results[name] == "", interpreter_results[name]


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
