"""Sliding-window attention and the selected + sliding combination: kernels against the reference.

gpu: forward and every gradient (q, k, v, gates) against reference.naive_nsa in float32 over G,
head dims, W ∈ {1, 7, 64, 512, >= T}, varlen with many short sequences whose ends fall inside the
query and key tiles, T off the tile grid and both dtypes, outputs poisoned with NaN first, compared
per sequence and per row (tests/utils.py); W >= T against SDPA's full causal attention; the same for
the overlapped forward (pick_config(overlap=True)) on the hostile cases. compile: the family builds
for sm_90a on the CPU, and the overlapped forward of the paper config with its asynchronous MMAs.
CPU: the argument checks.
"""
import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import reference as R
from kernels import banded as K_band
from nsa_module import selected_sliding_attention, sliding_window_attention
from reference.inputs import random_block_counts, random_block_indices, random_gates, random_qkv
from tests.utils import assert_close, hostile_cu, rel_err, run_both, segments

# G, H, K, V, W, dtype, varlen, T
GRID = [
    (16, 2, 128, 128, 512, torch.bfloat16, False, 1000),  # the benchmark's family
    (16, 2, 128, 128, 512, torch.bfloat16, True, 1000),
    (1, 4, 64, 64, 1, torch.float16, True, 517),
    (2, 2, 192, 128, 7, torch.bfloat16, False, 333),
    (2, 2, 192, 128, 7, torch.bfloat16, True, 433),
    (4, 2, 256, 256, 64, torch.float16, True, 700),
    (8, 2, 128, 128, 4096, torch.bfloat16, False, 250),  # W >= T: full causal attention
    (8, 2, 128, 128, 4096, torch.bfloat16, True, 450),
    (32, 1, 64, 64, 512, torch.bfloat16, True, 450),
    (16, 2, 192, 128, 64, torch.float16, True, 900),  # the paper's dims
    (3, 2, 64, 64, 7, torch.bfloat16, False, 211),  # a G that divides no tile
    (3, 2, 64, 64, 7, torch.bfloat16, True, 411),
    (64, 1, 128, 128, 1, torch.bfloat16, False, 300),
    (64, 1, 128, 128, 1, torch.bfloat16, True, 400),
]


def grid_id(c):
    G, H, K, V, W, dtype, varlen, T = c
    return f"G{G}-H{H}-K{K}V{V}-W{W}-{str(dtype)[6:]}-{'varlen' if varlen else 'B2'}-T{T}"


@pytest.fixture(scope="module")
def compiled_grid():
    fams = {(c[1], c[0], c[2], c[3], min(c[4], 1 << 30), str(c[5])[6:], c[2] ** -0.5) for c in GRID}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: K_band.sliding_kernels(*f), fams))


def make_inputs(G, H, K, V, dtype, varlen, T, seed=0, sizes=()):
    B = 1 if varlen else 2
    # varlen: short sequences around the query tile (64 // G tokens), the 64-key tile and `sizes`,
    # 1-token ones between them, then one of the rest (sizes past 128 tokens are left to the long one)
    cu = hostile_cu(T, max(1, 64 // G), 64, *(b for b in sizes if b < 128)) if varlen else None
    q, k, v = random_qkv(B, T, G * H, H, K, V, dtype=dtype, device="cuda", seed=seed)
    g1 = random_gates(B, T, G * H, dtype=dtype, device="cuda", seed=seed + 1)
    g2 = random_gates(B, T, G * H, dtype=dtype, device="cuda", seed=seed + 2)
    return q, k, v, g1, g2, cu


def check_sliding(G, H, K, V, W, dtype, varlen, T):
    q, k, v, g, _, cu = make_inputs(G, H, K, V, dtype, varlen, T, sizes=(W,))
    ours, ref, lp = run_both(lambda q, k, v, g: sliding_window_attention(q, k, v, W, None, cu, g),
                             lambda q, k, v, g: R.naive_nsa(q, k, v, None, g, None, None, 64, W, None, cu),
                             [q, k, v, g])
    assert_close(ours, ref, lp, ["o", "dq", "dk", "dv", "dg"], dtype, segments(q.shape[0], T, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GRID, ids=[grid_id(c) for c in GRID])
def test_sliding_matches_reference(case, compiled_grid, poison_outputs):
    check_sliding(*case)


# the paper config, varlen K != V, K = V = 256 and a G that divides no tile (the paper config's varlen
# case has one dQ row over its allowance with either forward: docs/perf-notes.md, Open)
OVERLAP = [GRID[0], GRID[4], GRID[5], GRID[11]]


@pytest.mark.gpu
@pytest.mark.parametrize("case", OVERLAP, ids=[grid_id(c) for c in OVERLAP])
def test_sliding_overlapped_forward_matches_reference(case, monkeypatch, poison_outputs):
    monkeypatch.setattr(K_band, "pick_config", functools.partial(K_band.pick_config, overlap=True))
    check_sliding(*case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GRID[1]], ids=[grid_id(GRID[1])])
def test_sliding_fp32_o_matches_reference(case, compiled_grid, poison_outputs, monkeypatch):
    """The case whose dQ missed the per-row rule on one row (docs/perf-notes.md), with the forward
    storing O in fp32 for the backward (kernels/banded.py O_FP32): Delta then matches P, so the
    rows where one key dominates keep their small dQ."""
    import nsa_module.common
    monkeypatch.setattr(nsa_module.common, "O_FP32", True)
    test_sliding_matches_reference(case, compiled_grid, poison_outputs)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GRID[1], GRID[2], GRID[7]], ids=[grid_id(c) for c in (GRID[1], GRID[2], GRID[7])])
