"""A small LLaMA-style language model with NSA against the same model with full attention.

The corpus is generated (no downloads): sentences from a random bigram language, in which spans of
earlier text are repeated later, so that attending far back pays. Both models see the same batches;
their training losses go in one plot (toy_lm_loss.png in --out).

    python examples/04_train_toy_lm.py [--steps 150] [--T 128] [--device cpu]
"""
import argparse
import os
import sys

import _cpu  # first: it sets OpenMP's wait policy before torch loads OpenMP
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_module.model import ToyLM, train  # noqa: E402

V = 64


class Corpus:
    """A random bigram language (each token has a few likely successors) with copied spans."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(V, V, generator=g) * 3.0
        self.trans = torch.softmax(logits, -1)
        self.g = g

    def batch(self, B: int, T: int, device="cpu") -> torch.Tensor:
        ids = torch.empty(B, T + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, V, (B,), generator=self.g)
        for t in range(1, T + 1):
            ids[:, t] = torch.multinomial(self.trans[ids[:, t - 1]], 1, generator=self.g)[:, 0]
        # copy a span of 16 tokens from the first half to a random place in the second half
        for b in range(B):
            src = int(torch.randint(0, T // 2 - 16, (1,), generator=self.g))
            dst = int(torch.randint(T // 2, T - 16, (1,), generator=self.g))
            ids[b, dst:dst + 16] = ids[b, src:src + 16]
        return ids.to(device)


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    _cpu.set_threads(args.device)
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    corpus = Corpus()
    batches = [corpus.batch(args.batch, args.T, args.device) for _ in range(args.steps)]
    curves = {}
    for attention in ("nsa", "full"):
        torch.manual_seed(0)
        model = ToyLM(V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, attention=attention,
                      compress_block=8, compress_stride=4, block_size=16, block_counts=4, window_size=16)
        model = model.to(args.device, dtype)
        it = iter(batches)
        curves[attention] = train(model, lambda: (next(it),), lm_loss, args.steps, desc=attention)
    first = {k: sum(v[:10]) / 10 for k, v in curves.items()}
    last = {k: sum(v[-10:]) / 10 for k, v in curves.items()}
    for k in curves:
        print(f"{k}: loss {first[k]:.3f} (first 10 steps) -> {last[k]:.3f} (last 10)")
    print("NSA's loss went down" if last["nsa"] < first["nsa"] else "NSA's loss did NOT go down")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, v in curves.items():
        ax.plot(v, label={"nsa": "NSA", "full": "full attention"}[k], alpha=0.85,
                color={"nsa": "#d62728", "full": "#1f77b4"}[k])  # the benchmark figures' colours
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"toy LM training loss, NSA vs full attention\nT={args.T}, batch {args.batch}, 2 layers, "
                 f"NSA l=8, d=4, l'=16, n=4, W=16; on {args.device}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "toy_lm_loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
