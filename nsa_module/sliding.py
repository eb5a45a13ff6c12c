"""Sliding-window attention on the TileLang kernels, and the selected + sliding combination.

As for the selected branch, the gate is fused: the forward writes the branch output (kept for the
backward) and gate·output; the dQ kernel also gives the gate's gradient. dK/dV are key-tiled, so no
atomics and no index are needed (the window fixes which queries reach a key).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from kernels import sliding as K_swa
from kernels.common import tl_dtype
from reference.checks import check_gate, check_positive_int

from .common import (SeqInfo, check_cuda, check_kernel_inputs, empty, kernel_gate, kernel_ready, resolve_scale, sm_count,
                     split_arg)
from .selected import selected_attention


def banded_fwd(q, k, v, gate, W: int, KS: int, KC: int, scale: float, qseq: SeqInfo, kseq: SeqInfo):
    """Banded causal attention (see kernels/sliding.py): o, og = gate·o, lse. Keys k/v may be a
    different (strided) stream than the queries, laid out by kseq."""
    B, Tq, HQ, Kd = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = HQ // H
    o = empty(B, Tq, HQ, V, dtype=q.dtype, device=q.device)
    og = empty(B, Tq, HQ, V, dtype=q.dtype, device=q.device)
    lse = empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    if k.shape[1] == 0:  # no key anywhere (every sequence shorter than one compressed block)
        return o.zero_(), og.zero_(), lse.fill_(float("inf"))
    K_swa.banded_fwd(H, G, Kd, V, W, KS, KC, tl_dtype(q.dtype), scale, **K_swa.pick_config(G, Kd, V))(
        q, k, v, gate, qseq.offsets, qseq.tok_seq, kseq.offsets, o, og, lse)
    return o, og, lse


def banded_bwd(q, k, v, gate, o, lse, dog, W: int, KS: int, KC: int, scale: float, qseq: SeqInfo, kseq: SeqInfo):
    """Gradients of og = gate·o: (dq, dk, dv, dgate)."""
    B, Tq, HQ, Kd = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = HQ // H
    dtype = tl_dtype(q.dtype)
    dq = empty(B, Tq, HQ, Kd, dtype=q.dtype, device=q.device)
    delta = empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    dgate = empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    dk = empty(*k.shape, dtype=k.dtype, device=k.device)
    dv = empty(*v.shape, dtype=v.dtype, device=v.device)
    if k.shape[1] == 0:
        return dq.zero_(), dk, dv, (dog.float() * o.float()).sum(-1)
    K_swa.banded_bwd_dq(H, G, Kd, V, W, KS, KC, dtype, scale, **K_swa.pick_config(G, Kd, V))(
        q, k, v, o, dog, gate, lse, qseq.offsets, qseq.tok_seq, kseq.offsets, dq, delta, dgate)
    cfg = K_swa.pick_dkv_config(G, Kd, V)
    args = (q, k, v, dog, gate, lse, delta, qseq.offsets, qseq.tok_seq, kseq.offsets, kseq.tok_seq)
    if not K_swa.splits_query_range(W):
        K_swa.banded_bwd_dkv(H, G, Kd, V, W, KS, KC, dtype, scale, **cfg)(*args, dk, dv)
        return dq, dk, dv, dgate
    # enough programs to fill the GPU about 4 times over, at least one query tile each
    key_tiles = B * H * -(-k.shape[1] // cfg["BN"])
    ns = max(1, min(-(-4 * sm_count(q.device) // key_tiles), -(-Tq // cfg["BM"])))
    dk_acc = torch.zeros(*k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(*v.shape, dtype=torch.float32, device=v.device)
    K_swa.banded_bwd_dkv_split(H, G, Kd, V, W, KS, KC, dtype, scale, **cfg)(
        *args, split_arg(ns, q.device), dk_acc, dv_acc)
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype), dgate


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
    W = min(check_positive_int(window_size, "window_size"), K_swa.W_CAP)
    check_gate(g_swa, "g_swa", B, T, HQ, q)
    scale = resolve_scale(scale, Kd)
    seq = SeqInfo.build(cu_seqlens, B, T, q)
    check_cuda(q, op)
    return SlidingAttentionFunction.apply(*map(kernel_ready, (q, k, v)), kernel_gate(g_swa, q), W, scale, seq)


def selected_sliding_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_counts: Union[None, int, torch.Tensor] = None,
    block_size: int = 64,
    window_size: int = 512,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    g_slc: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""g_slc·o_slc + g_swa·o_swa: `reference.naive_nsa` on the kernels (arguments as in
    `selected_attention` and `sliding_window_attention`; window_size 0 leaves the sliding branch
    out). Two launches for now, one per branch; whether one fused launch is faster has not been
    measured yet (docs/perf-notes.md). Every argument is checked before the first launch: the
    sliding branch's own here, the rest by selected_attention before its kernel."""
    W = check_positive_int(window_size, "window_size", minimum=0)
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        check_gate(g_swa, "g_swa", *q.shape[:3], q)
    o = selected_attention(q, k, v, block_indices, block_counts, block_size, scale, cu_seqlens, g_slc)
    if W == 0:
        return o
    return o + sliding_window_attention(q, k, v, W, scale, cu_seqlens, g_swa)