def test_sliding_delta_pass_matches_reference(case, compiled_grid, poison_outputs, monkeypatch):
    """The same with Delta from a first pass over the key tiles (kernels/banded.py DELTA_PASS),
    exactly consistent with the dQ kernel's P; with W = 1 (one key: dS = 0) and W >= T too."""
    import nsa_module.common
    monkeypatch.setattr(nsa_module.common, "DELTA_PASS", True)
    test_sliding_matches_reference(case, compiled_grid, poison_outputs)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(16, 2, 192, 128, 64, 16, 512, torch.bfloat16, True, 900),
                                  (4, 2, 64, 64, 32, 4, 7, torch.float16, False, 333)],
                         ids=["paper-dims-W512-varlen", "G4-W7"])
def test_selected_plus_sliding_matches_reference(case, poison_outputs):
    G, H, K, V, BS, S, W, dtype, varlen, T = case
    q, k, v, g1, g2, cu = make_inputs(G, H, K, V, dtype, varlen, T, seed=1, sizes=(BS, W))
    B = q.shape[0]
    idx = random_block_indices(B, T, H, S, BS, cu_seqlens=cu, device="cuda", seed=1, adversarial=0.3)
    bc = random_block_counts(B, T, H, S, device="cuda", seed=1)
    ours, ref, lp = run_both(
        lambda q, k, v, g1, g2: selected_sliding_attention(q, k, v, idx, bc, BS, W, None, cu, g1, g2),
        lambda q, k, v, g1, g2: R.naive_nsa(q, k, v, g1, g2, idx, bc, BS, W, None, cu),
        [q, k, v, g1, g2])
    assert_close(ours, ref, lp, ["o", "dq", "dk", "dv", "dg_slc", "dg_swa"], dtype, segments(B, T, cu))


@pytest.mark.gpu
def test_sliding_window_past_T_is_causal_attention():
    B, T, H, G, K = 1, 777, 2, 8, 128
    q, k, v = random_qkv(B, T, G * H, H, K, K, dtype=torch.bfloat16, device="cuda", seed=5)
    o = sliding_window_attention(q, k, v, 2 ** 40)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float().repeat_interleave(G, 1),
        v.transpose(1, 2).float().repeat_interleave(G, 1), is_causal=True).transpose(1, 2)
    assert rel_err(o, ref) <= 1e-2


FAMILIES = [(2, 16, 128, 128, 512, "bfloat16"), (4, 1, 64, 64, 7, "float16"), (1, 3, 192, 128, 64, "bfloat16")]


@pytest.mark.compile
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f"sliding-H{f[0]}-G{f[1]}-K{f[2]}V{f[3]}-W{f[4]}-{f[5]}")
def test_compile_sliding(fam, sm90_target):
    H, G, K, V, W, dtype = fam
    for kern in K_band.sliding_kernels(H, G, K, V, W, dtype, K ** -0.5):
        assert "__global__" in kern.get_kernel_source()


