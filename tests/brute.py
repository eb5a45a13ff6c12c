"""Brute-force NSA: Python loops over sequences, tokens and heads, float64 math, tiny sizes only.

Written from the rules alone, with no tensor tricks, so that the vectorized reference is checked
against something too slow to share its bugs.
"""
from __future__ import annotations

import math

import torch


def _attend(qv, keys, k, v, scale):
    """softmax over the listed key rows (duplicates count), applied to v; empty list gives 0.
    qv: list[K]; k: list of rows [K]; v: list of rows [V]."""
    if not keys:
        return [0.0] * len(v[0])
    s = [scale * sum(a * b for a, b in zip(qv, k[j])) for j in keys]
    m = max(s)
    w = [math.exp(x - m) for x in s]
    z = sum(w)
    return [sum(wi * v[j][c] for wi, j in zip(w, keys)) / z for c in range(len(v[0]))]


def _ranges(B, T, cu_seqlens):
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    c = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(c, c[1:])]


def brute_nsa(q, k, v, g_slc, g_swa, block_indices, block_counts, block_size, window_size, scale, cu_seqlens=None):
    B, T, HQ, K = q.shape
    H = k.shape[2]
    G = HQ // H
    out = torch.zeros(B, T, HQ, v.shape[-1], dtype=torch.float64)
    qd, kd, vd = q.double().tolist(), k.double(), v.double()
    for b, s0, e0 in _ranges(B, T, cu_seqlens):
        L = e0 - s0
        for t in range(L):
            for hq in range(HQ):
                h = hq // G
                kk = kd[b, s0:e0, h].tolist()
                vv = vd[b, s0:e0, h].tolist()
                qv = qd[b][s0 + t][hq]
                o = [0.0] * v.shape[-1]
                if block_indices is not None:
                    S = block_indices.shape[-1]
                    if block_counts is None:
                        n = S
                    elif isinstance(block_counts, int):
                        n = block_counts
                    else:
                        n = int(block_counts[b, s0 + t, h])
                    keys = []
                    for s in range(n):
                        i = int(block_indices[b, s0 + t, h, s])
                        if i < 0:
                            continue
                        for j in range(block_size):
                            p = i * block_size + j
                            if p <= t and p < L:
                                keys.append(p)
                    gate = 1.0 if g_slc is None else float(g_slc[b, s0 + t, hq])
                    o = [x + gate * y for x, y in zip(o, _attend(qv, keys, kk, vv, scale))]
                if window_size > 0:
                    keys = list(range(max(0, t - window_size + 1), t + 1))
                    gate = 1.0 if g_swa is None else float(g_swa[b, s0 + t, hq])
                    o = [x + gate * y for x, y in zip(o, _attend(qv, keys, kk, vv, scale))]
                out[b, s0 + t, hq] = torch.tensor(o, dtype=torch.float64)
    return out


def brute_compress_mean(x, l, d):
    """x `[T, H, D]` of one sequence -> `[N, H, D]` block means."""
    T = x.shape[0]
    n = 0 if T < l else (T - l) // d + 1
    return torch.stack([x[i * d: i * d + l].double().mean(0) for i in range(n)]) if n else x.new_zeros(0, *x.shape[1:]).double()


def brute_selection(q, k, l, d, l_sel, n, scale):
    """Block ids `[T, H, n]` for one sequence (q `[T, HQ, K]`, k `[T, H, K]`), mean-pooled compression."""
    T, HQ, _ = q.shape
    H = k.shape[1]
    G = HQ // H
    kc = brute_compress_mean(k, l, d)
    Ns = math.ceil(T / l_sel)
    out = torch.full((T, H, n), -1, dtype=torch.long)
    for t in range(T):
        for h in range(H):
            score = [0.0] * Ns
            for g in range(G):
                hq = h * G + g
                vis = [i for i in range(kc.shape[0]) if i * d + l - 1 <= t]
                if vis:
                    s = [scale * float(q[t, hq].double() @ kc[i, h]) for i in vis]
                    m = max(s)
                    z = sum(math.exp(x - m) for x in s)
                    for i, x in zip(vis, s):
                        p = math.exp(x - m) / z
                        for j in range(Ns):
                            # overlap of tokens [i*d, i*d+l) with [j*l', (j+1)*l'), counted token by token
                            ov = sum(1 for tok in range(i * d, i * d + l) if j * l_sel <= tok < (j + 1) * l_sel)
                            score[j] += p * ov / d
            cur = t // l_sel
            forced = {0, cur, cur - 1} - {-1}
            rest = sorted((j for j in range(cur + 1) if j not in forced), key=lambda j: (-score[j], j))
            chosen = sorted((sorted(forced) + rest)[:n])  # n >= 3 keeps every forced block
            out[t, h, : len(chosen)] = torch.tensor(chosen)
    return out
