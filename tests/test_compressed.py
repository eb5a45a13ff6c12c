"""Compressed attention on the banded kernels (strided keys) against reference.compressed_attention.

gpu: forward and gradients (q, k_cmp, v_cmp, g_cmp) for the paper's (l, d) = (32, 16), fla's
l = d = 64 and (16, 8); G ∈ {1, 3, 4, 8, 16, 32} (query tiles of 64 … 2 tokens); varlen with many
short sequences whose ends fall inside query and key tiles (lengths around l, d and the tile,
1-token sequences, sequences with no compressed token next to ones with one); T off every grid;
both dtypes; outputs poisoned first; compared per sequence and per row (tests/utils.py); the same for
the overlapped forward (pick_config(overlap=True)) on the hostile cases.
compile: the strided family builds for sm_90a. CPU: checks.
"""
import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import reference as R
from kernels import banded as K_band
from nsa_module import compress_mean, compressed_attention
from reference.inputs import random_gates, random_qkv
from tests.utils import assert_close, compressed_segments, hostile_cu, packed, rel_err, run_both, segments

# G, H, K, V, l, d, dtype, varlen, T
GRID = [
    (16, 2, 192, 128, 32, 16, torch.bfloat16, True, 1000),  # the paper's config
    (16, 2, 128, 128, 64, 64, torch.bfloat16, False, 777),  # fla's l = d = l'
    (16, 2, 128, 128, 64, 64, torch.bfloat16, True, 777),
    (1, 4, 64, 64, 16, 8, torch.float16, True, 517),
    (4, 2, 128, 128, 32, 16, torch.float16, False, 333),
    (4, 2, 128, 128, 32, 16, torch.float16, True, 433),
    (8, 2, 64, 64, 32, 16, torch.bfloat16, True, 400),
    (3, 2, 64, 64, 32, 16, torch.float16, True, 400),  # tiles of 21 tokens
    (32, 1, 64, 64, 16, 8, torch.bfloat16, True, 300),
]


def grid_id(c):
    G, H, K, V, l, d, dtype, varlen, T = c
    return f"G{G}-H{H}-K{K}V{V}-l{l}d{d}-{str(dtype)[6:]}-{'varlen' if varlen else 'B2'}-T{T}"


@pytest.fixture(scope="module")
def compiled_grid():
    fams = {(c[1], c[0], c[2], c[3], K_band.W_CAP, c[5], c[4] - 1, str(c[6])[6:], c[2] ** -0.5) for c in GRID}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: K_band.banded_kernels(*f), fams))


def check_compressed(G, H, K, V, l, d, dtype, B, T, cu, seed=3):
    q, k, v = random_qkv(B, T, G * H, H, K, V, dtype=dtype, device="cuda", seed=seed)
    g = random_gates(B, T, G * H, dtype=dtype, device="cuda", seed=seed + 1)
    k_cmp, v_cmp = R.compress_kv(k, v, l, d, cu_seqlens=cu)
    ours, ref, lp = run_both(lambda q, kc, vc, g: compressed_attention(q, kc, vc, l, d, None, cu, g),
                             lambda q, kc, vc, g: R.compressed_attention(q, kc, vc, l, d, None, cu)[0] * g[..., None],
                             [q, k_cmp, v_cmp, g])
    cmp_segs = compressed_segments(cu, B, T, l, d)
    assert_close(ours, ref, lp, ["o", "dq", "dk_cmp", "dv_cmp", "dg"], dtype, segments(B, T, cu),
                 {"dk_cmp": cmp_segs, "dv_cmp": cmp_segs})


