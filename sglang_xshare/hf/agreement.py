"""Argmax agreement: the acceptance proxy of greedy speculative decoding under a selection policy.

In greedy speculative decoding the target model verifies ``g`` rows per request (the target row
and ``g - 1`` draft rows); the tokens it emits are its argmax at every row, and a draft token is
accepted while it equals that argmax. A policy that changes the verify rows' expert sets can
change that argmax -- then the draft that plain top-k would have accepted is rejected. With the
teacher-forced text as the draft (an oracle draft that predicts plain top-k's greedy output),
the number of leading rows of a request whose argmax is unchanged is its acceptance length.
"""

from __future__ import annotations

import torch

__all__ = ["argmax_agreement"]


def argmax_agreement(policy: torch.Tensor, ref: torch.Tensor, g: int) -> dict[str, float]:
    """Agreement of the policy's greedy tokens with plain top-k's, per verify row.

    Args:
        policy: ``[B, S] int64`` the policy's argmax next token at every position.
        ref: ``[B, S] int64`` plain top-k's argmax on the same tokens.
        g: rows per request (positions ``j*g .. j*g+g-1`` of a sequence are one request; the
            first is its target row). ``S % g == 0``.

    Returns:
        ``agree``: fraction of all rows whose argmax is unchanged; ``agree_first``: the same over
        target rows only (offset 0 of each request); ``accept``: mean over requests of the number
        of leading unchanged rows, divided by ``g`` (1.0 = every oracle draft still accepted).
    """
    if policy.shape != ref.shape or policy.dim() != 2:
        raise ValueError(f"need two [B, S] tensors of one shape, got {tuple(policy.shape)} and {tuple(ref.shape)}")
    B, S = ref.shape
    if g < 1 or S % g:
        raise ValueError(f"sequence length {S} is not a multiple of g={g}")
    same = (policy == ref).view(B, S // g, g)                      # [B, S//g, g] bool
    lead = same.to(torch.int64).cumprod(-1).sum(-1)                # [B, S//g] leading unchanged rows
    return {"agree": float(same.double().mean()), "agree_first": float(same[..., 0].double().mean()),
            "accept": float(lead.double().mean() / g)}
