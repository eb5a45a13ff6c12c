"""Generation with the NSA cache: prefill a prompt, then decode token by token, printing how many
tokens each step reads against the paper's Table 4 count ((T - l)/d) + n·l' + w for a context of T
tokens, and against full attention's T. Also checks that the cached generation is what a full forward over the same tokens
predicts. Figure: decode_reads.png in --out.

    python examples/05_decode.py [--prompt 256] [--steps 256] [--device cpu]
"""
import argparse
import os
import sys

import _cpu  # first: it sets OpenMP's wait policy before torch loads OpenMP
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_module.model import ToyLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    _cpu.set_threads(args.device)
    os.makedirs(args.out, exist_ok=True)
    from tqdm import tqdm

    l, d, ls, n, w = 16, 8, 32, 4, 64
    torch.manual_seed(0)
    model = ToyLM(64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, attention="nsa",
                  compress_block=l, compress_stride=d, block_size=ls, block_counts=n, window_size=w)
    # bf16 on CUDA: the layer runs its TileLang kernels (prefill) and decode kernels; float32 elsewhere
    model = model.to(args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model.eval()
    prompt = torch.randint(0, 64, (args.batch, args.prompt), device=args.device)
    with torch.no_grad():
        logits, caches = model(prompt, use_cache=True)
        tokens, reads = [logits[:, -1].argmax(-1)], []
        for _ in tqdm(range(args.steps - 1), desc="decode"):
            logits, caches = model(tokens[-1][:, None], caches=caches)
            tokens.append(logits[:, -1].argmax(-1))
            reads.append(caches[0].reads[0])  # layer 0, sequence 0
    gen = torch.stack(tokens, 1)
    ctx = list(range(args.prompt + 1, args.prompt + 1 + len(reads)))  # context T of each decode step
    table4 = [(T - l) // d + 1 + n * ls + w for T in ctx]
    print(f"{'context T':>10} {'read':>6} {'Table 4':>8} {'full attention':>15}")
    for i in range(0, len(ctx), max(1, len(ctx) // 8)):
        print(f"{ctx[i]:>10} {reads[i]:>6} {table4[i]:>8} {ctx[i]:>15}")
    print(f"at T={ctx[-1]}: NSA reads {reads[-1]} tokens, {ctx[-1] / reads[-1]:.1f}x fewer than full attention")

    with torch.no_grad():  # the cached decode must agree with one forward over everything
        full = model(torch.cat([prompt, gen[:, :-1]], 1))[:, args.prompt - 1:].argmax(-1)
    print(f"cached generation equals the full forward's predictions: {torch.equal(full, gen)}")
    if not torch.equal(full, gen):  # in bf16 a near-tie of two logits can round either way
        print(f"  the same token in {(full == gen).float().mean():.1%} of the {gen.numel()} steps")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ctx, reads, label="NSA decode (counted)", color="#d62728", linewidth=2)  # the benchmark figures' colours
    ax.plot(ctx, table4, "--", label="((T−l)/d) + n·l' + w (Table 4)", color="#7f7f7f")
    ax.plot(ctx, ctx, label="full attention", color="#1f77b4")
    ax.set_xlabel("context T")
    ax.set_ylabel("tokens read per step (one kv head)")
    ax.set_title(f"tokens one decode step reads, NSA vs full attention\nl={l}, d={d}, l'={ls}, n={n}, w={w}; "
                 f"prompt {args.prompt}, on {args.device}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "decode_reads.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
