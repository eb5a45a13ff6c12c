"""Helpers the test files share (no test file imports another): running a kernel path and the
reference side by side, the comparisons that a few wrong rows cannot pass, and the inputs several
files build (packed layouts, decode caches, selected-attention cases, the small decode layer).

A kernel's output or gradient is compared with the float32 reference three ways:
  - one relative error over the whole tensor (<= 1e-2);
  - one relative error per sequence (<= 1e-2): a short sequence's rows cannot hide in a long one's;
  - row by row (a row: one (batch, token, head) vector, all dims but the last), FlashAttention's
    rule: the row's max abs error at most twice that of the same reference run in the inputs' own
    fp16/bf16 (`reference.low_precision()`), plus one rounding step at the row's own scale (for
    gradients, and at the whole tensor's: see check_rows).
Where the reference is exactly 0 (a row or sequence that sees one key: P = 1 makes dS = 0) the
kernel's value is rounding noise of size ~1e-6: those compare by absolute error.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

import reference as R
from reference.inputs import random_block_counts, random_block_indices, random_gates, random_qkv

# one rounding step, relative (half an ulp at the bottom of a binade, so a row off by one output
# rounding more than the low-precision run still passes)
ROUNDING = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
REL_TOL = 1e-2
ZERO_ATOL = 1e-3  # where the reference is exactly 0


def rel_err(x, ref) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def segments(B: int, T: int, cu_seqlens: Optional[torch.Tensor] = None) -> list[tuple[int, int, int]]:
    """(batch, start, end) of every sequence along dim 1: each batch row, or the packed ones."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    offs = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(offs, offs[1:])]


def compressed_segments(cu_seqlens: Optional[torch.Tensor], B: int, T: int, l: int, d: int):
    """The same for tensors along the packed compressed streams (k_cmp, v_cmp and their grads)."""
    if cu_seqlens is None:
        return [(b, 0, R.num_compressed(T, l, d)) for b in range(B)]
    offs = R.compressed_cu_seqlens(cu_seqlens.cpu(), l, d).tolist()
    return [(0, s, e) for s, e in zip(offs, offs[1:])]


def packed(lengths: Sequence[int], device="cuda") -> torch.Tensor:
    """cu_seqlens `[N+1]` (int32) of sequences of these lengths packed along T."""
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    return torch.tensor(offs, dtype=torch.int32, device=device)


def hostile_lengths(*sizes: int) -> list[int]:
    """Many short sequences for packed batches: for each block size b given (l, d, l', a tile),
    lengths b - 1, b, b + 1, with 1-token sequences and tiny ones between, so that sequence
    boundaries fall inside every query and key tile."""
    out = [1, 2]
    for b in sorted(set(sizes)):
        out += [max(1, b - 1), 1, b, 3, b + 1]
    return out + [5, 1]


def hostile_cu(T: int, *sizes: int, device="cuda") -> torch.Tensor:
    """cu_seqlens `[N+1]` of hostile_lengths(*sizes) followed by one sequence of the rest: T in all."""
    lens = hostile_lengths(*sizes)
    if sum(lens) >= T:
        raise ValueError(f"T={T} leaves no room for a last sequence after {sum(lens)} short tokens")
    return packed(lens + [T - sum(lens)], device)


def run_both(ours: Callable, ref: Callable, tensors: Sequence[torch.Tensor], do: Optional[torch.Tensor] = None):
    """ours(*leaves), ref(*float32 leaves) and ref(*leaves in their own dtype) under
    reference.low_precision(), each backward with one random dO (seeded: a test's result does not
    depend on which tests ran before it). Returns three lists
    [output, grad of each input] (a grad is None where the output does not depend on the input)."""
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    o = ours(*leaves)
    if do is None:
        gen = torch.Generator(device=o.device).manual_seed(1234)
        do = torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype)
    o.backward(do)
    ref_leaves = [x.detach().float().requires_grad_() for x in tensors]
    r = ref(*ref_leaves)
    r.backward(do.float())
    lp_leaves = [x.detach().clone().requires_grad_() for x in tensors]
    with R.low_precision():
        lp = ref(*lp_leaves)
        lp.backward(do.to(lp.dtype))
    return ([o] + [x.grad for x in leaves], [r] + [x.grad for x in ref_leaves],
            [lp] + [x.grad for x in lp_leaves])


