"""CPU tests of the golden reference: against brute force, then the properties NSA must have."""
import math

import pytest
import torch
import torch.nn.functional as F

import reference as R
from reference.inputs import (local_block_indices, random_block_counts, random_block_indices, random_cu_seqlens,
                              random_gates, random_qkv)
from tests.brute import brute_compress_mean, brute_nsa, brute_selection
from tests.utils import assert_same_math


def full_causal(q, k, v, scale=None):
    """Full causal attention `[B, T, HQ, V]` in float64 via SDPA (GQA by repeating kv heads)."""
    G = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.double().transpose(1, 2) for x in (q, k, v))
    kh, vh = kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# naive_nsa against brute force
# ------------------------------------------------------------------------------------------------

CASES = [
    # B, T, HQ, H, K, V, S, BS, W, counts, varlen
    (2, 37, 4, 4, 8, 8, 3, 8, 0, None, False),  # G=1, T not a multiple of BS
    (1, 45, 4, 2, 16, 8, 4, 16, 5, "int", False),  # G=2, K != V, window
    (2, 29, 8, 2, 8, 12, 2, 4, 9, "tensor", False),  # G=4
    (1, 70, 16, 1, 8, 8, 5, 16, 0, "tensor", True),  # G=16, varlen
    (1, 53, 4, 1, 4, 4, 3, 8, 12, None, True),  # varlen + window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"G{c[2] // c[3]}-T{c[1]}-S{c[6]}-BS{c[7]}-W{c[8]}-{c[9]}-"
                                              f"{'varlen' if c[10] else 'fixed'}" for c in CASES])
def test_naive_nsa_matches_brute_force(case, dtype):
    B, T, HQ, H, K, V, S, BS, W, counts, varlen = case
    q, k, v = random_qkv(B, T, HQ, H, K, V, dtype=dtype, seed=T)
    cu = random_cu_seqlens(T, 3, min_len=2, seed=T) if varlen else None
    idx = random_block_indices(B, T, H, S, BS, cu_seqlens=cu, seed=T, adversarial=0.4)
    bc = {None: None, "int": S - 1, "tensor": random_block_counts(B, T, H, S, seed=T)}[counts]
    g_slc, g_swa = random_gates(B, T, HQ, dtype, seed=1), random_gates(B, T, HQ, dtype, seed=2)
    scale = 0.7 / math.sqrt(K)
    out = R.naive_nsa(q, k, v, g_slc, g_swa, idx, bc, BS, W, scale, cu)
    assert out.dtype == dtype and out.shape == (B, T, HQ, V)
    ref = brute_nsa(q, k, v, g_slc, g_swa, idx, bc, BS, W, scale, cu)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_hostile_ids_really_are_hostile():
    """The adversarial factory must produce each kind of id the kernels must survive."""
    T, BS = 200, 16
    idx = random_block_indices(1, T, 2, 8, BS, seed=0, adversarial=0.5)
    t = torch.arange(T).view(1, T, 1, 1)
    assert (idx == -1).any()
    assert ((idx * BS > t) & (idx * BS < T)).any(), "future ids inside the sequence"
    assert (idx * BS >= T).any(), "ids past the last block"
    srt = idx.sort(-1).values
    assert ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(), "duplicates"


