"""Argument checks shared by the reference and the TileLang ops.

Torch only: the reference must never import TileLang or a kernel. Every check raises ValueError or
TypeError naming the argument, what was expected and what was given; never `assert` (it vanishes
under `python -O`). The values of `cu_seqlens` are read on the host, so an op validates before launch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_tensor(x, name: str, ndim: int, layout) -> None:
    """x is a tensor of ndim dims; layout describes the expected shape in the message: a string, or
    a callable giving one (formatted only on an error: formatting the sizes of a tensor traced by
    torch.compile would pin them to their values and recompile for every length)."""
    if callable(layout) and (not isinstance(x, torch.Tensor) or x.dim() != ndim):
        layout = layout()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {_shape(x)}")


def check_qkv(q, k, v, q_offset: Optional[int] = None, cu_seqlens=None) -> tuple[int, int, int, int, int, int]:
    """Check q `[B, Tq, HQ, K]`, k `[B, Tk, H, K]`, v `[B, Tk, H, V]`; return (B, Tq, HQ, H, K, V).

    Without q_offset the queries are the whole sequence: Tq = Tk. With q_offset (an int >= 0) they are
    the tokens q_offset … q_offset+Tq-1 of the keys' sequence: q_offset + Tq <= Tk (check_q_offset,
    which cu_seqlens is passed on to).
    """
    check_tensor(q, "q", 4, "[B, T, HQ, K]")
    check_tensor(k, "k", 4, "[B, T, H, K]")
    check_tensor(v, "v", 4, "[B, T, H, V]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, T, HQ, K = q.shape
    if q_offset is None:
        if k.shape[0] != B or k.shape[1] != T or k.shape[3] != K:
            raise ValueError(f"k must have shape [B={B}, T={T}, H, K={K}] to match q {_shape(q)}, got {_shape(k)}")
    elif k.shape[0] != B or k.shape[3] != K:
        raise ValueError(f"k must have shape [B={B}, Tk, H, K={K}] to match q {_shape(q)}, got {_shape(k)}")
    H = k.shape[2]
    V = v.shape[3]
    Tk = k.shape[1]
    if tuple(v.shape[:3]) != (B, Tk, H):
        raise ValueError(f"v must have shape [B={B}, T={Tk}, H={H}, V] to match k {_shape(k)}, got {_shape(v)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the query heads HQ={HQ} (q.shape[2]) must be a multiple of the kv heads H={H} (k.shape[2])")
    if min(B, T, K, V) == 0:
        raise ValueError(f"q, k, v must be non-empty, got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    check_q_offset(q_offset, T, Tk, cu_seqlens)
    return B, T, HQ, H, K, V


def check_q_offset(q_offset, Tq: int, Tk: Optional[int], cu_seqlens=None) -> Optional[int]:
    """q_offset is None (the queries are the whole sequence) or the global position of the first of Tq
    queries over Tk keys: an int with 0 <= q_offset and q_offset + Tq <= Tk (Tk None: the caller checks
    its keys itself). One offset serves all B rows; packed sequences (cu_seqlens) take none yet: their
    queries would need their own cu_seqlens_q and an offset per sequence, as fla's separate
    query/key lengths do."""
    if q_offset is None:
        return None
    if cu_seqlens is not None:
        raise ValueError("q_offset is not supported with cu_seqlens yet (packed sequences: the queries are "
                         "each whole sequence)")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise TypeError(f"q_offset must be None or an int >= 0, got {type(q_offset).__name__} {q_offset!r}")
    if q_offset < 0 or (Tk is not None and q_offset + Tq > Tk):
        raise ValueError(f"q_offset={q_offset} with Tq={Tq} queries needs 0 <= q_offset and q_offset + Tq <= Tk={Tk} "
                         f"(the keys' length), got q_offset + Tq = {q_offset + Tq}")
    return q_offset


def check_gate(g, name: str, B: int, T: int, HQ: int, like: torch.Tensor) -> None:
    """A gate is None (meaning 1) or a floating tensor `[B, T, HQ]` on q's device."""
    if g is None:
        return
    check_tensor(g, name, 3, lambda: f"[B={B}, T={T}, HQ={HQ}]")
    if tuple(g.shape) != (B, T, HQ):
        raise ValueError(f"{name} must have shape [B={B}, T={T}, HQ={HQ}], got {_shape(g)}")
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {g.dtype}")
    if g.device != like.device:
        raise ValueError(f"{name} must be on q's device {like.device}, got {g.device}")


