"""Emulate the banded (sliding) dQ kernel's arithmetic in float64 with its roundings, to see which
rounding makes a dQ row miss the per-row rule (tests/utils.check_rows), and what candidate fixes do.

The kernels (kernels/banded.py banded_fwd, banded_bwd_dq) per row (token t, head h), keys j in key
tiles of BN = 64 starting at the query tile's `lo` (key_range), in order:
  forward   s_j = q·k_j (fp32 MMA); online softmax per tile: m = max(m, tile max), p~_j =
            exp2(s_j·sc - m·sc), l = l·r + Σ p~_j (fp32), acc_o = acc_o·r + Σ bf16(p~_j)·v_j;
            O = bf16(acc_o / l) (stored; OG = gate·O is the output), LSE = log2 l + m·sc.
  dQ        dGate = Σ dOG∘O (O as stored), Delta = gate·dGate; P_j = exp2(s_j·sc - LSE),
            dP_j = dOG·v_j, dS_j = P_j·(gate·dP_j - Delta), dQ = bf16(scale·Σ bf16(dS_j)·k_j).
Each rounding can be turned off (float64 there instead), and Delta can come from
  a: an fp32 O (the forward writing O in fp32 for the backward),
  b: Σ_j P_j·gate·dP_j (a first pass over the row's key tiles, consistent with the P of dQ),
  c: the bf16 O, with dQ corrected by -scale·(Σ_j dS_j)·k_ref, k_ref the row's top-scoring key
     (Σ_j dS_j, which is 0 in exact arithmetic, is a row sum of the dS the kernel already has;
     the error left is scale·(Σ dS)·Σ_j P_j (k_j - k_ref), small where one key dominates).

    python -m tools.emulate_dq [--device cpu|cuda] [--seed 0] [--kernel]

On the CPU the inputs are the failing test's shapes and sequences (G16-H2-K128V128-W512-bfloat16-
varlen-T1000) from CPU generators (CUDA's give other numbers); --device cuda generates them exactly as
the test does (dO from run_both's CUDA generator), and --kernel also runs the kernel there and
reports how far its dQ is from the emulation, row by row, as written, with O_FP32 (fix a) and with DELTA_PASS (fix b).
"""
from __future__ import annotations

import argparse
import math

import torch

import reference as R
from reference.inputs import random_gates, random_qkv
from tests.utils import ROUNDING, hostile_cu

G, H, KD, VD, W, T_LEN, BM, BN = 16, 2, 128, 128, 512, 1000, 4, 64
LOG2E = 1.4426950408889634

# the kernel's roundings (all on: the kernel as written)
ROUNDINGS = ("s_fp32", "p_bf16", "o_bf16", "lse_fp32", "dp_fp32", "ds_fp32", "ds_bf16", "dq_bf16")


def rnd(x, dtype, on=True):
    return x.to(dtype).to(torch.float64) if on else x


