"""The banded family's launchers (kernels/banded.py): causal attention over a band of keys, shared by
the sliding branch (keys = the tokens, band of width W) and the compressed branch (keys = the
compressed stream, strided by d, no window). Forward and backward, gate fused; inputs validated by
the callers (sliding.py, compressed.py, ops.py).
"""
from __future__ import annotations

import torch

from kernels import banded as K_band
from kernels.common import tl_dtype

from . import common
from .common import SeqInfo, empty, o_dtype_arg, sm_count, split_arg, stored_o_dtype


def banded_fwd(q, k, v, gate, W: int, KS: int, KC: int, scale: float, qseq: SeqInfo, kseq: SeqInfo):
    """Banded causal attention (see kernels/banded.py): o, og = gate·o, lse. Keys k/v may be a
    different (strided) stream than the queries, laid out by kseq."""
    B, Tq, HQ, Kd = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = HQ // H
    o = empty(B, Tq, HQ, V, dtype=stored_o_dtype(q), device=q.device)
    og = empty(B, Tq, HQ, V, dtype=q.dtype, device=q.device)
    lse = empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    if k.shape[1] == 0:  # no key anywhere (every sequence shorter than one compressed block)
        return o.zero_(), og.zero_(), lse.fill_(float("inf"))
    K_band.banded_fwd(H, G, Kd, V, W, KS, KC, tl_dtype(q.dtype), scale, **K_band.pick_config(G, Kd, V),
                      **o_dtype_arg(o, q))(
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
    pass_arg = dict(delta_pass=True) if common.DELTA_PASS else {}
    K_band.banded_bwd_dq(H, G, Kd, V, W, KS, KC, dtype, scale, **K_band.pick_dq_config(G, Kd, V), **o_dtype_arg(o, q),
                         **pass_arg)(
        q, k, v, o, dog, gate, lse, qseq.offsets, qseq.tok_seq, kseq.offsets, dq, delta, dgate)
    cfg = K_band.pick_dkv_config(G, Kd, V)
    args = (q, k, v, dog, gate, lse, delta, qseq.offsets, qseq.tok_seq, kseq.offsets, kseq.tok_seq)
    if not K_band.splits_query_range(W):
        K_band.banded_bwd_dkv(H, G, Kd, V, W, KS, KC, dtype, scale, **cfg)(*args, dk, dv)
        return dq, dk, dv, dgate
    # enough programs to fill the GPU about 4 times over, at least one query tile each
    key_tiles = B * H * -(-k.shape[1] // cfg["BN"])
    ns = max(1, min(-(-4 * sm_count(q.device) // key_tiles), -(-Tq // cfg["BM"])))
    dk_acc = torch.zeros(*k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(*v.shape, dtype=torch.float32, device=v.device)
    K_band.banded_bwd_dkv_split(H, G, Kd, V, W, KS, KC, dtype, scale, **cfg)(
        *args, split_arg(ns, q.device), dk_acc, dv_acc)
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype), dgate
