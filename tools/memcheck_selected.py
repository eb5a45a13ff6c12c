"""Run under compute-sanitizer: forward and backward over ids full of -1, future blocks, ids past
the sequence's end (and far past the tensor's end) and duplicates, fixed-length, varlen and packed
batches of many short sequences (1 token, around the block size) whose ends fall inside blocks.

    compute-sanitizer --tool memcheck python tools/memcheck_selected.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_module import selected_attention  # noqa: E402
from reference.inputs import random_block_counts, random_block_indices, random_cu_seqlens, random_qkv  # noqa: E402
from tests.utils import hostile_cu  # noqa: E402

for (G, H, K, V, BS, S, varlen, T) in [(16, 2, 128, 128, 64, 16, False, 333), (3, 2, 64, 64, 16, 8, True, 301),
                                       (4, 1, 192, 128, 128, 4, True, 517), (16, 2, 128, 128, 64, 16, "packed", 333),
                                       (3, 2, 64, 64, 16, 8, "packed", 301)]:
    B = 1 if varlen else 2
    cu = random_cu_seqlens(T, 3, min_len=5, device="cuda") if varlen is True else None
    if varlen == "packed":
        cu = hostile_cu(T, BS, 16)
    q, k, v = random_qkv(B, T, G * H, H, K, V, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    idx = random_block_indices(B, T, H, S, BS, cu_seqlens=cu, device="cuda", adversarial=0.7)
    idx[..., 0] = 2 ** 31 - 1  # the largest id there is
    cnt = random_block_counts(B, T, H, S, device="cuda")
    o = selected_attention(q, k, v, idx, cnt, BS, cu_seqlens=cu)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    print(f"G={G} K={K} V={V} BS={BS} S={S} varlen={varlen} T={T}: finite={bool(torch.isfinite(o).all())}")
