"""Where nsa()'s forward time goes: each step of the compressed branch and the selection alone.

    python benchmarks/profile_nsa.py [--T 32768 65536] [--l 64 --d 64 --ls 64]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import attention_flops, bench_ms  # noqa: E402
from kernels.banded import W_CAP  # noqa: E402
from nsa_module.common import SeqInfo  # noqa: E402
from nsa_module.common import compressed_layout  # noqa: E402
from nsa_module.compressed import compress_mean  # noqa: E402
from nsa_module.banded import banded_fwd  # noqa: E402
from nsa_module.topk import _select_exact, block_scores, select_blocks, select_from_masked  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--l", type=int, default=64)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--ls", type=int, default=64)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), f"G={a.G} H={a.H} K=V={a.K} l={a.l} d={a.d} l'={a.ls} n={a.n}")
    for T in a.T:
        profile_one(T, a)
        torch.cuda.empty_cache()


def profile_one(T: int, a) -> None:
    """Time each step at T tokens (its tensors are freed on return)."""
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, T, a.G * a.H, a.K, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, T, a.H, a.K, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, T, a.H, a.K, device=dev, dtype=dt, generator=g)
    gate = torch.ones(1, T, a.G * a.H, device=dev, dtype=dt)
    scale = a.K ** -0.5
    qseq = SeqInfo.build(None, 1, T, q)
    kseq = compressed_layout((T,), a.l, a.d, dev)
    kc, vc = compress_mean(k, v, a.l, a.d)
    _, _, lse = banded_fwd(q, kc, vc, gate, W_CAP, a.d, a.l - 1, scale, qseq, kseq)
    s = block_scores(q, kc, lse, a.l, a.d, a.ls, scale, qseq, kseq)
    steps = {
        "compress_mean": lambda: compress_mean(k, v, a.l, a.d),
        "compressed fwd": lambda: banded_fwd(q, kc, vc, gate, W_CAP, a.d, a.l - 1, scale, qseq, kseq),
        "block_scores": lambda: block_scores(q, kc, lse, a.l, a.d, a.ls, scale, qseq, kseq),
        "select on chip (block_topn: scores + top-n)": lambda: select_blocks(q, kc, lse, a.n, a.l, a.d, a.ls, scale,
                                                                             qseq, kseq),
        "select (fp32 top-(n+1))": lambda: select_from_masked(s, a.n),
        "select exact int64 (all rows)": lambda: _select_exact(s.view(-1, s.shape[-1]), a.n),
    }
    # useful FLOPs: a query sees floor((t - l + 1) / d) + 1 compressed keys
    t = torch.arange(T, dtype=torch.float64)
    keys = float(torch.clamp(torch.floor((t - a.l + 1) / a.d) + 1, min=0).mean())
    flops = {"compressed fwd": attention_flops(T, a.G * a.H, a.K, a.K, keys),
             "block_scores": attention_flops(T, a.G * a.H, a.K, 0, keys)}  # QKᵀ only
    flops["select on chip (block_topn: scores + top-n)"] = flops["block_scores"]
    for name, fn in steps.items():
        ms = bench_ms(fn, rep=100)
        rate = f" ({flops[name] / ms / 1e9:.0f} TFLOP/s)" if name in flops else ""
        print(f"T={T} {name}: {ms:.3f} ms{rate}", flush=True)


if __name__ == "__main__":
    main()