def test_local_ids_are_valid_selections_that_neighbours_share():
    """bench_selected's second distribution: every row a legal selection (the forced blocks, no
    block after the token, ascending, distinct, -1 padding last), and tokens next to each other
    choosing nearly the same blocks, unlike the random ids."""
    T, H, S, BS = 3000, 2, 16, 64
    idx = local_block_indices(2, T, H, S, BS, seed=1).long()
    cur = (torch.arange(T) // BS).view(1, T, 1, 1)
    valid = idx >= 0
    assert ((idx <= cur) | ~valid).all()
    assert (idx == 0).any(-1).all() and (idx == cur).any(-1).all()
    assert ((idx == cur - 1).any(-1) | (cur[..., 0] == 0)).all()
    assert (valid[..., 1:] <= valid[..., :-1]).all(), "-1 only after the ids"
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all(), "ascending and distinct"
    assert valid.sum(-1).eq(torch.clamp(cur[..., 0] + 1, max=S)).all(), "as many ids as visible blocks allow"

    def shared(x):  # mean fraction of a token's ids that the previous token also chose, past 2048
        a, b = x[:, 2049:], x[:, 2048:-1]  # (early on, with few blocks visible, any two picks overlap)
        same = ((a.unsqueeze(-1) == b.unsqueeze(-2)) & (a.unsqueeze(-1) >= 0)).any(-1).sum(-1)
        return (same.float() / (a >= 0).sum(-1).clamp_min(1)).mean().item()
    assert shared(idx) > 0.95
    assert shared(random_block_indices(2, T, H, S, BS, seed=1).long()) < 0.5


def test_head_first_layout():
    B, T, HQ, H, K = 1, 33, 4, 2, 8
    q, k, v = random_qkv(B, T, HQ, H, K, K, seed=5)
    idx = random_block_indices(B, T, H, 3, 8, seed=5)
    bc = random_block_counts(B, T, H, 3, seed=5)
    g = random_gates(B, T, HQ)
    o = R.naive_nsa(q, k, v, g, g, idx, bc, 8, 4)
    tr = lambda x: x.transpose(1, 2)  # noqa: E731
    o_hf = R.naive_nsa(tr(q), tr(k), tr(v), tr(g), tr(g), tr(idx), tr(bc), 8, 4, head_first=True)
    torch.testing.assert_close(tr(o_hf), o)


# ------------------------------------------------------------------------------------------------
# compression and selection against brute force
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("l,d,l_sel", [(32, 16, 64), (8, 4, 16), (16, 16, 16), (12, 4, 8), (8, 8, 24)])
def test_compress_and_select_match_brute_force(l, d, l_sel):
    T, HQ, H, K = 150, 4, 2, 8
    q, k, v = random_qkv(1, T, HQ, H, K, K, dtype=torch.float64, seed=l + d)
    k_cmp, v_cmp = R.compress_kv(k, v, l, d)
    torch.testing.assert_close(k_cmp[0], brute_compress_mean(k[0], l, d))
    o_cmp, p_cmp = R.compressed_attention(q, k_cmp, v_cmp, l, d)
    n = 5
    idx = R.select_blocks(R.selection_scores(p_cmp, l, d, l_sel, H), n, l_sel)
    ref = brute_selection(q[0], k[0], l, d, l_sel, n, K ** -0.5)
    assert torch.equal(idx[0], ref)


def test_overlap_weights_of_the_paper():
    M = R.overlap_matrix(32, 16, 64, Nc=20, Ns=5)
    # selection block 2 (tokens 128..191) gets compressed blocks 7..11 with weights 1, 2, 2, 2, 1
    assert M[:, 2].tolist() == [0] * 7 + [1, 2, 2, 2, 1] + [0] * 8
    assert torch.equal(R.overlap_matrix(64, 64, 64, 9, 9), torch.eye(9))


@pytest.mark.parametrize("seed", range(6))
def test_overlap_matrix_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(1, 9, (1,), generator=g))
    l = d * int(torch.randint(1, 6, (1,), generator=g))
    l_sel = d * int(torch.randint(1, 6, (1,), generator=g))
    T = 200
    Nc, Ns = R.num_compressed(T, l, d), math.ceil(T / l_sel)
    M = R.overlap_matrix(l, d, l_sel, Nc, Ns, dtype=torch.float64)
    # token-level count of the overlap
    for i in range(Nc):
        for j in range(Ns):
            ov = len(set(range(i * d, i * d + l)) & set(range(j * l_sel, (j + 1) * l_sel)))
            assert M[i, j] * d == ov
    # each compressed block lies inside the T tokens the selection blocks cover: its weights sum to l/d
    assert torch.allclose(M.sum(1), torch.full((Nc,), l / d, dtype=torch.float64))
    # banded: row i touches only consecutive selection blocks
    for i in range(Nc):
        nz = M[i].nonzero().flatten()
        assert (nz.diff() == 1).all() and len(nz) <= math.ceil(l / l_sel) + 1


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------


def _perturb_future(x, t):
    y = x.detach().clone()
    y[:, t + 1:] = torch.randn_like(y[:, t + 1:]) * 3
    return y


