"""NSA's op layer (nsa_module/ops.py): the registrations of every op (fake shapes, autograd)
checked by torch.library.opcheck; the composition `nsa_branches` and a two-layer model compiled
whole by torch.compile (fullgraph=True fails on any graph break) against eager. On the CPU the
forward ops run dense float32 versions of the kernels' masks (no backward there); on the GPU the
kernels, both ways, plus `torch.compile(nsa)` across lengths and a varlen nsa() with no host sync."""
import warnings

import pytest
import torch
import torch.nn as nn

import reference as R
from nsa_module import nsa, ops
from nsa_module.layer import NativeSparseAttention
from nsa_module.nsa import nsa_branches
from reference.inputs import random_gates, random_qkv
from tests.utils import LAYER_DECODE, packed, rel_err

SMALL = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, compress_block=8, compress_stride=4,
             block_size=8, block_counts=3, window_size=6)
# a small NSA: G = 2, K != V, l = 8, d = 4, l' = 8, n = 3, W = 6
CFG = dict(HQ=4, H=2, K=16, V=32, l=8, d=4, ls=8, n=3, W=6)


class TwoLayers(nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        self.attn = nn.ModuleList([NativeSparseAttention(**cfg) for _ in range(2)])
        self.norm = nn.LayerNorm(cfg["hidden_size"])

    def forward(self, x):
        for a in self.attn:
            x = x + a(self.norm(x))[0]
        return x


def inputs(B, T, device="cpu", dtype=torch.float32, seed=0, c=CFG):
    q, k, v = random_qkv(B, T, c["HQ"], c["H"], c["K"], c["V"], dtype=dtype, device=device, seed=seed)
    gates = [random_gates(B, T, c["HQ"], dtype=dtype, device=device, seed=seed + s) for s in (1, 2, 3)]
    return q, k, v, gates


def composed(q, k, v, gates, cu=None, c=CFG):
    """nsa()'s composition on validated arguments (nsa_branches over the ops), cu on the host."""
    kv_cmp = (ops.compress_mean(k, cu, c["l"], c["d"]), ops.compress_mean(v, cu, c["l"], c["d"]))
    return nsa_branches(q, kv_cmp, (k, v), (k, v), *gates, None, c["n"], c["l"], c["d"], c["ls"], c["W"],
                        c["K"] ** -0.5, cu)


def reference(q, k, v, gates, cu=None, c=CFG):
    return R.naive_nsa_full(q, k, v, *gates, None, c["n"], c["ls"], c["W"], None, cu, c["l"], c["d"])


# -- CPU ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [None, [5, 8, 1, 23, 9]], ids=["B2", "varlen"])
def test_compress_mean_op_equals_the_reference_and_its_gradient(lengths):
    B, T = (2, 37) if lengths is None else (1, sum(lengths))
    cu = None if lengths is None else packed(lengths, "cpu")
    x = torch.randn(B, T, 2, 8, dtype=torch.float64, requires_grad=True)
    ref, _ = R.compress_kv(x, x, 8, 4, cu_seqlens=cu)
    got = ops.compress_mean(x, None if cu is None else cu.long(), 8, 4)
    torch.testing.assert_close(got, ref)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(ref, x, dy)[0])


def test_op_registrations_on_cpu():
    """Schemas, fake shapes and dispatch of the forward ops (no backward on the CPU)."""
    q, k, v, (g1, g2, g3) = inputs(2, 40)
    l, d, ls, n, sc = CFG["l"], CFG["d"], CFG["ls"], CFG["n"], CFG["K"] ** -0.5
    k_cmp = ops.compress_mean(k, None, l, d)
    v_cmp = ops.compress_mean(v, None, l, d)
    _, _, lse = ops.banded_fwd(q, k_cmp, v_cmp, g1, None, 2 ** 30, d, l - 1, sc)
    idx = ops.select_blocks(q, k_cmp, lse, None, n, l, d, ls, sc)
    cnt = torch.full(idx.shape[:3], 2, dtype=torch.int32)
    cu = torch.tensor([0, 40], dtype=torch.int64)
    for op, args in [
        (torch.ops.nsa_tilelang.compress_mean.default, (k, None, l, d)),
        (torch.ops.nsa_tilelang.compress_mean.default, (k[:1], cu, l, d)),
        (torch.ops.nsa_tilelang.banded_fwd.default, (q, k, v, g3, None, 6, 1, 0, sc)),
        (torch.ops.nsa_tilelang.banded_fwd.default, (q, k_cmp, v_cmp, None, None, 2 ** 30, d, l - 1, sc)),
        (torch.ops.nsa_tilelang.selected_fwd.default, (q, k, v, g2, idx, cnt, None, ls, sc)),
        (torch.ops.nsa_tilelang.select_blocks.default, (q, k_cmp, lse, None, n, l, d, ls, sc)),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("lengths", [None, [9, 30, 1, 17]], ids=["B2", "varlen"])
def test_composition_on_cpu_is_the_reference(lengths):
    """nsa_branches over the CPU ops equals naive_nsa_full (ids and output)."""
    B, T = (2, 45) if lengths is None else (1, sum(lengths))
    cu = None if lengths is None else packed(lengths, "cpu")
    q, k, v, gates = inputs(B, T)
    o, idx = composed(q, k, v, gates, None if cu is None else cu.long())
    o_ref, idx_ref = reference(q, k, v, gates, cu)
    assert torch.equal(idx.long(), idx_ref)
    assert rel_err(o, o_ref) <= 1e-5


def test_composition_compiles_whole_on_cpu():
    """nsa()'s composition under torch.compile(fullgraph=True, dynamic=True): one graph, no break,
    equal to eager, and a second length runs without recompiling."""
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, g1, g2, g3: composed(q, k, v, [g1, g2, g3]), fullgraph=True, dynamic=True)
    for T in (45, 61):
        q, k, v, gates = inputs(2, T, seed=T)
        o_c, idx_c = f(q, k, v, *gates)
        o, idx = composed(q, k, v, gates)
        assert torch.equal(idx_c, idx) and rel_err(o_c, o) <= 1e-5
        torch._dynamo.config.error_on_recompile = True  # from the second length on
    torch._dynamo.config.error_on_recompile = False


