"""Needle in a haystack: a tiny NSA model trained from scratch to retrieve a value planted anywhere
in a long sequence, then tested at several depths and context lengths (the paper's Figure 5).

A sequence is filler tokens with one needle, MARK followed by a value token, at some depth; its
last token is QUERY, and the model must answer the value. With 16-token selection blocks and
n = 4 selected blocks (three of them forced: block 0 and the two local ones), a needle far from
the query is only seen if the compressed attention ranks its block first among the rest.
Figure: needle_accuracy.png (depth × length accuracy) in --out.

    python examples/03_needle_in_a_haystack.py                      # CPU: trains at 64 and 128 tokens
    python examples/03_needle_in_a_haystack.py --device cuda --train-len 4096 --test-lens 1024 4096 16384 65536
"""
import argparse
import os
import sys

import _cpu  # first: it sets OpenMP's wait policy before torch loads OpenMP
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_module.model import ToyLM, train  # noqa: E402

V, NV, MARK, QUERY = 64, 16, 1, 2  # vocab, value tokens 3 … 3+NV-1, fillers above
N_TEST = 64  # needles per accuracy measurement


def haystack(B: int, L: int, depth=None, g=None, device="cpu"):
    """Token ids `[B, L]` with a needle at relative depth (random if None) and the values `[B]`."""
    ids = torch.randint(3 + NV, V, (B, L), generator=g)
    vals = torch.randint(3, 3 + NV, (B,), generator=g)
    dep = torch.rand(B, generator=g) if depth is None else torch.full((B,), float(depth))
    pos = (dep * (L - 4)).long()
    rows = torch.arange(B)
    ids[rows, pos], ids[rows, pos + 1], ids[:, L - 1] = MARK, vals, QUERY
    return ids.to(device), vals.to(device)


def accuracy(model, L, depth=None, n=N_TEST, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids, vals = haystack(n, L, depth, g, device)
    with torch.no_grad():
        return (model(ids)[:, -1].argmax(-1) == vals).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-len", type=int, nargs="+", default=[64, 128], help="lengths trained on (a curriculum)")
    ap.add_argument("--test-lens", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.05, 0.25, 0.5, 0.75, 0.95])
    ap.add_argument("--steps", type=int, default=400, help="training steps per length (stops early when solved)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    _cpu.set_threads(args.device)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = ToyLM(V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, attention="nsa",
                  compress_block=8, compress_stride=4, block_size=16, block_counts=4, window_size=16)
    model = model.to(args.device, dtype)
    g = torch.Generator().manual_seed(0)
    for L in args.train_len:
        train(model, lambda: haystack(args.batch, L, g=g, device=args.device),
              lambda m, ids, vals: F.cross_entropy(m(ids)[:, -1].float(), vals), args.steps,
              desc=f"train L={L}", eval_fn=lambda m: accuracy(m, L, device=args.device), stop_at=0.99)

    acc = torch.tensor([[accuracy(model, L, dep, device=args.device) for L in args.test_lens] for dep in args.depths])
    print("accuracy (rows: depth, columns: length)")
    print("depth  " + "  ".join(f"{L:>6}" for L in args.test_lens))
    for dep, row in zip(args.depths, acc.tolist()):
        print(f"{dep:5.2f}  " + "  ".join(f"{a:6.2f}" for a in row))
    for L in args.train_len:
        if L in args.test_lens:
            print(f"trained length {L}: mean accuracy {acc[:, args.test_lens.index(L)].mean():.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(args.test_lens), 4))
    im = ax.imshow(acc.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(args.test_lens)), [str(L) for L in args.test_lens])
    ax.set_yticks(range(len(args.depths)), [f"{d:.0%}" for d in args.depths])
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (trained: " + ", ".join(map(str, args.train_len)) + ")")
    ax.set_ylabel("needle depth")
    ax.set_title(f"needle retrieval accuracy, {N_TEST} needles per cell\n"
                 f"2-layer NSA model (l=8, d=4, l'=16, n=4, W=16) on {args.device}", fontsize=10)
    fig.colorbar(im, label="accuracy")
    fig.tight_layout()
    path = os.path.join(args.out, "needle_accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
