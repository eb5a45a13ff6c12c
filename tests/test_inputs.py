"""Odd but legal inputs: a right answer or a clear error, never a crash inside torch or a kernel.

CPU: integer dtypes of ids, counts and cu_seqlens; strided and misaligned views made kernel-ready;
ids too large for id·block_size in int64; every argument checked before a launch (so on CPU tensors
the real mistake is reported, not only "needs CUDA"); the layer's input width. gpu: the same odd
inputs through the kernels equal the plain ones.
"""
import pytest
import torch

import reference as R
from nsa_module import (NativeSparseAttention, compress_mean, compressed_attention, nsa, selected_attention,
                        selected_sliding_attention, sliding_window_attention)
from nsa_module.common import KERNEL_ALIGN, SeqInfo, kernel_ready, prepare_block_indices
from reference.inputs import random_block_indices, random_gates, random_qkv
from tests.utils import make_caches, packed


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous view whose data pointer is off the 16-byte grid."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    assert view.is_contiguous() and view.data_ptr() % KERNEL_ALIGN != 0
    return view


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous 1-D view (every other element of a buffer)."""
    buf = torch.empty(2 * x.numel(), dtype=x.dtype, device=x.device)
    view = buf[::2]
    view.copy_(x)
    assert not view.is_contiguous()
    return view


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64])
def test_block_ids_and_counts_of_any_integer_dtype(dtype):
    B, T, H, S = 1, 40, 2, 3
    idx = random_block_indices(B, T, H, S, 16, seed=1).clamp_min(0)  # uint8 holds no -1
    cnt = torch.randint(0, S + 1, (B, T, H), generator=torch.Generator().manual_seed(1))
    idx32, cnt32 = prepare_block_indices(idx.to(dtype), cnt.to(dtype), B, T, H, idx)
    assert idx32.dtype == cnt32.dtype == torch.int32
    assert torch.equal(idx32, idx.int()) and torch.equal(cnt32, cnt.int())


def test_huge_ids_clamp_into_int32_without_wrapping():
    idx = torch.tensor([[[[2 ** 32 + 5, -2 ** 40, 3, 2 ** 62]]]])
    idx32, cnt = prepare_block_indices(idx, torch.tensor([[[9]]], dtype=torch.int8), 1, 1, 1, idx)
    assert idx32.tolist() == [[[[2 ** 31 - 1, -1, 3, 2 ** 31 - 1]]]] and cnt.tolist() == [[[4]]]


@pytest.mark.parametrize("make", [lambda c: c.to(torch.int16), lambda c: c.to(torch.int8), lambda c: strided(c.int()),
                                  lambda c: c.to(torch.uint8)], ids=["int16", "int8", "strided-int32", "uint8"])
def test_cu_seqlens_of_any_integer_dtype_or_strides(make):
    lengths = [3, 1, 7, 2]
    cu = packed(lengths, "cpu")
    q = torch.zeros(1, sum(lengths), 2, 16)
    want = SeqInfo.build(cu, 1, q.shape[1], q)
    got = SeqInfo.build(make(cu), 1, q.shape[1], q)
    assert got.offsets.dtype == torch.int32 and got.offsets.is_contiguous()
    assert torch.equal(got.offsets, want.offsets) and torch.equal(got.tok_seq, want.tok_seq)
    assert got.lengths == lengths


def test_cu_seqlens_on_another_device_than_q_is_rejected():
    q = torch.zeros(1, 10, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens must be on q's device"):
        SeqInfo.build(torch.tensor([0, 10], device="meta"), 1, 10, q)


def test_kernel_ready_copies_only_misaligned_or_strided_views():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert kernel_ready(x) is x
    y = misaligned(x)
    z = kernel_ready(y)
    assert z.data_ptr() % KERNEL_ALIGN == 0 and torch.equal(z, x)
    s = strided(x.flatten())
    assert kernel_ready(s).is_contiguous() and torch.equal(kernel_ready(s), x.flatten())


@pytest.mark.parametrize("huge", [2 ** 57, 2 ** 58, 2 ** 62, 2 ** 63 - 1])
def test_reference_ids_past_the_end_take_no_part_at_any_size(huge):
    """id·block_size would wrap int64 (2^58·64 = 2^64 ≡ 0: block 0); such ids must add nothing."""
    T, HQ, H, K, BS = 70, 4, 2, 16, 64
    q, k, v = random_qkv(1, T, HQ, H, K, K, seed=2)
    idx = torch.tensor([0, 1, -1], dtype=torch.long).expand(1, T, H, 3).clone()
    hostile = idx.clone()
    hostile[..., 2] = huge
    torch.testing.assert_close(R.naive_nsa(q, k, v, None, None, hostile, None, BS),
                               R.naive_nsa(q, k, v, None, None, idx, None, BS), atol=0, rtol=0)


def _cpu_qkv(T=64, HQ=4, H=2, K=64):
    return random_qkv(1, T, HQ, H, K, K, dtype=torch.bfloat16)


# each call holds CPU tensors and one other mistake: the mistake must be what is reported
MISTAKES = [
    ("nsa g_slc shape", lambda q, k, v: nsa(q, k, v, g_slc=torch.rand(1, 64, 3)), ValueError, "g_slc"),
    ("nsa g_swa dtype", lambda q, k, v: nsa(q, k, v, g_swa=torch.ones(1, 64, 4, dtype=torch.int32), window_size=16),
     TypeError, "g_swa"),
    ("nsa ids shape", lambda q, k, v: nsa(q, k, v, block_indices=torch.zeros(1, 64, 3, 2, dtype=torch.int32)),
     ValueError, "block_indices"),
    ("nsa counts > S", lambda q, k, v: nsa(q, k, v, block_indices=torch.zeros(1, 64, 2, 2, dtype=torch.int32),
                                           block_counts=5), ValueError, "block_counts"),
    ("nsa selecting n < 3", lambda q, k, v: nsa(q, k, v, block_counts=2), ValueError, "block_counts"),
    ("nsa cu_seqlens", lambda q, k, v: nsa(q, k, v, cu_seqlens=torch.tensor([0, 10, 70])), ValueError, "cu_seqlens"),
    ("selected+sliding window", lambda q, k, v: selected_sliding_attention(
        q, k, v, torch.zeros(1, 64, 2, 2, dtype=torch.int32), window_size=-1), ValueError, "window_size"),
    ("selected+sliding g_swa", lambda q, k, v: selected_sliding_attention(
        q, k, v, torch.zeros(1, 64, 2, 2, dtype=torch.int32), g_swa=torch.rand(1, 60, 4)), ValueError, "g_swa"),
    ("selected float ids", lambda q, k, v: selected_attention(q, k, v, torch.zeros(1, 64, 2, 2)), TypeError, "integer"),
    ("sliding window type", lambda q, k, v: sliding_window_attention(q, k, v, 3.0), TypeError, "window_size"),
    ("compressed stride", lambda q, k, v: compressed_attention(q, *compress_mean(k, v, 32, 16), 32, 12), ValueError,
     "divide"),
]


@pytest.mark.parametrize("name,call,exc,msg", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_cpu_tensors_report_the_real_mistake_first(name, call, exc, msg):
    """Every check runs before the CUDA check and so before any launch: on CPU tensors the other
    mistake is what the error names."""
    with pytest.raises(exc, match=msg):
        call(*_cpu_qkv())


def test_cpu_tensors_alone_say_cuda():
    q, k, v = _cpu_qkv()
    with pytest.raises(ValueError, match="CUDA"):
        nsa(q, k, v, block_indices=torch.zeros(1, 64, 2, 4, dtype=torch.int32))  # S = 4 < 16: fine


def test_layer_input_width_is_checked():
    m = NativeSparseAttention(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, compress_block=8,
                              compress_stride=4, block_size=8, block_counts=3, window_size=6)
    with pytest.raises(ValueError, match="hidden_size = 64, got 48"):
        m(torch.randn(1, 10, 48))


# ------------------------------------------------------------------------------------------------
# gpu: the same odd inputs through the kernels
# ------------------------------------------------------------------------------------------------

G, H, K = 4, 2, 64


def _gpu_inputs(T=300, seed=0):
    q, k, v = random_qkv(1, T, G * H, H, K, K, dtype=torch.bfloat16, device="cuda", seed=seed)
    g = random_gates(1, T, G * H, dtype=torch.bfloat16, device="cuda", seed=seed)
    return q, k, v, g


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int64])
def test_gpu_ids_of_narrow_dtypes_equal_int32(dtype):
    q, k, v, g = _gpu_inputs()
    idx = random_block_indices(1, 300, H, 4, 32, device="cuda", seed=1)
    if dtype == torch.uint8:
        idx = idx.clamp_min(0)
    want = selected_attention(q, k, v, idx, torch.full((1, 300, H), 3, device="cuda"), 32, g_slc=g)
    got = selected_attention(q, k, v, idx.to(dtype), torch.full((1, 300, H), 3, device="cuda", dtype=dtype), 32,
                             g_slc=g)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [lambda c: c.to(torch.int16), lambda c: strided(c.int())], ids=["int16", "strided"])
def test_gpu_cu_seqlens_of_other_dtypes_or_strides(make):
    q, k, v, g = _gpu_inputs()
    cu = packed([1, 33, 32, 2, 100, 132])
    want = nsa(q, k, v, g, g, g, block_counts=4, block_size=32, window_size=16, cu_seqlens=cu)
    got = nsa(q, k, v, g, g, g, block_counts=4, block_size=32, window_size=16, cu_seqlens=make(cu))
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_cu_seqlens_on_the_cpu_is_taken_and_another_device_rejected():
    """cu_seqlens on the CPU (read there without a device sync) gives what it gives on q's device;
    on any other device it is rejected before a launch."""
    q, k, v, g = _gpu_inputs()
    idx = torch.zeros(1, 300, H, 2, dtype=torch.int32, device="cuda")
    calls = (lambda cu: selected_attention(q, k, v, idx, cu_seqlens=cu),
             lambda cu: sliding_window_attention(q, k, v, 16, cu_seqlens=cu),
             lambda cu: nsa(q, k, v, g, g, g, block_counts=4, block_size=32, window_size=16, cu_seqlens=cu))
    for call in calls:
        assert torch.equal(call(torch.tensor([0, 100, 300])), call(torch.tensor([0, 100, 300], device="cuda")))
        with pytest.raises(ValueError, match="cu_seqlens must be on q's device"):
            call(torch.tensor([0, 100, 300], device="meta"))


@pytest.mark.gpu
def test_gpu_misaligned_views_equal_aligned_inputs():
    """Contiguous views at an odd storage offset (which once faulted with a misaligned address)
    give what the aligned tensors give, forward and backward, on every kernel family."""
    q, k, v, g = _gpu_inputs()
    idx = random_block_indices(1, 300, H, 4, 32, device="cuda", seed=2)
    calls = [
        lambda q, k, v, g: selected_attention(q, k, v, idx, None, 32, g_slc=g),
        lambda q, k, v, g: sliding_window_attention(q, k, v, 64, g_swa=g),
        lambda q, k, v, g: compressed_attention(q, *compress_mean(k, v, 32, 16), 32, 16, g_cmp=g),
        lambda q, k, v, g: nsa(q, k, v, g, g, g, block_counts=4, block_size=32, window_size=64),
    ]
    for call in calls:
        outs = []
        for make in (lambda x: x, misaligned):
            leaves = [make(x.detach().clone()).requires_grad_() for x in (q, k, v, g)]
            o = call(*leaves)
            o.backward(torch.ones_like(o))
            outs.append([o] + [x.grad for x in leaves])
        for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], *outs):
            if name in ("dk", "dv"):  # the compressed branch adds its dK/dV with fp32 atomics
                torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-5, msg=name)
            else:
                assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_nsa_given_fewer_ids_than_16_uses_all_slots():
    q, k, v, g = _gpu_inputs()
    idx = random_block_indices(1, 300, H, 4, 32, device="cuda", seed=3)
    o = nsa(q, k, v, g, g, g, block_indices=idx, block_size=32, window_size=64)
    assert torch.equal(o, nsa(q, k, v, g, g, g, block_indices=idx, block_counts=4, block_size=32, window_size=64))


@pytest.mark.gpu
def test_gpu_decode_misaligned_inputs():
    from nsa_module.decode import nsa_decode
    lengths = [300, 1, 77]
    q, kv, ckv, num_cmp, ring, gates = make_caches(3, 2, 8, 64, 64, 32, 16, 64, lengths, torch.bfloat16, "cuda")
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")  # noqa: E731
    args = [q, *ckv, as_t(num_cmp), *kv, as_t(lengths), *ring, as_t(lengths)]
    want = nsa_decode(*args, gates, 32, 16, 64, 4, 64 ** -0.5)
    got = nsa_decode(*[misaligned(x) for x in args], tuple(misaligned(x) for x in gates), 32, 16, 64, 4, 64 ** -0.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
