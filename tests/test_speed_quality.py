"""bench/speed_quality.py: every serving point gets the evaluation model's quality cost at its expert
ratio and batch size, and the profile's conversion / ideal speed-up are computed from the arms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "bench" / "results" / "quality.json"


def _mod():
    import speed_quality  # bench/ is on the tests' path (pyproject: pythonpath)

    return speed_quality


def test_batch_mapping_and_settings():
    sq = _mod()
    assert [sq.quality_batch(c) for c in (1, 2, 4, 8, 16, 32, 64, 128)] == [1, 4, 4, 16, 16, 64, 64, 64]
    assert sq.family_and_setting("xshare@auto") == ("xshare", "xshare k0=3 budget=0.8")
    assert sq.family_and_setting("xshare@0.7") == ("xshare", "xshare k0=1 budget=0.7")
    assert sq.family_and_setting("xshare@mass:0.95") == ("xshare", "xshare k0=1 budget=mass:0.95")
    assert sq.family_and_setting("xshare@24") == ("xshare", None)  # a count of 128 experts has no E=64 twin
    assert sq.family_and_setting("oea+k0=4") == ("oea", "oea k0=4")
    m, ci = sq.mean_ci([1.0, 1.2])
    assert m == pytest.approx(1.1) and ci == pytest.approx(12.706 * 0.1414213 / 1.41421356, rel=1e-4)


def _serve(speedups, experts, topk, prof=True):
    sg = {"graph_launches": 10, "total_us": 100_000.0, "kernel_us": {"MoE experts": 60_000.0, "attention": 10_000.0}}
    arm = {"graph_launches": 10, "total_us": 82_000.0,
           "kernel_us": {"MoE experts": 39_000.0, "attention": 10_000.0, "xshare selection": 1_000.0}}
    rows = [{"config": "off", "concurrency": 16},
            {"config": "xshare@0.7", "concurrency": 32, "ab_tpot_speedups": speedups, "ab_tpot_speedup": speedups[0],
             "ab_tok_ratio": 1.2, "experts": experts, "topk_experts": topk, "tpot_med_ms": 8.0, "ab_sglang_tpot_ms": 9.6}]
    lvl = {"concurrency": 32, "profile": {"sglang": {"0": sg}, "xshare@0.7": {"0": arm}}} if prof else {"concurrency": 32}
    return {"rows": rows, "records": [{"levels": [lvl]}], "meta": {}}


def test_rows_carry_speed_ratio_and_cost():
    sq = _mod()
    qrows = json.loads(QUALITY.read_text())["rows"]
    rows = sq.speed_rows(_serve([1.2, 1.3], 70.0, 100.0), qrows)
    assert len(rows) == 1  # SGLang's own configuration has no row of its own
    r = rows[0]
    assert r["expert_ratio"] == pytest.approx(0.7) and r["speedup"] == pytest.approx(1.25) and r["pairs"] == 2
    q = r["quality"]
    assert q["B"] == 64
    same = next(x for x in qrows if x["B"] == 64 and x["spec"] == "xshare k0=1 budget=0.7")
    assert q["same"]["dce_pct"] == pytest.approx(100 * same["delta_rel"])
    best = min((x for x in qrows if x["B"] == 64 and x["family"] == "xshare" and x["ratio"] <= 0.705 and x.get("g", 1) == 1),
               key=lambda x: x["delta_rel"])
    assert q["at_ratio"]["spec"] == best["spec"] and q["at_ratio"]["ratio"] <= 0.705


def test_no_cut_has_no_mapped_cost():
    """A point that ran top-k's own experts (ratio 1) costs nothing, not the cheapest swept cut."""
    sq = _mod()
    qrows = json.loads(QUALITY.read_text())["rows"]
    (r,) = sq.speed_rows(_serve([1.0, 1.0], 100.0, 100.0), qrows)
    assert r["expert_ratio"] == pytest.approx(1.0)
    assert r["quality"]["at_ratio"]["spec"] is None and "no cut" in r["quality"]["at_ratio"]["note"]
    (r,) = sq.speed_rows(_serve([1.0, 1.0], 98.0, 100.0), qrows)  # a real (small) cut still maps
    assert r["quality"]["at_ratio"]["spec"] is not None


def test_profile_conversion_and_ideal():
    sq = _mod()
    serve = _serve([1.2, 1.3], 70.0, 100.0)
    speed = {(r["config"], r["concurrency"]): r for r in sq.speed_rows(serve, [])}
    (p,) = sq.profile_rows(serve, speed)
    assert p["expert_time_ratio"] == pytest.approx(0.65) and p["expert_ratio"] == pytest.approx(0.7)
    assert p["conversion"] == pytest.approx(0.65 / 0.7) and p["cut_converted"] == pytest.approx(0.35 / 0.3)
    assert p["ideal_speedup"] == pytest.approx(10.0 / (10.0 - 6.0 * 0.3))
    assert p["profile_speedup"] == pytest.approx(10.0 / 8.2) and p["selection_ms"] == pytest.approx(0.1)


def test_report_files(tmp_path):
    sq = _mod()
    f = tmp_path / "serve_x.json"
    f.write_text(json.dumps(_serve([1.2, 1.3], 70.0, 100.0)))
    assert sq.main(["--serve", str(f), "--name", "sq", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "sq.md").read_text()
    assert "xshare@0.7" in md and "1.250 ± " in md and (tmp_path / "sq.png").stat().st_size > 1000
    assert json.loads((tmp_path / "sq.json").read_text())["shapes"][0]["profile"][0]["conversion"] == pytest.approx(0.65 / 0.7)