def test_nsa_compiles_whole_across_lengths_on_cpu(monkeypatch):
    """nsa() itself (its checks included) under torch.compile(fullgraph=True, dynamic=True), its
    launches on the CPU ops: three lengths, no recompile after the first (a check that formatted a
    size into a message once pinned T), equal to eager."""
    import sys
    monkeypatch.setattr(sys.modules["nsa_module.nsa"], "check_cuda", lambda q, op: None)
    c = dict(CFG, ls=16)  # the kernels' smallest block_size

    def f(q, k, v, g1, g2, g3):
        return nsa(q, k, v, g1, g2, g3, block_counts=c["n"], block_size=c["ls"], window_size=c["W"],
                   compress_block=c["l"], compress_stride=c["d"])
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    try:
        for T in (45, 61, 77):
            q, k, v, gates = inputs(1, T, dtype=torch.bfloat16, seed=T)
            assert rel_err(cf(q, k, v, *gates), f(q, k, v, *gates)) <= 1e-2  # bf16 sums fused or not
            torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_two_layer_model_compiles_whole_on_cpu(monkeypatch):
    """The layer's kernel path (the ops) forced on the CPU, where the ops run their dense forward:
    torch.compile traces both layers in one graph, equal to eager."""
    monkeypatch.setattr(NativeSparseAttention, "_use_kernels", lambda self, x: True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoLayers(**SMALL)
    x = torch.randn(2, 45, SMALL["hidden_size"])
    with torch.no_grad():
        y = model(x)
        y_c = torch.compile(model, fullgraph=True)(x)  # raises on any graph break
        monkeypatch.setattr(NativeSparseAttention, "_use_kernels", lambda self, x: False)
        y_ref = model(x)
    assert rel_err(y_c, y) <= 1e-4 and rel_err(y, y_ref) <= 1e-5


# -- GPU ----------------------------------------------------------------------------------------

GPU_CFG = dict(HQ=16, H=2, K=64, V=64, l=32, d=16, ls=64, n=4, W=64)  # the layer test's kernels


@pytest.mark.gpu
def test_op_registrations_gpu():
    """The CUDA ops with their backward: fake shapes, autograd registration, AOT dispatch."""
    c, sc = GPU_CFG, GPU_CFG["K"] ** -0.5
    q, k, v, (g1, g2, g3) = inputs(2, 300, "cuda", torch.bfloat16, c=c)
    k_cmp, v_cmp = ops.compress_mean(k, None, c["l"], c["d"]), ops.compress_mean(v, None, c["l"], c["d"])
    _, _, lse = ops.banded_fwd(q, k_cmp, v_cmp, g1, None, 2 ** 30, c["d"], c["l"] - 1, sc)
    idx = ops.select_blocks(q, k_cmp, lse, None, c["n"], c["l"], c["d"], c["ls"], sc)
    grad = lambda *xs: [x.detach().requires_grad_() for x in xs]  # noqa: E731
    qg, kg, vg, kcg, vcg, g1g, g2g, g3g = grad(q, k, v, k_cmp, v_cmp, g1, g2, g3)
    tol = dict(atol=1e-2, rtol=1.6e-2)  # bf16
    for op, args in [
        (torch.ops.nsa_tilelang.compress_mean.default, (kg, None, c["l"], c["d"])),
        (torch.ops.nsa_tilelang.banded_fwd.default, (qg, kg, vg, g3g, None, c["W"], 1, 0, sc)),
        (torch.ops.nsa_tilelang.banded_fwd.default, (qg, kcg, vcg, g1g, None, 2 ** 30, c["d"], c["l"] - 1, sc)),
        (torch.ops.nsa_tilelang.selected_fwd.default, (qg, kg, vg, g2g, idx, None, None, c["ls"], sc)),
        (torch.ops.nsa_tilelang.select_blocks.default, (q, k_cmp, lse, None, c["n"], c["l"], c["d"], c["ls"], sc)),
    ]:
        torch.library.opcheck(op, args, **tol)


NAMES = ["o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"]


def _nsa(q, k, v, g1, g2, g3, cu=None):
    c = GPU_CFG
    return nsa(q, k, v, g1, g2, g3, block_counts=c["n"], block_size=c["ls"], window_size=c["W"], cu_seqlens=cu,
               compress_block=c["l"], compress_stride=c["d"])


def _fwd_bwd(f, q, k, v, gates, do):
    leaves = [x.detach().requires_grad_() for x in (q, k, v, *gates)]
    o = f(*leaves)
    return [o, *torch.autograd.grad(o, leaves, do)]


@pytest.mark.gpu
def test_nsa_compiles_whole_across_lengths_gpu():
    """torch.compile(nsa, fullgraph=True, dynamic=True), forward and backward: equal to eager nsa()
    at three lengths, without a recompile after the first."""
    torch._dynamo.reset()
    f = torch.compile(_nsa, fullgraph=True, dynamic=True)
    try:
        for T in (300, 517, 1000):
            q, k, v, gates = inputs(1, T, "cuda", torch.bfloat16, seed=T, c=GPU_CFG)
            do = torch.randn(1, T, GPU_CFG["HQ"], GPU_CFG["V"], device="cuda", dtype=torch.bfloat16)
            eager, comp = _fwd_bwd(_nsa, q, k, v, gates, do), _fwd_bwd(f, q, k, v, gates, do)
            for name, e, c in zip(NAMES, eager, comp):
                # the same kernels on the same inputs, but Inductor fuses the gated sum of the
                # branches (and of their gradients) in fp32 where eager rounds each add to bf16
                assert rel_err(c, e) <= 1e-2, (T, name, rel_err(c, e))
            torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False


@pytest.mark.gpu
def test_varlen_nsa_forward_backward_makes_no_host_sync():
    """cu_seqlens on the CPU: a varlen nsa() forward + backward never waits for the GPU (CUDA's
    sync debug mode raises on any synchronizing call). On the device: exactly one host read."""
    lengths = [300, 17, 64, 1, 450, 129]
    cu = packed(lengths, "cpu")
    q, k, v, gates = inputs(1, sum(lengths), "cuda", torch.bfloat16, c=GPU_CFG)
    do = torch.randn(1, sum(lengths), GPU_CFG["HQ"], GPU_CFG["V"], device="cuda", dtype=torch.bfloat16)
    want = _fwd_bwd(lambda *a: _nsa(*a, cu=cu), q, k, v, gates, do)  # warm: kernels compiled, layouts cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _fwd_bwd(lambda *a: _nsa(*a, cu=cu), q, k, v, gates, do)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, w, g in zip(NAMES, want, got):
        assert rel_err(g, w) <= (0 if name == "o" else 1e-3), (name, rel_err(g, w))  # atomics: see above
    cu_dev = cu.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fwd_bwd(lambda *a: _nsa(*a, cu=cu_dev), q, k, v, gates, do)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.gpu
def test_two_layer_model_compiles_whole_on_gpu():
    """bf16 on CUDA, the TileLang kernels inside the ops, compiled whole (fullgraph) and run forward
    and backward: as accurate as the eager bf16 model against the float32 model on the reference
    path (the two bf16 graphs round differently, so each is held to the float32 truth: error at most
    1e-2, or 1.5 times eager's where eager's own is larger)."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoLayers(**LAYER_DECODE).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(model).float()
    for a in ref.attn:
        a._use_kernels = lambda x: False
    x = torch.randn(2, 300, LAYER_DECODE["hidden_size"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().float().requires_grad_()
    names = ["x"] + [n for n, _ in model.named_parameters()]

    def run(m, inp):
        y = m(inp)
        return [y, *torch.autograd.grad(y.float().square().sum(), [inp, *m.parameters()])]
    eager, compiled, truth = run(model, x), run(torch.compile(model, fullgraph=True), x), run(ref, x_ref)
    for name, e, c, t in zip(["y"] + names, eager, compiled, truth):
        if name.endswith("phi_k.pos"):
            # adding the same vector to every compressed key shifts each query's logits by a
            # constant: softmax ignores it, so this gradient is exactly 0 and bf16 gives noise
            assert c.float().norm() <= 1e-4 * truth[names.index(name.replace(".pos", ".proj.weight")) + 1].norm()
            continue
        assert rel_err(c, t) <= max(1e-2, 1.5 * rel_err(e, t)), name
