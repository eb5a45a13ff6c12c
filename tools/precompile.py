"""Compile kernel families ahead of time for Hopper (sm_90a), on a machine without a GPU.

TileLang keys its disk cache on the kernel's TIR, the target string, the pass configs and the
TileLang build, not on the machine: kernels compiled here with the sm_90a target and the same
TileLang wheel are cache hits on an H100 that runs with the same TILELANG_DEFAULT_TARGET and
TILELANG_CACHE_DIR. That moves minutes of nvcc time off the GPU.

    TILELANG_CACHE_DIR=.tlcache python tools/precompile.py tests bench   # also: examples, memcheck, profile_topn, profile_banded
    # on the GPU machine: TILELANG_CACHE_DIR=.tlcache TILELANG_DEFAULT_TARGET='{"kind": "cuda", "arch": "sm_90a"}' pytest -m gpu

Families are named like the launchers name them: nsa(...) compiles the compressed (banded, strided
keys), block-score, selected and (W > 0) sliding kernels of one configuration.
"""
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.common import SM90_TARGET  # noqa: E402

os.environ.setdefault("TILELANG_DEFAULT_TARGET", SM90_TARGET)

from kernels import selected as K_sel  # noqa: E402
from kernels import banded as K_band  # noqa: E402
from kernels import topk as K_topk  # noqa: E402


# A family is (name, args): picklable, so worker processes (not threads: TileLang's lowering holds
# the GIL) can compile them side by side.
def sliding(H, G, K, V, W, dtype, scale=None):
    return [("sliding", (H, G, K, V, W, dtype, scale or K ** -0.5))]


def compressed(H, G, K, V, l, d, dtype, scale=None):
    return [("banded", (H, G, K, V, K_band.W_CAP, d, l - 1, dtype, scale or K ** -0.5))]


def selected(H, G, K, V, S, BS, dtype, scale=None):
    return [("selected", (H, G, K, V, S, BS, dtype, scale or K ** -0.5))]


def nsa(H, G, K, V, l, d, ls, n, W, dtype, scale=None):
    scale = scale or K ** -0.5
    fams = compressed(H, G, K, V, l, d, dtype, scale) + selected(H, G, K, V, n, ls, dtype, scale)
    fams.append(("block_scores", (H, G, K, l, d, ls, dtype, scale)))
    fams.append(("block_topn", (H, G, K, l, d, ls, n, dtype, scale)))
    return fams + (sliding(H, G, K, V, W, dtype, scale) if W > 0 else [])


def topn_variants(H, G, K, l, d, ls, n, dtype, scale=None):
    """block_topn under every variant of benchmarks/profile_topn.py (the default one included)."""
    from benchmarks.profile_topn import VARIANTS
    args = (H, G, K, l, d, ls, n, dtype, scale or K ** -0.5)
    return [("block_topn", args + tuple(sorted(v.items()))) for v in VARIANTS.values()]


def decode(H, G, K, V, l, d, ls, n, W, capacities, dtype, scale=None):
    from kernels.decode import select_blocks_max
    from nsa_module.decode import CMP_ASYNC, CMP_TILE, SPARSE_TILE
    nbs = sorted({select_blocks_max(c, d, ls) for c in capacities})
    return [("decode", (H, G, K, V, l, d, ls, n, W > 0, nb, dtype, float(scale or K ** -0.5), CMP_TILE, CMP_ASYNC,
                        SPARSE_TILE)) for nb in nbs]


def build(fam):
    name, args = fam
    if name == "sliding":
        K_band.sliding_kernels(*args)
    elif name == "banded":
        K_band.banded_kernels(*args)
    elif name == "selected":
        K_sel.selected_kernels(*args)
    elif name == "decode":
        from nsa_module.decode import _kernels
        _kernels(*args)
    elif name == "o_fp32":  # the forward and dQ kernels that store and read O in fp32 (O_FP32)
        (K_sel.selected_kernels if args[0] == "selected" else K_band.sliding_kernels)(*args[1:], o_dtype="float32")
    elif name == "delta_pass":  # the sliding dQ kernel with Delta from a first pass (DELTA_PASS)
        H, G, K, V, W, dtype, scale = args
        K_band.banded_bwd_dq(H, G, K, V, min(W, K_band.W_CAP), 1, 0, dtype, scale, **K_band.pick_dq_config(G, K, V),
                             delta_pass=True)
    elif name == "overlap":  # the overlapped forward alone (its dQ and dK/dV are the defaults)
        H, G, K, V = args[:4]
        K_band.banded_fwd(*args, **K_band.pick_config(G, K, V, overlap=True))
    elif name == "profile_banded":
        from benchmarks.profile_banded import _build
        _build(args)
    elif name == "block_scores":
        H, G, K, l, d, ls, dtype, scale = args
        K_topk.block_scores(*args, **K_topk.pick_config(G, K, l, d, ls))
    elif name == "block_topn":
        H, G, K, l, d, ls, n, dtype, scale = args[:9]
        variant = dict(args[9:])  # (merge, JT) of benchmarks/profile_topn.py's variants; none: the launcher's
        K_topk.block_topn(*args[:9], **K_topk.pick_topn_config(G, K, l, d, ls, n, **variant))
    else:
        raise ValueError(f"unknown kernel family {name!r}")
    return name


