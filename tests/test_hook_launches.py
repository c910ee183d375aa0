"""What the hook adds to an MoE layer, counted: the CPU proxy of the per-layer kernel count.

SGLang's real ``TopK`` runs the *GPU path* of the hook on a CPU: the selection backend is forced to
the Triton kernel (``SGLANG_XSHARE_SELECT_BACKEND=kernel``) under ``TRITON_INTERPRET=1``, in a
subprocess. Every PyTorch op dispatched during one routing call is recorded (a
``TorchDispatchMode``) and every Triton launch counted. The fast path must be exactly **one
Triton launch and no PyTorch compute op** (only output allocations and views) -- SGLang's own
top-k does not run; the step-aside path (one-token batch) must dispatch exactly the ops plain
SGLang dispatches. (On a GPU, ``bench/hook_overhead.py`` counts the kernels in a captured graph.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")
pytest.importorskip("triton")
pytestmark = pytest.mark.sglang

ROOT = Path(__file__).resolve().parents[1]

#: Ops that launch no kernel: allocations (outputs) and metadata-only views.
NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.view.default", "aten._unsafe_view.default",
             "aten.alias.default", "aten.detach.default", "aten.reshape.default", "aten.as_strided.default",
             "aten.slice.Tensor", "aten.select.int", "aten.unsqueeze.default", "aten.expand.default"}

CASES = {
    "xshare": dict(policy="xshare", budget="0.5"),
    "xshare_ep": dict(policy="xshare_ep", budget="0.5"),
    "oea": dict(policy="oea", warmup_k0=2),
    "cap": dict(policy="cap", cap=2),
    "xshare+metrics": dict(policy="xshare", budget="0.5", metrics=True),
    "xshare+ab": dict(policy="xshare", budget="0.5"),  # with --xshare-ab-switch (a file set to the policy)
}


def _child(names: list[str]) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from sglang.srt.layers.moe import topk
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    from sglang_xshare.kernels import _batch, _refine
    from sglang_xshare.serving import context, install, runtime
    from sglang_xshare.serving.config import XShareServerConfig
    from sglang_xshare.serving.measure.arms import arm_configs

    publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    launches = [0]
    for fn in (_batch.batch_kernel, _refine.refine_kernel):
        cls = type(fn)
        if not getattr(cls, "_counted", False):
            orig = cls.run

            def run(self, *a, _orig=orig, **k):
                launches[0] += 1
                with _disable_current_modes():  # the interpreter's own tensor work is not the layer's
                    return _orig(self, *a, **k)

            cls.run, cls._counted = run, True

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def routed(tk, T, n):
        g = torch.Generator().manual_seed(T)
        x, logits = torch.randn(T, 16, generator=g), torch.randn(T, 32, generator=g)
        nv = torch.tensor(n)
        with context.batch_scope(context.BatchInfo("decode", batch_size=n)):
            tk.forward_native(x, logits.clone(), num_token_non_padded=nv)  # warm-up: workspace allocation
            launches[0] = 0
            lg = logits.clone()
            with Ops() as mode:
                tk.forward_native(x, lg, num_token_non_padded=nv)
        return mode.ops, launches[0]

    import tempfile

    for name in names:
        if name in SIDE_CASES:
            try:
                print("RESULT " + json.dumps(dict(name=name, **SIDE_CASES[name]())), flush=True)
            except Exception as e:
                print("RESULT " + json.dumps(dict(name=name, error=repr(e))), flush=True)
            continue
        if name.startswith("ab-arms"):
            try:
                print("RESULT " + json.dumps(dict(name=name, **_ab_arms(name.endswith("compute")))), flush=True)
            except Exception as e:
                print("RESULT " + json.dumps(dict(name=name, error=repr(e))), flush=True)
            continue
        try:
            install.uninstall()
            plain_one, plain_launch = routed(topk.TopK(top_k=4, layer_id=3), 1, 1)
            plain8, _ = routed(topk.TopK(top_k=4, layer_id=3), 8, 6)
            kw = dict(CASES[name])
            if name.endswith("+ab"):
                arm = Path(tempfile.mkdtemp()) / "arm"
                arm.write_text("1")
                kw["ab_switch"] = str(arm)
            install.install(XShareServerConfig(empty_slots="minus_one", **kw))
            tk = topk.TopK(top_k=4, layer_id=3)
            ops, n = routed(tk, 8, 6)
            one, n_one = routed(tk, 1, 1)
            print("RESULT " + json.dumps(dict(name=name, ops=ops, launches=n, one=one, one_launches=n_one,
                                              plain_one=plain_one, plain_launch=plain_launch, plain8=plain8,
                                              paths=next(iter(runtime.current().layers.values())).paths)), flush=True)
        except Exception as e:  # report, do not stop the others
            print("RESULT " + json.dumps(dict(name=name, error=repr(e))), flush=True)


def _ab_arms(compute: bool) -> dict:
    """One server's A/B with three policy arms on the GPU path (kernel backend): per switch arm, the
    routing the experts got (is it that policy's own, alone?) and which arms' fused metrics counted
    the call (under ``skip`` only the arm routed by: the others' kernels returned at once)."""
    import os
    import tempfile

    import torch

    from sglang.srt.layers.moe import topk
    from sglang_xshare.serving import context, install, runtime
    from sglang_xshare.serving.config import XShareServerConfig
    from sglang_xshare.serving.measure.arms import arm_configs

    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 16, generator=g)
    centers = torch.randn(3, 32, generator=g) * 2.5
    logits = centers[torch.randint(0, 3, (8,), generator=g)] + torch.randn(8, 32, generator=g)
    nv = torch.tensor(8)
    arms = ("policy=oea,warmup-k0=1", "policy=cap,cap=2")
    base = dict(empty_slots="minus_one", min_tokens="1")

    def route(tk):
        with context.batch_scope(context.BatchInfo("decode", batch_size=8)):
            return tk.forward_native(x, logits.clone(), num_token_non_padded=nv)

    alone = []
    for c in arm_configs(XShareServerConfig(policy="xshare", budget="8", ab_arms=arms, ab_switch="/tmp/x", **base)):
        install.uninstall()
        install.install(XShareServerConfig(**{**c.__dict__, "ab_switch": None, "ab_arms": ()}))
        alone.append(route(topk.TopK(top_k=4, layer_id=3)).topk_ids.tolist())
    install.uninstall()
    sw = Path(tempfile.mkdtemp()) / "arm"
    sw.write_text("0")
    install.install(XShareServerConfig(policy="xshare", budget="8", ab_arms=arms, ab_switch=str(sw), metrics=True,
                                    metrics_interval=1000, ab_idle_arms="compute" if compute else "skip", **base))
    tk = topk.TopK(top_k=4, layer_id=3)
    plain = route(topk.TopK(top_k=4, layer_id=3)).topk_ids.tolist()
    out = dict(alone=alone, plain=plain, routed={}, counted={})
    route(tk)  # builds the layer and its arms
    lp = next(iter(runtime.current().layers.values()))
    rows = [lp.metrics_row, *(a.metrics_row for a in runtime.current().ab.arms_of(lp))]
    for arm in (0, 1, 2, 3):
        sw.write_text(str(arm))
        st = os.stat(sw)
        os.utime(sw, ns=(st.st_mtime_ns + 1000 * (arm + 1), st.st_mtime_ns + 1000 * (arm + 1)))
        runtime.current().ab.switch.poll()
        before = [int(r[0]) for r in rows]
        out["routed"][arm] = route(tk).topk_ids.tolist()
        out["counted"][arm] = [int(r[0]) - b for r, b in zip(rows, before)]
    install.uninstall()
    return out


def _ep_global_idle() -> dict:
    """``--xshare-ep-global`` on the kernel path (rank 0 of a two-rank MoE EP group, the peer's
    collective a stand-in recording what each all-reduce sends): ``(dtype, shape)`` of the
    statistics a selecting call reduces and of the zeros each call that does not select sends
    (a step-aside prefill batch, ``TopK.empty_topk_output`` of a built layer and of a fresh one)."""
    from types import SimpleNamespace

    import torch

    import sglang.srt.layers.moe.utils as moe_utils
    import sglang.srt.runtime_context as rc
    from sglang.srt.layers.moe import topk
    from sglang_xshare.serving import context, install, runtime
    from sglang_xshare.serving.config import XShareServerConfig

    sent: list = []

    def all_reduce(t):
        sent.append((str(t.dtype), list(t.shape), int(torch.count_nonzero(t))))
        return t

    par = SimpleNamespace(moe_ep_group=SimpleNamespace(world_size=2, all_reduce=all_reduce), moe_ep_size=2,
                          tp_group=SimpleNamespace(world_size=1))
    moe_utils.is_moe_input_scattered_across_dp_ranks = lambda: True
    rc.get_parallel = lambda: par
    topk.get_parallel = lambda: par
    install.uninstall()
    install.install(XShareServerConfig(policy="xshare", budget="0.5", empty_slots="minus_one", ep_global=True))
    tk = topk.TopK(top_k=4, layer_id=3)
    g = torch.Generator().manual_seed(9)
    x, logits = torch.randn(8, 16, generator=g), torch.randn(8, 32, generator=g)
    kinds = []
    with context.batch_scope(context.BatchInfo("decode", batch_size=8)):
        tk.forward_native(x, logits.clone())
    kinds.append("select")
    with context.batch_scope(context.BatchInfo("prefill", batch_size=8)):
        tk.forward_native(x, logits.clone())
    kinds.append("step-aside")
    tk.empty_topk_output(torch.device("cpu"))
    kinds.append("empty")
    topk.TopK(top_k=4, layer_id=5).empty_topk_output(torch.device("cpu"))
    kinds.append("empty-fresh")
    lp = next(iter(runtime.current().layers.values()))
    out = dict(sent=sent, kinds=kinds, uses_kernel=lp.selector.uses_kernel(logits))
    install.uninstall()
    return out


def _simulation() -> dict:
    """SGLang's routing simulation (``SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS`` /
    ``SGLANG_SIMULATE_UNIFORM_EXPERTS``, a Triton kernel of SGLang's): the routing of an 8-token
    batch with and without the plugin (``xshare``), and the layer's path label."""
    import os

    import torch

    from sglang.srt.layers.moe import topk
    from sglang_xshare.serving import context, install, runtime
    from sglang_xshare.serving.config import XShareServerConfig

    g = torch.Generator().manual_seed(11)
    x, logits = torch.randn(8, 16, generator=g), torch.randn(8, 32, generator=g)
    out = {}
    for env in ("SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS", "SGLANG_SIMULATE_UNIFORM_EXPERTS"):
        os.environ[env] = "1"
        got = []
        for cfg in (None, XShareServerConfig(policy="xshare", budget="0.5", empty_slots="minus_one")):
            install.uninstall()
            if cfg is not None:
                install.install(cfg)
            topk._simulate_uniform_seed = 0  # SGLang's per-launch seed of the uniform simulation
            with context.batch_scope(context.BatchInfo("decode", batch_size=8)):
                r = topk.TopK(top_k=4, layer_id=3).forward_native(x, logits.clone())
            got.append([r.topk_ids.tolist(), r.topk_weights.tolist()])
        out[env] = dict(plain=got[0], hooked=got[1], paths=next(iter(runtime.current().layers.values())).paths)
        install.uninstall()
        del os.environ[env]
    install.install(XShareServerConfig(policy="xshare", budget="0.5", empty_slots="minus_one"))
    with context.batch_scope(context.BatchInfo("decode", batch_size=8)):
        r = topk.TopK(top_k=4, layer_id=3).forward_native(x, logits.clone())
    out["selected"] = r.topk_ids.tolist()
    install.uninstall()
    return out


#: Cases run in the kernel-backend child besides the launch counts.
SIDE_CASES = {"ep-global-idle": _ep_global_idle, "simulation": _simulation}


@pytest.fixture(scope="module")
def counted():
    from tests._subprocess_cases import run_cases

    return run_cases(__file__, [*CASES, "ab-arms", "ab-arms-compute", *SIDE_CASES],
                     {"TRITON_INTERPRET": "1", "SGLANG_XSHARE_SELECT_BACKEND": "kernel"})


@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith("+ab")])
def test_fast_path_is_one_launch_and_no_torch_compute(counted, name):
    r = counted[name]
    assert "error" not in r, r.get("error")
    assert r["paths"] == {"8": "fast", "1": "sglang" if name != "cap" else "fast"}
    assert r["launches"] == 1, r["ops"]
    compute = [op for op in r["ops"] if op not in NO_KERNEL]
    assert compute == [], compute


