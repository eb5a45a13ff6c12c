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

from . import ops
from .common import check_cuda, check_kernel_inputs, host_cu_seqlens, resolve_scale


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
    cu = host_cu_seqlens(cu_seqlens, B, T, q)
    check_cuda(q, op)
    return ops.banded_fwd(q, k, v, g_swa, cu, W, 1, 0, scale)[1]
