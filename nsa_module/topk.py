"""Top-n block selection (paper Eqs. 8–12).

`select_blocks` (what nsa() and the layer use) chooses on chip, in the kernel that computes the
block scores, and equals `reference.select_blocks(reference.selection_scores(p_cmp, ...), ...)`:
block 0 and the two local blocks always, then the highest scores among blocks starting at or
before t, ties toward the lower id, sorted ascending, -1 padding. `block_scores` +
`select_from_masked` compute the same in two steps through a `[B, T, H, T/l']` score matrix (kept
for tests and tools).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from kernels import topk as K_topk
from kernels.common import tl_dtype

from .common import SeqInfo, device_tensor, empty


@lru_cache(maxsize=16)
def query_tiles(lengths: tuple, BM: int, device: str) -> torch.Tensor:
    """First row of each tile of BM tokens, tiles never straddling a sequence (cached per layout)."""
    starts, s = [], 0
    for n in lengths:
        starts += range(s, s + n, BM)
        s += n
    return device_tensor(starts, torch.int32, device)


def block_scores(q, k_cmp, lse_cmp, l: int, d: int, l_sel: int, scale: float, qseq: SeqInfo, kseq: SeqInfo):
    """Masked scores `[B, T, H, NS]` (fp32) of every selection block for each token and kv head, NS
    the longest sequence's block count: +inf for the forced blocks (0 and the two local ones), -inf
    for blocks after the token's own, else the Eq. 9-10 score."""
    B, T, HQ, Kd = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    NS = -(-max(qseq.lengths) // l_sel)
    # -inf where the kernel writes nothing (blocks past a tile's last token)
    scores = torch.full((B, T, H, NS), float("-inf"), dtype=torch.float32, device=q.device)
    cfg = K_topk.pick_config(G, Kd, l, d, l_sel)
    tiles = query_tiles(tuple(qseq.lengths), cfg["BM"], str(q.device))
    K_topk.block_scores(H, G, Kd, l, d, l_sel, tl_dtype(q.dtype), scale, **cfg)(
        q, k_cmp, lse_cmp, tiles, qseq.offsets, qseq.tok_seq, kseq.offsets, scores)
    return scores


def mask_scores(scores: torch.Tensor, l_sel: int, positions: torch.Tensor) -> torch.Tensor:
    """Raw scores `[B, T, H, NS]` -> masked as block_scores returns them; positions `[T]` or `[B, T]`
    (decoding: one token per sequence, each at its own position) are the tokens' positions in their
    sequences."""
    B, T, H, NS = scores.shape
    cur = (positions // l_sel).view(-1 if positions.dim() == 2 else 1, T, 1, 1)
    j = torch.arange(NS, device=scores.device)
    return scores.masked_fill(j > cur, float("-inf")).masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf"))


def _select_exact(s: torch.Tensor, n: int) -> torch.Tensor:
    """Top-n ids of masked scores, ties toward the lower id, as int64 keys (score bits in sortable
    order, then the complemented id) so top-k needs no stable sort. Slower: fallback for ties."""
    j = torch.arange(s.shape[-1], device=s.device)
    bits = s.contiguous().view(torch.int32).long()
    order = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order as integer order
    key = (order << 32) | (0xFFFFFFFF - j)
    top = torch.topk(key, n, dim=-1).values
    return 0xFFFFFFFF - (top & 0xFFFFFFFF)


# Below this many scores the exact int64 ranking of every row is cheaper than the fp32 path's host
# sync (H100, nsa() forward: 8k and 16k were 1.1 and 0.6 ms slower with the sync, 32k 4.4 ms faster).
FAST_SELECT_MIN_SCORES = 1 << 25


def select_from_masked(s: torch.Tensor, n: int, fast: Optional[bool] = None) -> torch.Tensor:
    """block_indices `[..., n]` (int32) from masked scores `[..., NS]` (see module docstring).

    Exact (fast=False): every row ranked by int64 keys, ties toward the lower id; no host sync.
    Fast (fast=True, the default from FAST_SELECT_MIN_SCORES scores on): one fp32 top-(n+1) per row.
    Where the n-th and (n+1)-th values differ the top-n set is unique whatever order top-k gives
    ties inside it; rows where they are equal (a tie across the cut: integer scores, probabilities
    that underflowed to 0) are redone exactly. Same result; one host sync to find those rows.
    """
    if s.shape[-1] < n + 1:
        s = torch.nn.functional.pad(s, (0, n + 1 - s.shape[-1]), value=float("-inf"))
    if fast is None:
        fast = s.numel() >= FAST_SELECT_MIN_SCORES
    if not fast:
        ids = _select_exact(s, n)
        return _sorted_taken(ids, torch.gather(s, -1, ids))
    vals, ids = torch.topk(s, n + 1, dim=-1)
    tie = (vals[..., n - 1] == vals[..., n]) & (vals[..., n - 1] > float("-inf"))
    ids, vals = ids[..., :n], vals[..., :n]
    if tie.any():
        ids = ids.clone()
        ids[tie] = _select_exact(s[tie], n)
        vals = vals.clone()
        vals[tie] = torch.gather(s[tie], -1, ids[tie])
    return _sorted_taken(ids, vals)


def _sorted_taken(ids: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Chosen ids ascending, -1 for the slots whose score is -inf (fewer visible blocks than n)."""
    big = torch.iinfo(torch.long).max
    ids = torch.where(vals > float("-inf"), ids, torch.full_like(ids, big)).sort(-1).values  # -inf: not taken
    return torch.where(ids == big, torch.full_like(ids, -1), ids).to(torch.int32)


def select_from_scores(scores: torch.Tensor, n: int, l_sel: int, qseq: SeqInfo, fast: Optional[bool] = None) -> torch.Tensor:
    """block_indices `[B, T, H, n]` (int32) from raw scores `[B, T, H, NS]`."""
    return select_from_masked(mask_scores(scores, l_sel, qseq.positions()), n, fast)


def select_blocks(q, k_cmp, lse_cmp, n: int, l: int, d: int, l_sel: int, scale: float,
                  qseq: SeqInfo, kseq: SeqInfo) -> torch.Tensor:
    """block_indices `[B, T, H, n]` (int32) chosen from the compressed attention (its LSE reused), on
    chip: no score matrix, no host sync (kernels/topk.block_topn). An n whose running lists would
    not fit in shared memory (kernels/topk.topn_smem) takes the score matrix and the exact int64
    ranking instead: the same ids, no host sync either."""
    B, T, HQ, Kd = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    cfg = K_topk.pick_topn_config(G, Kd, l, d, l_sel, n)
    if K_topk.topn_smem(G, Kd, l, d, l_sel, n, merge=cfg["merge"], JT=cfg["JT"]) > K_topk.TOPN_SMEM:
        return select_from_masked(block_scores(q, k_cmp, lse_cmp, l, d, l_sel, scale, qseq, kseq), n, fast=False)
    ids = empty(B, T, H, n, dtype=torch.int32, device=q.device)
    tiles = query_tiles(tuple(qseq.lengths), cfg["BM"], str(q.device))
    K_topk.block_topn(H, G, Kd, l, d, l_sel, n, tl_dtype(q.dtype), scale, **cfg)(
        q, k_cmp, lse_cmp, tiles, qseq.offsets, qseq.tok_seq, kseq.offsets, ids)
    return ids