def _row_view(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.float().reshape(-1, 1)


def check_rows(name: str, x: torch.Tensor, ref: torch.Tensor, lp: torch.Tensor, dtype, gradient: bool) -> None:
    """Every row: max |x - ref| <= 2·max |lp - ref| + one rounding of the row's max |ref|.

    Gradients get one rounding of the whole tensor's max |ref| on top (FlashAttention's own rule for
    them is the global max): a kernel forms Delta = rowsum(dO ∘ O) from the O it stored in fp16/bf16,
    so dS = P ∘ (dP − Delta), and with it dQ, dK and dV, carries an error of a rounding of |dO|·|O|
    whatever the row's own size, which the low-precision reference's autograd does not share. Seen
    on the H200: dq rows of short sequences with a scale of 1e-3 … 1e-1 of the tensor's."""
    xr, rr, lr = _row_view(x), _row_view(ref), _row_view(lp)
    err = (xr - rr).abs().amax(-1)
    lp_err = (lr - rr).abs().amax(-1)
    scale = rr.abs().amax(-1)
    top = rr.abs().max().item()
    floor = ROUNDING[dtype] * top if gradient else 1e-4 * max(top, 1.0)
    allowed = 2 * lp_err + ROUNDING[dtype] * scale + floor
    bad = err > allowed
    if bad.any():
        worst = int(((err - allowed) / allowed.clamp_min(1e-12)).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} rows off; worst row {worst} (of the flattened "
            f"{list(x.shape[:-1])}): max abs error {err[worst]:.3e}, the low-precision reference's "
            f"{lp_err[worst]:.3e}, row scale {scale[worst]:.3e}, tensor scale {top:.3e}")


def check_segments(name: str, x: torch.Tensor, ref: torch.Tensor, segs) -> None:
    """Relative error per sequence (segs: (batch, start, end) along dim 1)."""
    for b, s, e in segs:
        xs, rs = x[b, s:e].float(), ref[b, s:e].float()
        if rs.numel() == 0:
            continue
        if rs.abs().max() == 0:
            err = (xs - rs).abs().max().item()
            assert err <= ZERO_ATOL, f"{name}: sequence [{s}, {e}) of row {b}: reference exactly 0, ours off by {err:.2e}"
            continue
        err = rel_err(xs, rs)
        assert err <= REL_TOL, f"{name}: sequence [{s}, {e}) of row {b}: relative error {err:.2e}"


def assert_close(ours, ref, lp, names, dtype, segs=None, seg_overrides: Optional[dict] = None) -> None:
    """The three comparisons (module docstring) for each named tensor. segs: the sequences of
    tensors indexed [B, T, ...] (None: skip the per-sequence check); seg_overrides: name -> segs for
    tensors laid out otherwise (the compressed streams). Names starting with "d" are gradients. A
    gradient must be None on both sides or on neither (None where the output does not depend on the
    input)."""
    seg_overrides = seg_overrides or {}
    for name, x, r, p in zip(names, ours, ref, lp):
        if x is None or r is None:
            assert x is None and r is None, f"{name}: gradient on one side only"
            continue
        assert x.dtype == dtype and x.shape == r.shape, f"{name}: {x.dtype} {list(x.shape)} vs {list(r.shape)}"
        assert not x.isnan().any(), f"{name} has NaN (an element left unwritten?)"
        if r.abs().max() == 0:
            err = (x.float() - r).abs().max().item()
            assert err <= ZERO_ATOL, f"{name}: the reference is exactly 0, ours is off by {err:.2e}"
            continue
        err = rel_err(x, r)
        assert err <= REL_TOL, f"{name}: relative error {err:.2e}"
        s = seg_overrides.get(name, segs)
        if s is not None:
            assert s[-1][2] == x.shape[1], f"{name}: segments end at {s[-1][2]}, the tensor has {x.shape[1]} rows"
            check_segments(name, x, r, s)
        check_rows(name, x, r, p, dtype, gradient=name.startswith("d"))


def assert_same_math(name: str, x: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-10, atol: float = 0.0) -> None:
    """x and ref compute the same float64 math in another order (a query slice at an offset, a
    sequence spread over processes): row by row (as check_rows), max |x - ref| <= rtol · the row's
    max |ref| + rtol · 1e-3 · the tensor's (rows that are 0 in the reference: tokens that see nothing)
    + atol (for a tensor that is 0 but for rounding, e.g. a gradient whose terms cancel: the scale of
    the terms, which the tensor itself does not show)."""
    assert x.shape == ref.shape, f"{name}: shape {list(x.shape)} vs {list(ref.shape)}"
    assert x.dtype == ref.dtype == torch.float64, f"{name}: compare float64 runs, got {x.dtype}, {ref.dtype}"
    xr, rr = _row_view(x), _row_view(ref)
    err = (xr - rr).abs().amax(-1)
    allowed = rtol * rr.abs().amax(-1) + rtol * 1e-3 * rr.abs().max().clamp_min(1e-300) + atol
    bad = err > allowed
    if bad.any():
        worst = int((err / allowed).argmax())
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} rows off; worst row {worst} (of the flattened "
                             f"{list(x.shape[:-1])}): max abs error {err[worst]:.3e}, allowed {allowed[worst]:.3e}")


