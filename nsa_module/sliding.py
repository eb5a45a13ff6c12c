"""Sliding-window attention on the banded kernels (nsa_module/banded.py: keys are the tokens, a
band of width W).

As for the selected branch, the gate is fused: the forward writes the branch output (kept for the
backward) and gate·output; the dQ kernel also gives the gate's gradient. dK/dV are key-tiled, so no
atomics and no index are needed (the window fixes which queries reach a key).
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.banded import W_CAP
from reference.checks import check_gate, check_positive_int

from .banded import banded_bwd, banded_fwd
from .common import SeqInfo, check_cuda, check_kernel_inputs, kernel_gate, kernel_ready, resolve_scale


class SlidingAttentionFunction(torch.autograd.Function):
    """og = gate·sliding_window_attention(q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, gate, window_size, scale, seq):
        o, og, lse = banded_fwd(q, k, v, gate, window_size, 1, 0, scale, seq, seq)
        ctx.save_for_backward(q, k, v, gate, o, lse)
        ctx.window_size, ctx.scale, ctx.seq = window_size, scale, seq
        return og

    @staticmethod
    def backward(ctx, dog):
        q, k, v, gate, o, lse = ctx.saved_tensors
        dq, dk, dv, dgate = banded_bwd(q, k, v, gate, o, lse, kernel_ready(dog), ctx.window_size, 1, 0,
                                       ctx.scale, ctx.seq, ctx.seq)
        return dq, dk, dv, dgate.to(gate.dtype), None, None, None


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""NSA's sliding branch on TileLang kernels: token t attends to tokens max(0, t-W+1) … t of its
    own sequence; differentiable in q, k, v and g_swa.

    Args:
        q: queries `[B, T, HQ, K]`, float16 or bfloat16 on CUDA; K a multiple of 16 up to 256.
        k: keys `[B, T, H, K]`; any G = HQ // H from 1 to 128.
        v: values `[B, T, H, V]`; V a multiple of 16 up to 256.
        window_size: W >= 1; W >= T is full causal attention.
        scale: softmax scale, default K ** -0.5.
        cu_seqlens: `[N+1]` offsets of sequences packed along T (B must be 1).
        g_swa: gate `[B, T, HQ]` multiplying each head's output; None means 1.

    Returns:
        o `[B, T, HQ, V]` in q's dtype.

    Compiled kernels are cached per (H, G, K, V, min(W, 2^30), dtype, scale); B, T and the
    sequence layout are dynamic.
    """
    op = "sliding_window_attention"
    B, T, HQ, H, Kd, V = check_kernel_inputs(q, k, v, op)
    W = min(check_positive_int(window_size, "window_size"), W_CAP)
    check_gate(g_swa, "g_swa", B, T, HQ, q)
    scale = resolve_scale(scale, Kd)
    seq = SeqInfo.build(cu_seqlens, B, T, q)
    check_cuda(q, op)
    return SlidingAttentionFunction.apply(*map(kernel_ready, (q, k, v)), kernel_gate(g_swa, q), W, scale, seq)