@pytest.mark.parametrize("branch", ["selected", "sliding", "full"])
def test_causality(branch):
    """Changing any token after t never changes the output at <= t, in any branch (selection too)."""
    B, T, HQ, H, K = 1, 90, 4, 2, 8
    q, k, v = random_qkv(B, T, HQ, H, K, K, dtype=torch.float64, seed=9)
    t = 57
    if branch == "full":
        run = lambda q, k, v: R.naive_nsa_full(q, k, v, block_counts=4, block_size=16, window_size=10,  # noqa: E731
                                               compress_block=8, compress_stride=4)
    else:
        # future and past-the-end ids on purpose: they must add nothing
        idx = random_block_indices(B, T, H, 6, 16, seed=9, adversarial=0.5)
        W = 10 if branch == "sliding" else 0
        bi = idx if branch == "selected" else None
        run = lambda q, k, v: (R.naive_nsa(q, k, v, None, None, bi, None, 16, W), idx)  # noqa: E731
    o, idx = run(q, k, v)
    o2, idx2 = run(_perturb_future(q, t), _perturb_future(k, t), _perturb_future(v, t))
    assert torch.equal(o[:, : t + 1], o2[:, : t + 1])
    assert torch.equal(idx[:, : t + 1], idx2[:, : t + 1])
    assert not torch.equal(o[:, t + 1:], o2[:, t + 1:])


@pytest.mark.parametrize("G", [1, 4])
def test_full_coverage_is_full_causal_attention(G):
    B, T, H, K, V, BS = 2, 77, 2, 16, 8, 16
    q, k, v = random_qkv(B, T, G * H, H, K, V, seed=11)
    NB = math.ceil(T / BS)
    all_blocks = torch.arange(NB, dtype=torch.int32).expand(B, T, H, NB).contiguous()
    ref = full_causal(q, k, v)
    o_slc = R.naive_nsa(q, k, v, None, None, all_blocks, None, BS, 0)
    o_swa = R.naive_nsa(q, k, v, None, None, None, None, BS, T + 5)
    assert (o_slc.double() - ref).abs().max() < 1e-5
    assert (o_swa.double() - ref).abs().max() < 1e-5
    o_both = R.naive_nsa(q, k, v, None, None, all_blocks, None, BS, T)
    assert (o_both.double() - 2 * ref).abs().max() < 1e-5


def test_varlen_equals_per_sequence():
    T, HQ, H, K, BS, W = 120, 8, 2, 8, 8, 6
    q, k, v = random_qkv(1, T, HQ, H, K, K, seed=12, requires_grad=True)
    cu = random_cu_seqlens(T, 4, min_len=3, seed=12)
    idx = random_block_indices(1, T, H, 4, BS, cu_seqlens=cu, seed=12, adversarial=0.3)
    bc = random_block_counts(1, T, H, 4, seed=12)
    g = random_gates(1, T, HQ)
    o = R.naive_nsa(q, k, v, g, g, idx, bc, BS, W, cu_seqlens=cu)
    o_full, _ = R.naive_nsa_full(q, k, v, g, g, g, None, 4, BS, W, cu_seqlens=cu, compress_block=4, compress_stride=2)
    c = cu.tolist()
    for s, e in zip(c, c[1:]):
        part = R.naive_nsa(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], g[:, s:e], idx[:, s:e], bc[:, s:e], BS, W)
        torch.testing.assert_close(o[:, s:e], part, atol=0, rtol=0)
        part_full, _ = R.naive_nsa_full(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], g[:, s:e], g[:, s:e], None, 4, BS, W,
                                          compress_block=4, compress_stride=2)
        torch.testing.assert_close(o_full[:, s:e], part_full, atol=1e-6, rtol=1e-6)