def test_ab_switch_fast_path_is_sglangs_ops_plus_the_kernel_plus_two_wheres(counted):
    """``--xshare-ab-switch`` (a measurement mode): both arms pay SGLang's own routing ops, the one
    selection launch and two ``where``; nothing else."""
    r = counted["xshare+ab"]
    assert "error" not in r, r.get("error")
    assert r["paths"] == {"8": "fast", "1": "sglang"} and r["launches"] == 1
    compute = [op for op in r["ops"] if op not in NO_KERNEL]
    sglang = [op for op in r["plain8"] if op not in NO_KERNEL]
    assert compute[:len(sglang)] == sglang, compute
    rest = compute[len(sglang):]
    # SGLang's native path returns int64 ids (its CUDA path int32, like ours): at most a dtype cast each
    assert [op for op in rest if op != "aten._to_copy.default"] == ["aten.where.self"] * 2, rest
    assert rest.count("aten._to_copy.default") <= 2, rest


@pytest.mark.parametrize("name", [n for n in CASES if n != "cap"])
def test_step_aside_path_adds_nothing(counted, name):
    r = counted[name]
    assert "error" not in r, r.get("error")
    assert r["one_launches"] == 0 and r["plain_launch"] == 0
    assert r["one"] == r["plain_one"]  # exactly SGLang's own ops


