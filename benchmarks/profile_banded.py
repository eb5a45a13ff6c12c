"""The banded kernels (sliding window and compressed attention) under several tile configurations:
time, TFLOP/s on the useful FLOPs, and agreement with the first configuration (the validated one).

    python benchmarks/profile_banded.py [--T 65536] [--variants base r128 r128s2 ...] [--out DIR]

A variant is (rows, BN, num_stages) of the forward and dQ kernels, the dK/dV kernels' options and
the forward's `overlap` switch (kernels/banded.py: pick_config, pick_dkv_config). Each variant also runs a packed batch
of hostile lengths, compared with the first variant row by row, so a configuration that breaks a
sequence boundary shows here before the gpu tests run.
"""
import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import attention_flops, bench_ms, commit  # noqa: E402
from kernels import banded as K_band  # noqa: E402
from nsa_module.common import SeqInfo  # noqa: E402
from nsa_module.common import compressed_layout  # noqa: E402
from nsa_module.compressed import compress_mean  # noqa: E402
from nsa_module.banded import banded_bwd, banded_fwd  # noqa: E402

# name: (rows, BN, num_stages of fwd/dQ, dK/dV options, overlapped forward); "base" is the
# configuration before issue 14 (validated over the gpu grids), the first variant the others are
# compared with; "overlap" is base with the forward of banded_overlap_loop (issue 14 step 3), 2
# programs an SM (83 KB of shared memory); "overlap-bn32" the same on 32-key steps, 4 an SM (50 KB)
VARIANTS = {
    "base": (64, 64, 1, dict(num_stages=1), False),
    "overlap": (64, 64, 1, dict(num_stages=1), True),
    "overlap-bn32": (64, 32, 1, dict(num_stages=1), True),
    "r64s2": (64, 64, 2, dict(num_stages=2), False),
    "r128": (128, 64, 1, dict(num_stages=1), False),
    "r128s2": (128, 64, 2, dict(num_stages=2), False),
    "r128b128s2": (128, 128, 2, dict(num_stages=2), False),
    "r128s2-dkv128": (128, 64, 2, dict(num_stages=2, BN=128, threads=256), False),
}


def use_variant(v):
    rows, BN, ns, dkv, overlap = VARIANTS[v]
    K_band.pick_config = functools.partial(ORIG_PICK, rows=rows, BN=BN, num_stages=ns, overlap=overlap)
    K_band.pick_dkv_config = functools.partial(ORIG_PICK_DKV, **dkv)


ORIG_PICK, ORIG_PICK_DKV = K_band.pick_config, K_band.pick_dkv_config


def branch(name, T, l, d, W):
    """(W, KS, KC, keys per query on average) of a branch over one sequence of T tokens."""
    t = torch.arange(T, dtype=torch.float64)
    if name == "sliding":
        return W, 1, 0, float(torch.clamp(t + 1, max=W).mean())
    return K_band.W_CAP, d, l - 1, float(torch.clamp(torch.floor((t - l + 1) / d) + 1, min=0).mean())


def inputs(cu, T, H, G, Kd, dev, dt, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(1, T, G * H, Kd, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, T, H, Kd, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, T, H, Kd, device=dev, dtype=dt, generator=g)
    gate = torch.rand(1, T, G * H, device=dev, dtype=dt, generator=g) + 0.5
    do = torch.randn(1, T, G * H, Kd, device=dev, dtype=dt, generator=g)
    return q, k, v, gate, do


def run_branch(name, q, k, v, gate, do, cu, l, d, W):
    """Forward and backward of one branch; returns (fwd closure, bwd closure, outputs)."""
    T = q.shape[1]
    scale = q.shape[-1] ** -0.5
    qseq = SeqInfo.build(cu, 1, T, q)
    if name == "sliding":
        kseq, kk, vv = qseq, k, v
    else:
        kseq = compressed_layout(tuple(qseq.lengths), l, d, str(q.device))
        kk, vv = compress_mean(k, v, l, d, cu)
    Wk, KS, KC, _ = branch(name, T, l, d, W)
    fwd = lambda: banded_fwd(q, kk, vv, gate, Wk, KS, KC, scale, qseq, kseq)  # noqa: E731
    o, og, lse = fwd()
    bwd = lambda: banded_bwd(q, kk, vv, gate, o, lse, do, Wk, KS, KC, scale, qseq, kseq)  # noqa: E731
    dq, dk, dv, dg = bwd()
    return fwd, bwd, dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv, dgate=dg)


