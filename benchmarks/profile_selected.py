"""Where the selected attention's time goes: each kernel and host step alone, in the benchmark config.

    python benchmarks/profile_selected.py [--T 65536] [--G 16]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import attention_flops, bench_ms  # noqa: E402
from kernels import selected as K_sel  # noqa: E402
from nsa_module.common import SeqInfo, prepare_block_indices  # noqa: E402
from nsa_module.selected import block_pairs, selected_fwd  # noqa: E402
from reference.inputs import random_block_indices  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[65536])
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--S", type=int, default=16)
    ap.add_argument("--BS", type=int, default=64)
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    print(torch.cuda.get_device_name())
    for T in a.T:
        HQ, H, K, S, BS = a.G * a.H, a.H, a.K, a.S, a.BS
        q = torch.randn(1, T, HQ, K, device=dev, dtype=dt)
        k = torch.randn(1, T, H, K, device=dev, dtype=dt)
        v = torch.randn(1, T, H, K, device=dev, dtype=dt)
        idx, cnt = prepare_block_indices(random_block_indices(1, T, H, S, BS, device=dev, seed=T), None, 1, T, H, q)
        seq = SeqInfo.build(None, 1, T, q)
        scale = K ** -0.5
        fwd, dq_k, dkv_k = K_sel.selected_kernels(H, a.G, K, K, S, BS, "bfloat16", scale)
        gate = torch.rand(1, T, HQ, device=dev, dtype=dt)
        o, og, lse = selected_fwd(q, k, v, gate, idx, cnt, BS, scale, seq)
        do = torch.randn_like(o)
        dq = torch.empty_like(q)
        delta, dgate = torch.empty_like(lse), torch.empty_like(lse)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        pairs = block_pairs(idx, cnt, BS, seq)
        fl = attention_flops(T, HQ, K, K, keys_per_query=min(S * BS, T / 2))
        t_f = bench_ms(lambda: fwd(q, k, v, gate, idx, cnt, seq.offsets, seq.tok_seq, o, og, lse))
        t_dq = bench_ms(lambda: dq_k(q, k, v, o, do, gate, lse, idx, cnt, seq.offsets, seq.tok_seq, dq, delta, dgate))
        t_pairs = bench_ms(lambda: block_pairs(idx, cnt, BS, seq))
        t_dkv = bench_ms(lambda: dkv_k(q, k, v, do, gate, lse, delta, *pairs, dk, dv))
        kv_bytes = T * H * S * BS * 2 * K * 2  # K and V tiles each (token, kv head) streams from L2
        print(f"T={T} G={a.G} K={K} S={S} BS={BS}")
        print(f"  fwd kernel  {t_f:8.3f} ms  {fl / t_f / 1e9:6.0f} TFLOP/s  {kv_bytes / t_f / 1e9:6.2f} TB/s of K/V tiles")
        print(f"  dq kernel   {t_dq:8.3f} ms  {1.5 * fl / t_dq / 1e9:6.0f} TFLOP/s  {kv_bytes / t_dq / 1e9:6.2f} TB/s of K/V tiles")
        print(f"  pairs (CSR) {t_pairs:8.3f} ms")
        print(f"  dkv kernel  {t_dkv:8.3f} ms  {2 * fl / t_dkv / 1e9:6.0f} TFLOP/s")


if __name__ == "__main__":
    main()
