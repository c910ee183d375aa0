"""HF (transformers) side of the quality yardstick: the trained MoE, the routing hook that lets a
:class:`~sglang_xshare.select.Selector` decide its experts, the batch-aware teacher-forced
evaluation harness and the trace recorder. Needs ``transformers >= 5`` (extra ``quality``)."""

from .agreement import argmax_agreement
from .evaluate import PointResult, evaluate_point, make_batches, sequence_ce, sequence_ce_argmax
from .hook import LayerStats, RoutingHook, StepLayout
from .model import EvalSet, default_model_dir, load_eval_set, load_model, moe_blocks, routing_spec_of
from .recorder import record_trace
from .text import is_heldout, load_text_eval_set

__all__ = [
    "EvalSet", "LayerStats", "argmax_agreement", "PointResult", "RoutingHook", "StepLayout",
    "default_model_dir", "evaluate_point", "is_heldout", "load_text_eval_set", "load_eval_set", "load_model", "make_batches",
    "moe_blocks", "record_trace", "routing_spec_of", "sequence_ce", "sequence_ce_argmax",
]
