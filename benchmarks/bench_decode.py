"""One NSA decode step (all three branches, top-n included) against full-attention decode, same run.

Config (../shared/ANCHORS.md): HQ=64, H=4, K=V=128, bf16, paper blocks l=32, d=16, l'=64, n=16,
W=512; batch 1 and 16; context T. The caches are filled with random data as after a prefill of T
tokens (the new token is the T-th). Providers: `ours` (nsa_module.decode.nsa_decode, three kernels,
replayed from a CUDA graph as a serving loop runs it), `ours_eager` (the same, launched from Python),
`sdpa_flash`, `sdpa_cudnn` (one query over the whole K/V cache, enable_gqa=True, as ANCHORS.md
measured them) and their CUDA-graph replays `sdpa_flash_graph`, `sdpa_cudnn_graph`. Rows: pass
`decode`, with B, the tokens a step reads per sequence and kv head, and the bandwidth on the K/V
bytes read. The timer flushes L2 before every step.

    python benchmarks/bench_decode.py [--T 8192 16384 32768 65536] [--B 1 16]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, plot_results_file, print_table, warm_up_gpu, write_results  # noqa: E402
from nsa_module.decode import nsa_decode  # noqa: E402

HQ, H, K, V, L, D, LS, N_SEL, W = 64, 4, 128, 128, 32, 16, 64, 16, 512


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream): returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_one(T, B, providers):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(T + B)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    q = rnd(B, HQ, K)
    k, v = rnd(B, T, H, K), rnd(B, T, H, V)
    nc = (T - L) // D + 1
    k_cmp, v_cmp = rnd(B, nc, H, K), rnd(B, nc, H, V)
    k_swa, v_swa = k[:, T - W:].contiguous(), v[:, T - W:].contiguous()
    full = lambda x: torch.full((B,), x, dtype=torch.int32, device=dev)  # noqa: E731
    num_cmp, lengths, swa_count = full(nc), full(T), full(T)
    gates = tuple(torch.rand(B, HQ, device=dev, dtype=dt, generator=g) for _ in range(3))
    reads_ours = nc + N_SEL * LS + W  # per sequence and kv head (all blocks full at these T)
    fns = {}

    def ours():
        return nsa_decode(q, k_cmp, v_cmp, num_cmp, k, v, lengths, k_swa, v_swa, swa_count, gates,
                          L, D, LS, N_SEL, K ** -0.5)
    if "ours" in providers:
        fns["ours"] = (lambda: graphed(ours), reads_ours)
    if "ours_eager" in providers:
        fns["ours_eager"] = (lambda: ours, reads_ours)
    qs, ks, vs = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)
    for name, backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        be = getattr(torch.nn.attention.SDPBackend, backend)

        def run(be=be):
            with torch.nn.attention.sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)
        if name in providers:
            fns[name] = (lambda run=run: run, T)
        if name + "_graph" in providers:
            fns[name + "_graph"] = (lambda run=run: graphed(run), T)
    rows = []
    for name, (make, reads) in fns.items():
        try:
            fn = make()
            fn()
            ms = bench_ms(fn, rep=100)
        except Exception as e:  # a backend that does not run (or capture) on this device/build
            print(f"  T={T} B={B} {name} unavailable: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        gbs = B * H * reads * (K + V) * 2 / (ms * 1e-3) / 1e9
        rows.append(dict(T=T, B=B, provider=name, **{"pass": "decode"}, ms=ms, tokens_read=reads, kv_GBps=gbs))
        print(f"  T={T} B={B} {name}: {ms * 1e3:.1f} us, reads {reads} tokens, {gbs:.0f} GB/s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--B", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--providers", nargs="+", default=["ours", "ours_eager", "sdpa_flash", "sdpa_cudnn",
                                                         "sdpa_flash_graph", "sdpa_cudnn_graph"])
    ap.add_argument("--out", default="decode")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU; committed results are in benchmarks/results/")
    device = torch.cuda.get_device_name()
    print(f"device: {device}", flush=True)
    warm_up_gpu()
    rows = []
    for B in args.B:
        for T in args.T:
            rows += bench_one(T, B, args.providers)
            torch.cuda.empty_cache()
    config = dict(HQ=HQ, H=H, K=K, V=V, l=L, d=D, block_size=LS, n=N_SEL, W=W, dtype="bfloat16",
                  ours="nsa_decode, 3 kernels, CUDA graph replay (ours_eager: launched from Python)",
                  sdpa="one query over the full cache, enable_gqa=True")
    path = write_results(args.out, device, config, rows)
    labeled = [dict(r, provider=f"{r['provider']} B={r['B']}") for r in rows]
    print_table(labeled, f"decode step ({device})")
    plot_results_file(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
