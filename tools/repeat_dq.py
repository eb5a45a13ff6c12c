"""Diagnose a dQ row that disagrees with the reference: run one sliding/compressed case's backward
several times with one seeded dO, report whether dQ is run-to-run identical and which rows are off
(token, its sequence and position), against the float32 reference.

    python tools/repeat_dq.py [--runs 10]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import nsa_module.common as C  # noqa: E402
import reference as R  # noqa: E402
from nsa_module import sliding_window_attention  # noqa: E402
from reference.inputs import random_gates, random_qkv  # noqa: E402
from tests.utils import hostile_cu  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    G, H, K, V, W, dtype, T = 16, 2, 128, 128, 512, torch.bfloat16, 1000
    cu = hostile_cu(T, max(1, 64 // G), 64)
    q, k, v = random_qkv(1, T, G * H, H, K, V, dtype=dtype, device="cuda", seed=0)
    g = random_gates(1, T, G * H, dtype=dtype, device="cuda", seed=1)
    gen = torch.Generator(device="cuda").manual_seed(1234)
    do = torch.randn(1, T, G * H, V, generator=gen, device="cuda").to(dtype)
    ql, kl, vl, gl = (x.detach().float().requires_grad_() for x in (q, k, v, g))
    R.naive_nsa(ql, kl, vl, None, gl, None, None, 64, W, None, cu).backward(do.float())
    ref = ql.grad
    offs = cu.tolist()
    print("sequences:", [e - s for s, e in zip(offs, offs[1:])][:40])
    first = None
    for poison in (False, True):
        C.POISON_OUTPUTS = poison
        for r in range(a.runs):
            qs = q.detach().clone().requires_grad_()
            o = sliding_window_attention(qs, k, v, W, None, cu, g)
            o.backward(do)
            dq = qs.grad.float()
            err = (dq - ref).abs().amax(-1)[0]  # [T, HQ]
            scale = ref.abs().amax(-1)[0].clamp_min(1e-6)
            bad = (err > 0.1 * scale + 1e-3).nonzero().tolist()
            same = first is None or torch.equal(dq, first)
            first = dq if first is None else first
            desc = []
            for t, h in bad[:6]:
                n = max(i for i, s in enumerate(offs) if s <= t)
                desc.append(f"t={t} h={h} seq={n} pos={t - offs[n]} len={offs[n + 1] - offs[n]} "
                            f"err={err[t, h]:.3g} scale={scale[t, h]:.3g}")
            print(f"poison={poison} run {r}: identical to run 0: {same}; rows off: {len(bad)} {desc}", flush=True)


if __name__ == "__main__":
    main()
