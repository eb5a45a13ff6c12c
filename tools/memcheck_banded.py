"""Run under compute-sanitizer: the banded kernels (sliding window, compressed attention) and the
block-score kernel, forward and backward, over sequence layouts that stress their bounds: tiles
straddling sequences, sequences of 1 token, sequences shorter than one compressed block (no key
at all) next to ones with one, packed batches of many short sequences around l, d and the query
tile, T off every tile grid, windows of 1 and past the sequence.

    compute-sanitizer --tool memcheck python tools/memcheck_banded.py
    compute-sanitizer --tool memcheck python tools/memcheck_banded.py --overlap   # the overlapped forward
"""
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import banded as K_band  # noqa: E402
from nsa_module import compress_mean, compressed_attention, nsa, sliding_window_attention  # noqa: E402
from reference.inputs import random_qkv  # noqa: E402
from tests.utils import hostile_lengths  # noqa: E402


def _offsets(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


LAYOUTS = [None, [0, 1, 2, 67, 68, 301], [0, 5, 40, 41, 200, 333], _offsets([33, 33, 36, 32, 200, 36, 32, 1]),
           _offsets(hostile_lengths(32, 16, 4, 21, 64) + [100])]

# G, H, K, V, W: one window per head shape keeps the compile count down
CASES = [(16, 2, 128, 128, 1), (3, 2, 64, 64, 7), (4, 1, 192, 128, 4096)]


def main():
    if "--overlap" in sys.argv:  # the banded forwards with pick_config(overlap=True), TMA loads included
        K_band.pick_config = functools.partial(K_band.pick_config, overlap=True)
    for G, H, K, V, W in CASES:
        for cu in LAYOUTS:
            T = 301 if cu is None else cu[-1]
            B = 2 if cu is None else 1
            cu_t = None if cu is None else torch.tensor(cu, device="cuda")
            q, k, v = random_qkv(B, T, G * H, H, K, V, dtype=torch.bfloat16, device="cuda", requires_grad=True)
            o = sliding_window_attention(q, k, v, W, cu_seqlens=cu_t)
            o.backward(torch.randn_like(o))
            o = compressed_attention(q, *compress_mean(k, v, 32, 16, cu_t), 32, 16, cu_seqlens=cu_t)
            o.backward(torch.randn_like(o))
            if G == 16:  # the selection end to end: scores, top-n, selected + sliding
                o = nsa(q, k, v, block_counts=4, block_size=32, window_size=W, cu_seqlens=cu_t,
                        compress_block=32, compress_stride=16)
                o.backward(torch.randn_like(o))
            torch.cuda.synchronize()
            print(f"G={G} K={K} V={V} cu={cu}: finite={bool(torch.isfinite(o).all())}", flush=True)


if __name__ == "__main__":
    main()
