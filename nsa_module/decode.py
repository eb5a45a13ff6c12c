"""One decode step of NSA on the kernels (kernels/decode.py): N sequences, one new query token each.

    o_cmp, logits  = attend(q, compressed stream)            # split over programs
    ids            = top-n of the Eq. 9-10 block scores        # from the logits and the merged LSE
    o_slc, o_swa   = attend(q, the n selected blocks), attend(q, the sliding ring)
    o              = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa    # LSE merge of the partials

Three launches (four past FUSE_SELECT_MAX_BLOCKS blocks: the selection on its own), no host sync,
nothing read back: a step can be captured in a CUDA graph. Semantics
are the reference's (reference/naive.py with `positions`): the new token is at position
t = length - 1 of its sequence and already in the caches.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch

from kernels import decode as K_dec
from kernels.common import tl_dtype

from .common import check_kernel_dims, empty, kernel_ready, sm_count, split_arg

CMP_TILE = 32  # compressed keys per tile of the compressed-branch kernel (32: 11 programs per SM, 64: 6)
CMP_ASYNC = False  # its tiles as cp.async copies: slower on the H100 (docs/perf-notes.md)
SPARSE_TILE = 32  # rows per tile of the selected/sliding kernel (a block of l' is l' / 32 tiles)
# Up to this many selection blocks (16k tokens at l' = 64) every split of the selected/sliding kernel
# chooses the blocks itself (three launches); beyond, one 1024-thread program per kv head does it
# first (four): its Σ_g p_cmp pass needs the threads (docs/perf-notes.md).
FUSE_SELECT_MAX_BLOCKS = 256
SELECT_THREADS = 1024
# The combine: wide programs (512 threads) while the grid fits in one wave, where a step has few
# sequences and many partials; narrow ones beyond (a B = 16 step has 1024 programs and ~19 partials
# a head). NSA_DECODE_COMBINE_WIDE_MAX overrides it for experiments.
COMBINE_WIDE_MAX_PROGRAMS = int(os.environ.get("NSA_DECODE_COMBINE_WIDE_MAX", 512))
# decode is memory bound: enough small programs to keep loads in flight (NSA_DECODE_PROGRAMS_PER_SM
# overrides it for experiments)
PROGRAMS_PER_SM = int(os.environ.get("NSA_DECODE_PROGRAMS_PER_SM", 4))


@lru_cache(maxsize=None)
def _kernels(H, G, K, V, l, d, l_sel, n, window, NB_MAX, dtype, scale, cmp_tile=CMP_TILE, cmp_async=CMP_ASYNC,
             sparse_tile=SPARSE_TILE):
    """(compressed, select or None, sparse, {threads: combine}) kernels for one configuration; the
    selection is fused into the sparse kernel up to FUSE_SELECT_MAX_BLOCKS blocks."""
    fuse = NB_MAX <= FUSE_SELECT_MAX_BLOCKS
    return (K_dec.decode_compressed(H, G, K, V, cmp_tile, dtype, scale, **K_dec.pick_config(G), async_copy=cmp_async),
            None if fuse else K_dec.decode_select(H, G, l, d, l_sel, n, NB_MAX, threads=SELECT_THREADS),
            K_dec.decode_sparse(H, G, K, V, l, d, l_sel, n, NB_MAX, window, fuse, dtype, scale,
                                BT=min(l_sel, sparse_tile), **K_dec.pick_sparse_config(G, n, fuse)),
            {t: K_dec.decode_combine(H * G, V, window, dtype, threads=t) for t in _combine_threads(V)})


def _combine_threads(V):
    """The combine's two sizes: narrow (a few slices of the partials per column) and wide (16
    slices at V = 128: one round of loads for ~80 partials)."""
    return max(128, -(-V // 32) * 32), 512


def _splits(tiles: int, programs: int, device) -> int:
    """Programs per (sequence, kv head, branch): enough to fill the GPU, at most one per tile (and
    at most the MAX_SPLITS the merges unroll over)."""
    return max(1, min(tiles, K_dec.MAX_SPLITS, -(-PROGRAMS_PER_SM * sm_count(device) // programs)))


def _check(name, t, shape, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"nsa_decode: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and a != s for a, s in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"nsa_decode: {name} must have shape {want}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"nsa_decode: {name} must be {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"nsa_decode: {name} must be on {device}, got {t.device}")


def _ints(name, t, N, device):
    _check(name, t, [N], device=device)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"nsa_decode: {name} must be an integer tensor, got {t.dtype}")
    return kernel_ready(t.to(torch.int32))


def decode_launches(q, k_cmp, v_cmp, num_cmp, k_slc, v_slc, lengths, k_swa, v_swa, swa_count, gates,
                    l: int, d: int, l_sel: int, n: int, scale: float):
    """One step, validated and allocated, as its kernel launches [(name, launch)] (three, or four for
    long caches, see FUSE_SELECT_MAX_BLOCKS) and the
    outputs they fill. q `[N, HQ, K]`; compressed stream k/v_cmp `[N, C, H, K|V]` holding num_cmp `[N]`
    tokens; raw selected-branch cache k/v_slc `[N, CAP, H, K|V]` holding lengths `[N]` tokens (the
    new one included; at least 1); sliding ring k/v_swa `[N, W, H, K|V]` with swa_count `[N]`
    entries ever written (None: no window); gates (g_cmp, g_slc, g_swa) `[N, HQ]`.

    The counts are trusted to match the caches (num_cmp = (length - l) // d + 1 or 0, lengths <= CAP);
    they stay on the device, so nothing here waits for the GPU."""
    _check("q", q, [None, None, None])
    N, HQ, Kd = q.shape
    dev = q.device
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"nsa_decode takes float16 or bfloat16 q and caches, got q {q.dtype}")
    _check("k_slc", k_slc, [N, None, None, Kd], q.dtype, dev)
    H, CAP = k_slc.shape[2], k_slc.shape[1]
    _check("v_slc", v_slc, [N, CAP, H, None], q.dtype, dev)
    V = v_slc.shape[-1]
    check_kernel_dims(q, HQ, H, Kd, V, "nsa_decode")
    if HQ % H != 0:
        raise ValueError(f"nsa_decode: q's heads HQ={HQ} must be a multiple of the caches' H={H}")
    _check("k_cmp", k_cmp, [N, None, H, Kd], q.dtype, dev)
    _check("v_cmp", v_cmp, [N, k_cmp.shape[1], H, V], q.dtype, dev)
    window = k_swa is not None
    if window:
        _check("k_swa", k_swa, [N, None, H, Kd], q.dtype, dev)
        _check("v_swa", v_swa, [N, k_swa.shape[1], H, V], q.dtype, dev)
    if not isinstance(gates, (tuple, list)) or len(gates) != 3:
        raise TypeError("nsa_decode: gates must be (g_cmp, g_slc, g_swa)")
    for name, g in zip(("g_cmp", "g_slc", "g_swa"), gates):
        _check(name, g, [N, HQ], device=dev)
    NB_MAX = K_dec.select_blocks_max(CAP, d, l_sel)
    if NB_MAX == 0:
        raise ValueError(f"nsa_decode: a cache of {CAP} tokens has more selection blocks of {l_sel} than the "
                         "selection kernel holds in shared memory")
    num_cmp = _ints("num_cmp", num_cmp, N, dev)
    lengths = _ints("lengths", lengths, N, dev)
    if window:
        swa_count = _ints("swa_count", swa_count, N, dev)
    if dev.type != "cuda":
        raise ValueError(f"nsa_decode runs TileLang kernels on CUDA tensors, got q on {dev}")

    G = HQ // H
    dt = tl_dtype(q.dtype)
    k_c, k_s, k_p, k_o = _kernels(H, G, Kd, V, l, d, l_sel, n, window, NB_MAX, dt, float(scale), CMP_TILE, CMP_ASYNC,
                                  SPARSE_TILE)
    CC = k_cmp.shape[1]
    ns1 = _splits(-(-CC // CMP_TILE), N * H, dev)
    bt = min(l_sel, SPARSE_TILE)
    win_tiles = -(-k_swa.shape[1] // bt) if window else 0
    ns3 = _splits(max(n * (l_sel // bt), win_tiles), N * H * (2 if window else 1), dev)
    nst = ns1 + ns3 * (2 if window else 1)
    s1, s3 = split_arg(ns1, dev), split_arg(ns3, dev)
    # the kernels index dense, 16-byte aligned caches: a strided or offset view is copied (a no-op
    # for the layer's buffers)
    q, k_cmp, v_cmp, k_slc, v_slc = map(kernel_ready, (q, k_cmp, v_cmp, k_slc, v_slc))
    if window:
        k_swa, v_swa = kernel_ready(k_swa), kernel_ready(v_swa)
    logits = torch.empty(N, HQ, CC, dtype=torch.float32, device=dev)
    o_part = empty(N, HQ, nst, V, dtype=torch.float32, device=dev)
    lse_part = empty(N, HQ, nst, dtype=torch.float32, device=dev)
    if not window:  # the kernels' sliding arguments, never read
        k_swa, v_swa, swa_count = q.new_zeros(N, 1, H, Kd), q.new_zeros(N, 1, H, V), lengths
    block_indices = empty(N, H, n, dtype=torch.int32, device=dev)
    o = empty(N, HQ, V, dtype=q.dtype, device=dev)

    g = [kernel_ready(x.to(q.dtype)) for x in gates]
    narrow, wide = _combine_threads(V)
    k_comb = k_o[wide if N * HQ <= COMBINE_WIDE_MAX_PROGRAMS else narrow]
    launches = [("compressed", lambda: k_c(q, k_cmp, v_cmp, num_cmp, s1, logits, o_part, lse_part))]
    if k_s is not None:
        launches.append(("select", lambda: k_s(logits, lse_part, s1, num_cmp, lengths, block_indices)))
    launches += [
        ("sparse" if k_s is not None else "select+sparse",
         lambda: k_p(q, logits, num_cmp, k_slc, v_slc, lengths, k_swa, v_swa, swa_count, s1, s3, block_indices,
                     o_part, lse_part)),
        ("combine", lambda: k_comb(o_part, lse_part, s1, s3, *g, o)),
    ]
    return launches, (o, block_indices)


def nsa_decode(*args, **kwargs):
    """One decode step; arguments as `decode_launches`. Returns (o `[N, HQ, V]` in q's dtype,
    block_indices `[N, H, n]` int32, ascending, -1 padded)."""
    launches, out = decode_launches(*args, **kwargs)
    for _, launch in launches:
        launch()
    return out


def decode_reads(block_indices: torch.Tensor, num_cmp: torch.Tensor, lengths: torch.Tensor,
                 swa_count: Optional[torch.Tensor], l_sel: int, window: int) -> torch.Tensor:
    """Tokens one step read per sequence `[N]` (int64), counted for kv head 0 as the paper's
    Table 4 does: the compressed stream, the selected blocks' existing tokens, the window."""
    blocks = block_indices[:, 0].long()
    lengths = lengths.long()
    sel = torch.where(blocks >= 0, (lengths[:, None] - blocks * l_sel).clamp(0, l_sel), 0).sum(-1)
    reads = num_cmp.long() + sel
    if swa_count is not None:
        reads = reads + swa_count.long().clamp(max=window)
    return reads