def test_group_consistency():
    """One index set per kv head: the group's heads are summed, so their order inside a group does
    not matter, and selection_scores is the group sum of each head's mapped probabilities."""
    T, G, H, K, l, d, ls = 130, 4, 2, 8, 16, 8, 32
    q, k, v = random_qkv(1, T, G * H, H, K, K, dtype=torch.float64, seed=13)
    _, idx = R.naive_nsa_full(q, k, v, block_counts=3, block_size=ls, compress_block=l, compress_stride=d)
    perm = torch.cat([torch.randperm(G) + h * G for h in range(H)])
    _, idx_perm = R.naive_nsa_full(q[:, :, perm], k, v, block_counts=3, block_size=ls, compress_block=l, compress_stride=d)
    assert torch.equal(idx, idx_perm)
    k_cmp, v_cmp = R.compress_kv(k, v, l, d)
    _, p_cmp = R.compressed_attention(q, k_cmp, v_cmp, l, d)
    p_slc = R.selection_scores(p_cmp, l, d, ls, H)
    M = R.overlap_matrix(l, d, ls, p_cmp.shape[-1], p_slc.shape[-1], dtype=torch.float64)
    per_head = p_cmp @ M
    torch.testing.assert_close(p_slc[:, :, 1], per_head[:, :, G:2 * G].sum(2))


@pytest.mark.parametrize("n", [3, 5, 16])
def test_forced_blocks_always_present(n):
    T, H, ls = 400, 2, 16
    g = torch.Generator().manual_seed(n)
    p_slc = torch.rand(1, T, H, math.ceil(T / ls), generator=g)
    p_slc[..., 0] = 0  # block 0 scores nothing and must still be kept
    idx = R.select_blocks(p_slc, n, ls)
    t = torch.arange(T).view(1, T, 1, 1)
    cur = t // ls
    has = lambda j: ((idx == j) | (j < 0)).any(-1)  # noqa: E731
    assert has(torch.zeros_like(cur)).all() and has(cur).all() and has(cur - 1).all()
    valid = idx >= 0
    assert (idx[valid] <= cur.expand_as(idx)[valid]).all(), "only blocks starting at or before t"
    # sorted ascending, -1 at the end, no duplicates
    big = torch.where(valid, idx, torch.full_like(idx, 10 ** 6))
    assert ((big.diff(dim=-1) > 0) | ~valid[..., 1:]).all()
    assert (valid[..., :-1] | ~valid[..., 1:]).all(), "-1 only after the ids"
    # exactly min(n, visible blocks) ids
    assert torch.equal(valid.sum(-1), torch.minimum(cur + 1, torch.tensor(n)).squeeze(-1).expand(1, T, H))


def test_top_scores_win_and_ties_go_to_lower_ids():
    p = torch.zeros(1, 1, 1, 10)
    p[..., 5], p[..., 7] = 2.0, 1.0
    # token at t=9*8 sees blocks 0..9; forced: 0, 9, 8; then 5, 7, then ties at 0 -> lowest ids 1, 2
    idx = R.select_blocks(p.expand(1, 73, 1, 10).contiguous(), 7, 8)
    assert idx[0, 72, 0].tolist() == [0, 1, 2, 5, 7, 8, 9]


def test_empty_rows_give_zero_and_finite_gradients():
    B, T, HQ, H, K = 1, 40, 4, 2, 8
    q, k, v = random_qkv(B, T, HQ, H, K, K, seed=14, requires_grad=True)
    idx = torch.full((B, T, H, 3), -1, dtype=torch.int32)
    idx[:, 20:, :, 0] = 50  # past the end: nothing either
    idx[:, 30:, 1, 1] = 3  # block 3 (tokens 24..31): token 30 sees 24..30
    o = R.naive_nsa(q, k, v, None, None, idx, None, 8, 0)
    assert not o.isnan().any()
    assert (o[:, :30] == 0).all() and (o[:, 30:, :2] == 0).all() and (o[:, 30:, 2:] != 0).all()
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    # compressed branch: tokens before the first compressed block ends see nothing
    k_cmp, v_cmp = R.compress_kv(k, v, 8, 4)
    o_cmp, p_cmp = R.compressed_attention(q, k_cmp, v_cmp, 8, 4)
    assert (o_cmp[:, :7] == 0).all() and (p_cmp[:, :7] == 0).all() and (o_cmp[:, 7:] != 0).any()
    assert torch.allclose(p_cmp[:, 7:].sum(-1), torch.ones(1))