def emulate(q, k, v, g, do, cu, off=(), delta_mode="o", o_override=None, tokens=None, probe=None):
    """dQ `[T, HQ, K]` (float64 holding the kernel's values) of the sliding kernels on one packed
    batch; `off`: roundings turned off; delta_mode: "o" (the kernel), "a", "b" or "c" (docstring);
    tokens: only these rows (the others stay 0); probe: a dict that gets each token's intermediates."""
    on = {name: name not in off for name in ROUNDINGS}
    bf, f32 = torch.bfloat16, torch.float32
    scale = KD ** -0.5
    sc = scale * LOG2E
    q, k, v, g, do = (x[0].double() for x in (q, k, v, g, do))  # noqa: E501  # [T, HQ|H, D]
    T, HQ = q.shape[:2]
    offs = cu.tolist()
    seq_of = torch.zeros(T, dtype=torch.long)
    for i, (s, e) in enumerate(zip(offs, offs[1:])):
        seq_of[s:e] = i
    head_kv = torch.arange(HQ) // G
    dq = torch.zeros(T, HQ, KD, dtype=torch.float64)
    for t in range(T) if tokens is None else tokens:
        n = int(seq_of[t])
        s0 = offs[n]
        pos = t - s0
        t0 = t - t % BM  # the query tile's first token, its key range's low end
        lo = offs[int(seq_of[t0])] + max(0, (t0 - offs[int(seq_of[t0])]) - W + 1)
        keys = torch.arange(max(s0, s0 + pos - W + 1), t + 1)
        tile = (keys - lo) // BN
        kk, vv = k[keys][:, head_kv], v[keys][:, head_kv]  # [N, HQ, D]
        s = rnd(torch.einsum("hd,nhd->hn", q[t], kk), f32, on["s_fp32"])  # [HQ, N]
        m = torch.full((HQ,), -math.inf, dtype=torch.float64)
        l = torch.zeros(HQ, dtype=torch.float64)
        acc_o = torch.zeros(HQ, VD, dtype=torch.float64)
        for ti in tile.unique().tolist():
            sel = tile == ti
            m_prev, m = m, torch.maximum(m, s[:, sel].amax(1))
            r = torch.where(m_prev == -math.inf, 0.0, torch.exp2((m_prev - m) * sc))
            p = rnd(torch.exp2(s[:, sel] * sc - m[:, None] * sc), f32, on["s_fp32"])
            l = l * r + p.sum(1)
            acc_o = acc_o * r[:, None] + torch.einsum("hn,nhv->hv", rnd(p, bf, on["p_bf16"]), vv[sel])
        o32 = rnd(acc_o / l[:, None], f32)
        o = rnd(o32, bf, on["o_bf16"]) if o_override is None else o_override[t]
        lse = rnd(torch.log2(l) + m * sc, f32, on["lse_fp32"])
        P = rnd(torch.exp2(s * sc - lse[:, None]), f32, on["s_fp32"])
        dp = rnd(torch.einsum("hv,nhv->hn", do[t], vv), f32, on["dp_fp32"])
        gt = g[t][:, None]
        if delta_mode == "a":
            delta = g[t] * (do[t] * o32).sum(1)
        elif delta_mode == "b":
            delta = g[t] * (P * dp).sum(1)
        else:
            delta = g[t] * (do[t] * o).sum(1)
        delta = rnd(delta, f32, on["ds_fp32"])
        ds = rnd(P * (gt * dp - delta[:, None]), f32, on["ds_fp32"])
        acc = torch.einsum("hn,nhk->hk", rnd(ds, bf, on["ds_bf16"]), kk)
        if delta_mode == "c":
            ref_key = s.argmax(1)
            acc = acc - ds.sum(1)[:, None] * kk[ref_key, torch.arange(HQ)]
        dq[t] = rnd(rnd(acc * scale, f32), bf, on["dq_bf16"])
        if probe is not None:
            probe[t] = dict(P=P, o=o, o32=o32, delta=delta, consistent=(P * gt * dp).sum(1), ds=ds, kk=kk)
    return dq


def rows_report(name, dq, ref, lp, cu, show=5, watch=()):
    """check_rows' rule per row: which rows fail, the worst few (error / allowance), and the rows in
    `watch` (flattened indices)."""
    x, r, p = (a.double().reshape(-1, a.shape[-1]) for a in (dq, ref, lp))
    err = (x - r).abs().amax(-1)
    lp_err = (p - r).abs().amax(-1)
    scale = r.abs().amax(-1)
    top = r.abs().max().item()
    allowed = 2 * lp_err + ROUNDING[torch.bfloat16] * scale + ROUNDING[torch.bfloat16] * top
    ratio = err / allowed
    offs = cu.tolist()
    HQ = dq.shape[-2]
    order = ratio.argsort(descending=True)[:show].tolist()
    worst = []
    for i in order:
        t, h = divmod(i, HQ)
        n = max(j for j, o in enumerate(offs) if o <= t)
        worst.append(f"t{t} h{h} pos{t - offs[n]} err {err[i]:.3e} allow {allowed[i]:.3e} ({ratio[i]:.2f})")
    print(f"{name:28s} rows failing {int((ratio > 1).sum()):3d}, max err/allow {ratio.max():.3f}; "
          + "; ".join(worst[:3]))
    if watch:
        print(" " * 29 + "watched: " + "; ".join(f"t{i // HQ} h{i % HQ} err {err[i]:.3e} ({ratio[i]:.2f})"
                                                  for i in watch))
    return ratio