@pytest.mark.gpu
@pytest.mark.parametrize("case", GRID, ids=[grid_id(c) for c in GRID])
def test_compressed_matches_reference(case, compiled_grid, poison_outputs):
    G, H, K, V, l, d, dtype, varlen, T = case
    B = 1 if varlen else 2
    # varlen: short sequences around l, d and the query tile (64 // G tokens), then one of the rest
    check_compressed(G, H, K, V, l, d, dtype, B, T, hostile_cu(T, l, d, max(1, 64 // G)) if varlen else None)


# the paper config (K != V), fp16 at G = 4, tiles of 21 tokens
OVERLAP = [GRID[0], GRID[5], GRID[7]]


@pytest.mark.gpu
@pytest.mark.parametrize("case", OVERLAP, ids=[grid_id(c) for c in OVERLAP])
def test_compressed_overlapped_forward_matches_reference(case, monkeypatch, poison_outputs):
    monkeypatch.setattr(K_band, "pick_config", functools.partial(K_band.pick_config, overlap=True))
    G, H, K, V, l, d, dtype, varlen, T = case
    check_compressed(G, H, K, V, l, d, dtype, 1, T, hostile_cu(T, l, d, max(1, 64 // G)))


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[33, 33], [36, 32], [200, 36, 32, 300], [1, 31, 32, 33, 1, 47, 48, 49]],
                         ids=lambda x: "-".join(map(str, x)))
def test_compressed_query_tile_straddling_two_sequences(lengths, poison_outputs):
    """A query tile (8 tokens at G = 8) holding the end of one sequence, whose last rows see a
    compressed key, and the start of the next, whose rows see none yet: the tile's key range once
    stopped before the first sequence's last key, so those rows came out wrong (issue 13)."""
    T = sum(lengths)
    check_compressed(8, 2, 64, 64, 32, 16, torch.bfloat16, 1, T, packed(lengths))


@pytest.mark.gpu
def test_compress_mean_then_attention_is_differentiable_end_to_end():
    T, G, H, K, l, d = 300, 4, 2, 64, 32, 16
    q, k, v = random_qkv(1, T, G * H, H, K, K, dtype=torch.bfloat16, device="cuda", seed=5, requires_grad=True)
    o = compressed_attention(q, *compress_mean(k, v, l, d), l, d)
    o.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))
    assert (o[:, : l - 1] == 0).all(), "tokens before the first compressed block ends see nothing"


FAMILIES = [(2, 16, 192, 128, 32, 16, "bfloat16"), (4, 1, 64, 64, 64, 64, "float16")]


@pytest.mark.compile
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f"compressed-H{f[0]}-G{f[1]}-K{f[2]}V{f[3]}-l{f[4]}d{f[5]}-{f[6]}")
def test_compile_compressed(fam, sm90_target):
    H, G, K, V, l, d, dtype = fam
    for kern in K_band.banded_kernels(H, G, K, V, K_band.W_CAP, d, l - 1, dtype, K ** -0.5):
        assert "__global__" in kern.get_kernel_source()


def _cpu(**over):
    q, k, v = random_qkv(1, 96, 4, 2, 64, 64, dtype=torch.bfloat16)
    k_cmp, v_cmp = R.compress_kv(k, v, 32, 16)
    args = dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp, compress_block=32, compress_stride=16, scale=None,
                cu_seqlens=None, g_cmp=None)
    args.update(over)
    return args


BAD = [
    ("cpu tensors", {}, ValueError, "CUDA"),
    ("stride does not divide block", dict(compress_stride=12), ValueError, "divide"),
    ("wrong number of compressed tokens", dict(compress_stride=8), ValueError, "compressed tokens"),
    ("k_cmp head dim", dict(k_cmp=torch.zeros(1, 5, 2, 32, dtype=torch.bfloat16)), ValueError, "k_cmp must be"),
    ("gate shape", dict(g_cmp=torch.rand(1, 96, 2)), ValueError, "g_cmp"),
    ("float32", dict(q=torch.randn(1, 96, 4, 64)), TypeError, "one dtype"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_compressed_bad_input_raises(name, over, exc, msg):
    with pytest.raises(exc, match=msg):
        compressed_attention(**_cpu(**over))


@pytest.mark.gpu
def test_compressed_long_sequence_64bit_offsets():
    """B·T·HQ·K > 2^31: the last tokens' output and dq against the reference on those tokens, and
    the gradient of the last compressed keys, which only the last tokens see."""
    T, HQ, H, K, l, d = 131072 + 1000, 64, 4, 256, 32, 16
    assert T * HQ * K > 2 ** 31
    q, k, v = random_qkv(1, T, HQ, H, K, K, dtype=torch.bfloat16, device="cuda", seed=8)
    k_cmp, v_cmp = (x.requires_grad_() for x in R.compress_kv(k, v, l, d))
    q.requires_grad_()
    o = compressed_attention(q, k_cmp, v_cmp, l, d)
    do = torch.zeros_like(o)
    tail = slice(T - 100, T)
    do[:, tail] = torch.randn_like(do[:, tail])
    o.backward(do)
    pos = torch.arange(T - 100, T, device="cuda")
    qf = q.detach()[0, tail].float().requires_grad_()
    kf, vf = (x.detach()[0].float().requires_grad_() for x in (k_cmp, v_cmp))
    ref, _ = R.naive.compressed_branch(qf, kf, vf, l, d, K ** -0.5, positions=pos)
    ref.backward(do[0, tail].float())
    assert rel_err(o[0, tail], ref) <= 1e-2
    assert rel_err(q.grad[0, tail], qf.grad) <= 1e-2
    assert rel_err(k_cmp.grad[0, -4:], kf.grad[-4:]) <= 1e-2
    assert rel_err(v_cmp.grad[0, -4:], vf.grad[-4:]) <= 1e-2
