"""A decode step's kernels on the GPU's own clock: start offset and duration of every kernel of one
graph-replayed step (ours and full-attention decode through cuDNN), from the CUDA profiler
(CUPTI), L2 flushed before each step. Where profile_decode.py times each launch with events
(launch gaps included), this shows what overlaps under programmatic dependent launch and how long
each kernel really runs.

    python benchmarks/trace_decode.py [--T 8192 16384] [--B 1] [--reps 20]
"""
import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode import H, HQ, K, L, LS, N_SEL, V, W, D, graphed  # noqa: E402
from benchmarks.common import warm_up_gpu  # noqa: E402
from nsa_module.decode import decode_launches, nsa_decode  # noqa: E402


def short(name: str) -> str:
    return name.split("(")[0].split("<")[0][-40:]


def steps(T, B):
    """{provider: (replay, kernel labels or None)} at context T, batch B; ours labelled by its launches."""
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(T + B)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    q, k, v = rnd(B, HQ, K), rnd(B, T, H, K), rnd(B, T, H, V)
    nc = (T - L) // D + 1
    k_cmp, v_cmp = rnd(B, nc, H, K), rnd(B, nc, H, V)
    full = lambda x: torch.full((B,), x, dtype=torch.int32, device=dev)  # noqa: E731
    gates = tuple(torch.rand(B, HQ, device=dev, dtype=dt, generator=g) for _ in range(3))
    k_swa, v_swa = k[:, T - W:].contiguous(), v[:, T - W:].contiguous()
    args = (q, k_cmp, v_cmp, full(nc), k, v, full(T), k_swa, v_swa, full(T), gates, L, D, LS, N_SEL, K ** -0.5)
    ours = lambda: nsa_decode(*args)  # noqa: E731
    labels = [name for name, _ in decode_launches(*args)[0]]
    qs, ks, vs = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)

    def cudnn():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)
    return {"ours": (graphed(ours), labels), "ours_eager": (ours, labels), "sdpa_cudnn": (graphed(cudnn), None)}


def split_steps(kernels):
    """Kernels [(start µs, end µs, name)] in start order, each step opened by a FillFunctor kernel
    (the L2 flush) and the sleep kernels dropped -> [[(name, start from the step's first kernel,
    duration)] per step]."""
    out, cur = [], None
    for s, e, n in kernels:
        if "FillFunctor" in n:
            cur = []
            out.append(cur)
        elif cur is not None and "spin_kernel" not in n and "sleep" not in n:
            cur.append((short(n), s, e))
    return [[(n, s - st[0][1], e - s) for n, s, e in st] for st in out if st]


def summarize(steps_, labels=None):
    """(median span, [(label, median start, median duration)]) over the steps with the most common
    kernel count; labels name the kernels when there are as many."""
    nk = statistics.mode(len(s) for s in steps_)
    st = [s for s in steps_ if len(s) == nk]
    names = labels if labels and len(labels) == nk else [st[0][i][0] for i in range(nk)]
    cols = [(names[i], statistics.median(s[i][1] for s in st), statistics.median(s[i][2] for s in st))
            for i in range(nk)]
    return statistics.median(s[-1][1] + s[-1][2] for s in st), cols


def trace(replay, reps):
    """The steps of `reps` replays, each after an L2 flush, as split_steps returns them."""
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    for _ in range(5):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.fill_(1)  # marks a step's start in the trace
            torch.cuda._sleep(200_000)  # the step's launch is queued before the GPU reaches it
            replay()
        torch.cuda.synchronize()
    kern = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name
                   and "Memset" not in e.name), key=lambda x: x[0])
    return split_steps(kern)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--B", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; per kernel: start offset +duration, µs (median of {a.reps} steps)")
    warm_up_gpu()
    for B in a.B:
        for T in a.T:
            for name, (replay, labels) in steps(T, B).items():
                span, cols = summarize(trace(replay, a.reps), labels)
                print(f"B={B:2d} T={T:6d} {name:10s} span {span:5.1f} | "
                      + " | ".join(f"{k} @{s:5.1f} +{d:5.1f}" for k, s, d in cols), flush=True)


if __name__ == "__main__":
    main()
