"""The compositions of NSA's branches, gated and summed (paper Eq. 5), differentiable end to end:
`nsa()` (compression, compressed attention, top-n selection, selected and sliding branches) and
`selected_sliding_attention` (given block ids: selected + sliding)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from kernels.banded import W_CAP
from reference.checks import check_block_counts, check_block_indices, check_compression, check_gate, check_positive_int

from . import ops
from .common import check_cuda, check_kernel_block_size, check_kernel_inputs, host_cu_seqlens, resolve_scale
from .selected import selected_unchecked


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
        cu_seqlens: `[N+1]` packed sequences (B = 1). On the CPU the call makes no device sync; on
            q's device it is read on the host once (one sync), to validate it and lay out the tiles.
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
    cu = host_cu_seqlens(cu_seqlens, B, T, q)  # the one host read of a varlen call (none if on the CPU)
    check_cuda(q, op)

    l, d = compress_block, compress_stride
    kv_cmp = (ops.compress_mean(k, cu, l, d), ops.compress_mean(v, cu, l, d))
    o, block_indices = nsa_branches(q, kv_cmp, (k, v), (k, v), g_cmp, g_slc, g_swa, block_indices, block_counts,
                                    l, d, block_size, window_size, scale, cu)
    return (o, block_indices) if return_block_indices else o


def nsa_branches(q, kv_cmp, kv_slc, kv_swa, g_cmp, g_slc, g_swa, block_indices, block_counts,
                 l: int, d: int, l_sel: int, window_size: int, scale: float, cu_seqlens):
    """The composition of NSA on the ops (nsa_module/ops.py), on validated arguments: each branch
    with its own keys/values (the layer projects them apart; `nsa()` passes one pair): compressed
    attention over kv_cmp (already compressed), the top-n blocks chosen from it unless
    block_indices is given, selected attention over kv_slc, sliding over kv_swa; gated and summed.
    cu_seqlens as `host_cu_seqlens` gives it. Returns (o, block_indices)."""
    _, o, lse_cmp = ops.banded_fwd(q, *kv_cmp, g_cmp, cu_seqlens, W_CAP, d, l - 1, scale)
    if block_indices is None:
        with torch.no_grad():
            block_indices = ops.select_blocks(q, kv_cmp[0], lse_cmp, cu_seqlens, block_counts, l, d, l_sel, scale)
        block_counts = None
    o = o + selected_unchecked(q, *kv_slc, g_slc, block_indices, block_counts, l_sel, scale, cu_seqlens)
    if window_size > 0:
        o = o + ops.banded_fwd(q, *kv_swa, g_swa, cu_seqlens, min(window_size, W_CAP), 1, 0, scale)[1]
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
    measured yet (docs/perf-notes.md). Every argument is checked once, before the first launch."""
    op = "selected_sliding_attention"
    B, T, HQ, H, Kd, V = check_kernel_inputs(q, k, v, op)
    check_kernel_block_size(block_size, op)
    W = min(check_positive_int(window_size, "window_size", minimum=0), W_CAP)
    check_gate(g_slc, "g_slc", B, T, HQ, q)
    check_gate(g_swa, "g_swa", B, T, HQ, q)
    S = check_block_indices(block_indices, B, T, H, q)
    check_block_counts(block_counts, B, T, H, S, q)
    scale = resolve_scale(scale, Kd)
    cu = host_cu_seqlens(cu_seqlens, B, T, q)
    check_cuda(q, op)
    o = selected_unchecked(q, k, v, g_slc, block_indices, block_counts, block_size, scale, cu)
    if W == 0:
        return o
    return o + ops.banded_fwd(q, k, v, g_swa, cu, W, 1, 0, scale)[1]