def test_ab_arms_the_switch_does_not_route_by_skip_their_selection(counted):
    """``--xshare-ab-idle-arms skip`` (the default) on the GPU path: per switch arm the experts get
    exactly that policy's routing (as a server with that policy alone routes the batch), and only
    the arm routed by runs its selection (its fused metrics count the call; the others' kernels
    returned at once); SGLang's arm runs none."""
    r = counted["ab-arms"]
    assert "error" not in r, r.get("error")
    assert r["routed"]["0"] == r["plain"]
    for arm in (1, 2, 3):
        assert r["routed"][str(arm)] == r["alone"][arm - 1], arm
    assert len({str(a) for a in r["alone"]}) == 3  # the three policies route this batch differently
    assert r["counted"] == {"0": [0, 0, 0], "1": [1, 0, 0], "2": [0, 1, 0], "3": [0, 0, 1]}


def test_ab_arms_under_compute_all_select_on_every_batch(counted):
    """``--xshare-ab-idle-arms compute``: every arm selects on every batch (what the A/B runs before
    the flag measured), and the experts still get the switch's arm."""
    r = counted["ab-arms-compute"]
    assert "error" not in r, r.get("error")
    for arm in (1, 2, 3):
        assert r["routed"][str(arm)] == r["alone"][arm - 1], arm
    assert r["counted"] == {str(a): [1, 1, 1] for a in range(4)}


