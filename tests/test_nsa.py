"""The whole nsa() call and its top-n selection: kernels against reference.naive_nsa_full.

gpu: block ids against reference.select_blocks (equal, except between blocks whose reference
scores differ by float rounding: either order is accepted there, and the test says how many rows
that was), then output and every gradient against the reference run with the same ids, for the
paper config (l=32, d=16, l'=64, n=16, W=512, G=16, K=192, V=128), fla's l = d = l' = 64, G in
{1, 4, 16}, varlen with many short sequences (around l, d, l' and the query tiles: boundaries
inside tiles), T off every block grid; compared per sequence and per row (tests/utils.py). The
on-chip top-n (both merges) against a row-wise ranking of the score kernel's own fp32 scores: equal at
every row. compile: the score and top-n kernels (every block_topn variant) build for sm_90a. CPU: the
row-wise selection against the reference (ties included) and the tiling.
"""
import functools

import pytest
import torch

import reference as R
from kernels import topk as K_topk
from kernels.banded import W_CAP
from nsa_module import nsa
from nsa_module.banded import banded_fwd
from nsa_module.common import SeqInfo
from nsa_module.common import compressed_layout
from nsa_module.compressed import compress_mean
from nsa_module.topk import block_scores, query_tiles, select_blocks, select_from_masked, select_from_scores
from reference.inputs import random_cu_seqlens, random_gates, random_qkv
from tests.utils import assert_close, check_selection, hostile_cu, run_both, segments

# G, H, K, V, l, d, l', n, W, dtype, varlen, T
CASES = [
    (16, 2, 192, 128, 32, 16, 64, 16, 512, torch.bfloat16, True, 2000),  # the paper's config
    (16, 2, 128, 128, 64, 64, 64, 16, 0, torch.bfloat16, False, 1500),  # fla's simplified config
    (1, 4, 64, 64, 32, 16, 64, 8, 64, torch.float16, True, 1000),
    (4, 2, 128, 128, 16, 8, 32, 5, 100, torch.bfloat16, False, 777),
    (4, 2, 128, 128, 16, 8, 32, 5, 100, torch.bfloat16, True, 777),
    (16, 2, 128, 128, 64, 64, 64, 16, 0, torch.bfloat16, True, 1500),
]


def case_id(c):
    G, H, K, V, l, d, ls, n, W, dtype, varlen, T = c
    return f"G{G}-K{K}V{V}-l{l}d{d}ls{ls}-n{n}-W{W}-{str(dtype)[6:]}-{'varlen' if varlen else 'B2'}-T{T}"


