"""Helpers the test files share: running a kernel path and the reference side by side, and the
comparisons that a few wrong rows cannot pass.

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
    reference.low_precision(), each backward with one random dO. Returns three lists
    [output, grad of each input] (a grad is None where the output does not depend on the input)."""
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    o = ours(*leaves)
    if do is None:
        do = torch.randn_like(o)
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
