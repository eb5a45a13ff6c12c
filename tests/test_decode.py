"""nsa_decode (kernels/decode.py): one step for N sequences of different lengths against the
reference decode, on the GPU; its host checks, read counts and selection bound on the CPU."""
import pytest
import torch

import reference as R
from kernels import decode as K_dec
from nsa_module.decode import decode_reads, nsa_decode
from reference import naive as RN
from tests.utils import assert_close, check_selection, make_caches


def reference_decode(q, kv, ckv, num_cmp, gates, lengths, l, d, ls, n, W, scale):
    """Per sequence, float32: (o `[N, HQ, V]`, block ids `[N, H, n]`, block scores `[N, H, NS]`):
    the reference NSA of one query at position t - 1 over the sequence's t tokens."""
    H = kv[0].shape[2]
    ids, scores = [], []
    for b, t in enumerate(lengths):
        kc, vc = ckv[0][b:b + 1, :num_cmp[b]].float(), ckv[1][b:b + 1, :num_cmp[b]].float()
        _, p_cmp = R.compressed_attention(q[b:b + 1, None].float(), kc, vc, l, d, scale, q_offset=t - 1)
        p_slc = R.selection_scores(p_cmp, l, d, ls, H, num_blocks=(t - 1) // ls + 1)
        ids.append(R.select_blocks(p_slc, n, ls, positions=torch.tensor([t - 1], device=q.device))[0, 0])  # [H, n]
        scores.append(p_slc[0, 0])
    ids = torch.stack(ids)
    return reference_decode_with_ids(q, kv, ckv, num_cmp, gates, lengths, l, d, ls, W, scale, ids), ids, scores


def reference_decode_with_ids(q, kv, ckv, num_cmp, gates, lengths, l, d, ls, W, scale, ids):
    """reference_decode's output for the selection `ids` `[N, H, n]`, in float32 (q's dtype inside
    reference.low_precision()): `reference.naive_nsa_branches` at the query's offset."""
    cdt = RN.compute_dtype(q.dtype)  # the inputs in it: the output comes in q's dtype
    outs = []
    for b, t in enumerate(lengths):
        kv_cmp = (ckv[0][b:b + 1, :num_cmp[b]].to(cdt), ckv[1][b:b + 1, :num_cmp[b]].to(cdt))
        kv_raw = (kv[0][b:b + 1, :t].to(cdt), kv[1][b:b + 1, :t].to(cdt))
        o, _ = R.naive_nsa_branches(q[b:b + 1, None].to(cdt), kv_cmp, kv_raw, kv_raw,
                                    *(g[b:b + 1, None].to(cdt) for g in gates),
                                    ids[b:b + 1, None], None, ls, W, scale, None, l, d, q_offset=t - 1)
        outs.append(o[0, 0])
    return torch.stack(outs)


# (G, H, K, V, l, d, l', n, W, dtype, lengths): lengths include a sequence shorter than l (no
# compressed token), one with fewer blocks than n (padding), ring not yet full, blocks ending mid-way;
# the last case's cache (> 256 blocks) takes the four-launch path with the separate selection kernel
CASES = [
    (16, 4, 128, 128, 32, 16, 64, 16, 512, torch.bfloat16, [5000, 1, 31, 300, 8191]),
    (8, 2, 64, 64, 32, 16, 64, 4, 64, torch.bfloat16, [100, 65, 2000]),
    (16, 2, 192, 128, 32, 16, 64, 16, 512, torch.bfloat16, [3000, 777]),
    (1, 4, 64, 64, 16, 8, 32, 5, 0, torch.float16, [900, 33, 2]),
    (4, 2, 128, 128, 64, 64, 64, 16, 100, torch.float16, [4096, 1500, 64]),
    (16, 4, 128, 128, 32, 16, 64, 16, 512, torch.bfloat16, [20000, 3000, 1]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[0]}-K{c[2]}V{c[3]}-l{c[4]}d{c[5]}ls{c[6]}-n{c[7]}-W{c[8]}"
                         f"-T{max(c[-1])}")
def test_nsa_decode_matches_reference(case, poison_outputs):
    check_decode_case(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["window", "no-window"])
def test_nsa_decode_narrow_combine(case, poison_outputs, monkeypatch):
    """The combine's narrow programs (taken by large batches) on the same cases."""
    import nsa_module.decode as D
    monkeypatch.setattr(D, "COMBINE_WIDE_MAX_PROGRAMS", 0)
    check_decode_case(case)


@pytest.mark.gpu
def test_nsa_decode_selection_rounds_path(poison_outputs, monkeypatch):
    """The selection kernel with fewer threads than blocks (each warp's top n by argmax rounds, as
    caches past 64k tokens take it) on the 20000-token case."""
    import nsa_module.decode as D
    monkeypatch.setattr(D, "SELECT_THREADS", 256)
    D._kernels.cache_clear()
    try:
        check_decode_case(CASES[5])
    finally:
        D._kernels.cache_clear()


def check_decode_case(case):
    G, H, K, V, l, d, ls, n, W, dtype, lengths = case
    N, HQ, dev = len(lengths), G * H, "cuda"
    scale = K ** -0.5
    q, kv, ckv, num_cmp, ring, gates = make_caches(N, H, HQ, K, V, l, d, W, lengths, dtype, dev)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
    swa = (*ring, as_t(lengths)) if W > 0 else (None, None, None)
    o, idx = nsa_decode(q, *ckv, as_t(num_cmp), *kv, as_t(lengths), *swa, gates, l, d, ls, n, scale)
    _, idx_ref, scores = reference_decode(q, kv, ckv, num_cmp, gates, lengths, l, d, ls, n, W, scale)
    # ids: equal, or different only between blocks whose reference scores tie; padding identical
    assert ((idx < 0) == (idx_ref < 0)).all()
    NSm = max(s.shape[-1] for s in scores)
    p = torch.stack([torch.nn.functional.pad(s, (0, NSm - s.shape[-1])) for s in scores])
    check_selection(idx[:, None], idx_ref[:, None], p[:, None])
    # the output over the kernel's ids, accepted above (a near-tie may rank either way, changing a
    # row's selected branch), in float32 and in the low precision; each sequence one segment, each
    # (sequence, head) one row
    o_ref = reference_decode_with_ids(q, kv, ckv, num_cmp, gates, lengths, l, d, ls, W, scale, idx.long())
    with R.low_precision():
        o_lp = reference_decode_with_ids(q, kv, ckv, num_cmp, gates, lengths, l, d, ls, W, scale, idx.long())
    assert_close([o[None]], [o_ref[None]], [o_lp[None]], ["o"], dtype, [(0, b, b + 1) for b in range(N)])
    reads = decode_reads(idx, as_t(num_cmp), as_t(lengths), swa[2], ls, W)
    want = [c + sum(min(ls, t - i * ls) for i in ids if i >= 0) + (min(W, t) if W > 0 else 0)
            for c, t, ids in zip(num_cmp, lengths, idx_ref[:, 0].tolist())]
    assert reads.tolist() == want


@pytest.mark.gpu
def test_nsa_decode_is_cuda_graph_capturable():
    """The step reads nothing back to the host: a captured replay equals the eager step, and a
    replay after the caches change (one more token) equals the eager step on the new caches."""
    G, H, K, V, l, d, ls, n, W, dtype, lengths = CASES[1]
    N, HQ, dev = len(lengths), G * H, "cuda"
    q, kv, ckv, num_cmp, ring, gates = make_caches(N, H, HQ, K, V, l, d, W, lengths, dtype, dev)
    nc, ln, wc = (torch.tensor(x, dtype=torch.int32, device=dev) for x in (num_cmp, lengths, lengths))
    step = lambda: nsa_decode(q, *ckv, nc, *kv, ln, *ring, wc, gates, l, d, ls, n, K ** -0.5)  # noqa: E731
    o_eager, idx_eager = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_g, idx_g = step()
    graph.replay()
    assert torch.equal(o_g, o_eager) and torch.equal(idx_g, idx_eager)
    ln += 1  # every sequence one token longer (its key is whatever the cache holds there)
    nc.copy_(torch.tensor([0 if t < l else (t - l) // d + 1 for t in (ln.tolist())], dtype=torch.int32))
    wc += 1
    graph.replay()
    o_new, idx_new = step()
    assert torch.equal(o_g, o_new) and torch.equal(idx_g, idx_new)


def test_both_selection_paths_are_covered():
    from nsa_module.decode import FUSE_SELECT_MAX_BLOCKS
    nbs = [K_dec.select_blocks_max(max(c[-1]) + 37, c[5], c[6]) for c in CASES]
    assert min(nbs) <= FUSE_SELECT_MAX_BLOCKS < max(nbs)


def test_select_blocks_max_doubles_and_bounds_shared_memory():
    assert K_dec.select_blocks_max(1, 16, 64) == 32
    assert K_dec.select_blocks_max(65536, 16, 64) == 1024
    assert K_dec.select_blocks_max(65537, 16, 64) == 2048
    assert K_dec.select_blocks_max(2 ** 18, 16, 64) == 4096  # 256k tokens: 4096 · 5 floats fit
    assert K_dec.select_blocks_max(2 ** 19, 16, 64) == 0


def test_decode_reads_counts_table_4_terms():
    idx = torch.tensor([[[0, 2, 3, -1]], [[0, -1, -1, -1]]], dtype=torch.int32)  # [N=2, H=1, n=4]
    reads = decode_reads(idx, torch.tensor([10, 0]), torch.tensor([200, 5]), torch.tensor([200, 5]), 64, 100)
    # 10 compressed + blocks 0, 2 full (64 each) + block 3 holds tokens 192..199 (8); window 100
    assert reads.tolist() == [10 + 64 + 64 + 8 + 100, 0 + 5 + 5]


def _args(N=2, HQ=8, H=2, K=64, V=64, CAP=128, dtype=torch.bfloat16):
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    i = torch.ones(N, dtype=torch.int32)
    return dict(q=z(N, HQ, K), k_cmp=z(N, 9, H, K), v_cmp=z(N, 9, H, V), num_cmp=i, k_slc=z(N, CAP, H, K),
                v_slc=z(N, CAP, H, V), lengths=i, k_swa=z(N, 16, H, K), v_swa=z(N, 16, H, V), swa_count=i,
                gates=(z(N, HQ),) * 3, l=32, d=16, l_sel=64, n=4, scale=0.125)


@pytest.mark.parametrize("over, exc, msg", [
    (dict(q=torch.zeros(2, 8, 64)), TypeError, "float16 or bfloat16"),
    (dict(k_slc=torch.zeros(3, 128, 2, 64, dtype=torch.bfloat16)), ValueError, "k_slc must have shape"),
    (dict(v_cmp=torch.zeros(2, 8, 2, 64, dtype=torch.bfloat16)), ValueError, "v_cmp must have shape"),
    (dict(lengths=torch.ones(2)), TypeError, "lengths must be an integer tensor"),
    (dict(num_cmp=torch.ones(3, dtype=torch.int32)), ValueError, "num_cmp must have shape"),
    (dict(gates=(torch.zeros(2, 8),) * 2), TypeError, "gates must be"),
    (dict(q=torch.zeros(2, 5, 64, dtype=torch.bfloat16), gates=(torch.zeros(2, 5),) * 3), ValueError, "multiple"),
    (dict(), ValueError, "CUDA tensors"),
])
def test_bad_decode_arguments_raise(over, exc, msg):
    with pytest.raises(exc, match=msg):
        nsa_decode(**{**_args(), **over})


@pytest.mark.compile
@pytest.mark.parametrize("G, K, V, window, NB_MAX", [(16, 128, 128, True, 4096), (16, 128, 128, True, 128),
                                                     (8, 64, 64, True, 4096), (1, 64, 64, False, 4096),
                                                     (4, 192, 192, True, 256)])
def test_compile_decode_kernels(G, K, V, window, NB_MAX, sm90_target):
    """Both selection paths (ranked inside decode_sparse up to 256 blocks, decode_select beyond)."""
    from nsa_module.decode import _kernels
    k_c, k_s, k_p, k_o = _kernels(4, G, K, V, 32, 16, 64, 16, window, NB_MAX, "bfloat16", K ** -0.5)
    for kern in [k_c, k_p, *k_o.values()] + ([k_s] if k_s else []):
        assert "__global__" in kern.get_kernel_source()
