"""Context parallelism: one long sequence's NSA spread over the ranks of a `torch.distributed` group.

Each rank holds a shard of the sequence ([B, T/P, ...]: its queries, keys, values and gates) and
returns its shard of the output. The keys and values are few next to the queries (H kv heads against
HQ query heads), so every rank all-gathers them, compresses the whole stream itself (a compression
block that straddles two ranks is then nothing special) and attends its own queries, at their global
positions, over all the keys. Backward: the gradients that a rank's queries leave on every key and
value are summed over the ranks and scattered back to the keys' owners (one reduce-scatter); dQ and
the gates' gradients stay local. No rank holds the whole sequence's Q, O or scores.

Layouts (how the T tokens are dealt out, `shard_ranges`): "contiguous", rank r holds tokens
r·T/P … (r+1)·T/P - 1; "zigzag", the sequence cut into 2P chunks, rank r holds chunks r and 2P-1-r
(an early and a late chunk: under the causal mask every rank has about the same work).

On the CPU the attention is the float32 reference (reference/naive.py). On CUDA a group of one rank
runs `nsa()` on the kernels; more ranks need the kernels to take queries at an offset (not yet).
docs/context-parallel.md has the algorithm's costs and how to launch it under torchrun.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from reference import compress_kv, naive_nsa_branches, naive_nsa_full
from reference.checks import (check_compression, check_gate, check_positive_int, check_qkv, check_scale,
                              check_window_size)
from reference.naive import Phi, compute_dtype

LAYOUTS = ("contiguous", "zigzag")
KERNELS_MISSING = ("context parallel NSA on CUDA with more than one rank needs the kernels to take queries at an offset "
                   "(compressed attention, the top-n selection, selected and sliding attention, forward and backward, "
                   "for queries at global positions q_offset … q_offset+Tq-1 over keys [0, T)): not wired yet. The CPU "
                   "runs the reference; a group of one rank runs nsa().")

# torch >= 2.13 names the single-tensor collectives *_single; older ones *_into_tensor / *_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _pieces(layout: str, world: int) -> int:
    """How many equal pieces the sequence is cut into."""
    return world if layout == "contiguous" else 2 * world


def shard_ranges(T: int, rank: int, world: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The token ranges [start, end) that `rank` of `world` holds, in the order its shard stores them:
    one range ("contiguous") or two ("zigzag": chunks rank and 2·world-1-rank of T/(2·world) tokens).

    T must be a multiple of world ("contiguous") or of 2·world ("zigzag"): pad the sequence's end if
    it is not (NSA is causal, so padding after the last token changes no real token's output)."""
    check_layout(layout)
    check_positive_int(world, "world")
    check_positive_int(T, "T")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
    n = _pieces(layout, world)
    if T % n != 0:
        raise ValueError(f"the {layout!r} layout over {world} ranks cuts the sequence into {n} equal pieces: T must be "
                         f"a multiple of {n}, got T={T} (pad the end: causal attention leaves earlier tokens unchanged)")
    c = T // n
    if layout == "contiguous":
        return [(rank * c, (rank + 1) * c)]
    return [(rank * c, (rank + 1) * c), ((n - 1 - rank) * c, (n - rank) * c)]


