"""The compositions of NSA's branches, gated and summed (paper Eq. 5), differentiable end to end:
`nsa()` (compression, compressed attention, top-n selection, selected and sliding branches) and
`selected_sliding_attention` (given block ids: selected + sliding)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from reference.checks import check_block_counts, check_block_indices, check_compression, check_gate, check_positive_int

from .common import (SeqInfo, check_cuda, check_kernel_block_size, check_kernel_inputs, kernel_gate, kernel_ready,
                     resolve_scale)
from .compressed import CompressedAttentionFunction, compress_mean, compressed_layout
from .selected import selected_attention
from .sliding import sliding_window_attention
from .topk import select_blocks


def nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: Optional[torch.Tensor] = None,
    g_slc: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
    block_indices: Optional[torch.Tensor] = None,
    block_counts: Union[None, int, torch.Tensor] = None,
    block_size: int = 64,
    window_size: int = 0,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    compress_block: int = 32,
    compress_stride: int = 16,
    return_block_indices: bool = False,
):
    r"""Native Sparse Attention: g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa on TileLang kernels.

    Args:
        q, k, v: `[B, T, HQ, K]`, `[B, T, H, K]`, `[B, T, H, V]`, float16/bfloat16 on CUDA.
        g_cmp, g_slc, g_swa: gates `[B, T, HQ]`; None means 1 (fla's parallel_nsa instead drops the
            compressed branch when g_cmp is None).
        block_indices: `[B, T, H, S]` to skip the selection; else the top `block_counts` blocks of
            size `block_size` (l') are chosen from the compressed attention (not differentiable).
        block_counts: n, an int >= 3 when selecting (None: 16); with given block_indices, anything
            `selected_attention` takes (None: all S slots).
        block_size: l', the selection block (16 … 256); window_size: W, 0 for no sliding branch.
        compress_block, compress_stride: l and d of the mean-pooled compression (d | l, d | l').
        cu_seqlens: `[N+1]` packed sequences (B = 1).
        return_block_indices: also return the indices used.

    Returns:
        o `[B, T, HQ, V]` (and block_indices `[B, T, H, n]` int32 when asked).
    """
    op = "nsa"
    # every argument is checked here, before the first launch (and on the CPU too)
    B, T, HQ, H, Kd, V = check_kernel_inputs(q, k, v, op)
    check_kernel_block_size(block_size, op)
    check_compression(compress_block, compress_stride, block_size)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_gate(g, name, B, T, HQ, q)
    check_positive_int(window_size, "window_size", minimum=0)
    if block_indices is None:
        block_counts = 16 if block_counts is None else block_counts
        if isinstance(block_counts, bool) or not isinstance(block_counts, int):
            raise TypeError(f"block_counts must be an int (blocks per token) when selecting, got {type(block_counts).__name__}")
        check_positive_int(block_counts, "block_counts", minimum=3)
    else:
        S = check_block_indices(block_indices, B, T, H, q)
        check_block_counts(block_counts, B, T, H, S, q)
    scale = resolve_scale(scale, Kd)
    l, d = compress_block, compress_stride
    qseq = SeqInfo.build(cu_seqlens, B, T, q)
    kseq = compressed_layout(tuple(qseq.lengths), l, d, str(q.device))
    check_cuda(q, op)

    k_cmp, v_cmp = compress_mean(k, v, l, d, cu_seqlens)
    o, block_indices = nsa_branches(q, (k_cmp, v_cmp), (k, v), (k, v), g_cmp, g_slc, g_swa, block_indices,
                                    block_counts, l, d, block_size, window_size, scale, cu_seqlens, qseq, kseq)
    return (o, block_indices) if return_block_indices else o


def nsa_branches(q, kv_cmp, kv_slc, kv_swa, g_cmp, g_slc, g_swa, block_indices, block_counts,
                 l: int, d: int, l_sel: int, window_size: int, scale: float, cu_seqlens,
                 qseq: SeqInfo, kseq: SeqInfo):
    """The three branches on the kernels, each with its own keys/values (the layer projects them
    apart; `nsa()` passes one pair): compressed attention over kv_cmp (already compressed), the
    top-n blocks chosen from it unless block_indices is given, selected over kv_slc, sliding over
    kv_swa. Inputs validated by the caller. Returns (o, block_indices)."""
    q = kernel_ready(q)
    k_cmp, v_cmp = (kernel_ready(x) for x in kv_cmp)
    o_cmp, lse_cmp = CompressedAttentionFunction.apply(q, k_cmp, v_cmp, kernel_gate(g_cmp, q), l, d, scale, qseq, kseq)
    counts = block_counts
    if block_indices is None:
        with torch.no_grad():
            block_indices = select_blocks(q, k_cmp, lse_cmp, block_counts, l, d, l_sel, scale, qseq, kseq)
        counts = None
    o = o_cmp + selected_attention(q, *kv_slc, block_indices, counts, l_sel, scale, cu_seqlens, g_slc)
    if window_size > 0:
        o = o + sliding_window_attention(q, *kv_swa, window_size, scale, cu_seqlens, g_swa)
    return o, block_indices


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
