"""The expert-parallel MoE layer: local SwiGLU experts, the EP layer, its reference, DP-attention selection.

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