def test_gradients_flow_through_compression_and_gates():
    B, T, HQ, H, K = 1, 64, 4, 2, 8
    q, k, v = random_qkv(B, T, HQ, H, K, K, dtype=torch.float64, seed=15, requires_grad=True)
    gs = [random_gates(B, T, HQ, torch.float64, seed=s, requires_grad=True) for s in range(3)]
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    phi = lambda blk: (blk * w[:, None]).sum(-2)  # noqa: E731  a learnable weighted pooling
    o, _ = R.naive_nsa_full(q, k, v, *gs, block_counts=3, block_size=16, window_size=8,
                            compress_block=8, compress_stride=4, phi=phi)
    o.square().sum().backward()
    for x in (q, k, v, w, *gs):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# queries at an offset: a slice of the queries over all keys is that slice of the whole result
# ------------------------------------------------------------------------------------------------

OFFSET_CASES = {
    # B, T, HQ, H, K, V, l, d, l', n, W, cuts (the slices [cut_i, cut_i+1) partition [0, T))
    # the paper's l, d, l', n, W at a small T (> n·l', so the top-n choice is real), T a multiple of none of them
    "paper": (1, 1032, 4, 1, 16, 16, 32, 16, 64, 16, 512, (0, 1, 300, 613, 1031, 1032)),
    # G = 1, K != V, B = 2, a stride that does not divide T, slices cutting compression blocks
    "small-G1-KneV": (2, 101, 2, 2, 8, 12, 6, 3, 12, 4, 10, (0, 7, 8, 50, 64, 101)),
}


def _nsa_grads(q, k, v, gates, do, cfg, q_offset=None):
    """(o, block_indices, [dq, dk, dv, dg_cmp, dg_slc, dg_swa]) of naive_nsa_full with dO = do."""
    l, d, ls, n, W = cfg
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, *gates)]
    o, idx = R.naive_nsa_full(*leaves, block_counts=n, block_size=ls, window_size=W, compress_block=l,
                              compress_stride=d, q_offset=q_offset)
    o.backward(do)
    return o, idx, [x.grad for x in leaves]


