"""NativeSparseAttention and its decode cache, on the reference path (CPU) and the kernels (gpu)."""
import copy

import pytest
import torch

import reference as R
from nsa_module.cache import RingBuffer
from nsa_module.layer import NativeSparseAttention
from reference.inputs import random_cu_seqlens
from tests.utils import LAYER_DECODE, check_segments, hostile_cu, rel_err, segments

SMALL = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, compress_block=8, compress_stride=4,
             block_size=8, block_counts=3, window_size=6)


def layer(**over):
    torch.manual_seed(0)
    return NativeSparseAttention(**{**SMALL, **over})


@pytest.mark.parametrize("over", [{}, dict(shared_kv=True), dict(compression="mean"), dict(gate="softmax"),
                                  dict(v_head_dim=8), dict(window_size=0), dict(num_kv_heads=4)],
                         ids=["default", "shared_kv", "mean", "softmax", "K!=V", "no-window", "G1"])
def test_prefill_then_decode_equals_full_forward(over):
    m = layer(**over)
    x = torch.randn(2, 45, SMALL["hidden_size"])
    y, none = m(x)
    assert y.shape == x.shape and none is None
    P = 13
    y_pre, cache = m(x[:, :P], use_cache=True)
    torch.testing.assert_close(y_pre, y[:, :P], atol=1e-6, rtol=1e-6)
    steps = []
    for t in range(P, x.shape[1]):
        y_t, cache = m(x[:, t:t + 1], cache=cache)
        steps.append(y_t)
        # the compressed stream grows exactly when a block completes: ⌊(t+1-l)/d⌋+1 tokens after t+1
        l, d = SMALL["compress_block"], SMALL["compress_stride"]
        assert all(cache.num_compressed(b) == (0 if t + 1 < l else (t + 1 - l) // d + 1) for b in range(2))
    torch.testing.assert_close(torch.cat(steps, 1), y[:, P:], atol=1e-5, rtol=1e-5)


def test_cached_compressed_stream_equals_compressing_the_whole_sequence():
    m = layer()
    x = torch.randn(1, 37, SMALL["hidden_size"])
    _, cache = m(x[:, :5], use_cache=True)
    for t in range(5, 37):
        _, cache = m(x[:, t:t + 1], cache=cache)
    positions = torch.arange(37)
    _, kv, _ = m._project(x, positions)
    k_cmp, v_cmp = R.compress_kv(*kv["cmp"], m.l, m.d, m._phi())
    torch.testing.assert_close(cache.ckv_k.get(0), k_cmp[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.ckv_v.get(0), v_cmp[0], atol=1e-6, rtol=1e-6)


def test_batch_of_different_lengths_decodes_like_each_sequence_alone():
    m = layer()
    T = 60
    cu = random_cu_seqlens(T, 3, min_len=9, seed=3)
    x = torch.randn(1, T, SMALL["hidden_size"])
    extra = torch.randn(3, 4, SMALL["hidden_size"])  # four more tokens for each sequence
    _, cache = m(x, cu_seqlens=cu, use_cache=True)
    assert cache.lengths == torch.diff(cu).tolist()
    steps = [m(extra[:, i:i + 1], cache=cache)[0] for i in range(4)]
    dec = torch.cat(steps, 1)  # [3, 4, hidden]
    c = cu.tolist()
    for n, (s, e) in enumerate(zip(c, c[1:])):
        full, _ = m(torch.cat([x[:, s:e], extra[n:n + 1]], 1))
        torch.testing.assert_close(dec[n], full[0, e - s:], atol=1e-5, rtol=1e-5)


def test_decode_reads_what_table_4_counts():
    """Per step: all compressed tokens + the selected blocks' tokens + the window, at most
    ((t+1-l)/d + 1) + n·l' + W (paper Table 4)."""
    m = layer()
    x = torch.randn(1, 80, SMALL["hidden_size"])
    _, cache = m(x[:, :1], use_cache=True)
    l, d, ls, n, W = m.l, m.d, m.l_sel, m.n, m.W
    for t in range(1, 80):
        _, cache = m(x[:, t:t + 1], cache=cache)
        bound = ((t + 1 - l) // d + 1 if t + 1 >= l else 0) + n * ls + W
        assert cache.reads[0] <= bound
        assert cache.reads[0] >= cache.num_compressed(0) + min(W, t + 1)


def test_layer_trains():
    m = layer()
    x = torch.randn(2, 40, SMALL["hidden_size"])
    y, _ = m(x)
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.phi_k.pos.grad.abs().sum() > 0 and m.gate_proj.weight.grad.abs().sum() > 0


def test_ring_buffer_keeps_the_last_W_in_order():
    rb = RingBuffer(1, 4, 1, 1, torch.float32, "cpu")
    seen = []
    for chunk in ([0, 1, 2], [3], [4, 5, 6, 7, 8, 9], [10]):
        rb.append(0, torch.tensor(chunk, dtype=torch.float32).view(-1, 1, 1))
        seen += chunk
        assert rb.get(0).flatten().tolist() == seen[-4:]


@pytest.mark.parametrize("over,exc,msg", [
    (dict(num_heads=6, num_kv_heads=4), ValueError, "multiple of num_kv_heads"),
    (dict(compress_stride=3), ValueError, "divide"),
    (dict(block_counts=2), ValueError, "block_counts"),
    (dict(window_size=-1), ValueError, "window_size"),
    (dict(compression="conv"), ValueError, "compression"),
    (dict(gate="relu"), ValueError, "gate"),
    (dict(head_dim=15), ValueError, "even"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
])
def test_bad_layer_arguments_raise(over, exc, msg):
    with pytest.raises(exc, match=msg):
        layer(**over)


def test_bad_decode_input_raises():
    m = layer()
    _, cache = m(torch.randn(2, 10, SMALL["hidden_size"]), use_cache=True)
    with pytest.raises(ValueError, match="C new tokens per cached sequence"):
        m(torch.randn(3, 1, SMALL["hidden_size"]), cache=cache)
    with pytest.raises(ValueError, match="no cu_seqlens"):
        m(torch.randn(1, 2, SMALL["hidden_size"]), cu_seqlens=torch.tensor([0, 1, 2]), cache=cache)


@pytest.mark.parametrize("cuts", [(37, 80), (5, 6, 7, 50), (90,)], ids=["3-chunks", "short-chunks", "one-cut"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["per-branch-kv", "shared-kv"])
def test_chunked_prefill_equals_one_prefill(cuts, shared_kv):
    """A prompt prefilled in chunks with the cache (chunks shorter and longer than l, l' and W) gives
    the outputs of one prefill, and the same next decode step: two sequences side by side."""
    m = layer(shared_kv=shared_kv)
    T = 100
    x = torch.randn(2, T + 1, SMALL["hidden_size"])
    with torch.no_grad():
        y_full, cache_full = m(x[:, :T], use_cache=True)
        bounds = (0, *cuts, T)
        y0, cache = m(x[:, :bounds[1]], use_cache=True)
        ys = [y0] + [m(x[:, a:b], cache=cache)[0] for a, b in zip(bounds[1:], bounds[2:])]
        torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=1e-5, rtol=1e-5)
        assert cache.lengths == cache_full.lengths == [T, T]
        step, _ = m(x[:, T:], cache=cache)
        step_full, _ = m(x[:, T:], cache=cache_full)
    torch.testing.assert_close(step, step_full, atol=1e-5, rtol=1e-5)


# the gpu tests' layer: G = 8, K = V = 64, paper block sizes, a window
@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["B1", "packed"])
def test_layer_kernels_match_reference_path(varlen):
    """The bf16 layer on CUDA: attention on the TileLang kernels against the same bf16 module with
    attention on the float32 reference, so the two differ only in the attention. (Against a float32
    copy of the module the whole bf16 layer, projections included, is ~2% off: that is bf16, not
    the kernels.) Packed: many short sequences around l, d, l' and the query tile, then a long one,
    compared sequence by sequence. Not row by row: each side chooses its own blocks, and a near-tie
    in the block scores may go either way, changing that row's selected branch."""
    torch.manual_seed(0)
    m = NativeSparseAttention(**LAYER_DECODE).cuda().to(torch.bfloat16)
    m_ref = copy.deepcopy(m)
    m_ref._use_kernels = lambda x: False
    T = 700
    cu = hostile_cu(T, 32, 16, 64, 8) if varlen else None
    x = torch.randn(1, T, 256, device="cuda", dtype=torch.bfloat16)
    y, _ = m(x, cu_seqlens=cu)
    y_ref, _ = m_ref(x, cu_seqlens=cu)
    assert not y.isnan().any()
    assert rel_err(y, y_ref) <= 1e-2
    check_segments("y", y, y_ref, segments(1, T, cu))


@pytest.mark.gpu
def test_decode_kernels_equal_full_forward():
    """bf16 on CUDA: prefill 100 tokens, decode 200 more one by one on the decode kernels; the
    outputs equal one full forward over the same 300 tokens (all three branches, top-n included)."""
    torch.manual_seed(0)
    m = NativeSparseAttention(**LAYER_DECODE).cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    y_full, _ = m(x)
    P = 100
    _, cache = m(x[:, :P], use_cache=True)
    y_dec = torch.cat([m(x[:, t:t + 1], cache=cache)[0] for t in range(P, 300)], 1)
    assert not y_dec.isnan().any()
    assert rel_err(y_dec, y_full[:, P:]) <= 1e-2


@pytest.mark.gpu
def test_decode_kernels_match_reference_decode_uneven_lengths():
    """Sequences of 70 and 130 prompt tokens (a varlen prefill), then 60 steps: the kernel decode
    against the same bf16 module decoding on the reference functions; equal read counts."""
    torch.manual_seed(1)
    m = NativeSparseAttention(**LAYER_DECODE).cuda().to(torch.bfloat16)
    m_ref = copy.deepcopy(m)
    m_ref._use_kernels = lambda x: False
    prompt = torch.randn(1, 200, 256, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 70, 200], device="cuda")
    _, cache = m(prompt, cu_seqlens=cu, use_cache=True)
    _, cache_ref = m_ref(prompt, cu_seqlens=cu, use_cache=True)
    ys, ys_ref = [], []
    for _ in range(60):
        x = torch.randn(2, 1, 256, device="cuda", dtype=torch.bfloat16)
        ys.append(m(x, cache=cache)[0])
        ys_ref.append(m_ref(x, cache=cache_ref)[0])
        assert cache.reads == cache_ref.reads
    ys, ys_ref = torch.cat(ys, 1), torch.cat(ys_ref, 1)
    assert rel_err(ys, ys_ref) <= 1e-2
    check_segments("y", ys, ys_ref, segments(2, 60))  # each sequence: a row of ys
