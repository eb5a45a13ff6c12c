"""Decode attention: one new query token per sequence over a cache, split over programs.

Every NSA branch at decode time is "the G query heads of a kv head attend over a list of key
tiles": the compressed stream's tiles, the selected blocks, the sliding ring's tiles (softmax does
not care about key order, so the ring is read slot by slot). The host gives the list as TileStart
`[N, H, NT]` (first key row of each BN-key tile, -1 for none) and Limit `[N]` (keys at rows >=
Limit[n] do not exist yet). Program (s, n·H + h) takes tiles s, s + NS, s + 2·NS, … and writes its
partial softmax: O_part `[N, HQ, NS, V]` (normalized) and LSE_part `[N, HQ, NS]` (base 2, -inf if it
saw nothing); the host merges the NS partials (log-sum-exp weights). Splitting the tiles over
programs keeps the GPU busy at batch 1, where N·H programs would leave most SMs idle.

Shapes: Q `[N, HQ, K]`, Kc `[N, CAP, H, K]`, Vc `[N, CAP, H, V]` (the cache, rows past Limit unused).
"""

import tilelang
import tilelang.language as T

from .common import LOG2E, PASS_CONFIGS, online_softmax_step, pad16


def pick_config(G: int, K: int, V: int, BN: int) -> dict:
    """M = G rows padded to 16, one warp per 16 rows (FullRow keeps P in registers; with fewer rows
    than warps TileLang would split the columns). Few threads per program, many programs: the
    host splits the tiles so that the GPU holds several programs per SM."""
    M = pad16(G)
    return dict(M=M, threads=32 * (M // 16))


@tilelang.jit(pass_configs=PASS_CONFIGS)
def decode_attend(H: int, G: int, K: int, V: int, BN: int, dtype: str, scale: float,
                  M: int = 16, threads: int = 128):
    """Kernel(Q, Kc, Vc, TileStart, Limit, Split, O_part, LSE_part); NS = len(Split)."""
    N, CAP, NT, NS = T.dynamic("N, CAP, NT, NS")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([N, HQ, K], dtype),
        Kc: T.Tensor([N, CAP, H, K], dtype),
        Vc: T.Tensor([N, CAP, H, V], dtype),
        TileStart: T.Tensor([N, H, NT], "int32"),
        Limit: T.Tensor([N], "int32"),
        Split: T.Tensor([NS], "int32"),
        O_part: T.Tensor([N, HQ, NS, V], acc),
        LSE_part: T.Tensor([N, HQ, NS], acc),
    ):
        with T.Kernel(NS, N * H, threads=threads) as (i_s, i_nh):
            Q_s = T.alloc_shared([M, K], dtype)
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            acc_s = T.alloc_fragment([M, BN], acc)
            acc_s_cast = T.alloc_fragment([M, BN], dtype)
            acc_o = T.alloc_fragment([M, V], acc)
            m = T.alloc_fragment([M], acc)
            m_prev = T.alloc_fragment([M], acc)
            r = T.alloc_fragment([M], acc)
            l = T.alloc_fragment([M], acc)
            l_blk = T.alloc_fragment([M], acc)

            i_n = i_nh // H
            i_h = i_nh % H
            limit = Limit[i_n]
            for g, d in T.Parallel(M, K):
                Q_s[g, d] = T.if_then_else(g < G, Q[i_n, i_h * G + T.min(g, G - 1), d], 0)
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, -T.infinity(acc))

            for it in T.serial(T.ceildiv(T.max(NT - i_s, 0), NS)):
                start = TileStart[i_n, i_h, i_s + it * NS]
                # a missing tile (-1) reads rows [0, BN) and masks them all: no branch around the copy
                k0 = T.max(start, 0)
                for j, d in T.Parallel(BN, K):
                    K_s[j, d] = T.if_then_else(k0 + j < CAP, Kc[i_n, T.min(k0 + j, CAP - 1), i_h, d], 0)
                for j, d in T.Parallel(BN, V):
                    V_s[j, d] = T.if_then_else(k0 + j < CAP, Vc[i_n, T.min(k0 + j, CAP - 1), i_h, d], 0)
                for g, j in T.Parallel(M, BN):
                    acc_s[g, j] = T.if_then_else(start >= 0 and start + j < limit, 0, -T.infinity(acc))
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                online_softmax_step(acc_s, acc_o, m, m_prev, r, l, l_blk, sc, M, BN, V)
                T.copy(acc_s, acc_s_cast)
                T.gemm(acc_s_cast, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            for g, d in T.Parallel(M, V):
                if g < G:
                    O_part[i_n, i_h * G + g, i_s, d] = T.if_then_else(l[g] > 0, acc_o[g, d] / l[g], 0)
            for g in T.Parallel(M):
                if g < G:
                    LSE_part[i_n, i_h * G + g, i_s] = T.if_then_else(l[g] > 0, T.log2(l[g]) + m[g] * sc,
                                                                     -T.infinity(acc))

    return main
