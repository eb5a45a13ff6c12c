"""What NSA's selection sees: the picture of the paper's Figure 2 (right) on a structured sequence.

The sequence is made of topics: runs of tokens whose queries and keys share a topic vector, so a
token attends to earlier tokens of its own topic. Figures (in --out):
  selection_maps.png      compressed-attention probabilities p_cmp and block scores p_slc of one
                          head group, with the selected blocks overlaid (cyan dots)
  selection_distance.png  how far back the selected blocks are (in blocks from the query's own)
  gate_histograms.png     the three branch gates of an (untrained) NativeSparseAttention layer
The maps come from the float32 reference (the kernels do not return probabilities); with --device
cuda the TileLang nsa() also makes the selection on chip, in bf16, and says how often it picks the
reference's blocks.

    python examples/02_visualize_selection.py [--T 512] [--device cpu]
"""
import argparse
import os
import sys

import _cpu  # first: it sets OpenMP's wait policy before torch loads OpenMP
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference as R  # noqa: E402
from nsa_module import NativeSparseAttention  # noqa: E402


def topic_sequence(T: int, topics: int, dim: int, g: torch.Generator):
    """Topic id per token (runs of random length) and q = k = topic vector + noise `[1, T, 1, dim]`."""
    ids, t = [], 0
    while t < T:
        run = int(torch.randint(16, 80, (1,), generator=g))
        ids += [int(torch.randint(0, topics, (1,), generator=g))] * run
        t += run
    ids = torch.tensor(ids[:T])
    vec = torch.randn(topics, dim, generator=g) * 2.0
    x = vec[ids] + 0.3 * torch.randn(T, dim, generator=g)
    return ids, x[None, :, None, :]


def kernel_agreement(q, k, v, idx, l, d, ls, n) -> float:
    """The share of the reference's selected blocks `idx [B, T, H, n]` that nsa()'s kernels select too."""
    from nsa_module import nsa

    bf = [x.to(torch.bfloat16) for x in (q, k, v)]
    _, idx_tl = nsa(*bf, block_counts=n, block_size=ls, compress_block=l, compress_stride=d, return_block_indices=True)
    used = idx >= 0
    found = (idx[..., :, None] == idx_tl.to(idx.dtype)[..., None, :]).any(-1) & used
    return (found.sum() / used.sum()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--G", type=int, default=4, help="query heads per kv head")
    ap.add_argument("--n", type=int, default=6, help="selected blocks per token")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    _cpu.set_threads(args.device)
    os.makedirs(args.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(0)
    T, G, D, l, d, ls = args.T, args.G, 32, 16, 8, 32
    topic, x = topic_sequence(T, 6, D, g)
    q = (x.repeat(1, 1, G, 1) + 0.2 * torch.randn(1, T, G, D, generator=g)).to(args.device)
    k = x.to(args.device)
    v = torch.randn(1, T, 1, D, generator=g).to(args.device)
    k_cmp, v_cmp = R.compress_kv(k, v, l, d)
    _, p_cmp = R.compressed_attention(q, k_cmp, v_cmp, l, d)
    p_slc = R.selection_scores(p_cmp, l, d, ls, 1)
    idx = R.select_blocks(p_slc, args.n, ls)
    print(f"T={T}, G={G}, l={l}, d={d}, l'={ls}, n={args.n}: {k_cmp.shape[1]} compressed tokens, "
          f"{p_slc.shape[-1]} selection blocks")
    if args.device.startswith("cuda"):
        print(f"TileLang's top-{args.n} (bf16, on chip) picks the reference's blocks in "
              f"{kernel_agreement(q, k, v, idx, l, d, ls, args.n):.1%} of the slots (near-ties may differ in bf16)")

    # -- p_cmp and p_slc with the selected blocks
    where = f"T={T}, G={G}, l={l}, d={d}, l'={ls}, n={args.n}; float32 reference on {args.device}"
    fig, axes = plt.subplots(1, 3, figsize=(16, 6), width_ratios=[1, 12, 12], layout="constrained")
    fig.suptitle(f"What NSA's selection sees on a sequence of topic runs ({where})")
    im = axes[0].imshow(topic[:, None].numpy(), aspect="auto", interpolation="nearest",
                        cmap=matplotlib.colormaps["tab10"].resampled(6), vmin=-0.5, vmax=5.5)
    fig.colorbar(im, ax=axes[0], location="left", ticks=range(6), label="topic of token t", fraction=1.0, aspect=12)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    pc = p_cmp[0, :, 0].cpu().clamp_min(1e-6).log10()
    im = axes[1].imshow(pc.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=axes[1], label="log10 p_cmp (floored at -6)")
    axes[1].set_title("compressed attention p_cmp, head 0: query × compressed block")
    axes[1].set_xlabel(f"compressed block i (tokens i·{d} … i·{d}+{l - 1})")
    axes[1].set_ylabel("query token t")
    im = axes[2].imshow(p_slc[0, :, 0].cpu().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=axes[2], label="p_slc (summed over the group's heads)")
    tt, ss = torch.nonzero(idx[0, :, 0] >= 0, as_tuple=True)
    axes[2].scatter(idx[0, tt, 0, ss].cpu(), tt.cpu(), s=1.5, c="cyan", marker=".", linewidths=0)
    axes[2].set_title(f"block scores p_slc and the {args.n} selected blocks per token (cyan)")
    axes[2].set_xlabel(f"selection block j (tokens j·{ls} … j·{ls}+{ls - 1})")
    axes[2].set_ylabel("query token t")
    path = os.path.join(args.out, "selection_maps.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")

    # -- how far back the selections reach
    cur = (torch.arange(T, device=idx.device) // ls).view(1, T, 1, 1)
    dist = (cur - idx)[idx >= 0].cpu()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(dist.numpy(), bins=range(0, int(dist.max()) + 2), color="tab:blue")
    ax.set_xlabel("blocks between the query's own block and a selected block")
    ax.set_ylabel("selections")
    ax.set_title(f"how far back the selected blocks are\n{where}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(args.out, "selection_distance.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}; selections further than the 2 local blocks: {(dist > 1).float().mean():.0%}")

    # -- gates of a layer (untrained: they start near sigmoid(0) = 0.5)
    torch.manual_seed(0)
    layer = NativeSparseAttention(64, 4, 1, 16, compress_block=l, compress_stride=d, block_size=ls,
                                  block_counts=args.n, window_size=64).to(args.device)
    h = torch.randn(1, T, 64, generator=g).to(args.device)
    with torch.no_grad():
        _, _, gates = layer._project(h, torch.arange(T, device=args.device))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, gate in zip(["g_cmp", "g_slc", "g_swa"], gates):
        ax.hist(gate.flatten().cpu().numpy(), bins=40, alpha=0.6, label=name)
    ax.set_xlabel("gate value")
    ax.set_title(f"branch gates of an untrained NativeSparseAttention layer\nT={T}, hidden 64, 4 heads, on {args.device}",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "gate_histograms.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
