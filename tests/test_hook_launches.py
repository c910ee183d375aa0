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
    from sglang_xshare.serving import hook
    from sglang_xshare.serving.flags import XShareServerConfig

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
        with hook.batch_scope(hook.BatchInfo("decode", batch_size=n)):
            tk.forward_native(x, logits.clone(), num_token_non_padded=nv)  # warm-up: workspace allocation
            launches[0] = 0
            lg = logits.clone()
            with Ops() as mode:
                tk.forward_native(x, lg, num_token_non_padded=nv)
        return mode.ops, launches[0]

    import tempfile

    for name in names:
        try:
            hook.uninstall()
            plain_one, plain_launch = routed(topk.TopK(top_k=4, layer_id=3), 1, 1)
            plain8, _ = routed(topk.TopK(top_k=4, layer_id=3), 8, 6)
            kw = dict(CASES[name])
            if name.endswith("+ab"):
                arm = Path(tempfile.mkdtemp()) / "arm"
                arm.write_text("1")
                kw["ab_switch"] = str(arm)
            hook.install(XShareServerConfig(empty_slots="minus_one", **kw))
            tk = topk.TopK(top_k=4, layer_id=3)
            ops, n = routed(tk, 8, 6)
            one, n_one = routed(tk, 1, 1)
            print("RESULT " + json.dumps(dict(name=name, ops=ops, launches=n, one=one, one_launches=n_one,
                                              plain_one=plain_one, plain_launch=plain_launch, plain8=plain8,
                                              paths=next(iter(hook._STATE.layers.values())).paths)), flush=True)
        except Exception as e:  # report, do not stop the others
            print("RESULT " + json.dumps(dict(name=name, error=repr(e))), flush=True)


@pytest.fixture(scope="module")
def counted():
    from tests._subprocess_cases import run_cases

    return run_cases(__file__, list(CASES), {"TRITON_INTERPRET": "1", "SGLANG_XSHARE_SELECT_BACKEND": "kernel"})


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


if __name__ == "__main__":
    _child(sys.argv[1:])
