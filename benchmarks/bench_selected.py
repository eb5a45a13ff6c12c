"""Selected-block attention: ours vs fla's parallel_nsa vs full causal SDPA (flash, cuDNN), one run.

Config (../shared/ANCHORS.md): B=1, HQ=64, H=4 (G=16), K=V=128, S=16 blocks of 64, bf16, gates on;
two id distributions (providers ours/fla, and ours_local/fla_local):
    random: S distinct random causal block ids per (token, kv head), sorted, unused slots -1 (fla's
            benchmark; neighbouring tokens share little)
    local:  ids as a trained model makes them, neighbouring tokens picking mostly the same blocks
            (reference.inputs.local_block_indices: fixed Zipf-like block importances, perturbed every
            64 tokens, through the selection rule)
A second table at G=4 (HQ=16, H=4), where fla cannot run. SDPA does not read ids: timed once per T.
Writes benchmarks/results/<device>/selected.json and .png.

    python benchmarks/bench_selected.py [--T 8192 16384 32768 65536] [--ids random local]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (attention_flops, plot_results_file, print_table, sdpa_provider, time_providers,  # noqa: E402
                               warm_up_gpu, write_results)
from nsa_module import selected_attention  # noqa: E402
from reference.inputs import local_block_indices, random_block_indices  # noqa: E402

try:
    from fla.ops.nsa import parallel_nsa
except ImportError:  # fla-core is optional: a peer, not a dependency
    parallel_nsa = None


def bench_one(T, HQ, H, K, S, BS, providers, ids="random", dtype=torch.bfloat16, sdpa_max_T=1 << 30):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(T)
    q = torch.randn(1, T, HQ, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, T, H, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, T, H, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    gs = torch.rand(1, T, HQ, device=dev, dtype=dtype, generator=g).requires_grad_()
    make = {"random": random_block_indices, "local": local_block_indices}[ids]
    idx = make(1, T, H, S, BS, device=dev, seed=T)
    leaves = [q, k, v, gs]
    fns = {}
    if "ours" in providers:
        fns["ours"] = (lambda: selected_attention(q, k, v, idx, S, BS, g_slc=gs), leaves)
    if "fla" in providers and parallel_nsa is not None and HQ // H >= 16:
        idx_long = idx.long()
        fns["fla"] = (lambda: parallel_nsa(q, k, v, g_slc=gs, block_indices=idx_long, block_counts=S, block_size=BS), leaves)
    for be in ("flash", "cudnn"):
        if f"sdpa_{be}" in providers and T <= sdpa_max_T and ids == "random":  # reads no ids: once per T
            run, sl = sdpa_provider(q, k, v, be)
            fns[f"sdpa_{be}"] = (run, sl)
    if ids != "random":  # its own lines in the tables and plots: ours_local, fla_local
        fns = {f"{name}_{ids}": fn for name, fn in fns.items()}
    rows = time_providers(fns, T, G=HQ // H)
    for r in rows:
        if r["provider"].startswith("ours"):
            fl = attention_flops(T, HQ, K, K, keys_per_query=min(S * BS, T / 2)) * (1 if r["pass"] == "fwd" else 3.5)
            print(f"  T={T} G={HQ // H} ids={ids} ours {r['pass']}: {fl / r['ms'] / 1e9:.0f} TFLOP/s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--providers", nargs="+", default=["ours", "fla", "sdpa_flash", "sdpa_cudnn"])
    ap.add_argument("--ids", nargs="+", default=["random", "local"], choices=["random", "local"])
    ap.add_argument("--out", default="selected")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_selected needs a CUDA GPU; committed results are in benchmarks/results/")
    device = torch.cuda.get_device_name()
    print(f"device: {device}", flush=True)
    warm_up_gpu()
    S, BS, K = 16, 64, 128
    rows = []
    for HQ, H in ((64, 4), (16, 4)):
        for T in args.T:
            for ids in args.ids:
                rows += bench_one(T, HQ, H, K, S, BS, args.providers, ids)
                torch.cuda.empty_cache()
    config = dict(B=1, K=K, V=K, S=S, block_size=BS, dtype="bfloat16",
                  ids={"random": "S distinct random causal blocks, sorted",
                       "local": "reference.inputs.local_block_indices (neighbours share most blocks)"},
                  tables={"G=16": "HQ=64, H=4", "G=4": "HQ=16, H=4"}, sdpa="full causal, K/V expanded to HQ heads",
                  gates="g_slc on (ours and fla)")
    path = write_results(args.out, device, config, rows)
    for G in (16, 4):
        print_table([r for r in rows if r["G"] == G], f"selected attention, G={G} ({device})")
    plot_results_file(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
