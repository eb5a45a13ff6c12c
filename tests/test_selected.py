"""Selected-block attention: TileLang kernels against the golden reference.

gpu: forward and every gradient (q, k, v, g_slc) against reference.naive_nsa in float32 over a grid
that covers G, head dims, block sizes, S, hostile ids, block_counts, varlen (many short sequences
whose ends fall inside blocks and key tiles), T off the block grid and both dtypes; outputs are
poisoned with NaN first; compared per sequence and per row (tests/utils.py). compile: every kernel family builds for sm_90a on
the CPU. CPU: the host-side inverted index and the argument checks.
"""
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import reference as R
from kernels import selected as K_sel
from nsa_module import selected_attention
from nsa_module.common import SeqInfo, prepare_block_indices
from nsa_module.selected import block_pairs
from reference.inputs import random_block_counts, random_block_indices, random_cu_seqlens, random_qkv
from tests.utils import assert_close, rel_err, run_both, segments, selected_case, selected_grads


# G, H, K, V, BS, S, dtype, counts, varlen, T
GRID = [
    (16, 2, 128, 128, 64, 16, torch.bfloat16, "tensor", False, 1000),  # the benchmark's family
    (1, 4, 64, 64, 16, 4, torch.float16, None, True, 517),
    (2, 2, 192, 128, 32, 16, torch.bfloat16, "int", False, 333),
    (4, 2, 256, 256, 128, 4, torch.float16, "tensor", True, 700),
    (8, 2, 128, 128, 16, 1, torch.bfloat16, "tensor", False, 250),
    (32, 1, 64, 64, 64, 4, torch.bfloat16, None, True, 450),
    (16, 2, 192, 128, 64, 16, torch.float16, "tensor", True, 900),  # the paper's dims
    (1, 2, 128, 128, 128, 16, torch.bfloat16, None, False, 1100),
    (4, 2, 64, 64, 32, 1, torch.float16, "int", False, 301),
    (2, 2, 256, 256, 64, 4, torch.bfloat16, "tensor", False, 400),
    (8, 1, 192, 128, 128, 4, torch.bfloat16, "int", True, 800),
    (32, 1, 128, 128, 32, 16, torch.float16, "tensor", False, 390),
    (64, 1, 128, 128, 64, 4, torch.bfloat16, None, False, 300),
    (3, 2, 64, 64, 64, 4, torch.bfloat16, "tensor", False, 211),  # a G that is no power of 2
    (16, 1, 64, 64, 256, 4, torch.bfloat16, "tensor", True, 1100),  # the largest block size
    (16, 2, 128, 128, 64, 16, torch.bfloat16, "tensor", True, 1000),
    (3, 2, 64, 64, 64, 4, torch.bfloat16, "tensor", True, 411),
    (64, 1, 128, 128, 64, 4, torch.bfloat16, None, True, 400),
    (2, 2, 192, 128, 32, 16, torch.bfloat16, "int", True, 433),
    (4, 1, 16, 16, 32, 4, torch.bfloat16, "tensor", True, 300),  # the smallest head dim (examples/05)
]


def grid_id(c):
    G, H, K, V, BS, S, dtype, counts, varlen, T = c
    return f"G{G}-H{H}-K{K}V{V}-BS{BS}-S{S}-{str(dtype)[6:]}-{counts}-{'varlen' if varlen else 'B2'}-T{T}"


@pytest.fixture(scope="module")
def compiled_grid():
    """Compile the grid's kernel families in parallel once (nvcc runs outside the GIL)."""
    fams = {(c[1], c[0], c[2], c[3], c[5], c[4], str(c[6])[6:], c[2] ** -0.5) for c in GRID}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: K_sel.selected_kernels(*f), fams))


def run_selected(q, k, v, g, idx, bc, cu, BS, scale=None):
    """(ours, float32 reference, low-precision reference): outputs and gradients of q, k, v, g."""
    return run_both(lambda q, k, v, g: selected_attention(q, k, v, idx, bc, BS, scale, cu, g),
                    lambda q, k, v, g: R.naive_nsa(q, k, v, g, None, idx, bc, BS, 0, scale, cu),
                    [q, k, v, g])


