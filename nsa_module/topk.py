"""Top-n block selection (paper Eqs. 8–12) on the block-score kernel, then a row-wise selection.

`select_blocks` equals `reference.select_blocks(reference.selection_scores(p_cmp, ...), ...)`:
block 0 and the two local blocks always, then the highest scores among blocks starting at or
before t, ties toward the lower id, sorted ascending, -1 padding.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from kernels import topk as K_topk
from kernels.common import tl_dtype

from .common import SeqInfo, empty


@lru_cache(maxsize=16)
def query_tiles(lengths: tuple, BM: int, device: str) -> torch.Tensor:
    """First row of each tile of BM tokens, tiles never straddling a sequence (cached per layout)."""
    starts, s = [], 0
    for n in lengths:
        starts += range(s, s + n, BM)
        s += n
    return torch.tensor(starts, dtype=torch.int32, device=device)


def block_scores(q, k_cmp, lse_cmp, l: int, d: int, l_sel: int, scale: float, qseq: SeqInfo, kseq: SeqInfo):
    """Scores `[B, T, H, NS]` (fp32) of every selection block for each token and kv head, NS the
    longest sequence's block count. Entries of blocks after a token's own are unspecified."""
    B, T, HQ, Kd = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    NS = -(-max(qseq.lengths) // l_sel)
    scores = empty(B, T, H, NS, dtype=torch.float32, device=q.device)
    cfg = K_topk.pick_config(G, Kd, l, d, l_sel)
    tiles = query_tiles(tuple(qseq.lengths), cfg["BM"], str(q.device))
    K_topk.block_scores(H, G, Kd, l, d, l_sel, tl_dtype(q.dtype), scale, **cfg)(
        q, k_cmp, lse_cmp, tiles, qseq.offsets, qseq.tok_seq, kseq.offsets, scores)
    return scores


def select_from_scores(scores: torch.Tensor, n: int, l_sel: int, qseq: SeqInfo) -> torch.Tensor:
    """block_indices `[B, T, H, n]` (int32) from scores `[B, T, H, NS]` (see module docstring).

    The choice is exact and deterministic: each score becomes an int64 key (its float bits in
    sortable order, then the complemented block id), so top-k ranks by score and breaks ties toward
    the lower id without a stable sort.
    """
    B, T, H, NS = scores.shape
    cur = (qseq.positions() // l_sel).view(1, T, 1, 1)
    j = torch.arange(max(NS, n), device=scores.device)
    s = torch.nn.functional.pad(scores, (0, max(NS, n) - NS), value=float("-inf"))
    s = s.masked_fill(j > cur, float("-inf")).masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf"))
    bits = s.view(torch.int32).long()
    order = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order as integer order
    key = (order << 32) | (0xFFFFFFFF - j)
    top = torch.topk(key, n, dim=-1).values
    ids = 0xFFFFFFFF - (top & 0xFFFFFFFF)
    taken = torch.gather(s, -1, ids) > float("-inf")  # fewer visible blocks than n: -1 slots
    big = torch.iinfo(torch.long).max
    ids = torch.where(taken, ids, torch.full_like(ids, big)).sort(-1).values
    return torch.where(ids == big, torch.full_like(ids, -1), ids).to(torch.int32)


def select_blocks(q, k_cmp, lse_cmp, n: int, l: int, d: int, l_sel: int, scale: float,
                  qseq: SeqInfo, kseq: SeqInfo) -> torch.Tensor:
    """block_indices `[B, T, H, n]` chosen from the compressed attention (its LSE reused)."""
    return select_from_scores(block_scores(q, k_cmp, lse_cmp, l, d, l_sel, scale, qseq, kseq), n, l_sel, qseq)
