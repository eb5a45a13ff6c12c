"""The whole nsa() against fla's parallel_nsa (with g_cmp: compression + top-k + selected) and full
causal SDPA (flash, cuDNN), forward and forward+backward, one run.

Config (../shared/ANCHORS.md): B=1, HQ=64, H=4, K=V=128, bf16, n=16 blocks, gates on. Providers:
  ours        nsa() with fla's scheme, l = d = l' = 64, window 0: like with like against `fla`
  ours_paper  nsa() with the paper's l=32, d=16, l'=64, W=512 (fla cannot run a window without
              flash-attn, nor l != d)
  fla         fla.ops.nsa.parallel_nsa(g_cmp, g_slc, block_counts=16, block_size=64), window 0
  sdpa_flash, sdpa_cudnn  full causal attention
Writes benchmarks/results/<device>/nsa.json and .png.

    python benchmarks/bench_nsa.py [--T 8192 16384 32768 65536]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (plot_results_file, print_table, sdpa_provider, time_providers,  # noqa: E402
                               warm_up_gpu, write_results)
from nsa_module import nsa  # noqa: E402

try:
    from fla.ops.nsa import parallel_nsa
except ImportError:  # fla-core is optional: a peer, not a dependency
    parallel_nsa = None


def bench_one(T, providers, HQ=64, H=4, K=128, n=16, dtype=torch.bfloat16):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(T)
    q = torch.randn(1, T, HQ, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, T, H, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, T, H, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    gates = [torch.rand(1, T, HQ, device=dev, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]
    leaves = [q, k, v, *gates]
    fns = {}
    if "ours" in providers:
        fns["ours"] = (lambda: nsa(q, k, v, *gates, block_counts=n, block_size=64, window_size=0,
                                   compress_block=64, compress_stride=64), leaves)
    if "ours_paper" in providers:
        fns["ours_paper"] = (lambda: nsa(q, k, v, *gates, block_counts=n, block_size=64, window_size=512,
                                         compress_block=32, compress_stride=16), leaves)
    if "fla" in providers and parallel_nsa is not None:
        fns["fla"] = (lambda: parallel_nsa(q, k, v, g_cmp=gates[0], g_slc=gates[1], block_counts=n, block_size=64), leaves)
    for be in ("flash", "cudnn"):
        if f"sdpa_{be}" in providers:
            fns[f"sdpa_{be}"] = sdpa_provider(q, k, v, be)
    rows = time_providers(fns, T)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--providers", nargs="+", default=["ours", "ours_paper", "fla", "sdpa_flash", "sdpa_cudnn"])
    ap.add_argument("--out", default="nsa")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_nsa needs a CUDA GPU; committed results are in benchmarks/results/")
    device = torch.cuda.get_device_name()
    print(f"device: {device}", flush=True)
    warm_up_gpu()
    rows = []
    for T in args.T:
        rows += bench_one(T, args.providers)
        torch.cuda.empty_cache()
    config = dict(B=1, HQ=64, H=4, K=128, V=128, n=16, dtype="bfloat16", gates="on",
                  ours="l = d = l' = 64, window 0 (fla's scheme)", ours_paper="l=32, d=16, l'=64, W=512",
                  fla="parallel_nsa with g_cmp, l = d = l' = 64, window 0 (its window needs flash-attn)")
    path = write_results(args.out, device, config, rows)
    print_table(rows, f"nsa() ({device})")
    plot_results_file(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
