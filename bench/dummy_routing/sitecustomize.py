"""Server-side start-up of the serving benchmark: zero the router biases that SGLang's dummy loader draws.

``--load-format dummy`` fills every floating-point parameter uniformly in +-1e-3
(``sglang.srt.model_loader.weight_utils.initialize_dummy_weights``). A router *with a bias*
(GPT-OSS: ``mlp.router.bias``) then computes logits of ~2e-5 from the hidden state plus a bias of
up to 1e-3: the bias alone ranks the experts and every token of every batch picks the same
top-k, so no batch has experts to share and a benchmark measures nothing. With the bias zeroed
the ranking follows the hidden state, as with trained weights.

This file is put on ``PYTHONPATH`` of the benchmark's servers only (``bench/serve.py`` does it for
the presets in ``servebench.models.ZERO_ROUTER_BIAS``) and acts only when
``XSHARE_BENCH_ROUTER_BIAS=zero`` is set: when SGLang's model loader is imported, its
``initialize_dummy_weights`` is wrapped so that parameters named ``*router.bias`` are zeroed after
SGLang's own initialisation. Every server process (SGLang spawns its schedulers) runs this at
interpreter start-up; nothing else changes.
"""

import importlib.abc
import importlib.util
import os
import sys

_TARGET = "sglang.srt.model_loader.loader"
_SUFFIXES = ("router.bias",)


def _wrap(loader_module) -> None:
    orig = loader_module.initialize_dummy_weights

    def initialize_dummy_weights(model, *args, **kwargs):
        orig(model, *args, **kwargs)
        zeroed = 0
        for name, param in model.named_parameters():
            if name.endswith(_SUFFIXES):
                param.data.zero_()
                zeroed += 1
        print(f"[xshare bench] dummy weights: zeroed {zeroed} router bias tensors", file=sys.stderr, flush=True)

    loader_module.initialize_dummy_weights = initialize_dummy_weights


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``_TARGET`` so that ``_wrap`` runs after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                _wrap(module)

        spec.loader = _Loader()
        return spec


if os.environ.get("XSHARE_BENCH_ROUTER_BIAS") == "zero":
    sys.meta_path.insert(0, _Finder())