def shard_sequence(x: torch.Tensor, rank: int, world: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of x along dim (the sequence, length T): `[..., T/world, ...]`."""
    ranges = shard_ranges(x.shape[dim], rank, world, layout)
    return torch.cat([x.narrow(dim, s, e - s) for s, e in ranges], dim)


def unshard_sequence(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (shards[r] from rank r, equal lengths along dim)."""
    check_layout(layout)
    if len(shards) == 0:
        raise ValueError("unshard_sequence needs one shard per rank, got none")
    n = shards[0].shape[dim]
    if any(s.shape[dim] != n for s in shards):
        raise ValueError(f"every shard must have the same length along dim {dim}, got {[s.shape[dim] for s in shards]}")
    if layout == "contiguous":
        return torch.cat(list(shards), dim)
    if n % 2 != 0:
        raise ValueError(f"a zigzag shard holds two equal chunks: its length must be even, got {n}")
    early = [s.narrow(dim, 0, n // 2) for s in shards]
    late = [s.narrow(dim, n // 2, n // 2) for s in reversed(shards)]
    return torch.cat(early + late, dim)


# ----------------------------------------------------------------------------------------------
# the collectives
# ----------------------------------------------------------------------------------------------


def group_rank(group) -> tuple[int, int]:
    """(size, this process's rank) of group (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialized (dist.init_process_group) and a "
                           "process group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return world, rank


class _GatherSequence(torch.autograd.Function):
    """Every rank's shards `[B, T/P, ...]` -> the whole sequences `[B, T, ...]`, on every rank, for
    tensors of one dtype packed into one buffer (one all-gather). Backward: each token's gradient
    summed over the ranks and left with its owner, again one buffer: a reduce-scatter (which gloo
    runs as an all-reduce and keeps its own part; NCCL as a real reduce-scatter)."""

    @staticmethod
    def forward(ctx, group, layout, *shards):
        world, _ = group_rank(group)
        B, Tl = shards[0].shape[:2]
        widths = [math.prod(x.shape[2:]) for x in shards]
        flat = torch.cat([x.reshape(B, Tl, -1) for x in shards], -1).contiguous()
        out = flat.new_empty(world * B, Tl, flat.shape[-1])
        _all_gather(out, flat, group=group)
        full = unshard_sequence(list(out.view(world, B, Tl, -1).unbind(0)), layout)
        ctx.group, ctx.layout, ctx.widths, ctx.shapes = group, layout, widths, [x.shape for x in shards]
        ctx.world = world
        parts = full.split(widths, -1)
        return tuple(p.reshape(B, full.shape[1], *x.shape[2:]) for p, x in zip(parts, shards))

    @staticmethod
    def backward(ctx, *grads):
        B, T = grads[0].shape[:2]
        g = torch.cat([x.reshape(B, T, -1) for x in grads], -1)
        pieces = torch.stack([shard_sequence(g, r, ctx.world, ctx.layout) for r in range(ctx.world)], 0)
        mine = g.new_empty(pieces.shape[1:])
        _reduce_scatter(mine, pieces.reshape(-1, *pieces.shape[2:]).contiguous(), group=ctx.group)
        parts = mine.split(ctx.widths, -1)
        return (None, None, *(p.reshape(s) for p, s in zip(parts, ctx.shapes)))


def gather_sequence(shards: Sequence[torch.Tensor], group=None, layout: str = "zigzag") -> list[torch.Tensor]:
    """The whole sequences `[B, T, ...]` of these shards `[B, T/P, ...]` (one dtype, equal B and T/P)
    on every rank of group, in one all-gather; differentiable (the backward is one reduce-scatter)."""
    return list(_GatherSequence.apply(group, check_layout(layout), *shards))


# ----------------------------------------------------------------------------------------------
# the handshake: one small all-gather that makes every rank raise the same error, instead of some
# ranks waiting forever in the K/V gather for one that gave up
# ----------------------------------------------------------------------------------------------


def float_bits(x: float) -> int:
    """A float as the int64 of its bits, to compare it across ranks exactly."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _as_int(x) -> int:
    """An int as it is; anything else (a dtype, a configuration tuple) as the CRC-32 of its repr, equal
    across ranks when the reprs are (Python's own hash of a str differs between processes)."""
    return x if isinstance(x, int) else zlib.crc32(repr(x).encode())


def check_ranks_agree(names: Sequence[str], values: Optional[Sequence], group, device,
                      error: Optional[BaseException] = None) -> None:
    """One all-gather of each rank's (ok, *values): then every rank raises if a rank failed its own
    checks (that rank its own `error`, the others a ValueError naming it) or if the ranks disagree on
    a value (a ValueError naming it and each rank's). Every rank of group must call it, with the same
    names; a failing rank passes its error and values=None. Values: ints, or anything with a repr."""
    world, _ = group_rank(group)
    row = [0] * (1 + len(names)) if error is not None else [1, *map(_as_int, values)]
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = mine.new_empty(world * len(row))
    _all_gather(rows, mine, group=group)
    rows = rows.view(world, len(row)).tolist()
    if error is not None:
        raise error
    failed = [r for r in range(world) if rows[r][0] == 0]
    if failed:
        raise ValueError(f"context parallel NSA: rank(s) {failed} of the group rejected their arguments (their own "
                         f"error says why); no rank has started the K/V gather")
    for i, name in enumerate(names, start=1):
        values = [rows[r][i] for r in range(world)]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"context parallel NSA: the ranks of the group disagree on {name} ({shown}); every "
                             f"rank must pass an equal shard of the sequence and the same configuration")


# ----------------------------------------------------------------------------------------------
# the attention
# ----------------------------------------------------------------------------------------------


def context_parallel_branches(q, kv_cmp, kv_slc, kv_swa, gates, *, group, layout: str, phi: Phi, l: int, d: int,
                              l_sel: int, n: int, W: int, scale: float) -> torch.Tensor:
    """The three gated branches over the whole sequence for this rank's queries q `[B, T/P, HQ, K]`,
    each branch with its own shards of keys and values (pairs `[B, T/P, H, K]`, `[B, T/P, H, V]`; a
    pair serving several branches is gathered once, all in one all-gather); the compressed branch's
    pair is compressed with phi after the gather. gates: (g_cmp, g_slc, g_swa) shards or None.
    Arguments validated, and agreed on by the ranks (check_ranks_agree), by the caller; on the
    reference. Returns o `[B, T/P, HQ, V]` in q's dtype."""
    world, rank = group_rank(group)
    pairs = [kv_cmp, kv_slc] + ([kv_swa] if W > 0 else [])
    shards = []
    for x in (x for pair in pairs for x in pair):
        if not any(x is y for y in shards):
            shards.append(x)
    # gathered in the inputs' dtype (half the bytes of float32 for bf16), then computed as the reference
    # computes (compute_dtype: the compression too, as naive_nsa_full does)
    cdt = compute_dtype(q.dtype)
    full = {id(x): y.to(cdt) for x, y in zip(shards, gather_sequence(shards, group, layout))}
    kv_cmp_full = compress_kv(full[id(kv_cmp[0])], full[id(kv_cmp[1])], l, d, phi)
    kv_slc_full = (full[id(kv_slc[0])], full[id(kv_slc[1])])
    kv_swa_full = None
    if W > 0:
        kv_swa_full = kv_slc_full if kv_swa is kv_slc else (full[id(kv_swa[0])], full[id(kv_swa[1])])
    outs, lo, qf = [], 0, q.to(cdt)
    for s, e in shard_ranges(q.shape[1] * world, rank, world, layout):  # the rank's chunks, one by one
        part = slice(lo, lo + e - s)
        g = [None if x is None else x[:, part] for x in gates]
        o, _ = naive_nsa_branches(qf[:, part], kv_cmp_full, kv_slc_full, kv_swa_full, *g, block_counts=n,
                                  block_size=l_sel, window_size=W, compress_block=l, compress_stride=d, scale=scale,
                                  q_offset=s)
        outs.append(o)
        lo += e - s
    return torch.cat(outs, 1).to(q.dtype)


def context_parallel_nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: Optional[torch.Tensor] = None,
    g_slc: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
    *,
    group,
    block_counts: int = 16,
    block_size: int = 64,
    window_size: int = 0,
    scale: Optional[float] = None,
    compress_block: int = 32,
    compress_stride: int = 16,
    layout: str = "zigzag",
) -> torch.Tensor:
    r"""NSA (`nsa()` / `reference.naive_nsa_full`, mean-pooled compression) of one sequence whose
    tokens are spread over the ranks of `group`; each rank calls it with its own shard.

    Args:
        q: this rank's queries `[B, T/P, HQ, K]`, the tokens `shard_ranges(T, rank, P, layout)` in that
            order (`shard_sequence` cuts them); P = the group's size, T = P · (T/P) the whole length.
        k, v: the same tokens' keys `[B, T/P, H, K]` and values `[B, T/P, H, V]`.
        g_cmp, g_slc, g_swa: the same tokens' gates `[B, T/P, HQ]`; None means 1 (on every rank).
        group: the process group (None: the default one). Every rank of it must call this function
            with an equal shard length and the same configuration, else all of them raise ValueError.
        block_counts: n, blocks selected per token (>= 3); block_size: l'; window_size: W (0: no
            sliding branch); scale: default K ** -0.5; compress_block, compress_stride: l and d.
        layout: "zigzag" (T a multiple of 2P) or "contiguous" (T a multiple of P); see shard_ranges.
            T need not be a multiple of l, d or l'.

    Returns:
        this rank's output shard `[B, T/P, HQ, V]` in q's dtype, differentiable in q, k, v and the
        gates: each rank's backward returns its own shards' gradients (the keys' and values' summed
        over the ranks whose queries read them), so every rank of the group must run the backward.

    On the CPU it computes the reference; on CUDA a group of one rank calls `nsa()`, more ranks raise
    NotImplementedError until the kernels take queries at an offset.
    """
    world, _ = group_rank(group)
    error, fields = None, None
    try:
        fields = _check_local(q, k, v, (g_cmp, g_slc, g_swa), block_counts, block_size, window_size, scale,
                              compress_block, compress_stride, layout, world)
    except (TypeError, ValueError) as e:  # raised below, once the other ranks know (check_ranks_agree)
        error = e
    if world == 1:  # nothing to gather, nobody to wait for
        if error is not None:
            raise error
        kw = dict(block_counts=block_counts, block_size=block_size, window_size=window_size, scale=scale,
                  compress_block=compress_block, compress_stride=compress_stride)
        if q.is_cuda:
            from .nsa import nsa
            return nsa(q, k, v, g_cmp, g_slc, g_swa, **kw)
        return naive_nsa_full(q, k, v, g_cmp, g_slc, g_swa, **kw)[0]
    if error is None and q.is_cuda:
        raise NotImplementedError(KERNELS_MISSING)
    check_ranks_agree(_NSA_FIELDS, fields, group, q.device if isinstance(q, torch.Tensor) else "cpu", error)
    kv = (k, v)
    return context_parallel_branches(q, kv, kv, kv, (g_cmp, g_slc, g_swa), group=group, layout=layout, phi="mean",
                                     l=compress_block, d=compress_stride, l_sel=block_size, n=block_counts,
                                     W=window_size, scale=check_scale(scale, q.shape[-1]))


_NSA_FIELDS = ("the batch size B", "the shard length T/P", "the query heads HQ", "the kv heads H", "the key dim K",
               "the value dim V", "the dtype", "the device type", "whether g_cmp is given", "whether g_slc is given",
               "whether g_swa is given", "the block_counts (n)", "the block_size (l')", "the window_size (W)",
               "the compress_block (l)", "the compress_stride (d)", "the scale (its bits)", "the layout",
               "whether k/v need gradients")


def _check_local(q, k, v, gates, n, l_sel, W, scale, l, d, layout, world) -> list:
    """This rank's own checks (no collective); returns the fields every rank must agree on."""
    B, Tl, HQ, H, K, V = check_qkv(q, k, v)
    for name, g in zip(("g_cmp", "g_slc", "g_swa"), gates):
        check_gate(g, name, B, Tl, HQ, q)
    check_compression(l, d, l_sel)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"block_counts must be an int (blocks per token), got {type(n).__name__}")
    check_positive_int(n, "block_counts", minimum=3)
    W = check_window_size(W)
    scale = check_scale(scale, K)
    check_layout(layout)
    if layout == "zigzag" and world > 1 and Tl % 2 != 0:
        raise ValueError(f"a zigzag shard holds two equal chunks of the sequence: its length T/P must be even "
                         f"(T a multiple of 2P = {2 * world}), got T/P = {Tl}")
    needs_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)  # the backward's reduce-scatter
    return [B, Tl, HQ, H, K, V, q.dtype, q.device.type,
            *(int(g is not None) for g in gates), n, l_sel, W, l, d, float_bits(scale), LAYOUTS.index(layout),
            int(needs_grad)]
