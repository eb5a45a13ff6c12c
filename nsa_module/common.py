"""Host-side pieces the ops share: kernel-specific argument checks, sequence metadata, allocation."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from reference import num_compressed
from reference.checks import check_block_counts, check_block_indices, check_cu_seqlens, check_qkv, check_scale

INT32_MAX = 2 ** 31 - 1

# Set by tests: every output a kernel writes is first filled with NaN, so an element the kernel
# forgets shows up as NaN instead of as stale memory that happens to look right.
POISON_OUTPUTS = False


# The forward kernels store the O the backward reads in fp32 (kernels/banded.py O_FP32: the dQ
# kernel's Delta then matches its P exactly; 2 more bytes per O element). Off by default; tests switch
# it on, or NSA_O_FP32=1 at import.
O_FP32 = os.environ.get("NSA_O_FP32") == "1"
# The banded dQ kernel takes Delta = gate·Σ_j P_j dP_j from a first pass over its key tiles instead of
# from O (kernels/banded.py DELTA_PASS: exactly consistent with its P; Q·Kᵀ and dO·Vᵀ twice). Off by
# default; read at backward time; NSA_DELTA_PASS=1 at import.
DELTA_PASS = os.environ.get("NSA_DELTA_PASS") == "1"


def stored_o_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype of the O a forward kernel stores for the backward."""
    return torch.float32 if O_FP32 else q.dtype


def o_dtype_arg(o: torch.Tensor, q: torch.Tensor) -> dict:
    """The kernels' o_dtype argument for a stored O (none for q's own dtype: the default kernels)."""
    return {} if o.dtype == q.dtype else dict(o_dtype="float32")


