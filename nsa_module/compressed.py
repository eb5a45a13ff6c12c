"""Compressed attention on the TileLang kernels (NSA's first branch).

Compressed key i of a sequence summarizes its tokens i·d … i·d+l-1 and is visible to token t iff
i·d + l - 1 <= t: the banded kernels (kernels/banded.py) with strided keys (KS = d, KC = l - 1)
and no window. The compression φ itself (mean pooling here) runs in torch: it is one cheap pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.banded import W_CAP
from reference import num_compressed
from reference.checks import check_gate, check_positive_int, check_tensor

from . import ops
from .common import check_cuda, check_kernel_dims, host_cu_seqlens, resolve_scale


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    compress_block: int,
    compress_stride: int,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    g_cmp: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Attention over compressed keys on TileLang kernels; differentiable in q, k_cmp, v_cmp, g_cmp.

    Args:
        q: queries `[B, T, HQ, K]`, float16 or bfloat16 on CUDA.
        k_cmp, v_cmp: `[B, Nc, H, K]` / `[B, Nc, H, V]` compressed keys and values, as
            `reference.compress_kv(k, v, l, d, cu_seqlens=...)` packs them (B = 1 with varlen).
        compress_block, compress_stride: l and d (d | l); key i covers tokens i·d … i·d+l-1 and is
            visible to token t iff i·d + l - 1 <= t. A token that sees none gets 0.
        scale: softmax scale, default K ** -0.5.
        cu_seqlens: `[N+1]` offsets of sequences packed along T (B must be 1).
        g_cmp: gate `[B, T, HQ]`; None means 1.

    Returns:
        o `[B, T, HQ, V]` in q's dtype.
    """
    op = "compressed_attention"
    check_tensor(q, "q", 4, "[B, T, HQ, K]")
    check_tensor(k_cmp, "k_cmp", 4, "[B, Nc, H, K]")
    check_tensor(v_cmp, "v_cmp", 4, "[B, Nc, H, V]")
    B, T, HQ, Kd = q.shape
    H, V = k_cmp.shape[2], v_cmp.shape[3]
    if k_cmp.shape[0] != B or k_cmp.shape[3] != Kd or tuple(v_cmp.shape[:3]) != tuple(k_cmp.shape[:3]):
        raise ValueError(f"k_cmp must be [B={B}, Nc, H, K={Kd}] and v_cmp [B, Nc, H, V], got "
                         f"{list(k_cmp.shape)} and {list(v_cmp.shape)}")
    if not (q.dtype == k_cmp.dtype == v_cmp.dtype):
        raise TypeError(f"q, k_cmp and v_cmp must share one dtype, got {q.dtype}, {k_cmp.dtype}, {v_cmp.dtype}")
    if not (q.device == k_cmp.device == v_cmp.device):
        raise ValueError(f"q, k_cmp and v_cmp must be on one device, got {q.device}, {k_cmp.device}, {v_cmp.device}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the query heads HQ={HQ} must be a multiple of the kv heads H={H}")
    check_kernel_dims(q, HQ, H, Kd, V, op)
    l = check_positive_int(compress_block, "compress_block (l)")
    d = check_positive_int(compress_stride, "compress_stride (d)")
    if l % d != 0:
        raise ValueError(f"compress_stride d={d} must divide compress_block l={l}")
    check_gate(g_cmp, "g_cmp", B, T, HQ, q)
    scale = resolve_scale(scale, Kd)
    cu = host_cu_seqlens(cu_seqlens, B, T, q)
    offs = (0, T) if cu is None else cu.tolist()
    n_keys = sum(num_compressed(e - s, l, d) for s, e in zip(offs, offs[1:]))
    if k_cmp.shape[1] != n_keys:
        raise ValueError(f"k_cmp holds {k_cmp.shape[1]} compressed tokens, but (l={l}, d={d}) over these "
                         f"sequences give {n_keys}")
    check_cuda(q, op)
    return ops.banded_fwd(q, k_cmp, v_cmp, g_cmp, cu, W_CAP, d, l - 1, scale)[1]


def compress_mean(k: torch.Tensor, v: torch.Tensor, compress_block: int, compress_stride: int,
                  cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled compressed keys and values (φ = mean), differentiable: `reference.compress_kv`'s
    result and packing (summed in float32 in another order) through the op `compress_mean`, so
    that a varlen call reads cu_seqlens on the host once and torch.compile sees no break."""
    check_tensor(k, "k", 4, "[B, T, H, K]")
    check_tensor(v, "v", 4, "[B, T, H, V]")
    if tuple(k.shape[:3]) != tuple(v.shape[:3]):
        raise ValueError(f"k [B, T, H, K] and v [B, T, H, V] must agree on B, T, H, got {list(k.shape)} and {list(v.shape)}")
    l = check_positive_int(compress_block, "compress_block (l)")
    d = check_positive_int(compress_stride, "compress_stride (d)")
    if l % d != 0:
        raise ValueError(f"compress_stride d={d} must divide compress_block l={l}")
    cu = host_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1], k)
    return ops.compress_mean(k, cu, l, d), ops.compress_mean(v, cu, l, d)
