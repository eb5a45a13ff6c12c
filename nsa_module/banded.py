"""The banded family's launchers (kernels/banded.py): causal attention over a band of keys, shared by
the sliding branch (keys = the tokens, band of width W) and the compressed branch (keys = the
compressed stream, strided by d, no window). Forward and backward, gate fused; inputs validated by
the callers (sliding.py, compressed.py, ops.py).
"""
from __future__ import annotations

import os

import torch

from kernels import banded as K_band
from kernels.common import tl_dtype

from .common import SeqInfo, empty, sm_count, split_arg

# The forward stores the O the backward reads in fp32 (kernels/banded.py O_FP32: the dQ kernel's Delta
# then matches its P exactly; 2 more bytes per O element). Off by default; tests switch it on, or
# NSA_O_FP32=1 at import.
O_FP32 = os.environ.get("NSA_O_FP32") == "1"


def o_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype of the O the forward stores for the backward."""
    return torch.float32 if O_FP32 else q.dtype


def _o_arg(o: torch.Tensor, q: torch.Tensor) -> dict:
    """The kernels' o_dtype argument for a stored O (none for q's own dtype: the default kernels)."""
    return {} if o.dtype == q.dtype else dict(o_dtype="float32")


def banded_fwd(q, k, v, gate, W: int, KS: int, KC: int, scale: float, qseq: SeqInfo, kseq: SeqInfo):
    """Banded causal attention (see kernels/banded.py): o, og = gate·o, lse. Keys k/v may be a
    different (strided) stream than the queries, laid out by kseq."""
    B, Tq, HQ, Kd = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = HQ // H
    o = empty(B, Tq, HQ, V, dtype=o_dtype(q), device=q.device)
    og = empty(B, Tq, HQ, V, dtype=q.dtype, device=q.device)
    lse = empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    if k.shape[1] == 0:  # no key anywhere (every sequence shorter than one compressed block)
        return o.zero_(), og.zero_(), lse.fill_(float("inf"))
    K_band.banded_fwd(H, G, Kd, V, W, KS, KC, tl_dtype(q.dtype), scale, **K_band.pick_config(G, Kd, V),
                      **_o_arg(o, q))(
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
    K_band.banded_bwd_dq(H, G, Kd, V, W, KS, KC, dtype, scale, **K_band.pick_config(G, Kd, V), **_o_arg(o, q))(
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