def test_families():
    """What `pytest -m gpu` compiles for the sliding, compressed, nsa and layer tests."""
    from tests import test_compressed, test_nsa, test_selected, test_sliding
    dt = lambda x: str(x).replace("torch.", "")  # noqa: E731
    fams = []
    for G, H, K, V, BS, S, dtype, _, _, _ in test_selected.GRID:
        fams += selected(H, G, K, V, S, BS, dt(dtype))
    # test_inputs: odd inputs through every family (G = 4, H = 2, K = V = 64)
    fams += selected(2, 4, 64, 64, 4, 32, "bfloat16") + selected(2, 4, 64, 64, 2, 64, "bfloat16")
    fams += sliding(2, 4, 64, 64, 64, "bfloat16") + compressed(2, 4, 64, 64, 32, 16, "bfloat16")
    fams += nsa(2, 4, 64, 64, 32, 16, 32, 4, 64, "bfloat16") + nsa(2, 4, 64, 64, 32, 16, 32, 4, 16, "bfloat16")
    fams += decode(2, 4, 64, 64, 32, 16, 64, 4, 64, [337], "bfloat16")
    for G, H, K, V, W, dtype, _, _ in test_sliding.GRID:
        fams += sliding(H, G, K, V, W, dt(dtype))
    fams += selected(2, 16, 192, 128, 16, 64, "bfloat16") + sliding(2, 16, 192, 128, 512, "bfloat16")
    fams += selected(2, 4, 64, 64, 4, 32, "float16") + sliding(2, 4, 64, 64, 7, "float16")
    fams += sliding(2, 8, 128, 128, 2 ** 40, "bfloat16")
    for G, H, K, V, l, d, dtype, _, _ in test_compressed.GRID:
        fams += compressed(H, G, K, V, l, d, dt(dtype))
    for G, H, K, V, l, d, dtype, _, _ in test_compressed.OVERLAP:
        fams.append(("overlap", (H, G, K, V, K_band.W_CAP, d, l - 1, dt(dtype), K ** -0.5)))
    for G, H, K, V, W, dtype, _, _ in test_sliding.OVERLAP:
        fams.append(("overlap", (H, G, K, V, min(W, K_band.W_CAP), 1, 0, dt(dtype), K ** -0.5)))
    for G, H, K, V, W, dtype, _, _ in (test_sliding.GRID[1],):  # test_sliding_fp32_o_matches_reference
        fams.append(("o_fp32", ("sliding", H, G, K, V, W, dt(dtype), K ** -0.5)))
    for G, H, K, V, BS, S, dtype, *_ in (test_selected.GRID[0], test_selected.GRID[15]):  # its selected twin
        fams.append(("o_fp32", ("selected", H, G, K, V, S, BS, dt(dtype), K ** -0.5)))
    for G, H, K, V, W, dtype, _, _ in (test_sliding.GRID[1], test_sliding.GRID[2], test_sliding.GRID[7]):
        fams.append(("delta_pass", (H, G, K, V, W, dt(dtype), K ** -0.5)))  # test_sliding_delta_pass_matches_reference
    fams += compressed(2, 4, 64, 64, 32, 16, "bfloat16")
    fams += sliding(4, 16, 256, 256, 512, "bfloat16") + compressed(4, 16, 256, 256, 32, 16, "bfloat16")  # T > 128k
    for G, H, K, V, l, d, ls, n, W, dtype, _, _ in test_nsa.CASES:
        fams += nsa(H, G, K, V, l, d, ls, n, W, dt(dtype))
        for n_sel in sorted({3, n, 2 * n + 1}):  # test_topn_on_chip_equals_ranking_of_its_scores, both merges
            for merge in ("warp",) if n_sel == n else ("rank", "warp"):  # nsa() has the launcher's
                fams.append(("block_topn", (H, G, K, l, d, ls, n_sel, dt(dtype), K ** -0.5, ("merge", merge))))
    fams += nsa(2, 8, 64, 64, 32, 16, 64, 4, 64, "bfloat16")  # test_layer's kernel path
    fams += decode(2, 8, 64, 64, 32, 16, 64, 4, 64, [256, 512], "bfloat16")  # and its decode (cache 256 -> 512)
    from tests import test_decode
    for G, H, K, V, l, d, ls, n, W, dtype, lengths in test_decode.CASES:
        fams += decode(H, G, K, V, l, d, ls, n, W, [max(lengths) + 37], dt(dtype))
    return fams


