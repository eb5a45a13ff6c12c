"""Debug aid: where and when the selected kernels disagree with the reference."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference as R  # noqa: E402
from nsa_module import selected_attention  # noqa: E402
from tests.utils import selected_case, selected_grads  # noqa: E402
from tests.utils import rel_err  # noqa: E402

torch.set_printoptions(linewidth=200)
for G, H, K, V, BS, S, dt, counts, varlen, T in [(32, 1, 128, 128, 32, 16, torch.float16, "tensor", False, 390),
                                                 (2, 2, 192, 128, 32, 16, torch.bfloat16, "int", False, 333)]:
    for adv in (0.0, 0.3):
        for cnt_kind in (None, counts):
            q, k, v, g, idx, bc, cu = selected_case(G, H, K, V, BS, S, dt, cnt_kind, varlen, T, adversarial=adv)
            o1 = selected_attention(q, k, v, idx, bc, BS)
            o2 = selected_attention(q, k, v, idx, bc, BS)
            ref = R.naive_nsa(q.float(), k.float(), v.float(), None, None, idx, bc, BS)
            err_t = (o1.float() - ref).abs().amax(dim=(2, 3))  # [B, T]
            bad = (err_t > 0.05).nonzero()
            print(f"G={G} BS={BS} S={S} adv={adv} counts={cnt_kind}: rel {rel_err(o1, ref):.2e} "
                  f"deterministic={torch.equal(o1, o2)} bad tokens={bad.shape[0]}")
            for b, t in bad[:4].tolist():
                print("   b", b, "t", t, "err", err_t[b, t].item(), "ids", idx[b, t].tolist(),
                      "cnt", None if not isinstance(bc, torch.Tensor) else bc[b, t].tolist())
q, k, v, g, idx, _, _ = selected_case(16, 2, 128, 128, 64, 16, torch.bfloat16, None, False, 600, seed=3)
do = torch.randn(*q.shape[:3], v.shape[-1], device="cuda", dtype=q.dtype)
a = selected_grads(q, k, v, g, idx, 5, 64, do)
b = selected_grads(q, k, v, g, idx[..., :5].contiguous(), None, 64, do)
a2 = selected_grads(q, k, v, g, idx, 5, 64, do)
for name, x, y, z in zip(["o", "dq", "dk", "dv", "dg"], a, b, a2):
    d = (x.float() - y.float()).abs()
    print(name, "max diff", d.max().item(), "n diff", int((d > 0).sum()), "repeat equal", torch.equal(x, z))
    if name == "dq" and d.max() > 0:
        loc = (d.amax(dim=(2, 3)) > 0).nonzero()[:5].tolist()
        print("   dq differs at (b, t):", loc)