def check_positive_int(x, name: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(x).__name__} {x!r}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def check_block_indices(block_indices, B: int, T: int, H: int, like: torch.Tensor) -> int:
    """block_indices `[B, T, H, S]` of an integer dtype; returns S."""
    check_tensor(block_indices, "block_indices", 4, lambda: f"[B={B}, T={T}, H={H}, S]")
    if tuple(block_indices.shape[:3]) != (B, T, H):
        raise ValueError(f"block_indices must have shape [B={B}, T={T}, H={H}, S], got {_shape(block_indices)}")
    if block_indices.dtype not in _INT_DTYPES:
        raise TypeError(f"block_indices must have an integer dtype, got {block_indices.dtype}")
    if block_indices.device != like.device:
        raise ValueError(f"block_indices must be on q's device {like.device}, got {block_indices.device}")
    S = block_indices.shape[3]
    if S == 0:
        raise ValueError("block_indices must have at least one slot (S >= 1), got S = 0")
    return S


def check_block_counts(block_counts, B: int, T: int, H: int, S: int, like: torch.Tensor) -> None:
    """block_counts is None (all S slots), an int in [0, S] or an integer tensor `[B, T, H]`."""
    if block_counts is None:
        return
    if isinstance(block_counts, bool):
        raise TypeError("block_counts must be None, an int or an integer tensor [B, T, H], got a bool")
    if isinstance(block_counts, int):
        if not 0 <= block_counts <= S:
            raise ValueError(f"block_counts must lie in [0, S={S}], got {block_counts}")
        return
    check_tensor(block_counts, "block_counts", 3, lambda: f"[B={B}, T={T}, H={H}]")
    if tuple(block_counts.shape) != (B, T, H):
        raise ValueError(f"block_counts must have shape [B={B}, T={T}, H={H}], got {_shape(block_counts)}")
    if block_counts.dtype not in _INT_DTYPES:
        raise TypeError(f"block_counts must have an integer dtype, got {block_counts.dtype}")
    if block_counts.device != like.device:
        raise ValueError(f"block_counts must be on q's device {like.device}, got {block_counts.device}")


def check_cu_seqlens(cu_seqlens, B: int, T: int, like: Optional[torch.Tensor] = None) -> Optional[list[int]]:
    """cu_seqlens `[N+1]`: integers strictly increasing from 0 to T, only with B = 1. Returns the
    offsets as a Python list (read on the host), or None."""
    if cu_seqlens is None:
        return None
    check_tensor(cu_seqlens, "cu_seqlens", 1, "[N+1]")
    if cu_seqlens.dtype not in _INT_DTYPES:
        raise TypeError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
    if like is not None and cu_seqlens.device != like.device:
        raise ValueError(f"cu_seqlens must be on q's device {like.device}, got {cu_seqlens.device}")
    offsets = cu_seqlens.tolist()
    if len(offsets) < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets [0, ..., T], got {offsets}")
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"cu_seqlens must run from 0 to the total length T={T}, got {offsets[0]} ... {offsets[-1]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {offsets}")
    return offsets


def check_scale(scale, K: int) -> float:
    if scale is None:
        return K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return float(scale)


def check_window_size(window_size) -> int:
    return check_positive_int(window_size, "window_size", minimum=0)


def check_compression(l: int, d: int, l_sel: int) -> None:
    """Compression block l, stride d and selection block l' with d | l and d | l' (paper §3.3)."""
    check_positive_int(l, "compress_block (l)")
    check_positive_int(d, "compress_stride (d)")
    check_positive_int(l_sel, "block_size (l')")
    if l % d != 0:
        raise ValueError(f"compress_stride d={d} must divide compress_block l={l}")
    if l_sel % d != 0:
        raise ValueError(f"compress_stride d={d} must divide the selection block_size l'={l_sel}")


def seq_ranges(offsets: Optional[list[int]], B: int, T: int) -> list[tuple[int, int, int]]:
    """(batch, start, end) for every sequence: B full rows, or the packed varlen segments."""
    if offsets is None:
        return [(b, 0, T) for b in range(B)]
    return [(0, s, e) for s, e in zip(offsets, offsets[1:])]


BlockCounts = Union[None, int, torch.Tensor]