def inputs(device, seed):
    cu = hostile_cu(T_LEN, max(1, 64 // G), 64, device=device)
    q, k, v = random_qkv(1, T_LEN, G * H, H, KD, VD, dtype=torch.bfloat16, device=device, seed=seed)
    g = random_gates(1, T_LEN, G * H, dtype=torch.bfloat16, device=device, seed=seed + 1)
    gen = torch.Generator(device=device).manual_seed(1234 + (seed if device == "cpu" else 0))
    do_og = torch.randn(1, T_LEN, G * H, VD, generator=gen, device=device).to(torch.bfloat16)
    return q, k, v, g, do_og, cu


def references(q, k, v, g, do_og, cu):
    """dQ of the float32 reference and of the same run in bf16 (tests/utils.run_both)."""
    out = []
    for low in (False, True):
        leaves = [(x.detach().clone() if low else x.detach().float()).requires_grad_() for x in (q, k, v, g)]
        if low:
            with R.low_precision():
                R.naive_nsa(*leaves[:3], None, leaves[3], None, None, 64, W, None, cu).backward(do_og)
        else:
            R.naive_nsa(*leaves[:3], None, leaves[3], None, None, 64, W, None, cu).backward(do_og.float())
        out.append(leaves[0].grad.cpu())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel", action="store_true", help="also run the kernel (--device cuda)")
    ap.add_argument("--quick", action="store_true", help="the kernel's roundings and the fixes only")
    a = ap.parse_args()
    q, k, v, g, do_og, cu = inputs(a.device, a.seed)
    ref, lp = references(q, k, v, g, do_og, cu)
    q, k, v, g, do_og, cu = (x.cpu() for x in (q, k, v, g, do_og, cu))
    print(f"seed {a.seed} on {a.device}: dQ tensor scale {ref.abs().max():.4f}")
    base = emulate(q, k, v, g, do_og, cu)
    watch = rows_report("kernel (all roundings)", base, ref, lp, cu).argsort(descending=True)[:3].tolist()
    fix_a = emulate(q, k, v, g, do_og, cu, delta_mode="a")
    fix_b = emulate(q, k, v, g, do_og, cu, delta_mode="b")
    if a.kernel:
        import nsa_module.common
        from nsa_module import sliding_window_attention
        for name, o_fp32, delta_pass, emulated in (("kernel", False, False, base), ("kernel, O_FP32", True, False, fix_a),
                                                   ("kernel, DELTA_PASS", False, True, fix_b)):
            nsa_module.common.O_FP32, nsa_module.common.DELTA_PASS = o_fp32, delta_pass
            qs = q.cuda().requires_grad_()
            sliding_window_attention(qs, k.cuda(), v.cuda(), W, None, cu.cuda(), g.cuda()).backward(do_og.cuda())
            kq = qs.grad.cpu().double()[0]
            d = (kq - emulated).abs().amax(-1)
            print(f"{name} vs its emulation: rows identical {int((d == 0).sum())} of {d.numel()}, "
                  f"max abs diff {d.max():.3e}")
            rows_report(f"{name} (measured)", kq[None], ref, lp, cu, watch=watch)
    if not a.quick:
        for name in ROUNDINGS:
            rows_report(f"  without {name}", emulate(q, k, v, g, do_og, cu, off=(name,)), ref, lp, cu, watch=watch)
    rows_report("fix a: Delta from fp32 O", fix_a, ref, lp, cu, watch=watch)
    rows_report("fix b: Delta = sum P dP", fix_b, ref, lp, cu, watch=watch)
    rows_report("fix c: bf16 O, k_ref term", emulate(q, k, v, g, do_og, cu, delta_mode="c"), ref, lp, cu, watch=watch)


if __name__ == "__main__":
    main()
