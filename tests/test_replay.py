"""Trace format round trip, metrics on a hand-made case, and the replay CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang_xshare import Placement, RoutingSpec, SelectionConfig, Selector
from sglang_xshare.cli import main
from sglang_xshare.metrics import selection_metrics
from sglang_xshare.select import SelectionOutput, compute_scores
from sglang_xshare.trace import Trace, default_trace_path, dense_request_ids

from .conftest import clustered_logits


def small_trace(S=4, L=2, T=8, E=16, k=4, pad=2) -> Trace:
    logits = np.stack([np.stack([clustered_logits(T, E, seed=s * 10 + l).numpy() for l in range(L)]) for s in range(S)])
    rid = np.tile(np.arange(T) // 2, (S, 1)).astype(np.int32)
    rid[:, T - pad:] = -1
    meta = {"num_experts": E, "top_k": k, "scoring": "softmax", "renormalize": True, "layer_ids": list(range(L)),
            "model": "random-clusters", "source": "tests"}
    return Trace(logits.astype(np.float16), rid, meta)


def test_trace_round_trip(tmp_path):
    tr = small_trace()
    p = tr.save(tmp_path / "t.npz")
    back = Trace.load(p)
    assert np.array_equal(back.logits, tr.logits) and np.array_equal(back.request_ids, tr.request_ids)
    assert back.routing == RoutingSpec(16, 4)
    step = next(back.steps())
    assert step.num_valid == 6 and step.logits.shape == (2, 8, 16)
    assert step.request_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]


def test_trace_validation():
    tr = small_trace()
    bad = tr.request_ids.copy()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="trailing"):
        Trace(tr.logits, bad, tr.meta)
    with pytest.raises(ValueError, match="layer_ids"):
        Trace(tr.logits, tr.request_ids, {**tr.meta, "layer_ids": [0]})


def test_dense_request_ids():
    assert dense_request_ids(np.array([7, 7, 3, 9, -1, -1])).tolist() == [0, 0, 1, 2, 3, 4]


def test_metrics_by_hand():
    E, k = 8, 2
    logits = torch.tensor([[4.0, 3.0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 4.0, 3.0], [0.0] * 8])
    scores = compute_scores(logits, RoutingSpec(E, k))
    ids = torch.tensor([[0, 1], [6, -1], [-1, -1]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    m = selection_metrics(SelectionOutput(ids, w), scores, valid, k, Placement.expert_parallel(E, 4))
    assert m["distinct"] == 3
    assert m["rank_experts"].tolist() == [2.0, 0.0, 0.0, 1.0]
    assert m["rank_tokens"].tolist() == [2.0, 0.0, 0.0, 1.0]
    assert m["peak_experts"] == 2 and m["peak_over_mean"] == pytest.approx(2 / 0.75)
    g = scores.gate
    want = (g[0, 0] + g[0, 1] + g[1, 6]) / (g[0, 0] + g[0, 1] + g[1, 6] + g[1, 7])
    assert float(m["retained_mass"]) == pytest.approx(float(want))
    assert m["short_tokens"] == 1


def test_xshare_ep_physical_ids_feed_metrics():
    E, k, T = 16, 4, 12
    placement = Placement.from_map(E, 4, list(range(E)) + [0, 1, 2, 3])
    from sglang_xshare import BudgetSchedule
    sel = Selector(RoutingSpec(E, k), SelectionConfig(policy="xshare_ep", budget=BudgetSchedule.parse("0.5")), placement)
    logits = clustered_logits(T, E, 1)
    out = sel(logits)
    kept = out.topk_ids >= 0
    assert torch.all(placement.physical_to_logical[out.physical_ids[kept].long()] == out.topk_ids[kept].long())
    # one copy per chosen expert
    pairs = {(int(a), int(b)) for a, b in zip(out.topk_ids[kept], out.physical_ids[kept])}
    assert len({a for a, _ in pairs}) == len(pairs)


def test_replay_cli(tmp_path, capsys):
    p = small_trace().save(tmp_path / "t.npz")
    rc = main(["replay", "--trace", str(p), "--policy", "xshare", "--budget", "0.6", "--ep-size", "4",
               "--also", "xshare_ep,xshare_spec,oea_simple", "--out", str(tmp_path), "--name", "r", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| topk |" in text and "xshare(m=frac:0.6, k0=1)" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert {"command", "git", "device", "date"} <= set(data["meta"])
    rows = data["overall"]
    assert rows["topk"]["retained_mass"] == pytest.approx(1.0)
    assert rows["topk"]["short_fraction"] == 0.0
    ours = rows["xshare(m=frac:0.6, k0=1)"]
    assert ours["distinct"] < rows["topk"]["distinct"]
    assert 0 < ours["retained_mass"] < 1
    assert (tmp_path / "r.md").read_text().startswith("# r")


def test_replay_writes_nothing_without_out(tmp_path, monkeypatch, capsys):
    """The default prints the table and writes nothing (``make demo`` must not touch the tree)."""
    p = small_trace().save(tmp_path / "t.npz")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["replay", "--trace", str(p), "--no-progress"]) == 0
    assert "| topk |" in capsys.readouterr().out
    assert list(work.rglob("*")) == [], "replay wrote files without --out"


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_replay_cli_errors(tmp_path, capsys):
    assert "--trace" in _error(["replay", "--trace", str(tmp_path / "missing.npz"), "--no-progress"], capsys)
    p = str(small_trace().save(tmp_path / "t.npz"))
    base = ["replay", "--trace", p, "--no-progress"]
    # the flags the user typed, not the server's --xshare-* names
    err = _error([*base, "--budget", "99"], capsys)
    assert "error: --budget:" in err and "--xshare" not in err
    assert "error: --k0:" in _error([*base, "--k0", "9"], capsys)
    assert "error: --layer-budgets:" in _error([*base, "--layer-budgets", "1:abc"], capsys)
    assert "error: --request-budget:" in _error([*base, "--also", "xshare_spec", "--request-budget", "0"], capsys)
    # a layer the trace does not have (its layers are 0 and 1)
    err = _error([*base, "--layer-budgets", "9:0.5"], capsys)
    assert "error: --layer-budgets:" in err and "[9]" in err
    err = _error([*base, "--device", "nodevice"], capsys)
    assert "error: --device:" in err
    assert "error: --ep-size: must be >= 1" in _error([*base, "--ep-size", "0"], capsys)
    # flags named inside the message are this front-end's too
    err = _error([*base, "--budget", "auto", "--warmup-p", "0.5"], capsys)
    assert "error: --warmup-p: --budget auto sets warmup_p" in err and "--xshare" not in err


def _overall(tmp_path, name, trace, *flags) -> dict:
    assert main(["replay", "--trace", str(trace), "--policy", "xshare", "--out", str(tmp_path), "--name", name,
                 "--no-progress", *flags]) == 0
    return json.loads((tmp_path / f"{name}.json").read_text())["overall"]


def test_replay_verify_budget_and_guard(tmp_path, capsys):
    """``--verify-budget`` / ``--verify-guard`` reach the selection of ``--policy`` on the steps with
    request groups (speculative verify batches) and nowhere else: on a grouped trace the verify
    budget replaces the batch budget, on a trace of single-token requests it changes nothing, and
    the baselines never take either."""
    grouped = small_trace(S=6, T=16, E=32, k=4).save(tmp_path / "g.npz")
    plain = _overall(tmp_path, "plain", grouped, "--budget", "0.4")
    wide = _overall(tmp_path, "wide", grouped, "--budget", "0.9")
    vb = _overall(tmp_path, "vb", grouped, "--budget", "0.4", "--verify-budget", "0.9")
    ours = "xshare(m=frac:0.4, k0=1, verify m=frac:0.9)"
    assert ours in vb and vb[ours]["distinct"] == pytest.approx(wide["xshare(m=frac:0.9, k0=1)"]["distinct"])
    assert vb[ours]["distinct"] > plain["xshare(m=frac:0.4, k0=1)"]["distinct"]
    assert vb["oea(k0=1)"] == plain["oea(k0=1)"]  # a baseline keeps its routing
    guard = _overall(tmp_path, "guard", grouped, "--budget", "0.4", "--verify-guard", "4")
    g = guard["xshare(m=frac:0.4, k0=1, guard=4)"]
    assert g["retained_mass"] > plain["xshare(m=frac:0.4, k0=1)"]["retained_mass"]
    # one request per token: no verify batch, so neither flag changes the routing
    single = small_trace(S=6, T=16, E=32, k=4)
    single.request_ids[:] = np.where(single.request_ids >= 0, np.arange(16, dtype=np.int32), -1)
    single = single.save(tmp_path / "s.npz")
    a = _overall(tmp_path, "s0", single, "--budget", "0.4")["xshare(m=frac:0.4, k0=1)"]
    b = _overall(tmp_path, "s1", single, "--budget", "0.4", "--verify-budget", "0.9", "--verify-guard", "4")
    assert b["xshare(m=frac:0.4, k0=1, verify m=frac:0.9, guard=4)"] == a
    capsys.readouterr()
    base = ["replay", "--trace", str(grouped), "--no-progress"]
    assert "error: --verify-guard:" in _error([*base, "--verify-guard", "9"], capsys)
    assert "error: --verify-budget:" in _error([*base, "--verify-budget", "99"], capsys)
    mixed = small_trace(S=2, T=8, E=32, k=4)
    mixed.request_ids[0, :4] = [0, 1, 0, 1]  # a request's rows not consecutive
    mixed = mixed.save(tmp_path / "m.npz")
    assert "error: --verify-guard:" in _error(["replay", "--trace", str(mixed), "--no-progress", "--verify-guard", "4"],
                                               capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_replay_cuda_without_gpu(tmp_path, capsys):
    p = str(small_trace().save(tmp_path / "t.npz"))
    err = _error(["replay", "--trace", p, "--no-progress", "--device", "cuda"], capsys)
    assert "error: --device:" in err and "CUDA is not available" in err and "Traceback" not in err


def test_replay_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.7)" in out and "(default: cpu)" in out and "(default: replay)" in out


def test_replay_hard_cap_and_replicas():
    """xshare_ep with EPLB-style replicas does more than keep the warm-up experts (it fills the
    budget); with the hard cap no batch activates more than max(budget, warm-up set) experts,
    which the default (per-rank budget, fill to the peak) does exceed."""
    from sglang_xshare.replay import replay, standard_runs

    tr = small_trace(S=3, T=12, E=16, k=4, pad=0)
    placement = Placement.from_map(16, 4, list(range(16)) + [0, 5, 9, 13])
    runs = standard_runs(tr.routing, "xshare_ep", "6", extra=["oea"])
    runs += standard_runs(tr.routing, "xshare_ep", "6", hard_cap=True)[-1:]
    res = replay(tr, runs, placement, progress=False).overall
    soft, oea = res["xshare_ep(m=6, k0=1)"], res["oea(k0=1)"]
    assert soft["distinct"] > oea["distinct"] and soft["retained_mass"] > oea["retained_mass"]
    sels = {r.label: Selector(tr.routing, r.config, placement) for r in runs}
    over = 0
    for step in tr.steps():
        for logits in step.logits:
            n_warm = int((sels["oea(k0=1)"](logits).topk_ids[:, :1].unique() >= 0).sum())
            hard = sels["xshare_ep(m=6, k0=1, hard cap)"](logits).topk_ids
            soft_ids = sels["xshare_ep(m=6, k0=1)"](logits).topk_ids
            assert int((hard.unique() >= 0).sum()) <= max(6, n_warm)
            over += int((soft_ids.unique() >= 0).sum()) > max(6, n_warm)
    assert over > 0, "the default should exceed the count on some batch (else the case tests nothing)"


def test_default_trace_in_checkout():
    path = default_trace_path()
    if not path.exists():
        pytest.fail(f"the repository must keep its default trace at {path}")
    assert path.parent == Path(__file__).resolve().parents[1] / "bench" / "data" / "model"
    tr = Trace.load(path)
    assert tr.num_steps > 0 and tr.routing.num_experts >= 8


def test_replay_without_checkout_data_names_trace_flag(tmp_path, monkeypatch, capsys):
    """Installed from a wheel (no bench/data next to the package), ``replay`` says to pass ``--trace``."""
    import sglang_xshare.trace as trace_mod

    monkeypatch.setattr(trace_mod, "DATA_DIR", tmp_path / "no-data")
    err = _error(["replay", "--no-progress"], capsys)
    assert "--trace PATH" in err and "bench/data/model" in err, err


def test_subpackages_come_from_top_level_folders():
    """``sglang_xshare.kernels`` / ``.launch`` are the checkout's top-level ``kernels/`` and ``launch/``
    (one copy; pyproject's package-dir for installs, the checkout finder for ``PYTHONPATH=<checkout>``)."""
    import sglang_xshare.kernels
    import sglang_xshare.launch

    root = Path(__file__).resolve().parents[1]
    assert Path(sglang_xshare.kernels.__file__).resolve() == root / "kernels" / "__init__.py"
    assert Path(sglang_xshare.launch.__file__).resolve() == root / "launch" / "__init__.py"
    assert not (root / "sglang_xshare" / "kernels").exists() and not (root / "sglang_xshare" / "launch").exists()


def test_contiguous_group():
    from sglang_xshare.trace import contiguous_group

    assert contiguous_group(np.array([0, 0, 1, 1, 2, 2])) == 2
    assert contiguous_group(np.array([0, 0, 0, 1, 1])) == 3  # the last request shorter
    assert contiguous_group(np.array([0, 1, 2])) == 1
    assert contiguous_group(np.array([0, 0, 1, 2])) is None
    assert contiguous_group(np.array([1, 1, 0, 0])) is None
    assert contiguous_group(np.array([], dtype=np.int64)) is None


def test_run_metadata_revision(tmp_path, monkeypatch):
    """Results record the revision: the checkout's (whatever the cwd), or $XSHARE_GIT_REV for a
    copy without .git (what the GPU machines run)."""
    from sglang_xshare.benchio import run_metadata

    monkeypatch.chdir(tmp_path)  # not a git tree
    monkeypatch.delenv("XSHARE_GIT_REV", raising=False)
    rev = run_metadata(["x"])["git"]
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0:
        assert rev.startswith(head.stdout.strip())
    monkeypatch.setenv("XSHARE_GIT_REV", "abc1234")
    assert run_metadata(["x"])["git"] == "abc1234"
