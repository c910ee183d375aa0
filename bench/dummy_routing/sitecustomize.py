"""Server-side start-up of the serving benchmark: zero the biases that SGLang's dummy loader draws.

``--load-format dummy`` fills every floating-point parameter uniformly in +-1e-3
(``sglang.srt.model_loader.weight_utils.initialize_dummy_weights``), reseeding the same generator
for each parameter: parameters of one size get *the same* values. In a model with biases
(GPT-OSS: ``mlp.router.bias``, the attention projections' ``qkv_proj.bias`` / ``o_proj.bias``, the
experts' ``w13_weight_bias`` / ``w2_weight_bias``) every layer then adds the same bias vectors to
the residual stream. With weights of 1e-3 the layers' matrix products are ~1e-5, so after a layer
or two the stream is the shared bias sum, not the token's embedding: every token of every batch
routes to the same top-k experts and greedy decoding emits one token for every request, so no
batch has experts to share and a benchmark measures nothing. Zeroing the router bias alone is not
enough (the other biases still swamp the stream). With every bias zeroed the stream stays the
token's embedding and the routing spreads tokens over experts (about the distinct experts of
independent random routing), as with trained weights. The work per step is unchanged: the bias
additions still run, on zeros.

This file is put on ``PYTHONPATH`` of the benchmark's servers only (``bench/serve.py`` does it for
the presets in ``servebench.models.ZERO_BIASES``) and acts only when
``XSHARE_BENCH_DUMMY_BIASES=zero`` is set: when SGLang's model loader is imported, its
``initialize_dummy_weights`` is wrapped so that floating-point parameters whose name ends in
``bias`` are zeroed after SGLang's own initialisation. Every server process (SGLang spawns its
schedulers) runs this at interpreter start-up; nothing else changes.
"""

import importlib.abc
import importlib.util
import os
import sys

_TARGET = "sglang.srt.model_loader.loader"
#: Parameter names that end so are biases (``router.bias``, ``o_proj.bias``, ``w2_weight_bias``, ...).
_SUFFIX = "bias"


def _wrap(loader_module) -> None:
    orig = loader_module.initialize_dummy_weights

    def initialize_dummy_weights(model, *args, **kwargs):
        orig(model, *args, **kwargs)
        zeroed = 0
        for name, param in model.named_parameters():
            if name.endswith(_SUFFIX) and param.is_floating_point():
                param.data.zero_()
                zeroed += 1
        print(f"[xshare bench] dummy weights: zeroed {zeroed} bias tensors", file=sys.stderr, flush=True)

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


if os.environ.get("XSHARE_BENCH_DUMMY_BIASES") == "zero":
    sys.meta_path.insert(0, _Finder())