# A small NSA layer for the decode and compile tests (test_layer, test_ops).
LAYER_DECODE = dict(hidden_size=256, num_heads=16, num_kv_heads=2, head_dim=64, compress_block=32, compress_stride=16,
                    block_size=64, block_counts=4, window_size=64)


def check_selection(ours, ref, p_slc, tol=5e-3):
    """Equal ids, or different only among blocks whose reference scores tie within tol·(row max)."""
    ours, ref = ours.long(), ref.long()
    diff = (ours.sort(-1).values != ref.sort(-1).values).any(-1)
    rows = diff.nonzero().tolist()
    for b, t, h in rows:
        a, r = set(ours[b, t, h].tolist()) - {-1}, set(ref[b, t, h].tolist()) - {-1}
        s = p_slc[b, t, h]
        worst_taken = min(s[i].item() for i in a - r)
        best_missed = max(s[i].item() for i in r - a)
        assert best_missed - worst_taken <= tol * s.max().item(), (b, t, h, sorted(a), sorted(r))
    assert len(rows) <= 0.01 * diff.numel(), f"{len(rows)} rows differ"
    return len(rows)


def make_caches(N, H, HQ, K, V, l, d, W, lengths, dtype, device, cap_pad=37, seed=0):
    """Random caches as a prefill would leave them: raw keys/values of `lengths` tokens (capacity a
    little larger), the compressed stream of (length - l) // d + 1 tokens and the ring's last W."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    CAP = max(lengths) + cap_pad
    num_cmp = [0 if t < l else (t - l) // d + 1 for t in lengths]
    k, v = rnd(N, CAP, H, K), rnd(N, CAP, H, V)
    kc, vc = rnd(N, max(num_cmp) + 3, H, K), rnd(N, max(num_cmp) + 3, H, V)
    ring = None
    if W > 0:
        kw, vw = torch.zeros(N, W, H, K, device=device, dtype=dtype), torch.zeros(N, W, H, V, device=device, dtype=dtype)
        for n, t in enumerate(lengths):
            for c in range(max(0, t - W), t):  # token c lives in slot c % W
                kw[n, c % W], vw[n, c % W] = k[n, c], v[n, c]
        ring = (kw, vw)
    q = rnd(N, HQ, K)
    gates = tuple(torch.rand(N, HQ, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return q, (k, v), (kc, vc), num_cmp, ring, gates


def selected_case(G, H, K, V, BS, S, dtype, counts, varlen, T, device="cuda", adversarial=0.3, seed=0):
    """(q, k, v, g, block ids, block_counts, cu_seqlens) of one selected-attention case."""
    B = 1 if varlen else 2
    # varlen: short sequences around the block size, the key tile (min(BS, 64)) and 16, 1-token ones
    # between them (block ends fall inside key tiles of the dK/dV kernel, which reads a block's last
    # tile past its sequence's end), then one of the rest
    cu = hostile_cu(T, *(b for b in (BS, min(BS, 64), 16) if b <= 64), device=device) if varlen else None
    q, k, v = random_qkv(B, T, G * H, H, K, V, dtype=dtype, device=device, seed=seed)
    idx = random_block_indices(B, T, H, S, BS, cu_seqlens=cu, device=device, seed=seed, adversarial=adversarial)
    bc = {None: None, "int": max(1, S - 1), "tensor": random_block_counts(B, T, H, S, device=device, seed=seed)}[counts]
    g = random_gates(B, T, G * H, dtype=dtype, device=device, seed=seed)
    return q, k, v, g, idx, bc, cu


def selected_grads(q, k, v, g, idx, bc, BS, do, cu=None):
    """[o, dq, dk, dv, dg] of selected_attention with the given dO."""
    from nsa_module import selected_attention
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g)]
    o = selected_attention(*leaves[:3], idx, bc, BS, None, cu, leaves[3])
    o.backward(do)
    return [o] + [x.grad for x in leaves]
