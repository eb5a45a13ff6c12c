"""The golden NSA: plain PyTorch + einops, float32 (float64 when given float64).

This file defines what every kernel must compute. It favours the obvious over the fast: each branch
gathers exactly the keys a token may see, masks what the rules exclude and takes a softmax over what
is left. Memory is bounded by walking the queries in chunks, never by changing the math.

Layout: q `[B, T, HQ, K]`, k `[B, T, H, K]`, v `[B, T, H, V]`; query head hq reads kv head hq // G
with G = HQ // H. With `cu_seqlens` (B = 1) the sequences are packed along T, positions and block ids
are relative to each sequence's start, and nothing attends across sequences.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Optional, Union

import torch
from einops import rearrange

from .checks import (
    check_block_counts,
    check_block_indices,
    check_compression,
    check_cu_seqlens,
    check_gate,
    check_positive_int,
    check_q_offset,
    check_qkv,
    check_scale,
    check_tensor,
    check_window_size,
    seq_ranges,
)

# Elements of the gathered [chunk, H, keys, dim] tensors per query chunk: bounds the reference's memory.
_CHUNK_ELEMS = 1 << 24

Phi = Union[str, Callable[[torch.Tensor], torch.Tensor], tuple]


_LOW_PRECISION = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 (float64 for float64 inputs); the inputs' own fp16/bf16 inside `low_precision()`."""
    if dtype == torch.float64:
        return torch.float64
    if _LOW_PRECISION and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.float32


@contextmanager
def low_precision():
    """Within this block the reference computes in its inputs' fp16/bf16 instead of float32.

    Not the semantics (those are float32): a yardstick. The error of this run against the float32
    run is what rounding in the low precision costs; tests allow a kernel a small multiple of it,
    row by row (FlashAttention's rule)."""
    global _LOW_PRECISION
    before, _LOW_PRECISION = _LOW_PRECISION, True
    try:
        yield
    finally:
        _LOW_PRECISION = before