def reference_selection(q, k, l, d, ls, n, cu):
    """Reference ids and the reference block scores they came from (float32 from the same inputs)."""
    H = k.shape[2]
    k_cmp, v_cmp = R.compress_kv(k.float(), k.float(), l, d, cu_seqlens=cu)
    _, p_cmp = R.compressed_attention(q.float(), k_cmp, v_cmp, l, d, cu_seqlens=cu)
    p_slc = R.selection_scores(p_cmp, l, d, ls, H, cu)
    return R.select_blocks(p_slc, n, ls, cu), p_slc


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_nsa_matches_reference(case, poison_outputs):
    G, H, K, V, l, d, ls, n, W, dtype, varlen, T = case
    B = 1 if varlen else 2
    # varlen: many short sequences (around l, d, l' and the query tiles), then a long one
    cu = hostile_cu(T, l, d, ls, max(1, 64 // G)) if varlen else None
    q, k, v = random_qkv(B, T, G * H, H, K, V, dtype=dtype, device="cuda", seed=7)
    gates = [random_gates(B, T, G * H, dtype=dtype, device="cuda", seed=s) for s in (8, 9, 10)]
    _, idx = nsa(q, k, v, *gates, block_counts=n, block_size=ls, window_size=W, cu_seqlens=cu,
                 compress_block=l, compress_stride=d, return_block_indices=True)
    ref_idx, p_slc = reference_selection(q, k, l, d, ls, n, cu)
    n_tied = check_selection(idx, ref_idx, p_slc)
    print(f"rows whose ids differ only between tied blocks: {n_tied}")
    ours, ref, lp = run_both(
        lambda q, k, v, g1, g2, g3: nsa(q, k, v, g1, g2, g3, block_indices=idx, block_counts=n, block_size=ls,
                                        window_size=W, cu_seqlens=cu, compress_block=l, compress_stride=d),
        lambda q, k, v, g1, g2, g3: R.naive_nsa_full(q, k, v, g1, g2, g3, idx, None, ls, W, None, cu, l, d)[0],
        [q, k, v, *gates])
    assert_close(ours, ref, lp, ["o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"], dtype, segments(B, T, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("merge", ["rank", "warp"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_topn_on_chip_equals_ranking_of_its_scores(case, merge, poison_outputs, monkeypatch):
    """block_topn chooses exactly what ranking block_scores' fp32 scores row by row chooses (the same
    sums in the same order: ties, -1 padding and forced blocks included), at every row, with either
    merge (kernels/topk.py: "rank" the default, "warp")."""
    monkeypatch.setattr(K_topk, "pick_topn_config", functools.partial(K_topk.pick_topn_config, merge=merge))
    G, H, K, V, l, d, ls, n, W, dtype, varlen, T = case
    B = 1 if varlen else 2
    cu = hostile_cu(T, l, d, ls, max(1, 64 // G)) if varlen else None
    q, k, v = random_qkv(B, T, G * H, H, K, V, dtype=dtype, device="cuda", seed=3)
    qseq = SeqInfo.build(cu, B, T, q)
    kseq = compressed_layout(tuple(qseq.lengths), l, d, "cuda")
    k_cmp, v_cmp = compress_mean(k, v, l, d, cu)
    gate = torch.ones(B, T, G * H, dtype=dtype, device="cuda")
    _, _, lse = banded_fwd(q, k_cmp, v_cmp, gate, W_CAP, d, l - 1, K ** -0.5, qseq, kseq)
    for n_sel in sorted({3, n, 2 * n + 1}):
        ids = select_blocks(q, k_cmp, lse, n_sel, l, d, ls, K ** -0.5, qseq, kseq)
        scores = block_scores(q, k_cmp, lse, l, d, ls, K ** -0.5, qseq, kseq)
        want = select_from_masked(scores, n_sel, fast=False)
        bad = (ids != want).any(-1).nonzero()
        assert bad.numel() == 0, f"n={n_sel}: {bad.shape[0]} rows differ, first {bad[:3].tolist()}"


# the last: the largest top-n lists block_topn takes at G = 1 (188 KB of shared memory)
FAMILIES = [(2, 16, 192, 32, 16, 64, 16, "bfloat16"), (4, 1, 64, 64, 64, 64, 5, "float16"),
            (1, 1, 256, 32, 16, 64, 64, "bfloat16")]


@pytest.mark.compile
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f"nsa-topk-H{f[0]}-G{f[1]}-K{f[2]}-l{f[3]}d{f[4]}ls{f[5]}-n{f[6]}-{f[7]}")
def test_compile_nsa_block_scores(fam, sm90_target):
    H, G, K, l, d, ls, n, dtype = fam
    cfg = K_topk.pick_config(G, K, l, d, ls)
    kern = K_topk.block_scores(H, G, K, l, d, ls, dtype, K ** -0.5, **cfg)
    assert "__global__" in kern.get_kernel_source()
    kern = K_topk.block_topn(H, G, K, l, d, ls, n, dtype, K ** -0.5, **cfg)
    assert "__global__" in kern.get_kernel_source()


# block_topn's variants (benchmarks/profile_topn.py) at the paper's G = 16 and at G = 1 and 4, where
# a warp merges several tokens (16 and 4 kept lists in its registers)
VARIANT_FAMILIES = [(16, dict(merge="warp")), (16, dict(merge="warp", q_regs=True)), (16, dict(merge="warp", JT=32)),
                    (1, dict(merge="warp")), (4, dict(merge="warp"))]


@pytest.mark.compile
@pytest.mark.parametrize("G,variant", VARIANT_FAMILIES, ids=lambda x: str(x) if isinstance(x, int) else
                         "-".join(f"{k}{v}" for k, v in sorted(x.items())))
def test_compile_topn_variants(G, variant, sm90_target):
    """Each variant builds for sm_90a; the warp merge adds no block barrier to the score step's four
    (before and after the MMA, after P and after the head sums; q_regs adds two before the loop)."""
    cfg = K_topk.pick_topn_config(G, 128, 32, 16, 64, 16, **variant)
    assert cfg["merge"] == "warp"
    src = K_topk.block_topn(4, G, 128, 32, 16, 64, 16, "bfloat16", 128 ** -0.5, **cfg).get_kernel_source()
    assert "__shfl_sync" in src and src.count("__syncthreads()") <= 4 + 2 * cfg["q_regs"]
    assert ("wgmma_rs" in src) == cfg["q_regs"]


def test_topn_warp_merge_only_where_its_lists_fit_registers():
    """The warp merge (the default) keeps 2·tpw·⌈n/32⌉ registers a lane; past WARP_KEPT_REGS it falls
    back to the rank merge."""
    assert K_topk.pick_topn_config(16, 128, 32, 16, 64, 16, merge="warp")["merge"] == "warp"
    assert K_topk.pick_topn_config(1, 128, 32, 16, 64, 64, merge="warp")["merge"] == "warp"  # 16 tokens a warp
    assert K_topk.pick_topn_config(1, 128, 32, 16, 64, 65, merge="warp")["merge"] == "rank"
    assert K_topk.pick_topn_config(16, 128, 32, 16, 64, 16)["merge"] == "warp"
    assert K_topk.pick_topn_config(16, 128, 32, 16, 64, 16, merge="rank")["merge"] == "rank"
    for G in (1, 4, 16):  # its shared memory is the score tiles' alone, whatever n
        smem = {K_topk.topn_smem(G, 128, 32, 16, 64, n, merge="warp") for n in (3, 16, 33, 64)}
        assert len(smem) == 1 and smem.pop() <= K_topk.TOPN_SMEM


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fp32-topk"])
@pytest.mark.parametrize("ties", [True, False], ids=["integer-scores", "float-scores"])
@pytest.mark.parametrize("T,ls,n,varlen", [(300, 16, 5, False), (200, 32, 3, False), (97, 8, 16, False), (250, 16, 4, True)])
def test_select_from_scores_equals_reference(T, ls, n, varlen, ties, fast):
    """Both selection paths; integer scores make many exact ties (lower id first must match
    exactly; the fp32 path redoes those rows exactly), float scores have none."""
    g = torch.Generator().manual_seed(T)
    B = 1 if varlen else 2
    cu = random_cu_seqlens(T, 3, min_len=10, seed=T) if varlen else None
    lens = [T] if cu is None else torch.diff(cu).tolist()
    NS = -(-max(lens) // ls)
    scores = torch.randint(0, 4, (B, T, 3, NS), generator=g).float() if ties else torch.rand(B, T, 3, NS, generator=g)
    ref = R.select_blocks(scores, n, ls, cu)
    assert torch.equal(select_from_scores(scores, n, ls, SeqInfo.build(cu, B, T, scores), fast), ref.int())


def test_topn_falls_back_to_the_score_matrix_only_past_shared_memory():
    """The paper's n = 16 selects on chip at every G and head size; n = 128 at G = 1 (tiles of 64
    tokens, 2·128 kept entries each) would not fit and ranks a score matrix instead."""
    for G in (1, 2, 3, 16, 64, 128):
        for K in (64, 128, 192, 256):
            assert K_topk.topn_smem(G, K, 32, 16, 64, 16) <= K_topk.TOPN_SMEM
    assert K_topk.topn_smem(1, 256, 32, 16, 64, 64) <= K_topk.TOPN_SMEM
    assert K_topk.topn_smem(1, 128, 32, 16, 64, 128) > K_topk.TOPN_SMEM


def test_query_tiles_never_straddle_sequences():
    # sequences of 5, 9 and 3 tokens, tiles of 4: [0, 4) [4, 5) | [5, 9) [9, 13) [13, 14) | [14, 17)
    assert query_tiles((5, 9, 3), 4, "cpu").tolist() == [0, 4, 5, 9, 13, 14]
