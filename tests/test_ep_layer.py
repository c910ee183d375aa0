"""EP MoE layer on CPU with gloo processes: output == single-process reference (bf16 tolerance).

One spawn per world size (2 and 4 ranks) runs every check and reports named results; the tests
below assert them one by one. Checks per world size:

* every policy (topk, xshare, xshare_ep, oea) x both NCCL/gloo modes (padded, exact): EP output vs
  :func:`reference_moe` of the same selection;
* ``-1`` slots and all-``-1`` (padded) tokens; a placement with replicated experts, mapped
  primary, round-robin, and by ``xshare_ep``'s own physical ids -- with *slot-tagged* weights
  (every physical slot its own weights) so the output shows which copy, on which rank, served
  each slot: it must be the copy the policy / replica map chose (computed independently here);
* rows that cross the network: tokens whose every slot is on their own rank are never sent
  (exact mode's send splits), and the counters match a host-side count;
* DP attention: the global view gives every rank the same expert set, equal to the single-process
  policy on all ranks' tokens; the local view's union of sets is never smaller.

Plus one single-process check of the Triton grouped GEMM in Triton's CPU interpreter.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_xshare.config import BudgetSchedule, RoutingSpec, SelectionConfig
from sglang_xshare.dispatch import DispatchConfigError, NcclDispatcher, make_dispatcher, rank_membership
from sglang_xshare.dispatch.deepep import low_latency_refusal
from sglang_xshare.moe import EPMoELayer, SwiGLUExperts, make_expert_weights, reference_moe
from sglang_xshare.moe.dp_attention import DPAttentionSelector
from sglang_xshare.placement import Placement
from sglang_xshare.select import Selector

E, K, H, I, T = 16, 4, 64, 32, 10
TOL = 1e-2  # relative Frobenius error, bf16 activations and outputs
POLICIES = ("topk", "xshare", "xshare_ep", "oea")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _selector(policy: str, placement: Placement, budget: str = "0.5") -> Selector:
    routing = RoutingSpec(num_experts=E, top_k=K)
    budgeted = policy.startswith("xshare")
    # min_score drops weak slots beyond k0: the budgeted policies then emit -1 slots
    cfg = SelectionConfig(policy=policy, k0=1, budget=BudgetSchedule.parse(budget) if budgeted else None,
                          min_score=0.08 if budgeted else 0.0)
    return Selector(routing, cfg, placement=placement, backend="reference")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _replicated(R: int) -> Placement:
    """E logical experts + R redundant copies, one extra slot per rank, copies on other ranks."""
    L = E // R + 1
    p2l = []
    for r in range(R):
        p2l += list(range(r * (E // R), (r + 1) * (E // R)))
        p2l.append(((r + 1) % R) * (E // R))      # a copy of the next rank's first expert
    assert len(p2l) == R * L
    return Placement.from_map(E, R, p2l)


def _layer(placement: Placement, rank: int, mode: str, replica_mode: str = "primary", tagged: bool = False) -> EPMoELayer:
    """This rank's layer; ``tagged``: weights keyed by *physical slot* (copies differ), else by
    logical expert (copies equal, as in a real model)."""
    L = placement.experts_per_rank
    local = torch.arange(rank * L, (rank + 1) * L) if tagged else placement.physical_to_logical[rank * L:(rank + 1) * L]
    w13, w2 = make_expert_weights(local, H, I, seed=11 if tagged else 7)
    disp = NcclDispatcher(rank, placement.num_ranks, placement.num_physical, H, K, mode)
    return EPMoELayer(placement, disp, SwiGLUExperts(w13, w2, impl="torch"), replica_mode=replica_mode)


def _worker(rank: int, R: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=R)
    res: dict[str, object] = {}
    try:
        g = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        logits = torch.randn(T, E, generator=g) * 2
        w13_all, w2_all = make_expert_weights(range(E), H, I, seed=7)
        pure = Placement.expert_parallel(E, R)
        repl = _replicated(R)

        # 1. policies x modes, pure EP and replicated placements
        for pname, placement in (("pure", pure), ("repl", repl)):
            for policy in POLICIES:
                sel = _selector(policy, placement)(logits)
                ref = reference_moe(x, sel.topk_ids, sel.topk_weights, w13_all, w2_all)
                for mode in ("padded", "exact"):
                    for rmode in (("primary", "round_robin") if pname == "repl" else ("primary",)):
                        out = _layer(placement, rank, mode, rmode).forward_selected(x, sel)
                        res[f"out/{pname}/{policy}/{mode}/{rmode}"] = _rel(out, ref)
                res[f"neg1/{pname}/{policy}"] = int((sel.topk_ids < 0).sum())
            # the layer's own select stage (router logits in) gives the same output
            layer = _layer(placement, rank, "padded")
            layer.selector = _selector("xshare_ep", placement)
            direct = layer.forward_selected(x, layer.selector(logits))
            res[f"forward_selector/{pname}"] = bool(torch.equal(layer(x, logits), direct))

        # 1b. which copy served each slot: slot-tagged weights, expected copies computed here
        P, Lr = repl.num_physical, repl.experts_per_rank
        w13_slots, w2_slots = make_expert_weights(range(P), H, I, seed=11)
        p2l = repl.physical_to_logical.tolist()
        copies = [[p for p in range(P) if p2l[p] == e] for e in range(E)]
        for policy in POLICIES:
            sel = _selector(policy, repl)(logits)
            for rmode in ("primary", "round_robin"):
                want = [[-1 if e < 0 else (int(sel.physical_ids[t, j]) if policy == "xshare_ep" else
                                           copies[e][0] if rmode == "primary" else copies[e][t % len(copies[e])])
                         for j, e in enumerate(sel.topk_ids[t].tolist())] for t in range(T)]
                want = torch.tensor(want)
                layer = _layer(repl, rank, "exact", rmode, tagged=True)
                out = layer.forward_selected(x, sel)
                res[f"copy/{policy}/{rmode}"] = _rel(out, reference_moe(x, want, sel.topk_weights, w13_slots, w2_slots))
                sent = layer.dispatcher.last_stats.rows_to_rank
                res[f"copy_ranks/{policy}/{rmode}"] = bool(torch.equal(sent, rank_membership(want, R, Lr).sum(0)))
            if policy == "xshare_ep":
                kept = sel.topk_ids >= 0
                primary = torch.tensor([c[0] for c in copies])[sel.topk_ids.long().clamp(min=0)]
                res["copy/xshare_ep/non_primary"] = int((kept & (sel.physical_ids.long() != primary)).sum())
                res["copy/xshare_ep/on_copy"] = bool(torch.all(
                    repl.physical_to_logical[sel.physical_ids[kept].long()] == sel.topk_ids[kept].long()))

        # 2. explicit -1 slots, padded tokens (all -1) -> zero output, replicated physical ids
        ids = torch.randint(0, repl.num_physical, (T, K), generator=g)
        ids[0] = -1                      # a padded token
        ids[1, 1:] = -1                  # a token with one slot
        ids[2, ::2] = -1
        dup = ids[3, 0].item()
        ids[3] = torch.where(torch.arange(K) % 2 == 0, torch.tensor(dup), torch.tensor(-1))  # same slot once, rest empty
        w = torch.rand(T, K, generator=g) * (ids >= 0)
        logical = torch.where(ids >= 0, repl.physical_to_logical[ids.clamp(min=0)], torch.full_like(ids, -1))
        ref = reference_moe(x, logical, w, w13_all, w2_all)
        for mode in ("padded", "exact"):
            layer = _layer(repl, rank, mode)
            out = layer.forward_selected(x, type("S", (), {"topk_ids": logical.int(), "topk_weights": w,
                                                          "physical_ids": ids.int()})())
            res[f"explicit/{mode}"] = _rel(out, ref)
            res[f"padded_zero/{mode}"] = float(out[0].float().abs().max())

        # 3. rows crossing the network: tokens 0..T/2 stay local, the rest each hit rank (rank+1)%R
        Lp = pure.experts_per_rank
        own = torch.randint(rank * Lp, (rank + 1) * Lp, (T, K), generator=g)
        other = (rank + 1) % R
        own[T // 2:, -1] = other * Lp + torch.randint(0, Lp, (T - T // 2,), generator=g)
        w = torch.rand(T, K, generator=g)
        layer = _layer(pure, rank, "exact")
        tokens, handle = layer.dispatch(x, own.int(), w)
        in_splits = handle[3]
        res["net/sent_to_other"] = in_splits[other]
        res["net/sent_elsewhere"] = sum(v for r, v in enumerate(in_splits) if r not in (rank, other))
        res["net/expected_other"] = T - T // 2
        res["net/stats_remote"] = int(layer.dispatcher.last_stats.remote_rows(rank))
        out = layer.combine(layer.compute(tokens), handle)
        res["net/out"] = _rel(out, reference_moe(x, own, w, w13_all, w2_all))
        allocal = torch.randint(rank * Lp, (rank + 1) * Lp, (T, K), generator=g)
        tokens, handle = layer.dispatch(x, allocal.int(), w)
        res["net/allocal_remote_sent"] = sum(v for r, v in enumerate(handle[3]) if r != rank)
        res["net/allocal_remote_recv"] = sum(v for r, v in enumerate(handle[4]) if r != rank)
        padded = _layer(pure, rank, "padded")
        padded.dispatch(x, allocal.int(), w)
        res["net/padded_useful_remote"] = int(padded.dispatcher.last_stats.remote_rows(rank))
        res["net/padded_wire_remote"] = int(padded.dispatcher.last_stats.remote_wire_rows(rank))

        # 4. DP attention: global view == single-process policy on all tokens; identical sets
        all_logits = [torch.empty_like(logits) for _ in range(R)]
        dist.all_gather(all_logits, logits)
        full = torch.cat(all_logits)
        for policy in ("xshare", "xshare_ep"):
            s = _selector(policy, pure, budget="0.4")
            glob = DPAttentionSelector(s, "global")(logits)
            local = DPAttentionSelector(s, "local")(logits)
            single = s(full)
            mine = slice(rank * T, (rank + 1) * T)
            res[f"dp/{policy}/equal_single"] = bool(torch.equal(glob.topk_ids, single.topk_ids[mine])
                                                   and torch.equal(glob.topk_weights, single.topk_weights[mine]))
            if policy == "xshare_ep":
                res[f"dp/{policy}/phys_equal"] = bool(torch.equal(glob.physical_ids, single.physical_ids[mine]))
            used_g = torch.zeros(E, dtype=torch.int64)
            used_l = torch.zeros(E, dtype=torch.int64)
            used_g[glob.topk_ids[glob.topk_ids >= 0].long()] = 1
            used_l[local.topk_ids[local.topk_ids >= 0].long()] = 1
            sets = [torch.empty_like(used_g) for _ in range(R)]
            dist.all_gather(sets, used_g)
            single_set = torch.zeros(E, dtype=torch.int64)
            single_set[single.topk_ids[single.topk_ids >= 0].long()] = 1
            union_g = torch.stack(sets).amax(0)
            res[f"dp/{policy}/global_subset_single"] = bool((union_g <= single_set).all())
            dist.all_reduce(used_g, op=dist.ReduceOp.MAX)
            dist.all_reduce(used_l, op=dist.ReduceOp.MAX)
            res[f"dp/{policy}/n_global"] = int(used_g.sum())
            res[f"dp/{policy}/n_local"] = int(used_l.sum())
        # 5. backend choice: auto without an importable deep_ep (or on gloo) -> NCCL/gloo, says why,
        #    and the layer reports the fallback as a WARNING (printed even without logging set up)
        d = make_dispatcher("auto", num_physical=E, hidden=H, top_k=K, max_tokens_per_rank=T)
        res["auto/name"], res["auto/reason"], res["auto/fallback"] = d.name, d.reason, d.fallback
        records: list[logging.LogRecord] = []
        catch = logging.Handler()
        catch.emit = records.append  # type: ignore[method-assign]
        ep_logger = logging.getLogger("sglang_xshare.moe.ep_layer")
        ep_logger.addHandler(catch)
        ep_logger.setLevel(logging.INFO)
        w13, w2 = make_expert_weights(range(rank * (E // R), (rank + 1) * (E // R)), H, I, seed=7)
        EPMoELayer(pure, d, SwiGLUExperts(w13, w2, impl="torch"))
        EPMoELayer(pure, NcclDispatcher(rank, R, E, H, K, "padded"), SwiGLUExperts(w13, w2, impl="torch"))
        ep_logger.removeHandler(catch)
        res["auto/logged"] = [(r.levelname, r.getMessage()) for r in records]
        try:
            make_dispatcher("bogus", num_physical=E, hidden=H, top_k=K, max_tokens_per_rank=T)
            res["bogus"] = "no error"
        except DispatchConfigError as exc:
            res["bogus"] = str(exc)
        res["ok"] = True
    except Exception:  # report, never hang the parent
        import traceback

        res["error"] = traceback.format_exc()
    queue.put((rank, res))
    dist.destroy_process_group()


def _run(R: int) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, R, port, queue)) for r in range(R)]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=150) for _ in range(R))
    for p in procs:
        p.join(timeout=30)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def results(request) -> tuple[int, dict[int, dict]]:
    R = request.param
    res = _run(R)
    for r, d in res.items():
        assert "error" not in d, f"rank {r}/{R} failed:\n{d['error']}"
    return R, res


def test_ep_output_matches_reference(results):
    R, res = results
    bad = {(r, key): v for r, d in res.items() for key, v in d.items()
           if key.startswith(("out/", "explicit/", "net/out")) and not v < TOL}
    assert not bad, f"relative error >= {TOL} at EP={R}: {bad}"
    n = sum(key.startswith("out/") for key in res[0])
    assert n == len(POLICIES) * 2 * 3  # pure x modes + replicated x modes x replica modes


def test_each_slot_is_served_by_the_chosen_copy(results):
    """Copies carry different weights here: the output is right only if every slot went to the
    copy xshare_ep chose (or the replica map's copy for the other policies), on that copy's rank."""
    R, res = results
    bad = {(r, key): v for r, d in res.items() for key, v in d.items()
           if key.startswith("copy/") and key.count("/") == 2 and not key.endswith(("non_primary", "on_copy"))
           and not v < TOL}
    assert not bad, f"a slot was served by another copy than chosen at EP={R}: {bad}"
    assert all(v for d in res.values() for key, v in d.items() if key.startswith("copy_ranks/")), "rows went to the wrong ranks"
    assert all(d["copy/xshare_ep/on_copy"] for d in res.values())
    assert sum(d["copy/xshare_ep/non_primary"] for d in res.values()) > 0, "xshare_ep never chose a non-primary copy"


def test_forward_runs_the_selector(results):
    R, res = results
    assert all(d["forward_selector/pure"] and d["forward_selector/repl"] for d in res.values())


def test_minus_one_slots_and_padding(results):
    R, res = results
    for r, d in res.items():
        assert d["neg1/pure/xshare"] > 0 and d["neg1/pure/xshare_ep"] > 0, "budgeted policies must leave -1 slots"
        assert d["neg1/pure/topk"] == 0
        for mode in ("padded", "exact"):
            assert d[f"padded_zero/{mode}"] == 0.0, "an all -1 token must get a zero output"


def test_local_tokens_never_cross_the_network(results):
    R, res = results
    for r, d in res.items():
        assert d["net/sent_to_other"] == d["net/expected_other"], d
        assert d["net/sent_elsewhere"] == 0
        assert d["net/stats_remote"] == d["net/expected_other"]
        assert d["net/allocal_remote_sent"] == 0 and d["net/allocal_remote_recv"] == 0
        assert d["net/padded_useful_remote"] == 0
        assert d["net/padded_wire_remote"] == (R - 1) * T  # padded mode moves a fixed block


def test_dp_attention_global_view(results):
    R, res = results
    for policy in ("xshare", "xshare_ep"):
        for r, d in res.items():
            assert d[f"dp/{policy}/equal_single"], f"rank {r}: global view != single-process {policy}"
            assert d[f"dp/{policy}/global_subset_single"]
        assert res[0][f"dp/{policy}/n_local"] >= res[0][f"dp/{policy}/n_global"]
    assert all(d["dp/xshare_ep/phys_equal"] for d in res.values())


def _gloo_rank(rank: int, port: int, body, args: tuple, queue) -> None:
    """One of two spawned gloo ranks: ``body(rank, *args)``'s result (``torch.save`` bytes; or the
    error, a string) goes to ``queue``."""
    from datetime import timedelta

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        buf = io.BytesIO()
        torch.save(body(rank, *args), buf)  # by value: a shared-memory tensor dies with this process
        queue.put((rank, buf.getvalue()))
    except Exception as e:  # report, do not hang the parent
        queue.put((rank, repr(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _two_ranks(body, *args) -> dict[int, object]:
    """Run ``body(rank, *args)`` on two gloo ranks; ``{rank: result}``. A rank stuck in a collective
    is killed (nothing is left behind); a rank's error fails the test."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, body, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=150) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert not isinstance(got[0], str) and not isinstance(got[1], str), got
    return {r: torch.load(io.BytesIO(b), weights_only=False) for r, b in got.items()}