def masked_attention(s: torch.Tensor, valid: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(s) over the keys where `valid`, applied to v; a row with no valid key gives 0.

    s `[..., G, N]` (already scaled), valid broadcastable to s, v `[..., N, V]` -> `[..., G, V]`.
    """
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty rows: exp(-inf) = 0, not NaN
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    o = torch.einsum("...gn,...nv->...gv", p, v)
    return o / torch.where(denom > 0, denom, torch.ones_like(denom))


def _chunk(num_keys: int, H: int, dim: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, num_keys * H * dim))


def selected_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    scale: float,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Selected-block attention of one sequence.

    q `[Tq, HQ, K]`, k `[Tk, H, K]`, v `[Tk, H, V]`, block_indices `[Tq, H, S]`, counts `[Tq, H]`,
    positions `[Tq]` (the queries' positions in the sequence; default 0 … Tq-1) -> `[Tq, HQ, V]`.
    Slot s of token t reads block i = block_indices[t, h, s] when s < counts[t, h] and i >= 0: its
    tokens i·BS … i·BS+BS-1 that are <= t and < Tk. A block listed twice counts twice.
    """
    Tq, HQ, _ = q.shape
    Tk, H, _ = k.shape
    G = HQ // H
    S = block_indices.shape[-1]
    if positions is None:
        positions = torch.arange(Tq, device=q.device)
    offs = torch.arange(block_size, device=q.device)
    slot = torch.arange(S, device=q.device).view(1, 1, S, 1)
    head = torch.arange(H, device=q.device).view(1, H, 1)
    chunk = _chunk(S * block_size, H, k.shape[-1] + v.shape[-1])
    out = []
    last_block = (Tk - 1) // block_size
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        idx = block_indices[c0:c1].long()
        # ids past the last block are dropped before id·BS is formed, which could wrap int64
        real = (idx >= 0) & (idx <= last_block)
        pos = torch.where(real, idx, 0)[..., None] * block_size + offs  # [C, H, S, BS] token positions
        t = positions[c0:c1].view(-1, 1, 1, 1)
        valid = real[..., None] & (slot < counts[c0:c1, :, None, None]) & (pos <= t) & (pos < Tk)
        pos = pos.clamp(0, Tk - 1).flatten(2)  # [C, H, N]
        ks, vs = k[pos, head], v[pos, head]  # [C, H, N, K], [C, H, N, V]
        qg = rearrange(q[c0:c1], "c (h g) k -> c h g k", g=G)
        s = torch.einsum("chgk,chnk->chgn", qg, ks) * scale
        o = masked_attention(s, valid.flatten(2)[:, :, None, :], vs)
        out.append(rearrange(o, "c h g v -> c (h g) v"))
    return torch.cat(out, 0)


def sliding_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    scale: float,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sliding-window attention of one sequence over tokens max(0, t-W+1) … t.

    q `[Tq, HQ, K]`, k `[Tk, H, K]`, v `[Tk, H, V]`, positions `[Tq]` -> `[Tq, HQ, V]`.
    """
    Tq, HQ, _ = q.shape
    Tk, H, _ = k.shape
    G = HQ // H
    if positions is None:
        positions = torch.arange(Tq, device=q.device)
    chunk = _chunk(min(Tk, window_size + 256), H, k.shape[-1] + v.shape[-1])
    out = []
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        t = positions[c0:c1]
        lo = max(0, int(t.min()) - window_size + 1)
        hi = min(Tk, int(t.max()) + 1)
        kp = torch.arange(lo, hi, device=q.device)
        valid = (kp[None, :] <= t[:, None]) & (kp[None, :] > t[:, None] - window_size)  # [C, N]
        qg = rearrange(q[c0:c1], "c (h g) k -> c h g k", g=G)
        s = torch.einsum("chgk,nhk->chgn", qg, k[lo:hi]) * scale
        o = masked_attention(s, valid[:, None, None, :], rearrange(v[lo:hi], "n h v -> h n v"))
        out.append(rearrange(o, "c h g v -> c (h g) v"))
    return torch.cat(out, 0)


def token_positions(offsets: Optional[list[int]], T: int, device) -> torch.Tensor:
    """`[T]` each token's position within its own sequence (0 … T-1 without varlen)."""
    if offsets is None:
        return torch.arange(T, device=device)
    return torch.cat([torch.arange(e - s, device=device) for s, e in zip(offsets, offsets[1:])])


def _query_positions(q_offset: Optional[int], Tq: int, device) -> Optional[torch.Tensor]:
    """`[Tq]` the positions q_offset … q_offset+Tq-1, or None (each branch's default 0 … Tq-1)."""
    return None if q_offset is None else torch.arange(q_offset, q_offset + Tq, device=device)


def _counts(block_counts, b: int, s: int, e: int, H: int, S: int, device) -> torch.Tensor:
    if block_counts is None:
        return torch.full((e - s, H), S, dtype=torch.long, device=device)
    if isinstance(block_counts, int):
        return torch.full((e - s, H), block_counts, dtype=torch.long, device=device)
    return block_counts[b, s:e].long()


def _assemble(parts: list[torch.Tensor], varlen: bool) -> torch.Tensor:
    """Per-sequence results `[T_i, ...]` back to `[B, T, ...]`."""
    return torch.cat(parts, 0).unsqueeze(0) if varlen else torch.stack(parts, 0)


def naive_nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_slc: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
    block_indices: Optional[torch.Tensor] = None,
    block_counts: Union[None, int, torch.Tensor] = None,
    block_size: int = 64,
    window_size: int = 0,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    head_first: bool = False,
    q_offset: Optional[int] = None,
) -> torch.Tensor:
    r"""NSA's selected and sliding branches: g_slc·o_slc + g_swa·o_swa.

    Args:
        q: queries `[B, T, HQ, K]` (`[B, HQ, T, K]` if head_first).
        k: keys `[B, T, H, K]`; HQ must be a multiple of H (G = HQ // H query heads per kv head).
        v: values `[B, T, H, V]`.
        g_slc, g_swa: gates `[B, T, HQ]` (`[B, HQ, T]` if head_first); None means 1.
        block_indices: `[B, T, H, S]` integer block ids shared by a kv head's G query heads, or None
            for no selected branch. An id < 0 is an empty slot; an id whose block starts after t, or
            lies past the sequence's end, adds nothing; the block holding t is masked token by token.
        block_counts: slots used per token: None (all S), an int, or an integer tensor `[B, T, H]`.
        block_size: tokens per selected block (BS).
        window_size: sliding window W; tokens max(0, t-W+1) … t. 0 disables the branch.
        scale: softmax scale, default K ** -0.5.
        cu_seqlens: `[N+1]` offsets of packed sequences (B must be 1).
        head_first: whether inputs are head-first.
        q_offset: None (the queries are the whole sequence), or the position of q's first token in the
            keys' sequence: q `[B, Tq, HQ, K]` holds tokens q_offset … q_offset+Tq-1 over k, v
            `[B, Tk, H, *]` (q_offset + Tq <= Tk); the gates, block_indices and block_counts follow q
            (Tq rows). The result is those rows of the whole sequence's. Not with cu_seqlens yet.

    Returns:
        o `[B, T, HQ, V]` (`[B, HQ, T, V]` if head_first) in q's dtype. A token with nothing to
        attend to in a branch gets 0 from that branch.
    """
    if head_first:
        q, k, v = (rearrange(x, "b h t d -> b t h d") if isinstance(x, torch.Tensor) else x for x in (q, k, v))
        g_slc, g_swa = (rearrange(g, "b h t -> b t h") if isinstance(g, torch.Tensor) else g for g in (g_slc, g_swa))
        if isinstance(block_indices, torch.Tensor):
            block_indices = rearrange(block_indices, "b h t s -> b t h s")
        if isinstance(block_counts, torch.Tensor):
            block_counts = rearrange(block_counts, "b h t -> b t h")
    B, T, HQ, H, K, V = check_qkv(q, k, v, q_offset, cu_seqlens)
    check_gate(g_slc, "g_slc", B, T, HQ, q)
    check_gate(g_swa, "g_swa", B, T, HQ, q)
    check_positive_int(block_size, "block_size")
    window_size = check_window_size(window_size)
    scale = check_scale(scale, K)
    offsets = check_cu_seqlens(cu_seqlens, B, T, q)
    S = 0
    if block_indices is not None:
        S = check_block_indices(block_indices, B, T, H, q)
        check_block_counts(block_counts, B, T, H, S, q)

    cdt = compute_dtype(q.dtype)
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    positions = _query_positions(q_offset, T, q.device)
    parts = []
    for b, s, e in seq_ranges(offsets, B, T):
        ks, ke = (s, e) if q_offset is None else (0, k.shape[1])  # the keys of the queries' sequence
        o = qf.new_zeros(e - s, HQ, V)
        if block_indices is not None:
            counts = _counts(block_counts, b, s, e, H, S, q.device)
            o_slc = selected_branch(qf[b, s:e], kf[b, ks:ke], vf[b, ks:ke], block_indices[b, s:e], counts, block_size,
                                    scale, positions)
            o = o + (o_slc if g_slc is None else o_slc * g_slc[b, s:e, :, None].to(cdt))
        if window_size > 0:
            o_swa = sliding_branch(qf[b, s:e], kf[b, ks:ke], vf[b, ks:ke], window_size, scale, positions)
            o = o + (o_swa if g_swa is None else o_swa * g_swa[b, s:e, :, None].to(cdt))
        parts.append(o)
    o = _assemble(parts, offsets is not None).to(q.dtype)
    return rearrange(o, "b t h d -> b h t d") if head_first else o


