"""One vectorized input factory for tests, benchmarks and examples (no Python loops over tokens)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .naive import token_positions


def make_generator(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def random_qkv(B, T, HQ, H, K, V, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    """Random q `[B, T, HQ, K]`, k `[B, T, H, K]`, v `[B, T, H, V]` (standard normal)."""
    g = make_generator(seed, device)
    q = torch.randn(B, T, HQ, K, generator=g, device=device).to(dtype)
    k = torch.randn(B, T, H, K, generator=g, device=device).to(dtype)
    v = torch.randn(B, T, H, V, generator=g, device=device).to(dtype)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def random_gates(B, T, HQ, dtype=torch.float32, device="cpu", seed=1, requires_grad=False):
    """Gates `[B, T, HQ]` in (0, 1), as a sigmoid gate would give."""
    g = make_generator(seed, device)
    return torch.rand(B, T, HQ, generator=g, device=device).to(dtype).requires_grad_(requires_grad)


def random_cu_seqlens(T: int, N: int, min_len: int = 1, device="cpu", seed=2) -> torch.Tensor:
    """`[N+1]` offsets of N sequences of uneven lengths (each >= min_len) summing to T."""
    if N * min_len > T:
        raise ValueError(f"cannot split T={T} into N={N} sequences of at least {min_len} tokens")
    g = make_generator(seed)
    rest = T - N * min_len
    w = torch.rand(N, generator=g) ** 2  # squared: deliberately uneven lengths
    extras = (w / w.sum() * rest).floor().long()
    extras[-1] += rest - int(extras.sum())
    lens = extras + min_len
    return torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(device)


def random_block_indices(
    B: int,
    T: int,
    H: int,
    S: int,
    block_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    device="cpu",
    seed: int = 3,
    adversarial: float = 0.0,
) -> torch.Tensor:
    """Block ids `[B, T, H, S]` (int32): for each (token, kv head) S distinct random blocks among those
    that start at or before the token (as fla's benchmark draws them), sorted, -1 where fewer exist.

    adversarial: the fraction of slots replaced by hostile ids: -1, blocks that start after t,
    ids past the sequence's last block (and past the tensor's end) and duplicates of another slot.
    """
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()
    pos = token_positions(offsets, T, device)  # [T]
    if offsets is None:
        lens = torch.full((T,), T, device=device)  # each token's sequence length
    else:
        seq_lens = torch.diff(cu_seqlens.to(device).long())
        lens = torch.repeat_interleave(seq_lens, seq_lens)
    NB = math.ceil(int(lens.max()) / block_size)
    g = make_generator(seed, device)
    out = torch.empty(B, T, H, S, dtype=torch.int32, device=device)
    chunk = max(1, (1 << 24) // max(1, B * H * NB))
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        visible = (pos[c0:c1] // block_size + 1).view(1, -1, 1, 1)
        score = torch.rand(B, c1 - c0, H, NB, generator=g, device=device)
        score = score.masked_fill(torch.arange(NB, device=device) >= visible, -1.0)
        top = score.topk(min(S, NB), dim=-1)
        ids = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
        if S > NB:
            ids = torch.nn.functional.pad(ids, (0, S - NB), value=-1)
        big = torch.iinfo(torch.int32).max
        ids = torch.where(ids >= 0, ids, torch.full_like(ids, big)).sort(-1).values
        out[:, c0:c1] = torch.where(ids == big, torch.full_like(ids, -1), ids).to(torch.int32)
    if adversarial > 0:
        out = _make_hostile(out, pos, lens, block_size, adversarial, g)
    return out


def local_block_indices(
    B: int,
    T: int,
    H: int,
    S: int,
    block_size: int,
    device="cpu",
    seed: int = 5,
    run: int = 64,
    noise: float = 0.1,
) -> torch.Tensor:
    """Block ids `[B, T, H, S]` (int32) as a trained NSA model tends to choose them: neighbouring
    tokens pick mostly the same blocks (one sequence per batch row).

    A synthetic model: each (batch row, kv head) has a fixed importance per block, Zipf-like (a few
    blocks matter to everyone, most little), plus a small fresh perturbation every `run` tokens
    (`noise`, relative to the spread of importances). The scores go through the selection rule
    (`naive.select_blocks`: block 0 and the two local blocks forced, then the S - 3 most important
    blocks visible to the token, ascending, -1 padding). Tokens of one run and one selection block
    share their ids exactly; the set drifts slowly from run to run, as attention to a long context
    does, instead of being drawn afresh per token as random_block_indices draws it.
    """
    from .naive import select_blocks

    NB = math.ceil(T / block_size)
    g = make_generator(seed, device)
    rank = torch.rand(B, 1, H, NB, generator=g, device=device).argsort(-1).argsort(-1).float()
    importance = 1.0 / (1.0 + rank)  # Zipf over a random order of the blocks
    n_runs = math.ceil(T / run)
    out = torch.empty(B, T, H, S, dtype=torch.int32, device=device)
    runs_per_chunk = max(1, (1 << 22) // max(1, B * H * NB * run))
    for r0 in range(0, n_runs, runs_per_chunk):
        r1 = min(n_runs, r0 + runs_per_chunk)
        t0, t1 = r0 * run, min(T, r1 * run)
        jitter = torch.rand(B, r1 - r0, H, NB, generator=g, device=device) * noise * importance
        score = (importance + jitter).repeat_interleave(run, dim=1)[:, : t1 - t0]
        pos = torch.arange(t0, t1, device=device)
        out[:, t0:t1] = select_blocks(score, S, block_size, positions=pos).to(torch.int32)
    return out


def _make_hostile(ids, pos, lens, block_size, fraction, g):
    B, T, H, S = ids.shape
    dev = ids.device
    hit = torch.rand(B, T, H, S, generator=g, device=dev) < fraction
    kind = torch.randint(0, 4, (B, T, H, S), generator=g, device=dev)
    cur = (pos // block_size).view(1, T, 1, 1)
    last = ((lens - 1) // block_size).view(1, T, 1, 1)
    future = cur + 1 + torch.randint(0, 3, (B, T, H, S), generator=g, device=dev)
    past_end = last + 1 + torch.randint(0, 1 << 12, (B, T, H, S), generator=g, device=dev)
    dup = torch.gather(ids, -1, torch.randint(0, S, (B, T, H, S), generator=g, device=dev))
    hostile = torch.stack([torch.full_like(ids, -1), future.to(ids.dtype), past_end.to(ids.dtype), dup], 0)
    return torch.where(hit, torch.gather(hostile, 0, kind[None].long()).squeeze(0), ids)


def random_block_counts(B: int, T: int, H: int, S: int, device="cpu", seed: int = 4) -> torch.Tensor:
    """Per-(token, kv head) slot counts `[B, T, H]` (int32) uniform in [0, S]."""
    g = make_generator(seed, device)
    return torch.randint(0, S + 1, (B, T, H), generator=g, device=device, dtype=torch.int32)