@pytest.mark.gpu
@pytest.mark.parametrize("case", GRID, ids=[grid_id(c) for c in GRID])
def test_selected_matches_reference(case, compiled_grid, poison_outputs):
    G, H, K, V, BS, S, dtype, counts, varlen, T = case
    q, k, v, g, idx, bc, cu = selected_case(*case)
    ours, ref, lp = run_selected(q, k, v, g, idx, bc, cu, BS)
    assert_close(ours, ref, lp, ["o", "dq", "dk", "dv", "dg"], dtype, segments(q.shape[0], T, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GRID[0], GRID[15]], ids=[grid_id(GRID[0]), grid_id(GRID[15])])
def test_selected_fp32_o_matches_reference(case, compiled_grid, poison_outputs, monkeypatch):
    """The benchmark's family (fixed-length and varlen) with the forward storing O in fp32 for the
    backward (kernels/banded.py O_FP32; the banded family has the same Delta from O)."""
    import nsa_module.common
    monkeypatch.setattr(nsa_module.common, "O_FP32", True)
    test_selected_matches_reference(case, compiled_grid, poison_outputs)


@pytest.mark.gpu
def test_selected_block_counts_equal_truncated_indices(poison_outputs):
    """block_counts < S must mean the same in forward and backward: the first c slots alone."""
    q, k, v, g, idx, _, _ = selected_case(16, 2, 128, 128, 64, 16, torch.bfloat16, None, False, 600, seed=3)
    do = torch.randn(*q.shape[:3], v.shape[-1], device="cuda", dtype=q.dtype)
    with_counts = selected_grads(q, k, v, g, idx, 5, 64, do)
    truncated = selected_grads(q, k, v, g, idx[..., :5].contiguous(), None, 64, do)
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], with_counts, truncated):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


@pytest.mark.gpu
def test_selected_empty_rows_are_zero(poison_outputs):
    q, k, v, g, idx, _, _ = selected_case(4, 2, 64, 64, 32, 4, torch.bfloat16, None, False, 200, seed=4)
    idx = torch.full_like(idx, -1)
    idx[:, 150:, 0, 2] = 10 ** 6  # past the end: nothing either
    idx[:, 100:, 1, 1] = 3  # block 3 starts at 96: seen by tokens >= 96 of kv head 1
    ours, ref, lp = run_selected(q, k, v, g, idx, None, None, 32)
    o = ours[0]
    assert (o[:, :, :4] == 0).all() and (o[:, 100:, 4:] != 0).all()
    for x in ours:
        assert torch.isfinite(x).all()
    assert_close(ours, ref, lp, ["o", "dq", "dk", "dv", "dg"], torch.bfloat16, segments(2, 200))


@pytest.mark.gpu
def test_selected_full_coverage_is_causal_attention():
    B, T, H, G, K, BS = 1, 640, 2, 8, 128, 64
    q, k, v = random_qkv(B, T, G * H, H, K, K, dtype=torch.bfloat16, device="cuda", seed=5)
    NB = math.ceil(T / BS)
    idx = torch.arange(NB, dtype=torch.int32, device="cuda").expand(B, T, H, NB).contiguous()
    o = selected_attention(q, k, v, idx, block_size=BS)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float().repeat_interleave(G, 1),
        v.transpose(1, 2).float().repeat_interleave(G, 1), is_causal=True).transpose(1, 2)
    assert rel_err(o, ref) <= 1e-2


@pytest.mark.gpu
def test_selected_non_contiguous_inputs():
    q, k, v, g, idx, bc, _ = selected_case(16, 2, 128, 128, 64, 4, torch.bfloat16, "tensor", False, 300, seed=6)
    o = selected_attention(q, k, v, idx, bc, 64, g_slc=g)
    nc = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  same values, other strides
    o_nc = selected_attention(nc(q), nc(k), nc(v), nc(idx), bc, 64, g_slc=g)
    assert not nc(q).is_contiguous()
    assert torch.equal(o, o_nc)


