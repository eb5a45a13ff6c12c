"""The op layer: every TileLang launch of NSA as a `torch.library` custom op, with a fake (shapes
only) implementation and, for the differentiable ones, its backward registered on top. `nsa()`, the
per-branch functions and the layer all compose these same ops, so `torch.compile` traces any of them
without a graph break (each op is opaque to the compiler) and eager calls take the same path.

  nsa_tilelang::compress_mean      (+ _backward)  the mean-pooled compressed stream (φ = mean)
  nsa_tilelang::banded_fwd         (+ banded_bwd)   causal attention over a band of keys: the sliding
                                                    branch (W, KS=1, KC=0) and the compressed one
                                                    (no window, KS=d, KC=l-1); gate fused
  nsa_tilelang::selected_fwd       (+ selected_bwd) attention over each token's selected blocks
  nsa_tilelang::select_blocks      the top-n block ids from q·k_cmp and the compressed LSE (no grad)
  nsa_tilelang::decode             one decode step over the cache

The ops take what the caller validated: their tensors of any strides (made kernel-ready inside), the
gates `[B, T, HQ]` or None (= 1), and `cu_seqlens` as an int64 tensor on the CPU (see
`common.host_cu_seqlens`): the sequence layouts are built from it on the host, cached per set of
offsets and copied to the device asynchronously, so a varlen call makes no device sync.

On the CPU the forward ops run a dense float32 version of the same masks (for tests and for
compiling the composition without a GPU); they have no backward there.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

import reference as R
from kernels.common import LOG2E
from reference import num_compressed

from .banded import banded_bwd as launch_banded_bwd
from .banded import banded_fwd as launch_banded_fwd
from .common import (SeqInfo, compressed_layout, device_tensor, kernel_gate, kernel_ready, prepare_block_indices,
                     stored_o_dtype)
from .decode import nsa_decode
from .selected import selected_bwd as launch_selected_bwd
from .selected import selected_fwd as launch_selected_fwd
from .topk import select_blocks as launch_select_blocks

def layouts(q: Tensor, cu_seqlens: Optional[Tensor], KS: int = 1, KC: int = 0) -> tuple[SeqInfo, SeqInfo]:
    """(qseq, kseq): the tokens' layout and the key stream's, which is the tokens themselves for
    (KS, KC) = (1, 0) and the compressed stream of blocks l = KC + 1, stride d = KS otherwise."""
    B, T = q.shape[:2]
    qseq = SeqInfo.build(cu_seqlens, B, T, q)
    if (KS, KC) == (1, 0):
        return qseq, qseq
    return qseq, compressed_layout(tuple(qseq.lengths), KC + 1, KS, str(q.device))


def _counts(block_counts: Optional[Tensor], block_indices: Tensor, q: Tensor, H: int):
    B, T = q.shape[:2]
    return prepare_block_indices(block_indices, block_counts, B, T, H, q)


# -- compression ------------------------------------------------------------------------------

def _offsets(T: int, cu_seqlens: Optional[Tensor]) -> tuple:
    return (0, T) if cu_seqlens is None else tuple(cu_seqlens.tolist())


@lru_cache(maxsize=16)
def _chunk_layout(offsets: tuple, l: int, d: int, device: str):
    """The d-token chunks of packed sequences, each sequence's own from its start (d | l, so a
    compressed block is l/d whole chunks; a trailing partial chunk belongs to no block):
    first `[NCH]` each chunk's first token, base `[Nc]` each block's first chunk, tok_chunk `[T]`
    each token's chunk (NCH, a zero row, for none)."""
    first, base, tok_chunk = [], [], []
    for s, e in zip(offsets, offsets[1:]):
        c0, nch = len(first), (e - s) // d
        first += range(s, s + nch * d, d)
        base += range(c0, c0 + num_compressed(e - s, l, d))
        tok_chunk += [c0 + j for j in range(nch) for _ in range(d)] + [-1] * (e - s - nch * d)
    NCH = len(first)
    tok_chunk = [NCH if c < 0 else c for c in tok_chunk]
    return tuple(device_tensor(x, torch.long, device) for x in (first, base, tok_chunk))


