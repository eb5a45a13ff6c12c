"""NSA as torch.library custom ops, so that torch.compile traces a model through the layer without
graph breaks: each op is opaque to the compiler (a fake implementation gives its output shapes),
runs the TileLang kernels eagerly, and carries its own backward.

  nsa_tilelang::attend          the three branches of the layer's training / prefill forward
                                (compressed attention, top-n selection, selected, sliding), gated;
                                also returns what the backward needs (branch outputs, LSEs, ids)
  nsa_tilelang::attend_backward their gradients, from those saved tensors
  nsa_tilelang::decode          one decode step (kernels/decode.py)

The layer calls these on CUDA; nsa() and the per-branch functions keep their autograd Functions.
Inside an op, host reads (cu_seqlens' offsets) are fine: the compiler never traces into it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import reference as R
from kernels.banded import W_CAP

from .banded import banded_bwd, banded_fwd
from .common import SeqInfo, kernel_ready, prepare_block_indices
from .compressed import compressed_layout
from .decode import nsa_decode
from .selected import selected_bwd, selected_fwd
from .topk import select_blocks


def _layouts(q: Tensor, cu_seqlens: Optional[Tensor], l: int, d: int):
    B, T = q.shape[:2]
    qseq = SeqInfo.build(cu_seqlens, B, T, q)
    return qseq, compressed_layout(tuple(qseq.lengths), l, d, str(q.device))


def _c(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else kernel_ready(x)


@torch.library.custom_op("nsa_tilelang::attend", mutates_args=(), device_types="cuda")
def attend(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_swa: Optional[Tensor],
           v_swa: Optional[Tensor], g_cmp: Tensor, g_slc: Tensor, g_swa: Optional[Tensor],
           cu_seqlens: Optional[Tensor], l: int, d: int, l_sel: int, n: int, W: int, scale: float
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa `[B, T, HQ, V]` with (o_cmp, lse_cmp, o_slc,
    lse_slc, o_swa, lse_swa, block_indices). q `[B, T, HQ, K]`; k/v_cmp the compressed streams
    (packed as nsa_module.compressed lays them out); k/v_slc, k/v_swa `[B, T, H, K|V]`; gates
    `[B, T, HQ]`. W = 0: no sliding branch (k/v_swa, g_swa None; its outputs empty)."""
    qseq, kseq = _layouts(q, cu_seqlens, l, d)
    q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa = map(_c, (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa))
    g_cmp, g_slc, g_swa = (None if g is None else kernel_ready(g.to(q.dtype)) for g in (g_cmp, g_slc, g_swa))
    o_cmp, og, lse_cmp = banded_fwd(q, k_cmp, v_cmp, g_cmp, W_CAP, d, l - 1, scale, qseq, kseq)
    idx = select_blocks(q, k_cmp, lse_cmp, n, l, d, l_sel, scale, qseq, kseq)
    B, T, HQ = q.shape[:3]
    idx, cnt = prepare_block_indices(idx, None, B, T, k_slc.shape[2], q)
    o_slc, og_slc, lse_slc = selected_fwd(q, k_slc, v_slc, g_slc, idx, cnt, l_sel, scale, qseq)
    o = og + og_slc
    o_swa, lse_swa = q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    if W > 0:
        o_swa, og_swa, lse_swa = banded_fwd(q, k_swa, v_swa, g_swa, W, 1, 0, scale, qseq, qseq)
        o = o + og_swa
    return o, o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, idx


def attend_reference(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, g_cmp, g_slc, g_swa, cu_seqlens,
                     l: int, d: int, l_sel: int, n: int, W: int, scale: float, block_indices=None):
    """The same three gated branches on the float32 reference (reference/naive.py): (o in q's
    dtype, block_indices). Differentiable; the selection (given or chosen) is not."""
    o_cmp, p_cmp = R.compressed_attention(q, k_cmp, v_cmp, l, d, scale, cu_seqlens)
    if block_indices is None:
        with torch.no_grad():
            p_slc = R.selection_scores(p_cmp, l, d, l_sel, k_slc.shape[2], cu_seqlens)
            block_indices = R.select_blocks(p_slc, n, l_sel, cu_seqlens)
    o = o_cmp * g_cmp[..., None] + R.naive_nsa(q, k_slc, v_slc, g_slc, None, block_indices, None, l_sel, 0,
                                               scale, cu_seqlens)
    if W > 0:
        o = o + R.naive_nsa(q, k_swa, v_swa, None, g_swa, None, None, l_sel, W, scale, cu_seqlens)
    return o.to(q.dtype), block_indices


@attend.register_kernel("cpu")
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, g_cmp, g_slc, g_swa, cu_seqlens, l, d, l_sel, n, W, scale):
    """CPU, forward only (the layer uses the reference functions directly on the CPU; this lets the
    op's registrations and a compiled model be checked without a GPU): the branch outputs the CUDA
    backward needs are zeros."""
    o, idx = attend_reference(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, g_cmp, g_slc, g_swa, cu_seqlens,
                              l, d, l_sel, n, W, scale)
    B, T, HQ = q.shape[:3]
    V = v_slc.shape[-1]
    kept = lambda: [q.new_zeros(B, T, HQ, V), q.new_zeros(B, T, HQ, dtype=torch.float32)]  # noqa: E731
    swa = kept() if W > 0 else [q.new_empty(0), q.new_empty(0, dtype=torch.float32)]
    return o, *kept(), *kept(), *swa, idx.to(torch.int32)