_UNEVEN = ((3, 0), (5, 2), (0, 4))  # tokens per rank, per step


def _uneven_inputs(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = _UNEVEN[step][rank]
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, H, generator=g).to(torch.bfloat16), torch.randn(n, E, generator=g) * 2


def _uneven_body(rank: int):
    """Different token counts per rank and step, ``0`` included, through the dispatcher ``auto``
    builds here (no DeepEP on gloo: padded NCCL/gloo)."""
    pure = Placement.expert_parallel(E, 2)
    w13, w2 = make_expert_weights(range(rank * (E // 2), (rank + 1) * (E // 2)), H, I, seed=7)
    disp = make_dispatcher("auto", num_physical=E, hidden=H, top_k=K, max_tokens_per_rank=5)
    layer = EPMoELayer(pure, disp, SwiGLUExperts(w13, w2, impl="torch"), selector=_selector("xshare", pure))
    return disp.name, disp.capacity, [layer(*_uneven_inputs(step, rank)) for step in range(len(_UNEVEN))]


def test_auto_dispatch_takes_different_token_counts_per_rank():
    """A rank may have fewer tokens than another, or none (DP attention, the last requests of a
    batch): with DeepEP that works, so ``auto``'s NCCL/gloo fallback must too. It pads every rank's
    block to ``max_tokens_per_rank`` (empty rows, ``-1`` slots); each rank gets the single-process
    output of its own tokens. Equal-split padded blocks of ``T`` rows failed here (gloo: size
    mismatch; NCCL: undefined)."""
    got = _two_ranks(_uneven_body)
    w13_all, w2_all = make_expert_weights(range(E), H, I, seed=7)
    for rank in (0, 1):
        name, capacity, outs = got[rank]
        assert (name, capacity) == ("nccl-padded", 5)
        for step in range(len(_UNEVEN)):
            x, logits = _uneven_inputs(step, rank)
            assert outs[step].shape == (x.shape[0], H)
            if x.shape[0]:
                sel = _selector("xshare", Placement.expert_parallel(E, 2))(logits)
                assert _rel(outs[step], reference_moe(x, sel.topk_ids, sel.topk_weights, w13_all, w2_all)) < TOL


_PAD_TOKENS, _PAD_CAPACITY = (3, 1), 4  # tokens per rank, rows per rank pair


def _pad_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = _PAD_TOKENS[rank]
    g = torch.Generator().manual_seed(40 + rank)
    ids = torch.randint(0, E, (n, K), generator=g, dtype=torch.int32)
    return torch.randn(n, H, generator=g).to(torch.bfloat16), ids, torch.rand(n, K, generator=g)


def _pad_body(rank: int):
    """One padded dispatch of fewer tokens than the capacity, then combine of expert rows that are
    the received hidden states on real rows and ``1000`` on the padding rows."""
    disp = NcclDispatcher(rank, 2, E, H, K, "padded", capacity=_PAD_CAPACITY)
    got, handle = disp.dispatch(*_pad_inputs(rank))
    real = torch.zeros(2 * _PAD_CAPACITY, dtype=torch.bool)
    for src, n in enumerate(_PAD_TOKENS):
        real[src * _PAD_CAPACITY: src * _PAD_CAPACITY + n] = True
    expert_out = torch.where(real[:, None], got.hidden, torch.full_like(got.hidden, 1000.0))
    return got.local_ids, got.weights, disp.combine(expert_out, handle)


def test_padded_capacity_rows_are_empty_and_skipped_by_combine():
    """Padded mode with a capacity: a rank with ``T < C`` tokens fills its block with empty rows.
    Every received padding row has slot ``-1`` on every destination (a ``0`` would make the rank
    compute expert 0 for it) and weight 0; real rows carry the local slot ids and the sender's
    weights (0 on slots another rank holds, as :class:`DispatchedTokens` says); combine returns
    ``[T, H]``, the real rows only (each token's two returned rows are its own hidden state:
    ``2 x``), whatever the padding rows hold."""
    got = _two_ranks(_pad_body)
    C = _PAD_CAPACITY
    for rank in (0, 1):
        local_ids, weights, out = got[rank]
        assert local_ids.shape == (2 * C, K)
        for src, n in enumerate(_PAD_TOKENS):
            pad = slice(src * C + n, (src + 1) * C)
            assert (local_ids[pad] == -1).all(), f"rank {rank}: padding rows from rank {src}: {local_ids[pad].tolist()}"
            assert (weights[pad] == 0).all()
            x, ids, w = _pad_inputs(src)
            lo = rank * (E // 2)
            here = (ids >= lo) & (ids < lo + E // 2)
            real = slice(src * C, src * C + n)
            assert torch.equal(local_ids[real], torch.where(here, ids - lo, -1).to(torch.int32))
            assert torch.equal(weights[real], torch.where(here, w, 0.0))  # 0 on slots held elsewhere
        x, _, _ = _pad_inputs(rank)
        assert out.shape == (_PAD_TOKENS[rank], H)
        assert torch.equal(out, (x.float() * 2).to(torch.bfloat16))


def _xshare_selector(backend: str) -> Selector:
    return Selector(RoutingSpec(num_experts=E, top_k=K), SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("0.5")),
                    placement=Placement.expert_parallel(E, 2), backend=backend)


def _dp_empty_body(rank: int, backend: str):
    """A DP-attention rank; rank 1 has no tokens in either of two steps."""
    dp = DPAttentionSelector(_xshare_selector(backend), "global")
    logits = torch.randn(6 if rank == 0 else 0, E, generator=torch.Generator().manual_seed(8))
    outs = [dp(logits).topk_ids for _ in range(2)]
    dist.barrier()
    return outs


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_dp_attention_rank_without_tokens_joins_the_collective(monkeypatch, backend):
    """DP attention, global view: a rank with no tokens this step must still join the statistics
    all-reduce, on the Triton path too (its statistics are ``[2, BLOCK_E]``, the reference's
    ``[3, E]``), else the ranks with tokens wait in it, or pair it with the rank's next collective.
    The rank with tokens then selects from its own tokens alone (the other rank added zeros)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks run the kernel on the CPU
    got = _two_ranks(_dp_empty_body, backend)
    ref = _xshare_selector("reference")(torch.randn(6, E, generator=torch.Generator().manual_seed(8))).topk_ids
    for step in (0, 1):
        assert torch.equal(got[0][step].to(torch.int32), ref.to(torch.int32))
        assert got[1][step].shape == (0, K)


def test_backend_choice_is_explained(results):
    R, res = results
    for d in res.values():
        assert d["auto/name"] == "nccl-padded"
        assert "DeepEP not used" in d["auto/reason"] and "gloo" in d["auto/reason"]
        assert d["auto/fallback"] and "DeepEP" in d["auto/fallback"]
        levels = [lvl for lvl, _ in d["auto/logged"]]
        assert levels == ["WARNING", "INFO"], d["auto/logged"]  # the fallback warns, a plain NCCL layer does not
        assert "DeepEP" in d["auto/logged"][0][1] and "falls back" in d["auto/logged"][0][1]
        assert d["bogus"].startswith("--dispatch-backend")


def test_layer_refuses_an_xshare_ep_selector_of_another_placement():
    """``xshare_ep`` names physical slots of its own placement; the EP layer dispatches them as its
    own. A selector built without the layer's placement, or with another map, would route tokens
    to other experts silently (0.6-1.1 relative output error): refused at construction and when
    set later. Other policies select logical experts (the layer maps them). The dispatcher moves
    bf16 rows as bytes: another dtype is refused before anything is sent."""
    pl = Placement.from_map(9, 2, [0, 1, 2, 3, 4, 0, 5, 6, 7, 8])  # a copy of expert 0 at slot 5
    other = Placement.from_map(9, 2, [0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    w13, w2 = make_expert_weights(pl.physical_to_logical[:5], H, I, seed=7)

    def sel(policy, placement):
        cfg = SelectionConfig(policy=policy, k0=1, budget=BudgetSchedule.parse("0.8") if policy == "xshare_ep" else None)
        return Selector(RoutingSpec(num_experts=9, top_k=2), cfg, placement=placement, backend="reference")

    disp = NcclDispatcher(0, 2, pl.num_physical, H, 2, "exact")
    layer = EPMoELayer(pl, disp, SwiGLUExperts(w13, w2, impl="torch"), selector=sel("xshare_ep", pl))
    for bad, why in ((None, "has no placement"), (other, "is not the layer's")):
        with pytest.raises(ValueError, match=why):
            EPMoELayer(pl, disp, SwiGLUExperts(w13, w2, impl="torch"), selector=sel("xshare_ep", bad))
        with pytest.raises(ValueError, match=why):
            layer.selector = DPAttentionSelector(sel("xshare_ep", bad), "local")
    layer.selector = sel("oea", None)  # logical ids: the layer's replica map places them
    with pytest.raises(ValueError, match="bfloat16"):
        disp.dispatch(torch.zeros(3, H), torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, 2))


def test_low_latency_refusal():
    assert "% 128" in low_latency_refusal(2880, 4, 64)          # GPT-OSS hidden: normal mode instead
    assert low_latency_refusal(7168, 8, 256) is None              # DeepSeek-V3 hidden
    assert "top_k" in low_latency_refusal(7168, 12, 256)
    assert "511" in low_latency_refusal(4096, 8, 1024)
    assert "compiled" in low_latency_refusal(1536, 8, 64)        # % 128 == 0 but no kernel for it


def test_triton_grouped_gemm_interpreter():
    """The Triton experts (both formats) against the reference, in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from sglang_xshare.moe.experts import SwiGLUExperts, make_expert_weights
        from sglang_xshare.moe.reference import reference_moe
        from sglang_xshare.dispatch.base import DispatchedTokens, ExpertsFormat
        g = torch.Generator().manual_seed(3)
        L, H, I, N, k, M = 5, 48, 40, 37, 3, 9
        w13, w2 = make_expert_weights(range(L), H, I, seed=2)
        x = torch.randn(N, H, generator=g).bfloat16()
        ids = torch.randint(-1, L, (N, k), generator=g).int()
        ids[4] = -1
        w = torch.rand(N, k, generator=g) * (ids >= 0)
        ref = reference_moe(x, ids, w, w13, w2)
        ex = SwiGLUExperts(w13, w2, impl="triton")
        y = ex(DispatchedTokens(ExpertsFormat.STANDARD, x, ids, w))
        e1 = float((y.float() - ref).norm() / ref.norm())
        assert y[4].abs().max() == 0
        counts = torch.tensor([3, 0, 9, 1, 7]).int()
        xb = torch.randn(L, M, H, generator=g).bfloat16()
        yb = ex(DispatchedTokens(ExpertsFormat.BATCHED, xb, expert_counts=counts, max_pairs=24))
        e2 = 0.0
        for e in range(L):
            c = int(counts[e])
            if c:
                r = reference_moe(xb[e, :c], torch.full((c, 1), e), torch.ones(c, 1), w13, w2)
                e2 = max(e2, float((yb[e, :c].float() - r).norm() / r.norm()))
        print(e1, e2)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    e1, e2 = map(float, p.stdout.split()[-2:])
    # the interpreter truncates (not rounds) fp32 -> bf16 casts, doubling the rounding error
    assert e1 < 2e-2 and e2 < 2e-2, (e1, e2)
