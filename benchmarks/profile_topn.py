"""block_topn (the block scores + top-n selection on chip) under its merge variants: agreement with
the default variant and with block_scores + the exact ranking on hostile inputs, then time and the
score part's TFLOP/s in the paper config; writes benchmarks/results/<device>/profile_topn.json.

    python benchmarks/profile_topn.py [--T 16384 32768 65536] [--variants rank warp warp-qreg warp-jt32] [--skip-checks]

A variant is block_topn's merge ("rank": today's, the n + JT candidates of a step ranked in shared
memory; "warp": one warp per token, kept list in registers, shuffles), whether Q stays in registers
(warp only) and its step of JT selection blocks (kernels/topk.py: pick_topn_config).

Checks, for every variant: a packed batch of hostile lengths (1-token sequences, lengths around l,
d, l' and the query tile, then a long odd one; 4099 tokens), once with random keys and once with
all-zero keys (every score of a row tied), at G = 1, 4, 16 with n = 16 and at G = 16 with n = 3 and
33. Ids must equal the first variant's and select_from_masked(block_scores(...), exact) at every row;
a failed check is printed and makes the exit status 1 (the timings still run and are written).
"""
import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import HERE, attention_flops, bench_ms, write_results  # noqa: E402
from kernels import topk as K_topk  # noqa: E402
from kernels.banded import W_CAP  # noqa: E402
from nsa_module.banded import banded_fwd  # noqa: E402
from nsa_module.common import SeqInfo  # noqa: E402
from nsa_module.common import compressed_layout  # noqa: E402
from nsa_module.compressed import compress_mean  # noqa: E402
from nsa_module.topk import block_scores, select_blocks, select_from_masked  # noqa: E402

# name: pick_topn_config's variant arguments; the first is the default (validated by the gpu tests)
VARIANTS = {
    "rank": dict(merge="rank"),
    "warp": dict(merge="warp"),
    "warp-qreg": dict(merge="warp", q_regs=True),
    "warp-jt32": dict(merge="warp", JT=32),
}
ORIG_PICK = K_topk.pick_topn_config


def use_variant(v):
    K_topk.pick_topn_config = functools.partial(ORIG_PICK, **VARIANTS[v])


def score_flops(T: int, HQ: int, K: int, l: int, d: int) -> float:
    """The score part's useful FLOPs: q·k_cmp over the compressed keys each query sees,
    2·T·HQ·K·mean_t(⌊(t − l + 1)/d⌋ + 1) ≈ 2·T·HQ·K·T/(2d) (the QKᵀ half of the compressed forward)."""
    t = torch.arange(T, dtype=torch.float64)
    keys = float(torch.clamp(torch.floor((t - l + 1) / d) + 1, min=0).mean())
    return attention_flops(T, HQ, K, 0, keys)


def selection_inputs(cu, T, H, G, Kd, l, d, zero_keys, seed=0):
    """(q, k_cmp, LSE of the compressed forward, qseq, kseq) on one packed row of T tokens."""
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(1, T, G * H, Kd, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, T, H, Kd, device=dev, dtype=dt, generator=g)
    if zero_keys:  # q·k = 0 everywhere: a row's scores tie except where the overlap weights differ
        k.zero_()
    qseq = SeqInfo.build(cu, 1, T, q)
    kseq = compressed_layout(tuple(qseq.lengths), l, d, dev)
    k_cmp, v_cmp = compress_mean(k, k, l, d, cu)
    gate = torch.ones(1, T, G * H, device=dev, dtype=dt)
    _, _, lse = banded_fwd(q, k_cmp, v_cmp, gate, W_CAP, d, l - 1, Kd ** -0.5, qseq, kseq)
    return q, k_cmp, lse, qseq, kseq


def check(variants, H, Kd, l, d, ls):
    """Rows whose ids differ, per case and variant, from the first variant and from the exact ranking
    of block_scores (0 everywhere = pass)."""
    from tests.utils import hostile_cu
    results = {}
    cases = [(G, n, zero) for G in (1, 4, 16) for n in (16,) for zero in (False, True)]
    cases += [(16, n, zero) for n in (3, 33) for zero in (False, True)]
    for G, n, zero in cases:
        T = 4099  # odd, off every tile and block grid
        cu = hostile_cu(T, l, d, ls, max(1, 64 // G), device="cuda")
        q, k_cmp, lse, qseq, kseq = selection_inputs(cu, T, H, G, Kd, l, d, zero, seed=G + n)
        scale = Kd ** -0.5
        want = select_from_masked(block_scores(q, k_cmp, lse, l, d, ls, scale, qseq, kseq), n, fast=False)
        first = None
        for v in variants:
            use_variant(v)
            ids = select_blocks(q, k_cmp, lse, n, l, d, ls, scale, qseq, kseq)
            first = ids if first is None else first
            vs_first = int((ids != first).any(-1).sum())
            vs_exact = int((ids != want).any(-1).sum())
            name = f"G={G} n={n} {'zero keys' if zero else 'random'} {v}"
            results[name] = dict(vs_first=vs_first, vs_exact=vs_exact)
            print(f"check {name}: rows differing from {variants[0]}: {vs_first}, from block_scores + exact "
                  f"ranking: {vs_exact}", flush=True)
    use_variant(variants[0])
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--l", type=int, default=32)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--ls", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--skip-checks", action="store_true")
    a = ap.parse_args()
    name = torch.cuda.get_device_name()
    print(name, f"G={a.G} H={a.H} K={a.K} l={a.l} d={a.d} l'={a.ls} n={a.n}", flush=True)
    checks = {} if a.skip_checks else check(a.variants, a.H, a.K, a.l, a.d, a.ls)
    failed = [c for c, r in checks.items() if r["vs_first"] or r["vs_exact"]]
    rows = []
    scale = a.K ** -0.5
    for T in a.T:
        q, k_cmp, lse, qseq, kseq = selection_inputs(None, T, a.H, a.G, a.K, a.l, a.d, False)
        flop = score_flops(T, a.G * a.H, a.K, a.l, a.d)
        for prov in ["block_scores"] + a.variants:
            if prov == "block_scores":
                fn = functools.partial(block_scores, q, k_cmp, lse, a.l, a.d, a.ls, scale, qseq, kseq)
            else:
                use_variant(prov)
                fn = functools.partial(select_blocks, q, k_cmp, lse, a.n, a.l, a.d, a.ls, scale, qseq, kseq)
            ms = bench_ms(fn, rep=100)
            print(f"  T={T} {prov}: {ms:.3f} ms (score part {flop / ms / 1e9:.0f} TFLOP/s)", flush=True)
            rows.append(dict(T=T, provider=prov, ms=ms, tflops=flop / ms / 1e9, **{"pass": "fwd"}))
        del q, k_cmp, lse
        torch.cuda.empty_cache()
    use_variant(a.variants[0])
    config = dict(vars(a), variants={v: VARIANTS[v] for v in a.variants}, checks=checks,
                  flops="2·T·HQ·K·mean_t(floor((t − l + 1)/d) + 1): q·k_cmp over the visible compressed keys")
    path = write_results("profile_topn", name, config, rows)
    print(f"wrote {os.path.relpath(path, os.path.dirname(HERE))}")
    if failed:
        print(f"FAILED checks: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
