"""One decode step of NSA on the kernels: N sequences, one new query token each, over their caches.

    o_cmp, lse_cmp = attend(q, compressed stream)          # kernels/decode.py, split over programs
    ids            = top-n of the Eq. 9-10 block scores     # from q·k_cmp and lse_cmp, torch
    o_slc          = attend(q, the n selected blocks)
    o_swa          = attend(q, the sliding ring)
    o              = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa

Semantics are the reference's (reference/naive.py with `positions`): the new token is at position
t = length - 1 of its sequence and already in the caches.
"""
from __future__ import annotations

from functools import lru_cache

import torch

import reference as R
from kernels import decode as K_dec
from kernels.common import LOG2E, tl_dtype

from .common import sm_count, split_arg
from .topk import mask_scores, select_from_masked


def contiguous_tiles(n_keys: torch.Tensor, H: int, BN: int, max_keys: int) -> torch.Tensor:
    """TileStart `[N, H, NT]` for keys 0 … n_keys[n] - 1 of each sequence (-1 past them)."""
    NT = max(1, -(-max_keys // BN))
    start = torch.arange(NT, device=n_keys.device, dtype=torch.int32) * BN
    start = torch.where(start[None, :] < n_keys[:, None], start[None, :], -1)
    return start[:, None, :].expand(-1, H, -1).contiguous()


def block_tiles(block_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """TileStart `[N, H, n]` of selected blocks `[N, H, n]` (one tile per block, -1 stays -1)."""
    return torch.where(block_indices >= 0, block_indices * block_size, -1).to(torch.int32).contiguous()


@lru_cache(maxsize=None)
def _kernel(H, G, K, V, BN, dtype, scale):
    return K_dec.decode_attend(H, G, K, V, BN, dtype, scale, **K_dec.pick_config(G, K, V, BN))


def decode_attend(q, k_cache, v_cache, tile_start, limit, BN: int, scale: float):
    """q `[N, HQ, K]` over the tiles of k/v_cache `[N, CAP, H, K|V]`: (o `[N, HQ, V]` fp32, lse
    `[N, HQ]` base 2, -inf where nothing was seen)."""
    N, HQ, Kd = q.shape
    H, V = k_cache.shape[2], v_cache.shape[-1]
    NT = tile_start.shape[-1]
    ns = max(1, min(NT, -(-2 * sm_count(q.device) // (N * H))))
    o_part = torch.empty(N, HQ, ns, V, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(N, HQ, ns, dtype=torch.float32, device=q.device)
    _kernel(H, HQ // H, Kd, V, BN, tl_dtype(q.dtype), scale)(
        q, k_cache, v_cache, tile_start, limit, split_arg(ns, q.device), o_part, lse_part)
    return merge_partials(o_part, lse_part)


def merge_partials(o_part: torch.Tensor, lse_part: torch.Tensor):
    """Softmax partials over disjoint key sets, o_part `[..., NS, V]` (each normalized) and lse_part
    `[..., NS]` (base 2, -inf for a split that saw nothing) -> (o `[..., V]`, lse `[...]`); rows that
    saw nothing at all get o = 0 and lse = -inf, never NaN."""
    m = lse_part.amax(-1, keepdim=True)
    w = torch.exp2(lse_part - torch.where(m > float("-inf"), m, 0.0))  # exp2(-inf) = 0 for empty splits
    den = w.sum(-1)
    o = (o_part * w[..., None]).sum(-2) / den.clamp_min(1e-30)[..., None]
    lse = torch.where(den > 0, m[..., 0] + torch.log2(den.clamp_min(1e-30)), float("-inf"))
    return o, lse


def nsa_decode(q, k_cmp, v_cmp, num_cmp, k_slc, v_slc, lengths, k_swa, v_swa, swa_count, gates,
               l: int, d: int, l_sel: int, n: int, scale: float):
    """One step. q `[N, HQ, K]`; compressed stream k/v_cmp `[N, C, H, *]` with num_cmp `[N]` tokens;
    raw selected-branch cache k/v_slc `[N, CAP, H, *]` with lengths `[N]` (the new token included);
    sliding ring k/v_swa `[N, W, H, *]` with swa_count `[N]` valid slots (None: no window);
    gates (g_cmp, g_slc, g_swa) `[N, HQ]`. Returns (o `[N, HQ, V]` in q's dtype, block_indices
    `[N, H, n]`, tokens read per sequence `[N]`)."""
    N, HQ, Kd = q.shape
    H = k_slc.shape[2]
    G = HQ // H
    g_cmp, g_slc, g_swa = (g.float() for g in gates)
    num_cmp = num_cmp.to(torch.int32)
    lengths = lengths.to(torch.int32)

    C = max(1, min(k_cmp.shape[1], int(num_cmp.max())))  # the stream's used rows, not its capacity
    o_cmp, lse_cmp = decode_attend(q, k_cmp, v_cmp, contiguous_tiles(num_cmp, H, 64, C), num_cmp, 64, scale)

    # Eqs. 8-10 from the same logits: p_cmp = exp2(q·k·scale·log2e - lse), zero past each stream
    logits = torch.einsum("nhgk,nchk->nhgc", q.view(N, H, G, Kd).float(), k_cmp[:, :C].float())
    p_cmp = torch.exp2(logits * (scale * LOG2E) - lse_cmp.view(N, H, G, 1))
    p_cmp = torch.where(torch.arange(C, device=q.device) < num_cmp.view(N, 1, 1, 1), p_cmp, 0.0)
    NS = int(lengths.max()) // l_sel + 1
    s = R.selection_scores(p_cmp.reshape(N, 1, HQ, C), l, d, l_sel, H, num_blocks=NS)  # [N, 1, H, NS]
    s = mask_scores(s, l_sel, (lengths - 1).view(N, 1))
    block_indices = select_from_masked(s, n, fast=False)[:, 0]  # [N, H, n]

    o_slc, _ = decode_attend(q, k_slc, v_slc, block_tiles(block_indices, l_sel), lengths, l_sel, scale)
    o = g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc
    blocks = block_indices[:, 0].long()  # reads of kv head 0, as the reference's cache.reads counts
    reads = num_cmp.long() + torch.where(blocks >= 0, (lengths.long()[:, None] - blocks * l_sel).clamp(0, l_sel), 0).sum(-1)
    if k_swa is not None:
        swa_count = swa_count.to(torch.int32)
        W = k_swa.shape[1]
        o_swa, _ = decode_attend(q, k_swa, v_swa, contiguous_tiles(swa_count, H, 64, W), swa_count, 64, scale)
        o = o + g_swa[..., None] * o_swa
        reads = reads + swa_count.long()
    return o.to(q.dtype), block_indices, reads
