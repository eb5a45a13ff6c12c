"""NSA's torch.library custom ops (nsa_module/ops.py): their registrations (fake shapes, autograd)
checked by torch.library.opcheck, and a two-layer model compiled whole by torch.compile
(fullgraph=True fails on any graph break) against the same model run eagerly. On the CPU the
attend op runs the reference forward (no backward there); on the GPU the kernels, both ways."""
import pytest
import torch
import torch.nn as nn

from nsa_module import ops  # noqa: F401  (registers the ops)
from nsa_module.layer import NativeSparseAttention
from tests.utils import LAYER_DECODE, rel_err

SMALL = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, compress_block=8, compress_stride=4,
             block_size=8, block_counts=3, window_size=6)


class TwoLayers(nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        self.attn = nn.ModuleList([NativeSparseAttention(**cfg) for _ in range(2)])
        self.norm = nn.LayerNorm(cfg["hidden_size"])

    def forward(self, x):
        for a in self.attn:
            x = x + a(self.norm(x))[0]
        return x


def attend_args(W, device="cpu", dtype=torch.float32, grad=False, B=2, T=40, HQ=4, H=2, K=16, V=16, l=8, d=4,
                ls=8, n=3):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    nc = (T - l) // d + 1
    swa = (r(B, T, H, K), r(B, T, H, V), u(B, T, HQ)) if W > 0 else (None, None, None)
    return (r(B, T, HQ, K), r(B, nc, H, K), r(B, nc, H, V), r(B, T, H, K), r(B, T, H, V), swa[0], swa[1],
            u(B, T, HQ), u(B, T, HQ), swa[2], None, l, d, ls, n, W, K ** -0.5)


@pytest.mark.parametrize("W", [6, 0], ids=["window", "no-window"])
def test_attend_op_registrations(W):
    torch.library.opcheck(torch.ops.nsa_tilelang.attend.default, attend_args(W))


def test_attend_op_on_cpu_is_the_reference():
    args = attend_args(6)
    out = torch.ops.nsa_tilelang.attend(*args)
    o_ref, idx_ref = ops.attend_reference(*args)
    assert torch.equal(out[0], o_ref) and torch.equal(out[-1].long(), idx_ref)


def test_two_layer_model_compiles_whole_on_cpu(monkeypatch):
    """The layer's kernel path (the custom op) forced on the CPU, where the op runs the reference
    forward: torch.compile traces both layers in one graph, equal to eager."""
    monkeypatch.setattr(NativeSparseAttention, "_use_kernels", lambda self, x: True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoLayers(**SMALL)
    x = torch.randn(2, 45, SMALL["hidden_size"])
    with torch.no_grad():
        y = model(x)
        y_c = torch.compile(model, fullgraph=True)(x)  # raises on any graph break
    assert rel_err(y_c, y) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("W", [64, 0], ids=["window", "no-window"])
def test_attend_op_registrations_gpu(W):
    """The CUDA op with its backward: fake shapes, autograd registration, AOT dispatch."""
    args = attend_args(W, "cuda", torch.bfloat16, grad=True, T=300, HQ=16, H=2, K=64, V=64, l=32, d=16, ls=64,
                       n=4)
    torch.library.opcheck(torch.ops.nsa_tilelang.attend.default, args, atol=1e-2, rtol=1.6e-2)  # bf16


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