def memcheck_families():
    """What tools/memcheck_banded.py compiles (with and without --overlap)."""
    from tools.memcheck_banded import CASES
    fams = []
    for G, H, K, V, W in CASES:
        fams += sliding(H, G, K, V, W, "bfloat16") + compressed(H, G, K, V, 32, 16, "bfloat16")
        for W_, KS, KC in ((W, 1, 0), (K_band.W_CAP, 16, 31)):  # --overlap's forwards
            fams.append(("overlap", (H, G, K, V, W_, KS, KC, "bfloat16", K ** -0.5)))
    return fams + nsa(2, 16, 128, 128, 32, 16, 32, 4, 1, "bfloat16")


def examples_families():
    """What examples/*.py --device cuda compile (bf16; one kv head of G = 4 query heads)."""
    return (nsa(1, 4, 32, 32, 16, 8, 32, 6, 0, "bfloat16")  # 02: nsa()'s top-n against the reference's
            + nsa(1, 4, 16, 16, 8, 4, 16, 4, 16, "bfloat16")  # 03 and 04: the toy models' layers
            + nsa(1, 4, 16, 16, 16, 8, 32, 4, 64, "bfloat16")  # 05: prefill, then the decode kernels
            + decode(1, 4, 16, 16, 16, 8, 32, 4, 64, [256, 512], "bfloat16"))


def bench_families():
    """The ANCHORS.md benchmark configuration (HQ = 64, H = 4, K = V = 128, bf16)."""
    H, G, K = 4, 16, 128
    return (selected(H, G, K, K, 16, 64, "bfloat16") + sliding(H, G, K, K, 512, "bfloat16")
            + nsa(H, G, K, K, 32, 16, 64, 16, 512, "bfloat16") + nsa(H, G, K, K, 64, 64, 64, 16, 0, "bfloat16")
            + decode(H, G, K, K, 32, 16, 64, 16, 512, [8192, 16384, 32768, 65536], "bfloat16"))


def profile_topn_families():
    """What benchmarks/profile_topn.py compiles (H = 4, K = 128, bf16, l = 32, d = 16, l' = 64): for
    G = 1, 4, 16 the compressed forward (its LSE), block_scores and every block_topn variant at
    n = 16, and at G = 16 also n = 3 and n = 33."""
    fams = []
    for G in (1, 4, 16):
        fams += compressed(4, G, 128, 128, 32, 16, "bfloat16")
        fams.append(("block_scores", (4, G, 128, 32, 16, 64, "bfloat16", 128 ** -0.5)))
        fams += topn_variants(4, G, 128, 32, 16, 64, 16, "bfloat16")
    for n in (3, 33):
        fams += topn_variants(4, 16, 128, 32, 16, 64, n, "bfloat16")
    return fams


def profile_banded_families():
    """What benchmarks/profile_banded.py compiles with its defaults (both branches, every variant, the
    overlapped forward included; H = 4, G = 16, K = V = 128, bf16, l = 32, d = 16, W = 512)."""
    from benchmarks.profile_banded import VARIANTS
    return [("profile_banded", (br, var, 4, 16, 128, 32, 16, 512)) for br in ("sliding", "compressed")
            for var in VARIANTS]


def main(which):
    fams = []
    if "tests" in which:
        fams += test_families()
    if "memcheck" in which:
        fams += memcheck_families()
    if "bench" in which:
        fams += bench_families()
    if "examples" in which:
        fams += examples_families()
    if "profile_topn" in which:
        fams += profile_topn_families()
    if "profile_banded" in which:
        fams += profile_banded_families()
    fams = list(dict.fromkeys(fams))
    t0 = time.time()
    with ProcessPoolExecutor(int(os.environ.get("NSA_PRECOMPILE_JOBS", os.cpu_count()))) as pool:
        list(pool.map(build, fams))
    print(f"{len(fams)} families ready in {time.time() - t0:.0f} s (cache: {os.environ.get('TILELANG_CACHE_DIR', '~/.tilelang/cache')})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["tests"])