@pytest.mark.gpu
def test_selected_new_lengths_do_not_recompile():
    case = (16, 2, 128, 128, 64, 16, torch.bfloat16, None, False, 256)
    q, k, v, g, idx, _, _ = selected_case(*case)
    selected_attention(q, k, v, idx)
    n = len(K_sel.selected_fwd._kernel_cache)
    q, k, v, g, idx, _, _ = selected_case(*case[:-1], 777)
    selected_attention(q, k, v, idx)
    cu = random_cu_seqlens(777, 4, min_len=40, device="cuda")
    selected_attention(q[:1], k[:1], v[:1], idx[:1], cu_seqlens=cu)
    assert len(K_sel.selected_fwd._kernel_cache) == n


@pytest.mark.gpu
def test_selected_long_sequence_64bit_offsets():
    """B·T·HQ·K > 2^31: offsets past 2^31 elements must be formed in 64 bits. Checks the last
    tokens' output and dq, and dk/dv of the last block, which only the last tokens can select."""
    T, HQ, H, K, BS, S = 131072 + 1000, 64, 4, 256, 64, 8
    assert T * HQ * K > 2 ** 31
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(7)
    q = torch.randn(1, T, HQ, K, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, T, H, K, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, T, H, K, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    idx = random_block_indices(1, T, H, S, BS, device=dev, seed=7)
    o = selected_attention(q, k, v, idx, block_size=BS)
    do = torch.zeros_like(o)
    tail = slice(T - 100, T)
    do[:, tail] = torch.randn_like(do[:, tail])
    o.backward(do)
    pos = torch.arange(T - 100, T, device=dev)
    qf = q.detach()[0, tail].float().requires_grad_()
    kf, vf = (x.detach()[0].float().requires_grad_() for x in (k, v))
    cnt = torch.full((100, H), S, device=dev)
    ref = R.naive.selected_branch(qf, kf, vf, idx[0, tail], cnt, BS, K ** -0.5, positions=pos)
    ref.backward(do[0, tail].float())
    assert rel_err(o[0, tail], ref) <= 1e-2
    assert rel_err(q.grad[0, tail], qf.grad) <= 1e-2
    last = slice((T - 1) // BS * BS, T)
    assert rel_err(k.grad[0, last], kf.grad[last]) <= 1e-2
    assert rel_err(v.grad[0, last], vf.grad[last]) <= 1e-2


# ------------------------------------------------------------------------------------------------
# compile: every family builds for sm_90a here, without a GPU
# ------------------------------------------------------------------------------------------------

FAMILIES = [(2, 16, 128, 128, 16, 64, "bfloat16"), (4, 1, 64, 64, 4, 16, "float16"), (1, 3, 192, 128, 8, 128, "bfloat16"),
            (1, 4, 16, 16, 4, 32, "bfloat16")]


@pytest.mark.compile
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f"selected-H{f[0]}-G{f[1]}-K{f[2]}V{f[3]}-S{f[4]}-BS{f[5]}-{f[6]}")
def test_compile_selected(fam, sm90_target):
    H, G, K, V, S, BS, dtype = fam
    fwd, dq, dkv = K_sel.selected_kernels(H, G, K, V, S, BS, dtype, K ** -0.5)
    for kern in (fwd, dq, dkv):
        src = kern.get_kernel_source()
        assert "__global__" in src
    # offsets into q/o are formed in 64 bits (B·T·HQ·K may pass 2^31)
    assert "(int64_t)" in fwd.get_kernel_source()


@pytest.mark.compile
def test_compile_selected_fp32_o(sm90_target):
    """The forward and dQ kernels with O stored in fp32 (O_FP32) build."""
    fwd, dq, _ = K_sel.selected_kernels(2, 16, 128, 128, 16, 64, "bfloat16", 128 ** -0.5, o_dtype="float32")
    for kern in (fwd, dq):
        src = kern.get_kernel_source()
        assert "__global__" in src and "float* __restrict__ O" in src


# ------------------------------------------------------------------------------------------------
# CPU: the inverted index and the checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("varlen", [False, True])
def test_block_pairs_inverts_the_selection(varlen):
    B, T, H, S, BS = (1 if varlen else 2), 150, 3, 5, 16
    cu = random_cu_seqlens(T, 3, min_len=9, seed=8) if varlen else None
    idx = random_block_indices(B, T, H, S, BS, cu_seqlens=cu, seed=8, adversarial=0.4)
    cnt_in = random_block_counts(B, T, H, S, seed=8)
    idx32, cnt = prepare_block_indices(idx, cnt_in, B, T, H, idx)
    seq = SeqInfo.build(cu, B, T, idx)
    blk_start, blk_end, pair_off, pair_tok = block_pairs(idx32, cnt, BS, seq)
    # brute force: which tokens read which (batch, head, sequence block)
    starts = seq.starts
    expect = {}
    for b in range(B):
        for t in range(T):
            n = int(seq.tok_seq[t])
            pos = t - starts[n]
            for h in range(H):
                for s in range(int(cnt[b, t, h])):
                    i = int(idx32[b, t, h, s])
                    if 0 <= i <= pos // BS:
                        expect.setdefault((b, h, starts[n] + i * BS), []).append(t)
    NB = blk_start.numel()
    got = {}
    for b in range(B):
        for h in range(H):
            for j in range(NB):
                c = (b * H + h) * NB + j
                toks = pair_tok[pair_off[c]:pair_off[c + 1]].tolist()
                if toks:
                    got[(b, h, int(blk_start[j]))] = toks
                seq_end = [e for s_, e in zip(starts, starts[1:] + [T]) if s_ <= blk_start[j] < e][0]
                assert int(blk_end[j]) == seq_end
    assert got == expect
    assert sorted(blk_start.tolist()) == blk_start.tolist()


def test_huge_ids_are_clamped_not_wrapped():
    idx = torch.tensor([[[[2 ** 32 + 5, -2 ** 40, 3]]]])
    idx32, _ = prepare_block_indices(idx, None, 1, 1, 1, idx)
    assert idx32.tolist() == [[[[2 ** 31 - 1, -1, 3]]]]


def _cpu_args(**over):
    q, k, v = random_qkv(1, 64, 4, 2, 64, 64, dtype=torch.bfloat16)
    args = dict(q=q, k=k, v=v, block_indices=random_block_indices(1, 64, 2, 2, 16), block_counts=None,
                block_size=16, scale=None, cu_seqlens=None, g_slc=None)
    args.update(over)
    return args


BAD = [
    ("cpu tensors", {}, ValueError, "CUDA"),
    ("float32", dict(q=torch.randn(1, 64, 4, 64), k=torch.randn(1, 64, 2, 64), v=torch.randn(1, 64, 2, 64)), TypeError,
     "float16 or bfloat16"),
    ("mixed dtypes", dict(k=torch.randn(1, 64, 2, 64, dtype=torch.float16)), TypeError, "one dtype"),
    ("K not a multiple of 16", dict(q=torch.randn(1, 64, 4, 72, dtype=torch.bfloat16),
                                    k=torch.randn(1, 64, 2, 72, dtype=torch.bfloat16)), ValueError, "multiple of 16"),
    ("V too large", dict(v=torch.randn(1, 64, 2, 512, dtype=torch.bfloat16)), ValueError, "V"),
    ("block size 48", dict(block_size=48), ValueError, "block_size must be 16, 32"),
    ("float ids", dict(block_indices=torch.zeros(1, 64, 2, 2)), TypeError, "integer dtype"),
    ("ids shape", dict(block_indices=torch.zeros(1, 64, 4, 2, dtype=torch.int32)), ValueError, "block_indices must have shape"),
    ("counts > S", dict(block_counts=3), ValueError, "block_counts"),
    ("gate shape", dict(g_slc=torch.rand(1, 64, 2)), ValueError, "g_slc"),
    ("bad cu_seqlens", dict(cu_seqlens=torch.tensor([0, 70])), ValueError, "cu_seqlens"),
    ("HQ not multiple of H", dict(q=torch.randn(1, 64, 3, 64, dtype=torch.bfloat16)), ValueError, "multiple"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_selected_bad_input_raises(name, over, exc, msg):
    with pytest.raises(exc, match=msg):
        selected_attention(**_cpu_args(**over))
