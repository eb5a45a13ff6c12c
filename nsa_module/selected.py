"""Selected-block attention on the TileLang kernels: the launchers (under the ops `selected_fwd` /
`selected_bwd`, nsa_module/ops.py) and the public function.

The gate is fused: the forward writes the branch output (kept for the backward) and gate·output;
the dQ kernel also gives the gate's gradient. Backward design: dQ is query-centric (one program
per token and kv head, like the forward). dK/dV
are key-centric over a two-pass inverted index (no atomics): pass one (torch, here) sorts every
(token, kv head, slot) that really reads a block by (batch, kv head, block) into a CSR list; pass
two (the dkv kernel) gives each key tile one program that walks the tokens that selected it and
keeps dK, dV in registers. docs/perf-notes.md has the measured trade-off against atomics.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Union

import torch

from kernels import selected as K_sel
from kernels.common import tl_dtype

from . import ops
from .common import (
    SeqInfo,
    check_cuda,
    check_kernel_block_size,
    check_kernel_inputs,
    device_tensor,
    empty,
    host_cu_seqlens,
    o_dtype_arg,
    resolve_scale,
    stored_o_dtype,
)
from reference.checks import check_block_counts, check_block_indices, check_gate


def selected_fwd(q, k, v, gate, idx, cnt, block_size: int, scale: float, seq: SeqInfo):
    """o `[B, T, HQ, V]` (the branch output), og = gate·o and lse `[B, T, HQ]` (fp32, base 2;
    +inf where a row sees nothing)."""
    B, T, HQ, Kd = q.shape
    H, V = k.shape[2], v.shape[-1]
    G, S = HQ // H, idx.shape[-1]
    o = empty(B, T, HQ, V, dtype=stored_o_dtype(q), device=q.device)
    kernel = K_sel.selected_fwd(H, G, Kd, V, S, block_size, tl_dtype(q.dtype), scale,
                                **K_sel.pick_config(G, Kd, V, block_size), **o_dtype_arg(o, q))
    og = empty(B, T, HQ, V, dtype=q.dtype, device=q.device)
    lse = empty(B, T, HQ, dtype=torch.float32, device=q.device)
    kernel(q, k, v, gate, idx, cnt, seq.offsets, seq.tok_seq, o, og, lse)
    return o, og, lse


@lru_cache(maxsize=16)
def _block_layout(lengths: tuple, block_size: int, device: str):
    """Blocks of all sequences numbered one after another: each block's first row, its sequence's
    end, and each sequence's first block number `[N+1]`. Cached per layout (no copies per step)."""
    nb = [-(-n // block_size) for n in lengths]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    blk_start = [s + i * block_size for s, n in zip(starts, nb) for i in range(n)]
    blk_end = [e for e, n in zip(starts[1:], nb) for _ in range(n)]
    base = [0]
    for n in nb:
        base.append(base[-1] + n)
    return (device_tensor(blk_start, torch.int32, device), device_tensor(blk_end, torch.int32, device),
            device_tensor(base, torch.long, device))


def block_pairs(idx: torch.Tensor, cnt: torch.Tensor, block_size: int, seq: SeqInfo):
    """The inverted index of the selection, for the dK/dV kernel.

    Every (token t, kv head h, slot s) that the forward reads (s < count, id >= 0, block starting at
    or before t) becomes a pair keyed by c = (b·H + h)·NB + global block, where the global block
    numbers the blocks of all sequences one after another. Returns
        blk_start `[NB]`, blk_end `[NB]`: each block's first row and its sequence's end;
        pair_off `[B·H·NB + 1]`: CSR offsets by c; pair_tok `[B·T·H·S]`: the tokens, grouped by c in
            token order (entries past pair_off[-1] are padding no program reads).
    Sync-free: invalid slots sort to the end instead of being filtered out.
    """
    B, T, H, S = idx.shape
    dev = idx.device
    blk_start, blk_end, base = _block_layout(tuple(seq.lengths), block_size, str(dev))
    NB = blk_start.numel()

    tok_seq = seq.tok_seq.long()
    pos = seq.positions()
    slot = torch.arange(S, device=dev)
    ids = idx.long()
    valid = (slot < cnt[..., None]) & (ids >= 0) & (ids <= (pos // block_size).view(1, T, 1, 1))
    bh = (torch.arange(B, device=dev).view(B, 1, 1, 1) * H + torch.arange(H, device=dev).view(1, 1, H, 1))
    key = (bh * NB + base[tok_seq].view(1, T, 1, 1) + ids).masked_fill(~valid, B * H * NB).flatten()
    counts = torch.zeros(B * H * NB + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    # int32 keys halve the radix passes; stable keeps each block's tokens in order (deterministic)
    order = torch.sort(key.to(torch.int32), stable=True).indices
    pair_tok = ((order // (H * S)) % T).to(torch.int32)
    pair_off = torch.cat([counts.new_zeros(1), counts[:-1].cumsum(0)]).to(torch.int32)
    return blk_start, blk_end, pair_off, pair_tok


def selected_bwd(q, k, v, gate, o, lse, dog, idx, cnt, block_size: int, scale: float, seq: SeqInfo):
    """Gradients of og = gate·o: (dq, dk, dv, dgate)."""
    B, T, HQ, Kd = q.shape
    H, V = k.shape[2], v.shape[-1]
    G, S = HQ // H, idx.shape[-1]
    dtype = tl_dtype(q.dtype)
    dq = empty(B, T, HQ, Kd, dtype=q.dtype, device=q.device)
    delta = empty(B, T, HQ, dtype=torch.float32, device=q.device)  # rowsum(dO ∘ O), for dK/dV
    dgate = empty(B, T, HQ, dtype=torch.float32, device=q.device)
    K_sel.selected_bwd_dq(H, G, Kd, V, S, block_size, dtype, scale, **K_sel.pick_config(G, Kd, V, block_size),
                          **o_dtype_arg(o, q))(
        q, k, v, o, dog, gate, lse, idx, cnt, seq.offsets, seq.tok_seq, dq, delta, dgate)
    blk_start, blk_end, pair_off, pair_tok = block_pairs(idx, cnt, block_size, seq)
    dk = empty(B, T, H, Kd, dtype=k.dtype, device=k.device)
    dv = empty(B, T, H, V, dtype=v.dtype, device=v.device)
    K_sel.selected_bwd_dkv(H, G, Kd, V, block_size, dtype, scale, **K_sel.pick_dkv_config(G, Kd, V, block_size))(
        q, k, v, dog, gate, lse, delta, blk_start, blk_end, pair_off, pair_tok, dk, dv)
    return dq, dk, dv, dgate


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_counts: Union[None, int, torch.Tensor] = None,
    block_size: int = 64,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    g_slc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""NSA's selected-block attention on TileLang kernels; differentiable in q, k, v and g_slc.

    Args:
        q: queries `[B, T, HQ, K]`, float16 or bfloat16 on CUDA; K a multiple of 16 up to 256.
        k: keys `[B, T, H, K]`; any G = HQ // H from 1 to 128.
        v: values `[B, T, H, V]`; V a multiple of 16 up to 256 (K != V allowed).
        block_indices: `[B, T, H, S]` integer block ids per (token, kv head), shared by the G query
            heads. Ids < 0, ids whose block starts after the token and ids past the sequence's end
            add nothing; the block holding the token is masked key by key; a repeated id counts twice.
        block_counts: slots used per token: None (all S), an int, or an integer tensor `[B, T, H]`.
        block_size: BS, tokens per block: 16, 32, 64, 128 or 256.
        scale: softmax scale, default K ** -0.5.
        cu_seqlens: `[N+1]` offsets of sequences packed along T (B must be 1); block ids are
            relative to each sequence's start.
        g_slc: gate `[B, T, HQ]` multiplying each head's output; None means 1.

    Returns:
        o `[B, T, HQ, V]` in q's dtype; a token with no key taking part gets 0.

    Compiled kernels are cached per (H, G, K, V, S, block_size, dtype, scale); B, T and the
    sequence layout are dynamic and never recompile.
    """
    op = "selected_attention"
    B, T, HQ, H, Kd, V = check_kernel_inputs(q, k, v, op)
    check_kernel_block_size(block_size, op)
    check_gate(g_slc, "g_slc", B, T, HQ, q)
    scale = resolve_scale(scale, Kd)
    check_block_indices(block_indices, B, T, H, q)
    check_block_counts(block_counts, B, T, H, block_indices.shape[-1], q)
    cu = host_cu_seqlens(cu_seqlens, B, T, q)
    check_cuda(q, op)
    return selected_unchecked(q, k, v, g_slc, block_indices, block_counts, block_size, scale, cu)


def selected_unchecked(q, k, v, g_slc, block_indices, block_counts, block_size: int, scale: float, cu):
    """selected_attention on validated arguments (cu_seqlens as `host_cu_seqlens` gives it)."""
    if isinstance(block_counts, int):
        block_counts = torch.full(block_indices.shape[:3], block_counts, dtype=torch.int32, device=q.device)
    return ops.selected_fwd(q, k, v, g_slc, block_indices, block_counts, cu, block_size, scale)[1]
