import copy, torch
from tests.test_ops import TwoLayers
from tests.test_layer import DEC
from tests.test_selected import rel_err
torch.manual_seed(0)
model = TwoLayers(**DEC).cuda().to(torch.bfloat16)
ref = copy.deepcopy(model).float()
for a in ref.attn: a._use_kernels = lambda x: False
x = torch.randn(2, 300, DEC["hidden_size"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
xr = x.detach().float().requires_grad_()
names = ["x"] + [n for n, _ in model.named_parameters()]
def grads(m, xx):
    y = m(xx); return y, torch.autograd.grad(y.float().square().sum(), [xx, *m.parameters()])
y, g = grads(model, x)
yc, gc = grads(torch.compile(model, fullgraph=True), x)
yr, gr = grads(ref, xr)
print("y: eager-vs-compiled", rel_err(yc, y), "eager-vs-fp32ref", rel_err(y, yr), "compiled-vs-fp32ref", rel_err(yc, yr))
for n, a, b, c in zip(names, g, gc, gr):
    print(f"{n:40s} e/c {rel_err(b, a):.4f}  e/ref {rel_err(a, c):.4f}  c/ref {rel_err(b, c):.4f}  |ref| {c.float().norm().item():.3e}")