# ----------------------------------------------------------------------------------------------
# Compression and selection (paper §3.3, Eqs. 7–12)
# ----------------------------------------------------------------------------------------------


def num_compressed(seq_len: int, l: int, d: int) -> int:
    """Compressed blocks of a sequence: block i covers tokens i·d … i·d+l-1, i = 0 … ⌊(T-l)/d⌋."""
    return 0 if seq_len < l else (seq_len - l) // d + 1


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, l: int, d: int) -> torch.Tensor:
    """Offsets of each sequence's compressed stream in the packed `compress_kv` output `[N+1]`."""
    lens = [num_compressed(e - s, l, d) for s, e in zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])]
    return torch.tensor([0] + lens, dtype=torch.long, device=cu_seqlens.device).cumsum(0)


def _pool(x: torch.Tensor, l: int, d: int, phi) -> torch.Tensor:
    """x `[B, T, H, D]` -> `[B, N, H, D]` with phi over each block `[B, N, H, l, D]`."""
    B, T, H, D = x.shape
    n = num_compressed(T, l, d)
    if n == 0:
        return x.new_zeros(B, 0, H, D)
    blocks = x.unfold(1, l, d)[:, :n].movedim(-1, -2)  # [B, N, H, l, D]
    return blocks.mean(-2) if phi == "mean" else phi(blocks)