@pytest.mark.compile
@pytest.mark.parametrize("branch", ["sliding", "compressed"])
def test_compile_overlapped_forward(branch, sm90_target):
    """The paper config's overlapped forward (sliding W = 512, compressed l = 32, d = 16; G = 16, H = 4,
    K = V = 128) builds for sm_90a with QKᵀ waited for while PV may still run, and K/V by TMA."""
    W, KS, KC = (512, 1, 0) if branch == "sliding" else (K_band.W_CAP, 16, 31)
    src = K_band.banded_fwd(4, 16, 128, 128, W, KS, KC, "bfloat16", 128 ** -0.5,
                            **K_band.pick_config(16, 128, 128, overlap=True)).get_kernel_source()
    assert "wait_wgmma<1>" in src and "tma_load" in src


def test_overlap_needs_one_warpgroup():
    assert K_band.pick_config(16, 128, 128, overlap=True)["threads"] == 128
    assert "overlap" not in K_band.pick_dq_config(16, 128, 128)
    with pytest.raises(ValueError, match="one warpgroup"):
        K_band.pick_config(128, 128, 128, overlap=True)


@pytest.mark.compile
def test_compile_sliding_fp32_o(sm90_target):
    """The forward and dQ kernels with O stored in fp32 (O_FP32) build; the default ones take no
    o_dtype and are unchanged."""
    H, G, K, V, W, dtype = FAMILIES[0]
    fwd, dq, _ = K_band.sliding_kernels(H, G, K, V, W, dtype, K ** -0.5, o_dtype="float32")
    for kern in (fwd, dq):
        src = kern.get_kernel_source()
        assert "__global__" in src and "float* __restrict__ O" in src


@pytest.mark.compile
def test_compile_sliding_delta_pass(sm90_target):
    """The dQ kernel with Delta from a first pass (DELTA_PASS) builds."""
    H, G, K, V, W, dtype = FAMILIES[0]
    cfg = K_band.pick_dq_config(G, K, V)
    kern = K_band.banded_bwd_dq(H, G, K, V, W, 1, 0, dtype, K ** -0.5, **cfg, delta_pass=True)
    assert "__global__" in kern.get_kernel_source()


def _cpu(**over):
    q, k, v = random_qkv(1, 64, 4, 2, 64, 64, dtype=torch.bfloat16)
    args = dict(q=q, k=k, v=v, window_size=16, scale=None, cu_seqlens=None, g_swa=None)
    args.update(over)
    return args


BAD = [
    ("cpu tensors", {}, ValueError, "CUDA"),
    ("window 0", dict(window_size=0), ValueError, "window_size"),
    ("float window", dict(window_size=16.0), TypeError, "window_size"),
    ("gate shape", dict(g_swa=torch.rand(1, 64, 3)), ValueError, "g_swa"),
    ("float32", dict(q=torch.randn(1, 64, 4, 64), k=torch.randn(1, 64, 2, 64), v=torch.randn(1, 64, 2, 64)), TypeError,
     "float16 or bfloat16"),
    ("bad cu_seqlens", dict(cu_seqlens=torch.tensor([0, 10, 10, 64])), ValueError, "strictly increasing"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_sliding_bad_input_raises(name, over, exc, msg):
    with pytest.raises(exc, match=msg):
        sliding_window_attention(**_cpu(**over))


@pytest.mark.gpu
def test_sliding_long_sequence_64bit_offsets():
    """B·T·HQ·K > 2^31: the last tokens' output and dq, and dk/dv of the last keys (which only the
    last W tokens see), against the reference on those tokens."""
    T, HQ, H, K, W = 131072 + 1000, 64, 4, 256, 512
    assert T * HQ * K > 2 ** 31
    q, k, v = random_qkv(1, T, HQ, H, K, K, dtype=torch.bfloat16, device="cuda", seed=7, requires_grad=True)
    o = sliding_window_attention(q, k, v, W)
    do = torch.zeros_like(o)
    tail = slice(T - 100, T)
    do[:, tail] = torch.randn_like(do[:, tail])
    o.backward(do)
    pos = torch.arange(T - 100, T, device="cuda")
    qf = q.detach()[0, tail].float().requires_grad_()
    kf, vf = (x.detach()[0, T - 100 - W:].float().requires_grad_() for x in (k, v))
    ref = R.naive.sliding_branch(qf, kf, vf, W, K ** -0.5, positions=pos - (T - 100 - W))
    ref.backward(do[0, tail].float())
    assert rel_err(o[0, tail], ref) <= 1e-2
    assert rel_err(q.grad[0, tail], qf.grad) <= 1e-2
    assert rel_err(k.grad[0, T - 64:], kf.grad[-64:]) <= 1e-2
    assert rel_err(v.grad[0, T - 64:], vf.grad[-64:]) <= 1e-2
