"""NSACache: what one NativeSparseAttention layer keeps for generation.

Per sequence of a batch (each with its own length):
  - the selected branch's raw keys/values, all of them (any block may be selected);
  - the compressed branch's raw keys/values, all of them (a new compressed token needs the last l);
  - the compressed stream: compressed token i is emitted when token i·d + l - 1 arrives, i.e. once l
    tokens are there and then every d tokens, from the last l raw tokens through φ;
  - the sliding branch's last W keys/values, in a ring.
Tensors are preallocated and grow by doubling; with shared K/V the branches share one store.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


class GrowingBuffer:
    """`[B, capacity, H, D]` storage with per-sequence lengths, doubling its capacity when full."""

    def __init__(self, B: int, H: int, D: int, dtype, device, capacity: int = 256):
        self.data = torch.zeros(B, max(1, capacity), H, D, dtype=dtype, device=device)
        self.lengths = [0] * B

    def _reserve(self, n: int) -> None:
        cap = self.data.shape[1]
        if n > cap:
            new_cap = max(n, 2 * cap)
            grown = self.data.new_zeros(self.data.shape[0], new_cap, *self.data.shape[2:])
            grown[:, :cap] = self.data
            self.data = grown

    def append(self, b: int, x: torch.Tensor) -> None:
        """x `[n, H, D]` appended to sequence b."""
        n0 = self.lengths[b]
        self._reserve(n0 + x.shape[0])
        self.data[b, n0:n0 + x.shape[0]] = x
        self.lengths[b] = n0 + x.shape[0]

    def append_rows(self, x: torch.Tensor, seq: torch.Tensor, rows: torch.Tensor) -> None:
        """x `[B, H, D]`: one new entry for every sequence, in one indexed write; seq = arange(B) and
        rows = the current lengths, on x's device (the caller builds them once for all buffers)."""
        self._reserve(max(self.lengths) + 1)
        self.data[seq, rows] = x
        self.lengths = [n + 1 for n in self.lengths]

    def get(self, b: int) -> torch.Tensor:
        return self.data[b, : self.lengths[b]]


class RingBuffer:
    """The last W entries `[B, W, H, D]` of each sequence, readable in order."""

    def __init__(self, B: int, W: int, H: int, D: int, dtype, device):
        self.data = torch.zeros(B, W, H, D, dtype=dtype, device=device)
        self.count = [0] * B  # entries ever written
        self.W = W

    def append(self, b: int, x: torch.Tensor) -> None:
        """x `[n, H, D]`: entry number c (counting from the sequence's start) lives in slot c % W."""
        skip = max(0, x.shape[0] - self.W)  # older entries than the last W are never read
        self.count[b] += skip
        slots = (self.count[b] + torch.arange(x.shape[0] - skip, device=x.device)) % self.W
        self.data[b, slots] = x[skip:]
        self.count[b] += x.shape[0] - skip

    def append_rows(self, x: torch.Tensor, seq: torch.Tensor, slots: torch.Tensor) -> None:
        """x `[B, H, D]`: one new entry for every sequence; seq = arange(B) and slots = count % W, on
        x's device (the caller builds them once for both rings)."""
        self.data[seq, slots] = x
        self.count = [c + 1 for c in self.count]

    def get(self, b: int) -> torch.Tensor:
        """The last min(W, count) entries, oldest first."""
        c = self.count[b]
        if c <= self.W:
            return self.data[b, :c]
        i = c % self.W
        return torch.cat([self.data[b, i:], self.data[b, :i]], 0)


@dataclass
class NSACache:
    """Decoding state of one layer (see the module docstring). Build with `NSACache.empty(...)`."""

    l: int
    d: int
    W: int
    slc_k: GrowingBuffer
    slc_v: GrowingBuffer
    cmp_k: GrowingBuffer
    cmp_v: GrowingBuffer
    ckv_k: GrowingBuffer  # compressed stream
    ckv_v: GrowingBuffer
    swa_k: Optional[RingBuffer]
    swa_v: Optional[RingBuffer]
    last_reads: object = None  # tokens the last decode step read per sequence: a list or a device tensor

    @staticmethod
    def empty(batch_size: int, num_kv_heads: int, head_dim: int, v_head_dim: int, compress_block: int,
              compress_stride: int, window_size: int, shared_kv: bool = False, dtype=torch.float32,
              device="cpu", capacity: int = 256) -> "NSACache":
        B, H, K, V = batch_size, num_kv_heads, head_dim, v_head_dim
        buf = lambda D, cap=capacity: GrowingBuffer(B, H, D, dtype, device, cap)  # noqa: E731
        slc_k, slc_v = buf(K), buf(V)
        cmp_k, cmp_v = (slc_k, slc_v) if shared_kv else (buf(K), buf(V))
        ring = (lambda D: RingBuffer(B, window_size, H, D, dtype, device)) if window_size > 0 else (lambda D: None)
        return NSACache(compress_block, compress_stride, window_size, slc_k, slc_v, cmp_k, cmp_v,
                        buf(K, capacity // compress_stride + 1), buf(V, capacity // compress_stride + 1),
                        ring(K), ring(V), [0] * B)

    @property
    def reads(self) -> list[int]:
        """Tokens the last decode step read, per sequence (read back from the device on access)."""
        r = self.last_reads
        return r.tolist() if isinstance(r, torch.Tensor) else list(r)

    @property
    def lengths(self) -> list[int]:
        return list(self.slc_k.lengths)

    def num_compressed(self, b: int) -> int:
        return self.ckv_k.lengths[b]

    def expected_compressed(self, length: int) -> int:
        """Compressed tokens a sequence of `length` tokens has: ⌊(length - l) / d⌋ + 1, or 0."""
        return 0 if length < self.l else (length - self.l) // self.d + 1