def _build(fam):
    """Compile one (branch, variant)'s three kernels (a worker process; TileLang's cache keeps them)."""
    br, var, H, G, Kd, l, d, W = fam
    os.environ.setdefault("TILELANG_DEFAULT_TARGET", '{"kind": "cuda", "arch": "sm_90a"}')
    use_variant(var)
    Wk, KS, KC, _ = branch(br, 64, l, d, W)
    K_band.banded_kernels(H, G, Kd, Kd, Wk, KS, KC, "bfloat16", Kd ** -0.5)


def worst_row(x, ref):
    """Largest row-wise max |x - ref| over the row's max |ref| (rows: all but the last dim)."""
    x, ref = x.float().flatten(0, -2), ref.float().flatten(0, -2)
    fin = torch.isfinite(ref)
    err = torch.where(fin, (x - ref).abs(), torch.zeros_like(ref))
    bad = (~torch.isfinite(x) & fin).any().item() or (torch.isfinite(x) != fin).any().item()
    return float("inf") if bad else float((err.amax(-1) / ref.abs().where(fin, 0).amax(-1).clamp_min(1e-3)).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[65536])
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--l", type=int, default=32)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--W", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--branches", nargs="+", default=["sliding", "compressed"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=0, help="compile every variant's kernels first, in parallel")
    ap.add_argument("--compile-only", action="store_true")
    a = ap.parse_args()
    if a.jobs:
        from concurrent.futures import ProcessPoolExecutor
        fams = [(br, var, a.H, a.G, a.K, a.l, a.d, a.W) for br in a.branches for var in a.variants]
        with ProcessPoolExecutor(a.jobs) as ex:
            list(ex.map(_build, fams))
    if a.compile_only:
        return
    dev, dt = "cuda", torch.bfloat16
    name = torch.cuda.get_device_name()
    print(name, f"G={a.G} H={a.H} K=V={a.K} l={a.l} d={a.d} W={a.W}", flush=True)
    rows, checks = [], {}
    # hostile packing: short sequences around every tile edge, then the rest
    from tests.utils import hostile_cu
    cu = hostile_cu(3000, 16, 32, 64, 128, 8, device=dev)
    small = inputs(cu, 3000, a.H, a.G, a.K, dev, dt, seed=1)
    for br in a.branches:
        ref_small = None
        for var in a.variants:
            use_variant(var)
            _, _, out = run_branch(br, *small, cu, a.l, a.d, a.W)
            torch.cuda.synchronize()
            if ref_small is None:
                ref_small = out
            errs = {key: worst_row(out[key], ref_small[key]) for key in out}
            print(f"{br} {var} packed vs {a.variants[0]}: " + " ".join(f"{k_}={e:.2e}" for k_, e in errs.items()),
                  flush=True)
            for T in a.T:
                q, k, v, gate, do = inputs(None, T, a.H, a.G, a.K, dev, dt)
                fwd, bwd, _ = run_branch(br, q, k, v, gate, do, None, a.l, a.d, a.W)
                keys = branch(br, T, a.l, a.d, a.W)[3]
                flop = attention_flops(T, a.G * a.H, a.K, a.K, keys)
                ms_f, ms_b = bench_ms(fwd, rep=100), bench_ms(bwd, rep=100)
                print(f"  {br} {var} T={T}: fwd {ms_f:.3f} ms ({flop / ms_f / 1e9:.0f} TFLOP/s), "
                      f"bwd {ms_b:.3f} ms ({2.5 * flop / ms_b / 1e9:.0f} TFLOP/s)", flush=True)
                # the results schema (benchmarks/common.py): fwdbwd = fwd + bwd, timed apart
                prov = f"{br} {var}"
                checks[prov] = errs
                rows += [dict(T=T, provider=prov, ms=ms_f, tflops=flop / ms_f / 1e9, **{"pass": "fwd"}),
                         dict(T=T, provider=prov, ms=ms_f + ms_b, bwd_ms=ms_b, tflops=3.5 * flop / (ms_f + ms_b) / 1e9,
                              **{"pass": "fwdbwd"})]
                del q, k, v, gate, do, fwd, bwd
                torch.cuda.empty_cache()
    use_variant(a.variants[0])
    if a.out:
        with open(os.path.join(a.out, "profile_banded.json"), "w") as f:
            config = dict(vars(a), tiles={v: str(VARIANTS[v]) for v in a.variants}, packed_worst_row_vs_base=checks)
            json.dump({"device": name, "commit": commit(), "config": config, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
