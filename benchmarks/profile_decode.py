"""Where a decode step's time goes: each of nsa_decode's kernels timed alone (CUDA events
between launches queued behind a sleep kernel, so the host never shows in the gaps; L2 flushed
before each step), at bench_decode's config, for a few programs-per-SM settings.

    python benchmarks/profile_decode.py [--T 8192 65536] [--B 1 16] [--pps 4 8 16]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nsa_module.decode as D  # noqa: E402
from benchmarks.bench_decode import H, HQ, K, L, LS, N_SEL, V, W, D as DS  # noqa: E402
from benchmarks.common import warm_up_gpu  # noqa: E402


def profile(T, B, reps=50):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    nc = (T - L) // DS + 1
    k, v = rnd(B, T, H, K), rnd(B, T, H, V)
    full = lambda x: torch.full((B,), x, dtype=torch.int32, device=dev)  # noqa: E731
    args = (rnd(B, HQ, K), rnd(B, nc, H, K), rnd(B, nc, H, V), full(nc), k, v, full(T),
            k[:, T - W:].contiguous(), v[:, T - W:].contiguous(), full(T),
            tuple(torch.rand(B, HQ, device=dev, dtype=dt) for _ in range(3)), L, DS, LS, N_SEL, K ** -0.5)
    launches, _ = D.decode_launches(*args)
    for _, f in launches:
        f()
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=dev)
    times = torch.zeros(len(launches))
    for _ in range(reps):
        flush.zero_()
        torch.cuda._sleep(2_000_000)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(launches) + 1)]
        ev[0].record()
        for e, (_, f) in zip(ev[1:], launches):
            f()
            e.record()
        torch.cuda.synchronize()
        times += torch.tensor([a.elapsed_time(b) for a, b in zip(ev, ev[1:])])
    return {name: 1e3 * t / reps for (name, _), t in zip(launches, times.tolist())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--B", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--pps", type=int, nargs="+", default=[D.PROGRAMS_PER_SM])
    ap.add_argument("--cmp", nargs="+", default=[f"{D.CMP_TILE}:{int(D.CMP_ASYNC)}"],
                    help="compressed-kernel variants tile:async, e.g. 64:1 64:0 32:1")
    ap.add_argument("--sparse", nargs="+", type=int, default=[D.SPARSE_TILE], help="selected/sliding tile rows")
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; µs per kernel (mean of 50, L2 flushed)")
    warm_up_gpu()
    for variant, sp in [(c, p) for c in a.cmp for p in a.sparse]:
        tile, asy = variant.split(":")
        D.CMP_TILE, D.CMP_ASYNC, D.SPARSE_TILE = int(tile), bool(int(asy)), sp
        variant = f"{variant} sparse {sp}"
        for pps in a.pps:
            D.PROGRAMS_PER_SM = pps
            for B in a.B:
                for T in a.T:
                    t = profile(T, B)
                    print(f"cmp {variant} programs/SM {pps:2d}  B={B:2d} T={T:6d}: "
                          + "  ".join(f"{k} {x:6.1f}" for k, x in t.items()) + f"  | sum {sum(t.values()):6.1f}",
                          flush=True)


if __name__ == "__main__":
    main()
