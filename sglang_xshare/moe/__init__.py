"""A standalone expert-parallel MoE layer for the benchmarks and tests; SGLang serving does not use it.

Served through SGLang (:mod:`sglang_xshare.serving`), xshare only chooses the experts: SGLang's own
MoE layer dispatches the tokens, runs the experts and combines. This package, with
:mod:`sglang_xshare.dispatch`, is a self-contained EP MoE layer on ``torch.distributed`` (DeepEP or
NCCL all-to-all) that measures the selection policies end to end outside SGLang. Its users:
``bench/ep_moe.py`` (started by ``bench/torchrun_ep_bench.sh``, one process per GPU),
``bench/ep_sim.py`` (:class:`RoutingSource`, :class:`DPAttentionSelector`) and
``tests/test_ep_layer.py``. Nothing in the SGLang plugin, the launchers or the ``sglang-xshare``
command imports it.

* :class:`EPMoELayer` -- select -> dispatch (:mod:`sglang_xshare.dispatch`) -> experts -> combine;
* :class:`SwiGLUExperts` -- bf16 experts with a Triton grouped GEMM (torch on CPU);
* :func:`reference_moe` -- single-process float32 oracle with the same selection;
* :class:`DPAttentionSelector` -- one all-reduced expert set per layer under DP attention;
* :class:`RoutingSource` -- router logits for benchmarks (trace or documented generator).
"""

from .dp_attention import DPAttentionSelector
from .ep_layer import EPMoELayer, ReplicaMap
from .experts import SwiGLUExperts, make_expert_weights
from .reference import reference_moe, reference_moe_lazy
from .routing_source import RoutingSource, SyntheticRouter

__all__ = ["EPMoELayer", "ReplicaMap", "SwiGLUExperts", "make_expert_weights", "reference_moe", "reference_moe_lazy",
           "DPAttentionSelector", "RoutingSource", "SyntheticRouter"]