@attend.register_fake
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, g_cmp, g_slc, g_swa, cu_seqlens, l, d, l_sel, n, W, scale):
    B, T, HQ = q.shape[:3]
    H, V = k_slc.shape[2], v_slc.shape[-1]
    o = q.new_empty(B, T, HQ, V)
    lse = q.new_empty(B, T, HQ, dtype=torch.float32)
    swa = (q.new_empty(B, T, HQ, V), q.new_empty(B, T, HQ, dtype=torch.float32)) if W > 0 else \
        (q.new_empty(0), q.new_empty(0, dtype=torch.float32))
    return o, q.new_empty(B, T, HQ, V), lse, q.new_empty(B, T, HQ, V), lse.new_empty(B, T, HQ), *swa, \
        q.new_empty(B, T, H, n, dtype=torch.int32)


@torch.library.custom_op("nsa_tilelang::attend_backward", mutates_args=(), device_types="cuda")
def attend_backward(do: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor,
                    k_swa: Optional[Tensor], v_swa: Optional[Tensor], g_cmp: Tensor, g_slc: Tensor,
                    g_swa: Optional[Tensor], o_cmp: Tensor, lse_cmp: Tensor, o_slc: Tensor, lse_slc: Tensor,
                    o_swa: Tensor, lse_swa: Tensor, block_indices: Tensor, cu_seqlens: Optional[Tensor],
                    l: int, d: int, l_sel: int, W: int, scale: float) -> list[Tensor]:
    """[dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_swa, dv_swa, dg_cmp, dg_slc, dg_swa] (the sliding
    ones empty when W = 0); each branch's backward gets do, as o is their sum."""
    qseq, kseq = _layouts(q, cu_seqlens, l, d)
    do, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa = map(_c, (do, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa))
    # the saved outputs too: under torch.compile they reach this op as the graph hands them over
    o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa = map(_c, (o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa))
    gates = [None if g is None else kernel_ready(g.to(q.dtype)) for g in (g_cmp, g_slc, g_swa)]
    B, T = q.shape[:2]
    idx, cnt = prepare_block_indices(block_indices, None, B, T, k_slc.shape[2], q)
    dq_c, dk_c, dv_c, dg_c = banded_bwd(q, k_cmp, v_cmp, gates[0], o_cmp, lse_cmp, do, W_CAP, d, l - 1,
                                        scale, qseq, kseq)
    dq_s, dk_s, dv_s, dg_s = selected_bwd(q, k_slc, v_slc, gates[1], o_slc, lse_slc, do, idx, cnt, l_sel,
                                          scale, qseq)
    dq = dq_c.float() + dq_s.float()
    dk_w, dv_w, dg_w = q.new_empty(0), q.new_empty(0), q.new_empty(0)
    if W > 0:
        dq_w, dk_w, dv_w, dg_w = banded_bwd(q, k_swa, v_swa, gates[2], o_swa, lse_swa, do, W, 1, 0, scale,
                                            qseq, qseq)
        dq = dq + dq_w.float()
        dg_w = dg_w.to(g_swa.dtype)
    return [dq.to(q.dtype), dk_c, dv_c, dk_s, dv_s, dk_w, dv_w, dg_c.to(g_cmp.dtype), dg_s.to(g_slc.dtype), dg_w]


@attend_backward.register_fake
def _(do, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, g_cmp, g_slc, g_swa, o_cmp, lse_cmp, o_slc, lse_slc,
      o_swa, lse_swa, block_indices, cu_seqlens, l, d, l_sel, W, scale):
    swa = [torch.empty_like(k_swa), torch.empty_like(v_swa), torch.empty_like(g_swa)] if W > 0 else \
        [q.new_empty(0), q.new_empty(0), q.new_empty(0)]
    return [torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp), torch.empty_like(k_slc),
            torch.empty_like(v_slc), swa[0], swa[1], torch.empty_like(g_cmp), torch.empty_like(g_slc), swa[2]]


def _attend_setup(ctx, inputs, output):
    q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, g_cmp, g_slc, g_swa, cu_seqlens, l, d, l_sel, n, W, scale = inputs
    _, o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, idx = output
    ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, g_cmp, g_slc, g_swa,
                          o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, idx, cu_seqlens)
    ctx.args = (l, d, l_sel, W, scale)


def _attend_backward(ctx, do, *_):
    saved = ctx.saved_tensors
    g = attend_backward(do, *saved, *ctx.args)
    W = ctx.args[3]
    swa = (g[5], g[6], g[9]) if W > 0 else (None, None, None)
    return (g[0], g[1], g[2], g[3], g[4], swa[0], swa[1], g[7], g[8], swa[2]) + (None,) * 7


torch.library.register_autograd("nsa_tilelang::attend", _attend_backward, setup_context=_attend_setup)


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