@torch.library.custom_op("nsa_tilelang::compress_mean", mutates_args=())
def compress_mean(x: Tensor, cu_seqlens: Optional[Tensor], l: int, d: int) -> Tensor:
    """The mean of each compressed block's l tokens: x `[B, T, H, D]` -> `[B, Nc, H, D]` packed as
    `reference.compress_kv` packs it, summed in float32 (chunk sums of d tokens, then l/d chunks)."""
    first, base, _ = _chunk_layout(_offsets(x.shape[1], cu_seqlens), l, d, str(x.device))
    chunks = x[:, first[:, None] + torch.arange(d, device=x.device)].float().sum(2)  # [B, NCH, H, D]
    out = chunks[:, base]
    for r in range(1, l // d):
        out = out + chunks[:, base + r]
    return (out / l).to(x.dtype)


@compress_mean.register_fake
def _(x, cu_seqlens, l, d):
    if cu_seqlens is None:
        return x.new_empty(x.shape[0], num_compressed(x.shape[1], l, d), *x.shape[2:])
    return x.new_empty(x.shape[0], torch.library.get_ctx().new_dynamic_size(), *x.shape[2:])


@torch.library.custom_op("nsa_tilelang::compress_mean_backward", mutates_args=())
def compress_mean_backward(dy: Tensor, cu_seqlens: Optional[Tensor], T: int, l: int, d: int) -> Tensor:
    """dx `[B, T, H, D]` of compress_mean: each token gets dy/l of every block holding it. The l/d
    blocks sharing a chunk are added one shift at a time (distinct targets each time: deterministic)."""
    first, base, tok_chunk = _chunk_layout(_offsets(T, cu_seqlens), l, d, str(dy.device))
    B = dy.shape[0]
    dchunks = torch.zeros(B, first.numel() + 1, *dy.shape[2:], dtype=torch.float32, device=dy.device)
    g = dy.float() / l
    for r in range(l // d):
        dchunks.index_add_(1, base + r, g)
    return dchunks[:, tok_chunk].to(dy.dtype)


@compress_mean_backward.register_fake
def _(dy, cu_seqlens, T, l, d):
    return dy.new_empty(dy.shape[0], T, *dy.shape[2:])


def _compress_setup(ctx, inputs, output):
    x, cu_seqlens, l, d = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.args = (x.shape[1], l, d)


def _compress_backward(ctx, dy):
    (cu_seqlens,) = ctx.saved_tensors
    return compress_mean_backward(dy, cu_seqlens, *ctx.args), None, None, None


torch.library.register_autograd("nsa_tilelang::compress_mean", _compress_backward, setup_context=_compress_setup)


# -- the banded family (sliding and compressed attention) --------------------------------------

@torch.library.custom_op("nsa_tilelang::banded_fwd", mutates_args=(), device_types="cuda")
def banded_fwd(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], cu_seqlens: Optional[Tensor], W: int,
               KS: int, KC: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(o, og = gate·o, lse) of banded causal attention (kernels/banded.py): q `[B, T, HQ, K]`, keys
    k/v `[B, Tk, H, K|V]` (the tokens, or the compressed stream when (KS, KC) != (1, 0)); key i
    ends at position i·KS + KC and token t sees it iff 0 <= t - (i·KS + KC) < W. lse `[B, T, HQ]`
    fp32 base 2 (+inf for a row that sees nothing; its o is 0)."""
    qseq, kseq = layouts(q, cu_seqlens, KS, KC)
    q, k, v = map(kernel_ready, (q, k, v))
    return launch_banded_fwd(q, k, v, kernel_gate(gate, q), W, KS, KC, scale, qseq, kseq)


@banded_fwd.register_fake
def _(q, k, v, gate, cu_seqlens, W, KS, KC, scale):
    og = q.new_empty(*q.shape[:3], v.shape[-1])
    return og.new_empty(og.shape, dtype=stored_o_dtype(q)), og, q.new_empty(q.shape[:3], dtype=torch.float32)


@banded_fwd.register_kernel("cpu")
def _(q, k, v, gate, cu_seqlens, W, KS, KC, scale):
    qseq, kseq = layouts(q, cu_seqlens, KS, KC)
    o, lse, _ = dense_banded(q, k, v, W, KS, KC, scale, qseq, kseq)
    g = torch.ones_like(o[..., 0]) if gate is None else gate.to(o.dtype)
    return o, o * g[..., None], lse


def dense_banded(q, k, v, W: int, KS: int, KC: int, scale: float, qseq: SeqInfo, kseq: SeqInfo):
    """The CPU version of banded_fwd in float32, one sequence at a time: (o, lse, p) with p
    `[B, T, HQ, Nmax]` the probabilities over each sequence's own keys (columns past them 0)."""
    B, T, HQ, _ = q.shape
    H = k.shape[2]
    G = HQ // H
    n_max = max(kseq.lengths) if kseq.lengths else 0
    o = q.new_zeros(B, T, HQ, v.shape[-1])
    lse = q.new_full((B, T, HQ), math.inf, dtype=torch.float32)
    p = q.new_zeros(B, T, HQ, n_max, dtype=torch.float32)
    for s, n, ks, nk in zip(qseq.starts, qseq.lengths, kseq.starts, kseq.lengths):
        t = torch.arange(n)[:, None]
        end = torch.arange(nk)[None, :] * KS + KC
        valid = (end <= t) & (t - end < W)  # [n, nk]
        qs = q[:, s:s + n].float()
        kk = k[:, ks:ks + nk].float().repeat_interleave(G, 2)
        vv = v[:, ks:ks + nk].float().repeat_interleave(G, 2)
        logits = torch.einsum("bthk,bihk->bthi", qs, kk) * scale
        logits = logits.masked_fill(~valid[None, :, None, :], -math.inf)
        m = torch.logsumexp(logits, -1)  # -inf for a row that sees nothing
        pr = torch.exp(logits - m[..., None]).nan_to_num(0.0)
        o[:, s:s + n] = torch.einsum("bthi,bihv->bthv", pr, vv).to(o.dtype)
        lse[:, s:s + n] = torch.where(m > -math.inf, m * LOG2E, math.inf)
        p[:, s:s + n, :, :nk] = pr
    return o, lse, p


@torch.library.custom_op("nsa_tilelang::banded_bwd", mutates_args=(), device_types="cuda")
def banded_bwd(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], o: Tensor, lse: Tensor, dog: Tensor,
               cu_seqlens: Optional[Tensor], W: int, KS: int, KC: int, scale: float
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dgate) of og = gate·o (dgate fp32)."""
    qseq, kseq = layouts(q, cu_seqlens, KS, KC)
    q, k, v, o, lse, dog = map(kernel_ready, (q, k, v, o, lse, dog))
    return launch_banded_bwd(q, k, v, kernel_gate(gate, q), o, lse, dog, W, KS, KC, scale, qseq, kseq)


@banded_bwd.register_fake
def _(q, k, v, gate, o, lse, dog, cu_seqlens, W, KS, KC, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lse)


def _banded_setup(ctx, inputs, output):
    q, k, v, gate, cu_seqlens, W, KS, KC, scale = inputs
    o, _, lse = output
    ctx.save_for_backward(q, k, v, gate, o, lse, cu_seqlens)
    ctx.args = (W, KS, KC, scale)
    ctx.set_materialize_grads(False)


def _banded_backward(ctx, _do, dog, _dlse):
    q, k, v, gate, o, lse, cu_seqlens = ctx.saved_tensors
    if dog is None:
        return (None,) * 9
    dq, dk, dv, dgate = banded_bwd(q, k, v, gate, o, lse, dog, cu_seqlens, *ctx.args)
    return dq, dk, dv, None if gate is None else dgate.to(gate.dtype), None, None, None, None, None


torch.library.register_autograd("nsa_tilelang::banded_fwd", _banded_backward, setup_context=_banded_setup)


# -- selected attention ------------------------------------------------------------------------

@torch.library.custom_op("nsa_tilelang::selected_fwd", mutates_args=(), device_types="cuda")
def selected_fwd(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], block_indices: Tensor,
                 block_counts: Optional[Tensor], cu_seqlens: Optional[Tensor], block_size: int, scale: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(o, og = gate·o, lse) of attention over each token's selected blocks (kernels/selected.py):
    block_indices `[B, T, H, S]` (any integer dtype), block_counts `[B, T, H]` or None (all S)."""
    qseq, _ = layouts(q, cu_seqlens)
    q, k, v = map(kernel_ready, (q, k, v))
    idx, cnt = _counts(block_counts, block_indices, q, k.shape[2])
    return launch_selected_fwd(q, k, v, kernel_gate(gate, q), idx, cnt, block_size, scale, qseq)


@selected_fwd.register_fake
def _(q, k, v, gate, block_indices, block_counts, cu_seqlens, block_size, scale):
    og = q.new_empty(*q.shape[:3], v.shape[-1])
    return og.new_empty(og.shape, dtype=stored_o_dtype(q)), og, q.new_empty(q.shape[:3], dtype=torch.float32)


@selected_fwd.register_kernel("cpu")
def _(q, k, v, gate, block_indices, block_counts, cu_seqlens, block_size, scale):
    cu = None if cu_seqlens is None else cu_seqlens.to(q.device)
    o = R.naive_nsa(q, k, v, None, None, block_indices, block_counts, block_size, 0, scale, cu)
    g = torch.ones_like(o[..., 0]) if gate is None else gate.to(o.dtype)
    return o, o * g[..., None], q.new_zeros(q.shape[:3], dtype=torch.float32)  # no backward on the CPU


@torch.library.custom_op("nsa_tilelang::selected_bwd", mutates_args=(), device_types="cuda")
def selected_bwd(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], o: Tensor, lse: Tensor, dog: Tensor,
                 block_indices: Tensor, block_counts: Optional[Tensor], cu_seqlens: Optional[Tensor],
                 block_size: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dgate) of og = gate·o (dgate fp32)."""
    qseq, _ = layouts(q, cu_seqlens)
    q, k, v, o, lse, dog = map(kernel_ready, (q, k, v, o, lse, dog))
    idx, cnt = _counts(block_counts, block_indices, q, k.shape[2])
    return launch_selected_bwd(q, k, v, kernel_gate(gate, q), o, lse, dog, idx, cnt, block_size, scale, qseq)


@selected_bwd.register_fake
def _(q, k, v, gate, o, lse, dog, block_indices, block_counts, cu_seqlens, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lse)


def _selected_setup(ctx, inputs, output):
    q, k, v, gate, block_indices, block_counts, cu_seqlens, block_size, scale = inputs
    o, _, lse = output
    ctx.save_for_backward(q, k, v, gate, o, lse, block_indices, block_counts, cu_seqlens)
    ctx.args = (block_size, scale)
    ctx.set_materialize_grads(False)


def _selected_backward(ctx, _do, dog, _dlse):
    q, k, v, gate, o, lse, block_indices, block_counts, cu_seqlens = ctx.saved_tensors
    if dog is None:
        return (None,) * 9
    dq, dk, dv, dgate = selected_bwd(q, k, v, gate, o, lse, dog, block_indices, block_counts, cu_seqlens,
                                     *ctx.args)
    return dq, dk, dv, None if gate is None else dgate.to(gate.dtype), None, None, None, None, None


torch.library.register_autograd("nsa_tilelang::selected_fwd", _selected_backward, setup_context=_selected_setup)


# -- the top-n selection -----------------------------------------------------------------------

@torch.library.custom_op("nsa_tilelang::select_blocks", mutates_args=(), device_types="cuda")
def select_blocks(q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, cu_seqlens: Optional[Tensor], n: int, l: int, d: int,
                  l_sel: int, scale: float) -> Tensor:
    """block_indices `[B, T, H, n]` int32 (nsa_module/topk.select_blocks): block 0 and the two local
    blocks, then the best Eq. 9-10 scores recomputed from q·k_cmp and the compressed LSE; ascending,
    -1 padded. Not differentiable."""
    qseq, kseq = layouts(q, cu_seqlens, d, l - 1)
    q, k_cmp, lse_cmp = map(kernel_ready, (q, k_cmp, lse_cmp))
    return launch_select_blocks(q, k_cmp, lse_cmp, n, l, d, l_sel, scale, qseq, kseq)


@select_blocks.register_fake
def _(q, k_cmp, lse_cmp, cu_seqlens, n, l, d, l_sel, scale):
    return q.new_empty(*q.shape[:2], k_cmp.shape[2], n, dtype=torch.int32)


@select_blocks.register_kernel("cpu")
def _(q, k_cmp, lse_cmp, cu_seqlens, n, l, d, l_sel, scale):
    qseq, kseq = layouts(q, cu_seqlens, d, l - 1)
    p = dense_banded(q, k_cmp, k_cmp, 2 ** 30, d, l - 1, scale, qseq, kseq)[2]
    cu = None if cu_seqlens is None else cu_seqlens.to(q.device)
    p_slc = R.selection_scores(p, l, d, l_sel, k_cmp.shape[2], cu)
    return R.select_blocks(p_slc, n, l_sel, cu).to(torch.int32)


# -- decoding ----------------------------------------------------------------------------------

@torch.library.custom_op("nsa_tilelang::decode", mutates_args=(), device_types="cuda")
def decode(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, num_cmp: Tensor, k_slc: Tensor, v_slc: Tensor,
           lengths: Tensor, k_swa: Optional[Tensor], v_swa: Optional[Tensor], swa_count: Optional[Tensor],
           g_cmp: Tensor, g_slc: Tensor, g_swa: Tensor, l: int, d: int, l_sel: int, n: int, scale: float
           ) -> tuple[Tensor, Tensor]:
    """nsa_module.decode.nsa_decode as an op: (o `[N, HQ, V]`, block_indices `[N, H, n]`)."""
    return nsa_decode(q, k_cmp, v_cmp, num_cmp, k_slc, v_slc, lengths, k_swa, v_swa, swa_count,
                      (g_cmp, g_slc, g_swa), l, d, l_sel, n, scale)


@decode.register_fake
def _(q, k_cmp, v_cmp, num_cmp, k_slc, v_slc, lengths, k_swa, v_swa, swa_count, g_cmp, g_slc, g_swa,
      l, d, l_sel, n, scale):
    N, HQ = q.shape[:2]
    return q.new_empty(N, HQ, v_slc.shape[-1]), q.new_empty(N, k_slc.shape[2], n, dtype=torch.int32)
