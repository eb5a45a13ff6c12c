"""Quickstart: NSA on random data, checked against the golden reference.

    python examples/quickstart.py                 # GPU if there is one, else the CPU path
    python examples/quickstart.py --device cpu    # the CPU path even with a GPU

With a CUDA GPU: the TileLang selected-block attention (forward and backward) on a realistic input
(T = 8192, 64 query heads over 4 kv heads, 16 blocks of 64), checked against the float32 reference.
Without one: the whole reference NSA (compression, top-k selection, selected and sliding branches)
on a small CPU input, checked against full attention where NSA must equal it, and the TileLang
kernels compiled for Hopper (sm_90a) with nvcc when nvcc is present. Either way it says whether
the kernels came from TileLang's cache (about a second) or were compiled (tens of seconds, once).
"""
import argparse
import os
import shutil
import sys
import time

import _cpu  # first: it sets OpenMP's wait policy before torch loads OpenMP
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as R  # noqa: E402
from reference.inputs import random_block_indices, random_gates, random_qkv  # noqa: E402


def cache_files() -> set:
    """The files in TileLang's kernel cache (TILELANG_CACHE_DIR, default ~/.tilelang/cache)."""
    from tilelang import env

    return {os.path.join(d, f) for d, _, files in os.walk(env.TILELANG_CACHE_DIR) for f in files}


def compiled_or_cached(before: set, seconds: float) -> str:
    """Whether the kernels built since `before = cache_files()` were compiled or loaded from the cache."""
    from tilelang import env

    if not env.is_cache_enabled():
        return f"compiled in {seconds:.1f} s (TileLang's cache is off)"
    if cache_files() - before:
        return (f"compiled in {seconds:.1f} s and stored in TileLang's cache ({env.TILELANG_CACHE_DIR}): "
                f"the next run loads them in about a second")
    return f"loaded from TileLang's cache ({env.TILELANG_CACHE_DIR}) in {seconds:.1f} s: nothing compiled"


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def gpu_path():
    from nsa_module import selected_attention

    B, T, HQ, H, K, S, BS = 1, 8192, 64, 4, 128, 16, 64
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"selected attention, B={B} T={T} HQ={HQ} H={H} K=V={K} S={S} block_size={BS}, bf16")
    q, k, v = random_qkv(B, T, HQ, H, K, K, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = random_gates(B, T, HQ, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    idx = random_block_indices(B, T, H, S, BS, device="cuda")
    before, t0 = cache_files(), time.time()
    o = selected_attention(q, k, v, idx, S, BS, g_slc=g)  # the first call builds the kernels
    do = torch.randn_like(o)
    o.backward(do)
    torch.cuda.synchronize()
    print(f"  first call, forward and backward kernels {compiled_or_cached(before, time.time() - t0)}")
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, g)]
    ref = R.naive_nsa(*leaves[:3], leaves[3], None, idx, S, BS)
    ref.backward(do.float())
    for name, x, r in zip(["o", "dq", "dk", "dv", "dg"], [o, q.grad, k.grad, v.grad, g.grad],
                          [ref] + [t.grad for t in leaves]):
        print(f"  {name}: relative error vs float32 reference {rel_err(x, r):.2e}, max abs {(x.float() - r).abs().max().item():.2e}")


def cpu_path():
    print("the reference NSA on the CPU" + ("" if torch.cuda.is_available() else " (no CUDA device here)"))
    B, T, HQ, H, K = 1, 512, 8, 2, 32
    q, k, v = random_qkv(B, T, HQ, H, K, K, seed=0)
    gates = [random_gates(B, T, HQ, seed=s) for s in range(3)]
    t0 = time.time()
    o, idx = R.naive_nsa_full(q, k, v, *gates, block_counts=4, block_size=32, window_size=64,
                              compress_block=16, compress_stride=8)
    print(f"  naive_nsa_full, T={T} HQ={HQ} H={H} K={K} (l=16, d=8, l'=32, n=4, W=64): "
          f"{time.time() - t0:.2f} s, output {list(o.shape)}, finite: {bool(torch.isfinite(o).all())}")
    print(f"  token {T - 1}, kv head 0 reads blocks {idx[0, T - 1, 0].tolist()}")
    # with every block selected and a window covering everything, each branch is full attention
    NB = T // 32
    every = torch.arange(NB, dtype=torch.int32).expand(B, T, H, NB).contiguous()
    full = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(HQ // H, 1),
        v.transpose(1, 2).repeat_interleave(HQ // H, 1), is_causal=True).transpose(1, 2)
    err_slc = (R.naive_nsa(q, k, v, None, None, every, None, 32, 0) - full).abs().max().item()
    err_swa = (R.naive_nsa(q, k, v, None, None, None, None, 32, T) - full).abs().max().item()
    print(f"  all blocks selected vs full causal attention: max abs error {err_slc:.1e}")
    print(f"  window >= T vs full causal attention:        max abs error {err_swa:.1e}")

    if shutil.which("nvcc") is None:
        print("nvcc not found: skipping the TileLang compile for sm_90a")
        return
    from kernels.common import SM90_TARGET
    os.environ.setdefault("TILELANG_DEFAULT_TARGET", SM90_TARGET)
    from kernels.selected import selected_kernels

    before, t0 = cache_files(), time.time()
    kernels = selected_kernels(4, 16, 128, 128, 16, 64, "bfloat16", 128 ** -0.5)
    lines = sum(k.get_kernel_source().count("\n") for k in kernels)
    print(f"  the selected-attention kernels (forward, dQ, dK/dV; {lines} lines of CUDA) for sm_90a "
          f"{compiled_or_cached(before, time.time() - t0)}; run them on a Hopper GPU")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is a GPU, else cpu")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _cpu.set_threads(device)
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
        gpu_path()
    else:
        cpu_path()


if __name__ == "__main__":
    main()