def test_ep_global_idle_zeros_have_the_kernels_statistics_shape(counted):
    """``--xshare-ep-global`` on the kernel path (the GPU's): every call that does not select (a
    step-aside batch, a rank without MoE tokens, also before the layer's first routing call) joins
    the all-reduce with zeros of exactly the dtype and shape a selecting call's kernel reduces
    (``[2, BLOCK_E] int64``), else a DP-attention + DeepEP server's collectives mismatch or hang."""
    r = counted["ep-global-idle"]
    assert "error" not in r, r.get("error")
    assert r["uses_kernel"] and r["kinds"] == ["select", "step-aside", "empty", "empty-fresh"]
    sent = r["sent"]
    assert len(sent) == 4, sent
    dtype, shape, nonzero = sent[0]
    assert dtype == "torch.int64" and len(shape) == 2 and shape[0] == 2 and nonzero > 0
    assert [s[:2] for s in sent[1:]] == [[dtype, shape]] * 3, sent
    assert [s[2] for s in sent[1:]] == [0, 0, 0]


@pytest.mark.parametrize("env", ["SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS", "SGLANG_SIMULATE_UNIFORM_EXPERTS"])
def test_routing_simulation_steps_aside_bit_for_bit(counted, env):
    """SGLang's routing simulation (benchmarks): the simulated routing reaches the experts bit for
    bit with the plugin installed, the path label is ``sglang``; without it the policy selects."""
    r = counted["simulation"]
    assert "error" not in r, r.get("error")
    assert r[env]["hooked"] == r[env]["plain"]
    assert r[env]["paths"] == {"8": "sglang"}
    assert r["selected"] != r[env]["plain"][0]


if __name__ == "__main__":
    _child(sys.argv[1:])
