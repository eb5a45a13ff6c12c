"""NativeSparseAttention: the drop-in attention layer (paper §3), for training and generation.

Shared query projection; keys and values projected separately for each branch (paper §3.3.3; one
shared pair as an option); RoPE on queries and keys; a learnable compression φ (an MLP over the l
tokens of a block plus an intra-block position embedding, Eq. 7; mean pooling as an option); a gate
MLP giving each head's three branch gates through a sigmoid (softmax as an option); the output
projection. On CUDA with fp16/bf16 the branches run on the TileLang kernels, elsewhere on the
reference, with the same results within tolerance.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from einops import rearrange

import reference as R
from reference import naive as RN
from reference.checks import check_compression, check_cu_seqlens, check_positive_int, seq_ranges

from . import distributed as cp
from . import ops as nsa_ops
from .cache import NSACache
from .nsa import nsa_branches
from .decode import decode_reads


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half) of x `[B, T, H, D]` at positions `[T]`, computed in float32."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x.float()[..., : D // 2], x.float()[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class CompressionMLP(nn.Module):
    """φ of Eq. 7: blocks `[..., l, D]` -> `[..., D]` through a linear map of the flattened block plus
    a learned intra-block position embedding. Starts as mean pooling (zero embedding, weights 1/l)."""

    def __init__(self, l: int, D: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(l, D))
        self.proj = nn.Linear(l * D, D, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(D).repeat(1, l) / l)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = (blocks + self.pos.to(blocks.dtype)).flatten(-2)
        return self.proj(x.to(self.proj.weight.dtype)).to(blocks.dtype)


class NativeSparseAttention(nn.Module):
    r"""NSA attention layer.

    Args:
        hidden_size: model width.
        num_heads: query heads HQ; num_kv_heads: H (HQ % H == 0; one index set per kv head).
        head_dim: K, the query/key dim; v_head_dim: V (default K; e.g. 192/128 as in the paper).
        compress_block, compress_stride: l and d of the compressed branch (d | l, d | l').
        block_size: l', the selection block; block_counts: n, blocks selected per token (>= 3).
        window_size: W of the sliding branch (0: no sliding branch).
        rope_theta: RoPE base.
        shared_kv: one key/value projection for all branches instead of one per branch.
        compression: "mlp" (learnable φ) or "mean".
        gate: "sigmoid" (the paper) or "softmax" over the three branches.
        cp_group: a torch.distributed process group for context parallelism (None: none). With a
            group of P > 1 ranks, forward(x) takes this rank's shard x `[B, T/P, hidden]` of one
            sequence (`nsa_module.distributed.shard_sequence`), at its global positions, and returns
            the output's shard; keys and values are all-gathered (nsa_module/distributed.py). No
            cache, no cu_seqlens; the parameters' gradients are each rank's share: sum them over the
            group (as data parallelism over dp × cp does). CPU (the reference) only for now.
        cp_layout: "zigzag" or "contiguous", how the sequence is dealt out (see shard_ranges).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: Optional[int] = None, compress_block: int = 32, compress_stride: int = 16,
                 block_size: int = 64, block_counts: int = 16, window_size: int = 512,
                 rope_theta: float = 10000.0, shared_kv: bool = False, compression: str = "mlp",
                 gate: str = "sigmoid", cp_group=None, cp_layout: str = "zigzag"):
        super().__init__()
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim)):
            check_positive_int(val, name)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        check_compression(compress_block, compress_stride, block_size)
        check_positive_int(block_counts, "block_counts", minimum=3)
        check_positive_int(window_size, "window_size", minimum=0)
        if compression not in ("mlp", "mean"):
            raise ValueError(f"compression must be 'mlp' or 'mean', got {compression!r}")
        if gate not in ("sigmoid", "softmax"):
            raise ValueError(f"gate must be 'sigmoid' or 'softmax', got {gate!r}")
        self.cp_group, self.cp_layout = cp_group, cp.check_layout(cp_layout)
        self.hidden_size, self.HQ, self.H, self.K = hidden_size, num_heads, num_kv_heads, head_dim
        self.V = head_dim if v_head_dim is None else check_positive_int(v_head_dim, "v_head_dim")
        self.l, self.d, self.l_sel, self.n, self.W = compress_block, compress_stride, block_size, block_counts, window_size
        self.theta, self.shared_kv, self.gate_act = rope_theta, shared_kv, gate
        self.scale = self.K ** -0.5
        self.q_proj = nn.Linear(hidden_size, self.HQ * self.K, bias=False)
        branches = ["all"] if shared_kv else ["cmp", "slc"] + (["swa"] if window_size > 0 else [])
        self.k_proj = nn.ModuleDict({b: nn.Linear(hidden_size, self.H * self.K, bias=False) for b in branches})
        self.v_proj = nn.ModuleDict({b: nn.Linear(hidden_size, self.H * self.V, bias=False) for b in branches})
        self.phi_k = CompressionMLP(self.l, self.K) if compression == "mlp" else None
        self.phi_v = CompressionMLP(self.l, self.V) if compression == "mlp" else None
        self.gate_proj = nn.Linear(hidden_size, self.HQ * 3, bias=True)
        self.o_proj = nn.Linear(self.HQ * self.V, hidden_size, bias=False)

    # -- pieces -------------------------------------------------------------------------------

    def _phi(self):
        return "mean" if self.phi_k is None else (self.phi_k, self.phi_v)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """q `[B, T, HQ, K]` and per-branch (k, v) `[B, T, H, K/V]` with RoPE, gates `[B, T, HQ]` ×3."""
        B, T, _ = x.shape
        q = rope(self.q_proj(x).view(B, T, self.HQ, self.K), positions, self.theta)
        kv = {}
        for b in ("cmp", "slc", "swa"):
            src = "all" if self.shared_kv else b
            if src in self.k_proj:
                k = rope(self.k_proj[src](x).view(B, T, self.H, self.K), positions, self.theta)
                kv[b] = (k, self.v_proj[src](x).view(B, T, self.H, self.V))
        g = self.gate_proj(x).view(B, T, self.HQ, 3)
        g = torch.sigmoid(g) if self.gate_act == "sigmoid" else torch.softmax(g.float(), -1).to(g.dtype)
        return q, kv, g.unbind(-1)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)

    def _attend(self, q, kv, gates, cu_seqlens, offsets):
        """All three branches over whole sequences: `[B, T, HQ, V]` (offsets: cu_seqlens as read on
        the host by forward(), or None)."""
        g_cmp, g_slc, g_swa = gates
        k_c, v_c = kv["cmp"]
        k_cmp, v_cmp = R.compress_kv(k_c, v_c, self.l, self.d, self._phi(), cu_seqlens)
        swa = kv["swa"] if self.W > 0 else (None, None)
        if self._use_kernels(q):  # the ops nsa() composes (nsa_module/ops.py): torch.compile sees no break
            cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int64)  # no second device read
            return nsa_branches(q, (k_cmp, v_cmp), kv["slc"], swa, g_cmp, g_slc, g_swa, None, self.n, self.l,
                                self.d, self.l_sel, self.W, self.scale, cu)[0]
        return R.naive_nsa_branches(q, (k_cmp, v_cmp), kv["slc"], swa if self.W > 0 else None, g_cmp, g_slc, g_swa,
                                    None, self.n, self.l_sel, self.W, self.scale, cu_seqlens, self.l, self.d)[0]

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                cache: Optional[NSACache] = None, use_cache: bool = False):
        """x `[B, T, hidden]` -> (y `[B, T, hidden]`, cache or None).

        Without a cache: the whole sequences (varlen with cu_seqlens, B = 1). With use_cache and no
        cache: the same, and the returned cache holds the prompt (one cache row per sequence). With
        a cache: C new tokens per cached sequence, x `[N, C, hidden]`: C = 1 is a decode step; C > 1
        prefills the next chunk of each prompt (equal to prefilling the whole prompt at once; on the
        reference for now: the kernels do not yet take queries at an offset).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be [B, T, hidden] with hidden = {self.hidden_size}, got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x's last dim must be the layer's hidden_size = {self.hidden_size}, got "
                             f"{x.shape[-1]} (x {list(x.shape)})")
        if cache is not None:
            if cu_seqlens is not None or x.shape[0] != len(cache.lengths):
                raise ValueError(f"with a cache the layer takes x [N={len(cache.lengths)}, C, hidden] (C new tokens "
                                 f"per cached sequence, no cu_seqlens), got {list(x.shape)}")
            if x.shape[1] == 1:
                return self._decode(x, cache), cache
            return self._prefill_chunk(x, cache), cache
        if self.cp_group is not None and cp.group_rank(self.cp_group)[0] > 1:
            if cu_seqlens is not None or use_cache:
                raise ValueError("with a cp_group of several ranks the layer takes one sequence's shard: no cu_seqlens, "
                                 "no use_cache")
            return self.o_proj(rearrange(self._attend_cp(x), "b t h v -> b t (h v)")), None
        B, T, _ = x.shape
        offsets = check_cu_seqlens(cu_seqlens, B, T, x)
        positions = RN.token_positions(offsets, T, x.device)
        q, kv, gates = self._project(x, positions)
        o = self._attend(q, kv, gates, cu_seqlens, offsets)
        y = self.o_proj(rearrange(o, "b t h v -> b t (h v)"))
        return y, (self._prefill_cache(kv, offsets, B, T) if use_cache else None)

    def _attend_cp(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's shard x `[B, T/P, hidden]` -> o `[B, T/P, HQ, V]` over the whole sequence."""
        group, layout = self.cp_group, self.cp_layout
        world, rank = cp.group_rank(group)
        names = ("the batch size B", "the shard length T/P", "the hidden size", "the dtype", "the layer's configuration",
                 "whether k/v need gradients")
        if x.is_cuda:
            raise NotImplementedError(cp.KERNELS_MISSING)
        error = None
        try:  # the shard's global positions (RoPE, the causal masks)
            positions = torch.cat([torch.arange(s, e, device=x.device)
                                   for s, e in cp.shard_ranges(x.shape[1] * world, rank, world, layout)])
        except ValueError as e:  # raised once the other ranks know too
            error = e
        if error is not None:
            cp.check_ranks_agree(names, None, group, x.device, error)
        q, kv, gates = self._project(x, positions)
        config = (self.HQ, self.H, self.K, self.V, self.l, self.d, self.l_sel, self.n, self.W, self.shared_kv,
                  self.phi_k is None, self.gate_act, layout)
        needs_grad = kv["slc"][0].requires_grad
        cp.check_ranks_agree(names, [x.shape[0], x.shape[1], x.shape[2], x.dtype, config, needs_grad], group, x.device)
        return cp.context_parallel_branches(q, kv["cmp"], kv["slc"], kv.get("swa"), gates, group=group, layout=layout,
                                            phi=self._phi(), l=self.l, d=self.d, l_sel=self.l_sel, n=self.n, W=self.W,
                                            scale=self.scale)

    def _prefill_cache(self, kv, offsets, B, T) -> NSACache:
        ranges = seq_ranges(offsets, B, T)
        k_s = kv["slc"][0]
        cache = NSACache.empty(len(ranges), self.H, self.K, self.V, self.l, self.d, self.W, self.shared_kv,
                               dtype=k_s.dtype, device=k_s.device, capacity=max(256, T))
        for n, (b, s, e) in enumerate(ranges):
            self._append(cache, n, {name: (k[b, s:e], v[b, s:e]) for name, (k, v) in kv.items()})
        return cache

    def _append(self, cache: NSACache, n: int, kv) -> None:
        """Add a sequence's new raw keys/values, then emit every compressed token now complete."""
        cache.slc_k.append(n, kv["slc"][0])
        cache.slc_v.append(n, kv["slc"][1])
        if not self.shared_kv:
            cache.cmp_k.append(n, kv["cmp"][0])
            cache.cmp_v.append(n, kv["cmp"][1])
        if self.W > 0:
            cache.swa_k.append(n, kv["swa"][0])
            cache.swa_v.append(n, kv["swa"][1])
        self._emit_compressed(cache, n)

    def _emit_compressed(self, cache: NSACache, n: int) -> None:
        """Compress every block of sequence n that its raw keys/values now complete."""
        have, want = cache.num_compressed(n), cache.expected_compressed(cache.cmp_k.lengths[n])
        if want > have:  # tokens have*d … (want-1)*d + l - 1 make the new compressed tokens
            lo, hi = have * self.d, (want - 1) * self.d + self.l
            k_new, v_new = R.compress_kv(cache.cmp_k.get(n)[None, lo:hi], cache.cmp_v.get(n)[None, lo:hi],
                                         self.l, self.d, self._phi())
            cache.ckv_k.append(n, k_new[0])
            cache.ckv_v.append(n, v_new[0])

    def _prefill_chunk(self, x: torch.Tensor, cache: NSACache) -> torch.Tensor:
        """C > 1 new tokens of each cached sequence, x `[N, C, hidden]`: appended to the cache, then
        attended as queries at their offset over everything cached (reference.naive_nsa_branches)."""
        N, C, _ = x.shape
        outs = []
        for n in range(N):
            t0 = cache.lengths[n]
            q, kv, gates = self._project(x[n:n + 1], torch.arange(t0, t0 + C, device=x.device))
            ring = (cache.swa_k.get(n), cache.swa_v.get(n)) if self.W > 0 else None  # before the chunk enters
            self._append(cache, n, {name: (k[0], v[0]) for name, (k, v) in kv.items()})
            kv_cmp = (cache.ckv_k.get(n)[None], cache.ckv_v.get(n)[None])
            kv_slc = (cache.slc_k.get(n)[None], cache.slc_v.get(n)[None])
            kv_swa = None
            if self.W > 0:  # the ring's tokens and the chunk's at their positions (the band reads no earlier one)
                kv_swa = tuple(torch.cat([r.new_zeros(t0 - r.shape[0], *r.shape[1:]), r, new[0]])[None]
                               for r, new in zip(ring, kv["swa"]))
            o, _ = R.naive_nsa_branches(q, kv_cmp, kv_slc, kv_swa, *gates, None, self.n, self.l_sel, self.W, self.scale,
                                        None, self.l, self.d, q_offset=t0)
            outs.append(o)
        return self.o_proj(rearrange(torch.cat(outs, 0), "b t h v -> b t (h v)"))

    def _decode(self, x: torch.Tensor, cache: NSACache) -> torch.Tensor:
        """One new token per sequence: the decode kernels on CUDA fp16/bf16, else the reference."""
        q, (g_cmp, g_slc, g_swa) = self._project_append(x, cache)  # q [N, HQ, K], gates [N, HQ]
        if self._use_kernels(x):
            o = self._decode_kernels(q, (g_cmp, g_slc, g_swa), cache)
            return self.o_proj(rearrange(o, "n h v -> n 1 (h v)"))
        outs, reads = [], []
        for n in range(x.shape[0]):
            # the new token is query t of its sequence over keys 0 … t: the reference NSA at an offset
            t = cache.lengths[n] - 1
            kv_cmp = (cache.ckv_k.get(n)[None], cache.ckv_v.get(n)[None])
            kv_slc = (cache.slc_k.get(n)[None], cache.slc_v.get(n)[None])
            kv_swa = None
            if self.W > 0:  # the ring's last tokens at their positions (the band reads no earlier one)
                ring = (cache.swa_k.get(n), cache.swa_v.get(n))
                kv_swa = tuple(torch.cat([r.new_zeros(t + 1 - r.shape[0], *r.shape[1:]), r])[None] for r in ring)
            g = [x_[n:n + 1, None] for x_ in (g_cmp, g_slc, g_swa)]  # [1, 1, HQ]
            o, idx = R.naive_nsa_branches(q[n:n + 1, None], kv_cmp, kv_slc, kv_swa, *g, None, self.n, self.l_sel, self.W,
                                          self.scale, None, self.l, self.d, q_offset=t)
            reads.append(kv_cmp[0].shape[1] + (min(self.W, t + 1) if self.W > 0 else 0)
                         + sum(min(self.l_sel, t + 1 - i * self.l_sel) for i in idx[0, 0, 0].tolist() if i >= 0))
            outs.append(o[0])
        cache.last_reads = reads
        o = torch.stack(outs, 0)  # [N, 1, HQ, V]
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)"))

    def _project_append(self, x: torch.Tensor, cache: NSACache):
        """The new tokens x `[N, 1, hidden]`, each at its sequence's position, projected in one batch:
        q `[N, HQ, K]` and gates (3 × `[N, HQ]`); their keys/values go into the cache (one indexed
        write per buffer), then every compressed token now complete is emitted."""
        N = x.shape[0]
        positions = torch.tensor(cache.lengths, device=x.device)  # also each raw buffer's next row
        seq = torch.arange(N, device=x.device)
        q, kv, gates = self._project(x.view(1, N, -1), positions)  # the batch as one sequence of N tokens
        raw = [(cache.slc_k, cache.slc_v, "slc")] + ([] if self.shared_kv else [(cache.cmp_k, cache.cmp_v, "cmp")])
        for kb, vb, name in raw:
            kb.append_rows(kv[name][0][0], seq, positions)
            vb.append_rows(kv[name][1][0], seq, positions)
        if self.W > 0:
            slots = torch.tensor([c % self.W for c in cache.swa_k.count], device=x.device)
            cache.swa_k.append_rows(kv["swa"][0][0], seq, slots)
            cache.swa_v.append_rows(kv["swa"][1][0], seq, slots)
        for n in range(N):
            self._emit_compressed(cache, n)
        return q[0], tuple(g[0] for g in gates)

    def _decode_kernels(self, q, gates, cache: NSACache) -> torch.Tensor:
        """`[N, HQ, V]` from kernels/decode.py; the read counts stay on the device until asked for."""
        dev = q.device
        as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
        num_cmp, lengths = as_t(cache.ckv_k.lengths), as_t(cache.lengths)
        swa = (cache.swa_k.data, cache.swa_v.data, as_t(cache.swa_k.count)) if self.W > 0 else (None, None, None)
        o, idx = nsa_ops.decode(q, cache.ckv_k.data, cache.ckv_v.data, num_cmp, cache.slc_k.data, cache.slc_v.data,
                                lengths, *swa, *gates, self.l, self.d, self.l_sel, self.n, self.scale)
        cache.last_reads = decode_reads(idx, num_cmp, lengths, swa[2], self.l_sel, self.W)
        return o
