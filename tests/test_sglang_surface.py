"""The plugin's guard on the SGLang surface it patches and reads (real SGLang 0.5.23, CPU).

A changed SGLang must stop the plugin with an error naming the installed version and the name
(or, opted in, warn and leave SGLang's own routing): never a silently wrong path. The changed
SGLang is made here by replacing real SGLang functions with ones of another signature.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("sglang")

from sglang_xshare.serving import install, runtime  # noqa: E402
from sglang_xshare.serving.config import XShareServerConfig  # noqa: E402
from sglang_xshare.serving.sglang_surface import (  # noqa: E402
    SGLANG_VERSION,
    SURFACE,
    SGLangSurfaceError,
    installed_sglang_version,
    modules,
    problems,
)

CFG = dict(policy="xshare", budget="8", empty_slots="minus_one")


@pytest.fixture
def topk():
    from sglang.srt.layers.moe import topk

    yield topk
    install.uninstall()


def test_real_sglang_matches_the_surface(topk):
    import importlib

    assert installed_sglang_version() == SGLANG_VERSION
    for name in modules():
        assert problems(importlib.import_module(name)) == [], name
    assert install.install(XShareServerConfig(**CFG))
    patched = [p for p in install.installed_patches() if p.module == topk.__name__]
    assert patched and all(p.applied for p in patched)
    assert topk.select_experts.__module__ == "sglang_xshare.serving.patches"


def test_every_patched_function_is_listed_with_its_signature():
    from sglang_xshare.serving.patches import PATCHES

    listed = {(n.module, n.attr): n for n in SURFACE}
    for module, attr, _ in PATCHES:
        assert (module, attr) in listed and listed[module, attr].use == "patched", (module, attr)
    post = listed["sglang.srt.layers.moe.topk", "_post_process_topk_ids"]
    assert len(post.params) == 8 and post.params[-1] == "padded_rows_masked"


def _seven_argument_post_process(topk_ids, topk_weights, topk_config, router_logits, layer_id,
                                 num_token_non_padded=None, expert_location_dispatch_info=None):
    raise AssertionError("never called")


def test_changed_signature_is_a_clear_error(topk, monkeypatch):
    monkeypatch.setattr(topk, "_post_process_topk_ids", _seven_argument_post_process)
    with pytest.raises(SGLangSurfaceError) as e:
        install.install(XShareServerConfig(**CFG))
    msg = str(e.value)
    assert f"written for SGLang {SGLANG_VERSION}" in msg and f"SGLang {installed_sglang_version()} is installed" in msg
    assert "sglang.srt.layers.moe.topk._post_process_topk_ids (patched by sglang_xshare)" in msg
    assert "'padded_rows_masked'" in msg and "--xshare-sglang-mismatch fallback" in msg
    assert runtime.current() is None and install.installed_patches() == []
    assert topk.select_experts.__module__.startswith("sglang.")  # nothing stays patched


def test_changed_method_and_missing_flag_are_named(topk, monkeypatch):
    def empty_topk_output(self, device):  # lost its layer_id parameter
        raise AssertionError("never called")

    monkeypatch.setattr(topk.TopK, "empty_topk_output", empty_topk_output)
    monkeypatch.delattr(topk, "_use_aiter")
    with pytest.raises(SGLangSurfaceError) as e:
        install.install(XShareServerConfig(**CFG))
    msg = str(e.value)
    assert "TopK.empty_topk_output (patched by sglang_xshare) has parameters ('self', 'device')" in msg
    assert "sglang.srt.layers.moe.topk._use_aiter (read by sglang_xshare) is missing" in msg


def test_fallback_warns_and_keeps_sglangs_routing(topk, monkeypatch, warnings_of):
    original = topk.select_experts
    monkeypatch.setattr(topk, "_post_process_topk_ids", _seven_argument_post_process)
    log = warnings_of("sglang_xshare.serving")
    assert install.install(XShareServerConfig(**CFG, sglang_mismatch="fallback")) is False
    text = log.text
    assert "_post_process_topk_ids" in text and "SGLang's own routing serves" in text
    assert topk.select_experts is original and runtime.current() is None


def test_measurement_and_telemetry_load_only_when_configured():
    """A production install imports neither the A/B measurement nor the telemetry modules."""
    code = (
        "import sys\n"
        "from sglang.srt.layers.moe import topk\n"
        "from sglang_xshare.serving import install\n"
        "from sglang_xshare.serving.config import XShareServerConfig\n"
        "def loaded(p):\n"
        "    return sorted(m for m in sys.modules if m.startswith('sglang_xshare.serving.' + p))\n"
        "install.install(XShareServerConfig(policy='xshare', budget='8'))\n"
        "print(loaded('measure'), loaded('telemetry'))\n"
        "install.install(XShareServerConfig(policy='xshare', budget='8', metrics=True, ab_switch='arm'))\n"
        "print(loaded('measure'), loaded('telemetry'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    default, measured = out.stdout.strip().splitlines()[-2:]
    assert default == "[] []", default
    assert "sglang_xshare.serving.measure.ab" in measured and "sglang_xshare.serving.telemetry.metrics" in measured