def empty(*shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:  # integers: a value no kernel writes
        return torch.full(shape, float("nan") if dtype.is_floating_point else -12345, dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


def check_kernel_inputs(q, k, v, op: str) -> tuple[int, int, int, int, int, int]:
    """The reference's shape checks plus what the TileLang kernels need. Returns (B, T, HQ, H, K, V)."""
    B, T, HQ, H, K, V = check_qkv(q, k, v)
    check_kernel_dims(q, HQ, H, K, V, op)
    return B, T, HQ, H, K, V


def check_kernel_dims(q, HQ: int, H: int, K: int, V: int, op: str) -> None:
    """dtype and head dims the kernels take."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{op} takes float16 or bfloat16 q, k, v, got {q.dtype}")
    for name, d in (("K (q.shape[-1])", K), ("V (v.shape[-1])", V)):
        if d % 16 != 0 or not 16 <= d <= 256:
            raise ValueError(f"{op}: head dim {name} must be a multiple of 16 in [16, 256], got {d}")
    if HQ // H > 128:
        raise ValueError(f"{op}: at most 128 query heads per kv head (HQ // H), got {HQ // H}")


def check_cuda(q, op: str) -> None:
    """Last of the checks, so every other mistake is reported on the CPU too."""
    if q.device.type != "cuda":
        raise ValueError(f"{op} runs TileLang kernels on CUDA tensors, got q on {q.device}; "
                         "on the CPU use reference.naive_nsa")


def check_kernel_block_size(block_size, op: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{op}: block_size must be an int, got {type(block_size).__name__}")
    if block_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"{op}: block_size must be 16, 32, 64, 128 or 256 for the kernels, got {block_size}")
    return block_size


@dataclass
class SeqInfo:
    """Where each token's sequence starts: Offsets `[N+1]` and TokSeq `[T]` (int32 on the device),
    with the lengths and starts on the host. A fixed-length batch is one sequence [0, T) per batch row."""

    offsets: torch.Tensor
    tok_seq: torch.Tensor
    lengths: list[int]
    starts: list[int]

    @staticmethod
    def build(cu_seqlens: Optional[torch.Tensor], B: int, T: int, like: torch.Tensor) -> "SeqInfo":
        """The layout of q-like tensors `[B, T, ...]` on like's device, cached per set of offsets.

        cu_seqlens may live on the CPU (validated there: no device sync) or on like's device, where
        reading it is one device-to-host copy (a sync); the kernels' callers read it once per call
        (`host_cu_seqlens`) and hand the host copy on."""
        offs = host_offsets(cu_seqlens, B, T, like)
        if offs is None:
            return _fixed_length_info(T, str(like.device))
        return _varlen_info(offs, str(like.device))

    def positions(self) -> torch.Tensor:
        """`[T]` each token's position within its sequence (int64)."""
        return torch.arange(self.tok_seq.numel(), device=self.tok_seq.device) - self.offsets[self.tok_seq.long()].long()


def host_offsets(cu_seqlens: Optional[torch.Tensor], B: int, T: int, like: torch.Tensor) -> Optional[tuple]:
    """cu_seqlens validated (reference/checks.py) and read as a tuple of ints, or None. A copy on the
    CPU is read as it is; one on like's device costs a device-to-host copy."""
    if cu_seqlens is None:
        return None
    on_host = isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type == "cpu"
    offs = check_cu_seqlens(cu_seqlens, B, T, None if on_host else like)
    if offs[-1] > INT32_MAX:
        raise ValueError(f"the kernels index tokens with int32: T={offs[-1]} is too long")
    return tuple(offs)


def host_cu_seqlens(cu_seqlens: Optional[torch.Tensor], B: int, T: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """What the kernel ops take: cu_seqlens validated, as an int64 tensor on the CPU (None stays None).
    From q's device this is the one device-to-host read of a varlen call; under torch.compile the
    ops validate it instead (a host read would break the graph)."""
    if cu_seqlens is None:
        return None
    if torch.compiler.is_compiling():
        return cu_seqlens.to("cpu", torch.int64)
    return torch.tensor(host_offsets(cu_seqlens, B, T, like), dtype=torch.int64)


def device_tensor(values, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A host list on the device without a sync: staged in pinned memory and copied asynchronously
    (a copy from pageable memory would wait for the stream)."""
    x = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


@lru_cache(maxsize=64)
def _varlen_info(offs: tuple, device: str) -> SeqInfo:
    """Packed sequences at these offsets (validated by the caller); cached, so that a step whose
    layout was seen before copies nothing to the device."""
    cu = device_tensor(offs, torch.int32, device)
    lengths = [e - s for s, e in zip(offs, offs[1:])]
    # from the device copy of the offsets: no host-to-device copy of T entries
    tok_seq = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32, device=device),
                                      torch.diff(cu.long()), output_size=offs[-1])
    return SeqInfo(cu, tok_seq, lengths, list(offs[:-1]))


@lru_cache(maxsize=16)
def _fixed_length_info(T: int, device: str) -> SeqInfo:
    """One sequence [0, T) per batch row; cached, and built on the device (no copy at all)."""
    if T > INT32_MAX:
        raise ValueError(f"the kernels index tokens with int32: T={T} is too long")
    offsets = torch.arange(2, dtype=torch.int32, device=device) * T
    return SeqInfo(offsets, torch.zeros(T, dtype=torch.int32, device=device), [T], [0])


@lru_cache(maxsize=16)
def compressed_layout(lengths: tuple, l: int, d: int, device: str) -> SeqInfo:
    """The packed compressed streams of sequences of these lengths: Offsets `[N+1]` and KSeq `[Nc]`.
    Cached per layout, so a training step copies nothing to the device."""
    counts = [num_compressed(n, l, d) for n in lengths]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    offsets = device_tensor(starts, torch.int32, device)
    kseq = device_tensor([i for i, c in enumerate(counts) for _ in range(c)], torch.int32, device)
    return SeqInfo(offsets, kseq, counts, starts[:-1])


def prepare_block_indices(block_indices, block_counts, B, T, H, like) -> tuple[torch.Tensor, torch.Tensor]:
    """block_indices as int32 `[B, T, H, S]` (ids beyond int32 clamped so a cast never wraps a huge id
    onto a real block) and block_counts as int32 `[B, T, H]` clamped to [0, S]. Any integer dtype:
    the clamps run in int64, where every bound is representable (int8's is not INT32_MAX)."""
    S = check_block_indices(block_indices, B, T, H, like)
    check_block_counts(block_counts, B, T, H, S, like)
    idx = block_indices
    if idx.dtype != torch.int32:
        idx = idx.long().clamp(-1, INT32_MAX).to(torch.int32)
    idx = kernel_ready(idx)
    if block_counts is None:
        cnt = torch.full((B, T, H), S, dtype=torch.int32, device=like.device)
    elif isinstance(block_counts, int):
        cnt = torch.full((B, T, H), block_counts, dtype=torch.int32, device=like.device)
    else:
        cnt = kernel_ready(block_counts.long().clamp(0, S).to(torch.int32))
    return idx, cnt


# TileLang's kernels load 16 bytes at a time and assume every tensor starts on such a boundary; a
# view at an odd storage offset would fault with "misaligned address" and kill the CUDA context.
KERNEL_ALIGN = 16


def kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x as a kernel argument: dense (contiguous) and starting at a 16-byte boundary. A copy only
    when x is neither already (a strided or offset view); the caching allocator's own blocks are
    always aligned."""
    x = x.contiguous()
    return x if x.data_ptr() % KERNEL_ALIGN == 0 else x.clone()


def kernel_gate(g: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """A branch's gate `[B, T, HQ]` in q's dtype as a kernel argument; None means 1."""
    if g is None:
        return torch.ones(q.shape[:3], dtype=q.dtype, device=q.device)
    return kernel_ready(g.to(q.dtype))


def resolve_scale(scale, K: int) -> float:
    return check_scale(scale, K)


@lru_cache(maxsize=None)
def sm_count(device) -> int:
    """Streaming multiprocessors of the device: how many programs fill it."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=64)
def split_arg(n: int, device) -> torch.Tensor:
    """A length-n tensor: split kernels read their split count from its shape."""
    return torch.zeros(n, dtype=torch.int32, device=device)
