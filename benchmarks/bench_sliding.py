"""Sliding-window attention (W = 512) alone and selected + sliding, against full causal SDPA (flash,
cuDNN) and a sliding-window baseline (flex_attention with a band mask, when it runs), one run.

Config (../shared/ANCHORS.md): B=1, HQ=64, H=4, K=V=128, bf16, gates on; selected branch S=16 blocks
of 64, random causal ids. Providers: `ours` = sliding alone, `ours_slc_swa` = selected + sliding in
one call, `ours_slc` = the selected branch alone (so the two branches launched apart can be compared
with the combined call), `flex_window`, `sdpa_flash`, `sdpa_cudnn`.
Writes benchmarks/results/<device>/sliding.json and .png.

    python benchmarks/bench_sliding.py [--T 8192 16384 32768 65536] [--W 512]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (attention_flops, plot_results_file, print_table, sdpa_provider, time_providers,  # noqa: E402
                               warm_up_gpu, write_results)
from nsa_module import selected_attention, selected_sliding_attention, sliding_window_attention  # noqa: E402
from reference.inputs import random_block_indices  # noqa: E402


def flex_window_provider(q, k, v, W):
    """flex_attention with a causal band mask of width W (GQA through enable_gqa)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, HQ, _ = q.shape
    band = lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W)  # noqa: E731
    mask = create_block_mask(band, None, None, T, T, device=q.device)
    compiled = torch.compile(flex_attention)
    qh, kh, vh = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    return (lambda: compiled(qh, kh, vh, block_mask=mask, enable_gqa=True)), [qh, kh, vh]


def bench_one(T, W, providers, HQ=64, H=4, K=128, S=16, BS=64, dtype=torch.bfloat16):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(T)
    q = torch.randn(1, T, HQ, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, T, H, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, T, H, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    g_slc = torch.rand(1, T, HQ, device=dev, dtype=dtype, generator=g).requires_grad_()
    g_swa = torch.rand(1, T, HQ, device=dev, dtype=dtype, generator=g).requires_grad_()
    idx = random_block_indices(1, T, H, S, BS, device=dev, seed=T)
    leaves = [q, k, v, g_slc, g_swa]
    fns = {}
    if "ours" in providers:
        fns["ours"] = (lambda: sliding_window_attention(q, k, v, W, g_swa=g_swa), leaves)
    if "ours_slc_swa" in providers:
        fns["ours_slc_swa"] = (lambda: selected_sliding_attention(q, k, v, idx, S, BS, W, g_slc=g_slc, g_swa=g_swa), leaves)
    if "ours_slc" in providers:
        fns["ours_slc"] = (lambda: selected_attention(q, k, v, idx, S, BS, g_slc=g_slc), leaves)
    if "flex_window" in providers:
        try:
            fns["flex_window"] = flex_window_provider(q, k, v, W)
        except Exception as e:  # flex_attention needs a working torch.compile on the device
            print(f"  flex_window unavailable: {type(e).__name__}: {str(e)[:200]}", flush=True)
    for be in ("flash", "cudnn"):
        if f"sdpa_{be}" in providers:
            fns[f"sdpa_{be}"] = sdpa_provider(q, k, v, be)
    rows = time_providers(fns, T, W=W)
    for r in rows:
        if r["provider"] == "ours":
            fl = attention_flops(T, HQ, K, K, keys_per_query=min(W, T / 2)) * (1 if r["pass"] == "fwd" else 3.5)
            print(f"  T={T} W={W} sliding {r['pass']}: {fl / r['ms'] / 1e9:.0f} TFLOP/s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--W", type=int, default=512)
    ap.add_argument("--providers", nargs="+",
                    default=["ours", "ours_slc_swa", "ours_slc", "flex_window", "sdpa_flash", "sdpa_cudnn"])
    ap.add_argument("--out", default="sliding")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sliding needs a CUDA GPU; committed results are in benchmarks/results/")
    device = torch.cuda.get_device_name()
    print(f"device: {device}", flush=True)
    warm_up_gpu()
    rows = []
    for T in args.T:
        rows += bench_one(T, args.W, args.providers)
        torch.cuda.empty_cache()
    config = dict(B=1, HQ=64, H=4, K=128, V=128, W=args.W, dtype="bfloat16", S=16, block_size=64,
                  ids="S distinct random causal blocks, sorted", gates="on",
                  sdpa="full causal, K/V expanded to HQ heads", flex_window="flex_attention, causal band of W")
    path = write_results(args.out, device, config, rows)
    print_table(rows, f"sliding window W={args.W} ({device})")
    plot_results_file(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