@pytest.mark.parametrize("case", OFFSET_CASES)
def test_query_slices_at_an_offset_equal_the_whole(case):
    """For a partition of the queries into slices [a, b), naive_nsa_full(q[:, a:b], k, v, q_offset=a)
    gives rows a … b-1 of the whole result and of its block ids, dq and the gates' gradients; the
    slices' dk and dv add up to the whole's (every key's gradient gathers each slice's share)."""
    B, T, HQ, H, K, V, l, d, ls, n, W, cuts = OFFSET_CASES[case]
    cfg = (l, d, ls, n, W)
    q, k, v = random_qkv(B, T, HQ, H, K, V, dtype=torch.float64, seed=T)
    gates = [random_gates(B, T, HQ, torch.float64, seed=s) for s in range(3)]
    do = torch.randn(B, T, HQ, V, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    o, idx, grads = _nsa_grads(q, k, v, gates, do, cfg)
    assert (idx >= 0).sum(-1).max() == n and math.ceil(T / ls) > n, "the top-n choice must leave blocks out"
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for a, b in zip(cuts, cuts[1:]):
        part = slice(a, b)
        o_p, idx_p, g_p = _nsa_grads(q[:, part], k, v, [g[:, part] for g in gates], do[:, part], cfg, q_offset=a)
        assert torch.equal(idx_p, idx[:, part]), f"[{a}, {b}): block ids"
        assert_same_math(f"[{a}, {b}) o", o_p, o[:, part])
        for name, x, ref in zip(("dq", "dg_cmp", "dg_slc", "dg_swa"), [g_p[0]] + g_p[3:], [grads[0]] + grads[3:]):
            assert_same_math(f"[{a}, {b}) {name}", x, ref[:, part])
        dk += g_p[1]
        dv += g_p[2]
    assert_same_math("dk summed over the slices", dk, grads[1])
    assert_same_math("dv summed over the slices", dv, grads[2])


def test_branches_at_an_offset_with_hostile_ids():
    """naive_nsa and compressed_attention alone: given ids (-1, future, past the end, duplicates) at an
    offset, over more keys than the queries reach (Tk > q_offset + Tq), equal the whole's rows."""
    B, T, HQ, H, K, V, BS, W, l, d = 2, 90, 4, 2, 8, 6, 16, 7, 8, 4
    q, k, v = random_qkv(B, T, HQ, H, K, V, dtype=torch.float64, seed=21)
    idx = random_block_indices(B, T, H, 5, BS, seed=21, adversarial=0.5)
    bc = random_block_counts(B, T, H, 5, seed=21)
    g1, g2 = random_gates(B, T, HQ, torch.float64, seed=1), random_gates(B, T, HQ, torch.float64, seed=2)
    whole = R.naive_nsa(q, k, v, g1, g2, idx, bc, BS, W)
    k_cmp, v_cmp = R.compress_kv(k, v, l, d)
    o_cmp, p_cmp = R.compressed_attention(q, k_cmp, v_cmp, l, d)
    for a, b in [(0, 1), (0, 45), (29, 30), (33, 61), (61, 90)]:
        part = slice(a, b)
        o = R.naive_nsa(q[:, part], k, v, g1[:, part], g2[:, part], idx[:, part], bc[:, part], BS, W, q_offset=a)
        assert_same_math(f"naive_nsa [{a}, {b})", o, whole[:, part])
        o, p = R.compressed_attention(q[:, part], k_cmp, v_cmp, l, d, q_offset=a)
        assert_same_math(f"compressed o [{a}, {b})", o, o_cmp[:, part])
        assert_same_math(f"compressed p [{a}, {b})", p, p_cmp[:, part])
        # the compressed keys the slice reaches are enough
        n_seen = R.num_compressed(b, l, d)
        o, _ = R.compressed_attention(q[:, part], k_cmp[:, :n_seen], v_cmp[:, :n_seen], l, d, q_offset=a)
        assert_same_math(f"compressed o, keys cut at {n_seen} [{a}, {b})", o, o_cmp[:, part])


def test_offset_none_is_the_whole_sequence():
    """q_offset=0 over keys of q's length is the default; None keeps the old check Tq = Tk."""
    q, k, v = random_qkv(1, 70, 4, 2, 8, 8, dtype=torch.float64, seed=22)
    kw = dict(block_counts=3, block_size=16, window_size=9, compress_block=8, compress_stride=4)
    o0, idx0 = R.naive_nsa_full(q, k, v, **kw)
    o1, idx1 = R.naive_nsa_full(q, k, v, **kw, q_offset=0)
    assert torch.equal(o0, o1) and torch.equal(idx0, idx1)
    with pytest.raises(ValueError, match="k must have shape"):
        R.naive_nsa_full(q[:, :60], k, v, **kw)


BAD_OFFSETS = [
    ("negative", dict(q_offset=-1), ValueError, "0 <= q_offset"),
    ("past the keys", dict(q_offset=33), ValueError, "q_offset \\+ Tq <= Tk"),
    ("a float", dict(q_offset=1.0), TypeError, "q_offset must be None or an int"),
    ("a bool", dict(q_offset=True), TypeError, "q_offset must be None or an int"),
    ("with cu_seqlens", dict(q_offset=0, cu_seqlens=torch.tensor([0, 10, 32])), ValueError, "not supported with cu_seqlens"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD_OFFSETS, ids=[b[0] for b in BAD_OFFSETS])
def test_bad_offset_raises(name, over, exc, msg):
    q, k, v = random_qkv(1, 64, 4, 2, 8, 8, seed=23)
    args = dict(q=q[:, 32:], k=k, v=v, block_counts=3, block_size=8, compress_block=8, compress_stride=4)
    if "cu_seqlens" in over:
        args["q"] = q[:, :32]
        args["k"], args["v"] = k[:, :32], v[:, :32]
    with pytest.raises(exc, match=msg):
        R.naive_nsa_full(**args, **over)
    with pytest.raises(exc, match=msg):
        R.naive_nsa(args["q"], args["k"], args["v"], None, None, None, None, 8, 4, **over)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def _base(**over):
    q, k, v = random_qkv(1, 32, 4, 2, 8, 8)
    args = dict(q=q, k=k, v=v, g_slc=None, g_swa=None, block_indices=random_block_indices(1, 32, 2, 2, 8),
                block_counts=None, block_size=8, window_size=0, scale=None, cu_seqlens=None)
    args.update(over)
    return args


q0, k0, v0 = random_qkv(1, 32, 4, 2, 8, 8)
BAD = [
    ("HQ not a multiple of H", dict(q=torch.randn(1, 32, 5, 8)), ValueError, "multiple"),
    ("T mismatch", dict(k=torch.randn(1, 31, 2, 8)), ValueError, "k must have shape"),
    ("K mismatch", dict(k=torch.randn(1, 32, 2, 16)), ValueError, "k must have shape"),
    ("V heads mismatch", dict(v=torch.randn(1, 32, 3, 8)), ValueError, "v must have shape"),
    ("B mismatch", dict(v=torch.randn(2, 32, 2, 8)), ValueError, "v must have shape"),
    ("q not 4-D", dict(q=torch.randn(32, 4, 8)), ValueError, "q must have shape"),
    ("q not a tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("mixed dtypes", dict(k=k0.double()), TypeError, "one dtype"),
    ("integer q", dict(q=torch.ones(1, 32, 4, 8, dtype=torch.int32)), TypeError, "floating"),
    ("gate shape", dict(g_slc=torch.rand(1, 32, 2)), ValueError, "g_slc must have shape"),
    ("indices shape", dict(block_indices=torch.zeros(1, 32, 4, 2, dtype=torch.int32)), ValueError, "block_indices must have shape"),
    ("float indices", dict(block_indices=torch.zeros(1, 32, 2, 2)), TypeError, "block_indices must have an integer dtype"),
    ("counts shape", dict(block_counts=torch.zeros(1, 32, 4, dtype=torch.int32)), ValueError, "block_counts must have shape"),
    ("float counts", dict(block_counts=torch.zeros(1, 32, 2)), TypeError, "block_counts must have an integer dtype"),
    ("counts > S", dict(block_counts=3), ValueError, "block_counts must lie in"),
    ("cu_seqlens float", dict(cu_seqlens=torch.tensor([0.0, 32.0])), TypeError, "cu_seqlens must be an integer"),
    ("cu_seqlens 2-D", dict(cu_seqlens=torch.tensor([[0, 32]])), ValueError, "cu_seqlens must have shape"),
    ("cu_seqlens not from 0", dict(cu_seqlens=torch.tensor([1, 32])), ValueError, "from 0"),
    ("cu_seqlens short of T", dict(cu_seqlens=torch.tensor([0, 31])), ValueError, "total length"),
    ("cu_seqlens not increasing", dict(cu_seqlens=torch.tensor([0, 10, 10, 32])), ValueError, "strictly increasing"),
    ("cu_seqlens with B=2", dict(q=torch.randn(2, 32, 4, 8), k=torch.randn(2, 32, 2, 8), v=torch.randn(2, 32, 2, 8),
                                 block_indices=None, cu_seqlens=torch.tensor([0, 32])), ValueError, "batch size must be 1"),
    ("negative window", dict(window_size=-1), ValueError, "window_size"),
    ("zero block size", dict(block_size=0), ValueError, "block_size"),
    ("float block size", dict(block_size=8.0), TypeError, "block_size"),
    ("negative scale", dict(scale=-1.0), ValueError, "scale"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, over, exc, msg):
    with pytest.raises(exc, match=msg):
        R.naive_nsa(**_base(**over))


@pytest.mark.parametrize("l,d,ls,msg", [(30, 16, 64, "divide compress_block"), (32, 16, 40, "divide the selection"),
                                        (0, 16, 64, "compress_block"), (32, 0, 64, "compress_stride")])
def test_bad_compression_config_raises(l, d, ls, msg):
    with pytest.raises(ValueError, match=msg):
        R.naive_nsa_full(q0, k0, v0, block_counts=4, block_size=ls, compress_block=l, compress_stride=d)


def test_bad_selection_args_raise():
    with pytest.raises(ValueError, match=">= 3"):
        R.select_blocks(torch.rand(1, 8, 2, 4), 2, 8)
    with pytest.raises(TypeError, match="block_counts must be an int"):
        R.naive_nsa_full(q0, k0, v0, block_counts=torch.ones(1, 32, 2, dtype=torch.int32), block_size=16,
                         compress_block=8, compress_stride=4)
    with pytest.raises(ValueError, match="compress_stride"):
        R.compress_kv(k0, v0, 8, 3)