def compress_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    l: int,
    d: int,
    phi: Phi = "mean",
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed keys and values (Eq. 7): block i of a sequence covers tokens i·d … i·d+l-1.

    Args:
        k: `[B, T, H, K]`, v: `[B, T, H, V]`.
        l, d: compression block length and stride (d | l).
        phi: "mean", a callable mapping blocks `[B, N, H, l, D]` to `[B, N, H, D]`, or a pair
            (phi_k, phi_v) of such callables.
        cu_seqlens: `[N+1]` packed sequences (B = 1); the streams are packed in the same order,
            at the offsets given by `compressed_cu_seqlens`.

    Returns:
        k_cmp `[B, Nc, H, K]`, v_cmp `[B, Nc, H, V]` in k's dtype (computed in float32/64).
    """
    check_tensor(k, "k", 4, "[B, T, H, K]")
    check_tensor(v, "v", 4, "[B, T, H, V]")
    if tuple(k.shape[:3]) != tuple(v.shape[:3]):
        raise ValueError(f"k [B, T, H, K] and v [B, T, H, V] must agree on B, T, H, got {list(k.shape)} and {list(v.shape)}")
    check_positive_int(l, "compress_block (l)")
    check_positive_int(d, "compress_stride (d)")
    if l % d != 0:
        raise ValueError(f"compress_stride d={d} must divide compress_block l={l}")
    if isinstance(phi, tuple):
        if len(phi) != 2 or not all(callable(f) for f in phi):
            raise TypeError("phi as a tuple must be (phi_k, phi_v), two callables")
        phi_k, phi_v = phi
    elif phi == "mean" or callable(phi):
        phi_k = phi_v = phi
    else:
        raise ValueError(f"phi must be 'mean', a callable or a pair of callables, got {phi!r}")
    offsets = check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1], k)
    cdt = compute_dtype(k.dtype)
    kf, vf = k.to(cdt), v.to(cdt)
    if offsets is None:
        return _pool(kf, l, d, phi_k).to(k.dtype), _pool(vf, l, d, phi_v).to(v.dtype)
    ks = [_pool(kf[:, s:e], l, d, phi_k) for s, e in zip(offsets, offsets[1:])]
    vs = [_pool(vf[:, s:e], l, d, phi_v) for s, e in zip(offsets, offsets[1:])]
    return torch.cat(ks, 1).to(k.dtype), torch.cat(vs, 1).to(v.dtype)


def compressed_branch(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    l: int,
    d: int,
    scale: float,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed attention of one sequence: block i is visible to t iff i·d + l - 1 <= t.

    q `[Tq, HQ, K]`, k_cmp `[Nc, H, K]`, v_cmp `[Nc, H, V]` -> (o `[Tq, HQ, V]`, p `[Tq, HQ, Nc]`).
    """
    Tq, HQ, _ = q.shape
    Nc, H, _ = k_cmp.shape
    G = HQ // H
    if Nc == 0:  # a sequence shorter than one compressed block: nothing to see
        return q.new_zeros(Tq, HQ, v_cmp.shape[-1]), q.new_zeros(Tq, HQ, 0)
    if positions is None:
        positions = torch.arange(Tq, device=q.device)
    ends = torch.arange(Nc, device=q.device) * d + l - 1
    chunk = _chunk(max(Nc, 1), HQ, 1)
    outs, probs = [], []
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        valid = ends[None, :] <= positions[c0:c1, None]  # [C, Nc]
        qg = rearrange(q[c0:c1], "c (h g) k -> c h g k", g=G)
        s = torch.einsum("chgk,nhk->chgn", qg, k_cmp) * scale
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        denom = p.sum(-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        o = torch.einsum("chgn,nhv->chgv", p, v_cmp)
        outs.append(rearrange(o, "c h g v -> c (h g) v"))
        probs.append(rearrange(p, "c h g n -> c (h g) n"))
    return torch.cat(outs, 0), torch.cat(probs, 0)


def _cmp_offsets(offsets: Optional[list[int]], B: int, T: int, l: int, d: int) -> list[tuple[int, int, int, int, int]]:
    """(batch, start, end, cmp_start, cmp_end) per sequence."""
    out, c = [], 0
    for b, s, e in seq_ranges(offsets, B, T):
        n = num_compressed(e - s, l, d)
        if offsets is None:
            out.append((b, s, e, 0, n))
        else:
            out.append((b, s, e, c, c + n))
            c += n
    return out


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    l: int,
    d: int,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    q_offset: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed keys (Eq. 8 gives p_cmp).

    Args:
        q: `[B, T, HQ, K]`; k_cmp `[B, Nc, H, K]`, v_cmp `[B, Nc, H, V]` from `compress_kv`.
        l, d: the compression block and stride that made k_cmp.
        cu_seqlens: `[N+1]` packed sequences; k_cmp/v_cmp packed as `compress_kv` packs them.
        q_offset: None (q is the whole sequence, Nc = its compressed length), or the position of q's
            first token: q `[B, Tq, HQ, K]` holds tokens q_offset … q_offset+Tq-1, and k_cmp holds the
            compressed keys of the sequence's first Tk >= q_offset + Tq tokens, so at least
            num_compressed(q_offset + Tq, l, d) of them (those past the last query add nothing).
            Not with cu_seqlens yet.

    Returns:
        o_cmp `[B, T, HQ, V]` in q's dtype and p_cmp `[B, T, HQ, Nmax]` (float32/64) where Nmax is
        the largest compressed stream of a sequence (k_cmp's Nc with q_offset); columns past a
        sequence's own stream are 0.
    """
    check_tensor(q, "q", 4, "[B, T, HQ, K]")
    check_tensor(k_cmp, "k_cmp", 4, "[B, Nc, H, K]")
    check_tensor(v_cmp, "v_cmp", 4, "[B, Nc, H, V]")
    B, T, HQ, K = q.shape
    H = k_cmp.shape[2]
    if k_cmp.shape[0] != B or k_cmp.shape[3] != K or tuple(v_cmp.shape[:3]) != tuple(k_cmp.shape[:3]):
        raise ValueError(f"k_cmp must be [B={B}, Nc, H, K={K}] and v_cmp [B, Nc, H, V], got {list(k_cmp.shape)}, {list(v_cmp.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the query heads HQ={HQ} must be a multiple of the kv heads H={H}")
    check_positive_int(l, "compress_block (l)")
    check_positive_int(d, "compress_stride (d)")
    scale = check_scale(scale, K)
    offsets = check_cu_seqlens(cu_seqlens, B, T, q)
    Nc = k_cmp.shape[1]
    if check_q_offset(q_offset, T, None, cu_seqlens) is None:
        ranges = _cmp_offsets(offsets, B, T, l, d)
        if ranges[-1][4] != Nc:
            raise ValueError(f"k_cmp holds {Nc} compressed tokens, but (l={l}, d={d}) over these sequences "
                             f"give {ranges[-1][4]}")
    else:
        if Nc < num_compressed(q_offset + T, l, d):
            raise ValueError(f"k_cmp holds {Nc} compressed tokens, but queries up to position q_offset + T - 1 = "
                             f"{q_offset + T - 1} see num_compressed({q_offset + T}, l={l}, d={d}) = "
                             f"{num_compressed(q_offset + T, l, d)}")
        ranges = [(b, 0, T, 0, Nc) for b in range(B)]
    cdt = compute_dtype(q.dtype)
    qf, kf, vf = q.to(cdt), k_cmp.to(cdt), v_cmp.to(cdt)
    positions = _query_positions(q_offset, T, q.device)
    n_max = max(r[4] - r[3] for r in ranges)
    outs, probs = [], []
    for b, s, e, cs, ce in ranges:
        o, p = compressed_branch(qf[b, s:e], kf[b, cs:ce], vf[b, cs:ce], l, d, scale, positions)
        outs.append(o)
        probs.append(torch.nn.functional.pad(p, (0, n_max - (ce - cs))))
    varlen = offsets is not None
    return _assemble(outs, varlen).to(q.dtype), _assemble(probs, varlen)


@lru_cache(maxsize=32)
def _overlap_matrix_cached(l: int, d: int, l_sel: int, Nc: int, Ns: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(Nc, dtype=torch.long)
    j = torch.arange(Ns, dtype=torch.long)
    start = torch.maximum(i[:, None] * d, j[None, :] * l_sel)
    end = torch.minimum(i[:, None] * d + l, (j[None, :] + 1) * l_sel)
    return ((end - start).clamp_min(0) // d).to(device=device, dtype=dtype)


def overlap_matrix(l: int, d: int, l_sel: int, Nc: int, Ns: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Eq. 9 as a matrix `[Nc, Ns]`: entry (i, j) is the overlap, in units of d, of compressed block i
    (tokens i·d … i·d+l-1) with selection block j (tokens j·l' … j·l'+l'-1). Banded: row i is
    non-zero only for the ⌈l/l'⌉+1 or fewer blocks it touches. Built once per (l, d, l', sizes)."""
    check_compression(l, d, l_sel)
    return _overlap_matrix_cached(l, d, l_sel, Nc, Ns, str(torch.device(device)), dtype)


def selection_scores(
    p_cmp: torch.Tensor,
    l: int,
    d: int,
    l_sel: int,
    num_kv_heads: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    num_blocks: Optional[int] = None,
) -> torch.Tensor:
    """Importance of each selection block (Eqs. 9–10).

    Args:
        p_cmp: `[B, T, HQ, Nc]` compressed-attention probabilities (from `compressed_attention`).
        l, d, l_sel: compression block, stride and selection block size l' (d | l, d | l').
        num_kv_heads: H; the G = HQ // H heads of a group are summed (Eq. 10).
        cu_seqlens: `[N+1]` packed sequences; fixes the number of selection blocks by the longest one.
        num_blocks: Ns when the queries are not the whole sequence (decoding: ⌈(t+1) / l'⌉).

    Returns:
        p_slc `[B, T, H, Ns]` with Ns = ⌈T_max / l'⌉ unless given (float32/64).
    """
    check_tensor(p_cmp, "p_cmp", 4, "[B, T, HQ, Nc]")
    check_compression(l, d, l_sel)
    B, T, HQ, Nc = p_cmp.shape
    H = check_positive_int(num_kv_heads, "num_kv_heads")
    if HQ % H != 0:
        raise ValueError(f"p_cmp's heads HQ={HQ} must be a multiple of num_kv_heads={H}")
    offsets = check_cu_seqlens(cu_seqlens, B, T)
    t_max = T if offsets is None else max(e - s for s, e in zip(offsets, offsets[1:]))
    Ns = math.ceil(t_max / l_sel) if num_blocks is None else check_positive_int(num_blocks, "num_blocks")
    M = overlap_matrix(l, d, l_sel, Nc, Ns, p_cmp.device, compute_dtype(p_cmp.dtype))
    p_slc = p_cmp.to(M.dtype) @ M  # [B, T, HQ, Ns]
    return rearrange(p_slc, "b t (h g) n -> b t h g n", h=H).sum(3)


def select_blocks(
    p_slc: torch.Tensor,
    n: int,
    l_sel: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Top-n selection blocks per (token, kv head) (Eqs. 11–12).

    Block 0 and the two local blocks (the one holding t and the one before, when they exist) are
    always kept; the rest are the highest-scoring blocks that start at or before t, ties broken
    toward the lower id. Ids are sorted ascending; unused slots are -1 (at the end).

    Args:
        p_slc: `[B, T, H, Ns]` block scores (from `selection_scores`).
        n: blocks per token (>= 3, to hold the forced ones).
        l_sel: selection block size l'.
        cu_seqlens: `[N+1]` packed sequences (positions restart at each sequence).
        positions: `[T]` the tokens' positions when they are not 0 … T-1 (decoding).

    Returns:
        block_indices `[B, T, H, n]` (int64).
    """
    check_tensor(p_slc, "p_slc", 4, "[B, T, H, Ns]")
    check_positive_int(n, "n (block_counts)", minimum=3)
    check_positive_int(l_sel, "block_size (l')")
    B, T, H, Ns = p_slc.shape
    offsets = check_cu_seqlens(cu_seqlens, B, T)
    if positions is None:
        positions = token_positions(offsets, T, p_slc.device)
    cur = (positions // l_sel).view(1, -1, 1, 1)  # block holding t
    j = torch.arange(max(Ns, n), device=p_slc.device).view(1, 1, 1, -1)
    score = torch.nn.functional.pad(p_slc.to(compute_dtype(p_slc.dtype)), (0, max(Ns, n) - Ns))
    score = score.masked_fill(j > cur, float("-inf"))
    score = score.masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]  # stable: lower id wins ties
    taken = torch.gather(score, -1, order) > float("-inf")
    big = torch.iinfo(torch.long).max
    ids = torch.where(taken, order, torch.full_like(order, big)).sort(-1).values
    return torch.where(ids == big, torch.full_like(ids, -1), ids)


def naive_nsa_full(
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
    phi: Phi = "mean",
    q_offset: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""All of NSA: g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa (Eq. 5), with `nsa()`'s arguments in
    `nsa()`'s order (then phi and q_offset).

    The compressed branch attends over `compress_kv(k, v, l, d, phi)`; unless `block_indices` is
    given, the selected branch reads the top-`block_counts` blocks of size l' = `block_size` chosen
    from the compressed probabilities (Eqs. 8–12; the choice itself carries no gradient).

    Args:
        q, k, v, g_*: as in `naive_nsa` (gates `[B, T, HQ]`, None means 1).
        block_indices: `[B, T, H, S]` to skip the selection.
        block_counts: n, the selected blocks per token (an int >= 3; None: 16) when selecting; with
            given `block_indices` anything `naive_nsa` takes (None: all S slots).
        block_size: l'; window_size: W; compress_block: l; compress_stride: d.
        phi: the compression function (see `compress_kv`).
        q_offset: None, or the position of q's first token in the keys' sequence (see `naive_nsa`):
            q `[B, Tq, HQ, K]` over k, v `[B, Tk, H, *]` with q_offset + Tq <= Tk gives rows q_offset …
            q_offset+Tq-1 of the whole sequence's result (compression over all Tk keys).

    Returns:
        (o `[B, T, HQ, V]` in q's dtype, block_indices `[B, T, H, S]`).
    """
    check_qkv(q, k, v, q_offset, cu_seqlens)
    check_compression(compress_block, compress_stride, block_size)
    cdt = compute_dtype(q.dtype)
    dtype, q, kv = q.dtype, q.to(cdt), (k.to(cdt), v.to(cdt))  # one cast for all branches: gradients add in float32
    kv_cmp = compress_kv(*kv, compress_block, compress_stride, phi, cu_seqlens)
    o, block_indices = naive_nsa_branches(q, kv_cmp, kv, kv, g_cmp, g_slc, g_swa, block_indices, block_counts, block_size,
                                          window_size, scale, cu_seqlens, compress_block, compress_stride, q_offset)
    return o.to(dtype), block_indices


def naive_nsa_branches(
    q: torch.Tensor,
    kv_cmp: tuple[torch.Tensor, torch.Tensor],
    kv_slc: tuple[torch.Tensor, torch.Tensor],
    kv_swa: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
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
    q_offset: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""`naive_nsa_full` after the compression, each branch with its own keys and values (the layer
    projects them apart; `naive_nsa_full` passes one pair): compressed attention over kv_cmp (already
    compressed), the top-n blocks chosen from it unless block_indices is given, selected attention
    over kv_slc, sliding over kv_swa. Lets a caller compress once and attend several query slices.

    Args:
        q: `[B, T, HQ, K]` (Tq rows at q_offset, as in `naive_nsa`).
        kv_cmp: (k_cmp `[B, Nc, H, K]`, v_cmp `[B, Nc, H, V]`) from `compress_kv`.
        kv_slc, kv_swa: (k `[B, Tk, H, K]`, v `[B, Tk, H, V]`); kv_swa is needed only when W > 0.
        the rest: as in `naive_nsa_full`.

    Returns:
        (o `[B, T, HQ, V]` in q's dtype, block_indices `[B, T, H, S]`).
    """
    k, v = kv_slc
    B, T, HQ, H, K, V = check_qkv(q, k, v, q_offset, cu_seqlens)
    check_gate(g_cmp, "g_cmp", B, T, HQ, q)
    check_compression(compress_block, compress_stride, block_size)
    window_size = check_window_size(window_size)
    if window_size > 0:
        if kv_swa is None:
            raise ValueError(f"window_size={window_size} needs the sliding branch's keys and values kv_swa, got None")
        check_qkv(q, *kv_swa, q_offset, cu_seqlens)
    scale = check_scale(scale, K)
    l, d = compress_block, compress_stride
    cdt = compute_dtype(q.dtype)
    qf = q.to(cdt)
    k_cmp, v_cmp = (x.to(cdt) for x in kv_cmp)
    o_cmp, p_cmp = compressed_attention(qf, k_cmp, v_cmp, l, d, scale, cu_seqlens, q_offset)
    if block_indices is None:
        block_counts = 16 if block_counts is None else block_counts
        if not isinstance(block_counts, int) or isinstance(block_counts, bool):
            raise TypeError(f"block_counts must be an int (blocks per token) when selecting, got {type(block_counts).__name__}")
        with torch.no_grad():
            ends = None if q_offset is None else math.ceil((q_offset + T) / block_size)
            p_slc = selection_scores(p_cmp, l, d, block_size, H, cu_seqlens, num_blocks=ends)
            block_indices = select_blocks(p_slc, block_counts, block_size, cu_seqlens, _query_positions(q_offset, T, q.device))
        block_counts = None
    k, v = (x.to(cdt) for x in kv_slc)
    if window_size == 0 or kv_swa is kv_slc:  # one pair of keys for both branches: one call
        o = naive_nsa(qf, k, v, g_slc, g_swa, block_indices, block_counts, block_size, window_size, scale, cu_seqlens,
                      q_offset=q_offset)
    else:
        o = naive_nsa(qf, k, v, g_slc, None, block_indices, block_counts, block_size, 0, scale, cu_seqlens,
                      q_offset=q_offset)
        o = o + naive_nsa(qf, *(x.to(cdt) for x in kv_swa), None, g_swa, None, None, block_size, window_size, scale,
                          cu_seqlens, q_offset=q_offset)
    o_cmp = o_cmp if g_cmp is None else o_cmp * g_cmp[..., None].to(cdt)
    return (o + o_cmp).to(q.dtype), block_indices
