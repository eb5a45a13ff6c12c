"""Sliding-window attention (NSA's third branch): forward and backward kernel factories.

Token t attends to the tokens max(bos, t-W+1) … t of its own sequence (bos: the sequence's first
row). Shapes as in `selected.py`: Q `[B, T, HQ, K]`, K `[B, T, H, K]`, V `[B, T, H, V]`,
Gate `[B, T, HQ]`, O/OG `[B, T, HQ, V]`, LSE `[B, T, HQ]` (fp32, base 2), Offsets `[N+1]`,
TokSeq `[T]`. B, T and N are dynamic; W is a compile-time constant (the host caps it at 2^30, which
means "the whole sequence" and keeps t-W+1 inside int32).

Rows of a program are (token, head) pairs: BM consecutive tokens × the G query heads of one kv
head, padded to a multiple of 16 (M rows). Every K/V tile a program loads serves all of them. The
key tiles visited are exactly those meeting the band [first token - W + 1, last token]; a row's mask
keeps key k iff bos(row) <= k <= t(row) and k > t(row) - W, so a tile may straddle sequences.
Backward: dQ per query tile like the forward (no atomics: each program owns its rows); dK/dV per key
tile of BN keys walking the query tiles whose windows reach it (each program owns its key rows).
"""

import tilelang
import tilelang.language as T

from .common import LOG2E, PASS_CONFIGS, online_softmax_step, pad16


def pick_config(G: int, K: int, V: int) -> dict:
    """Tile choices of the sliding forward and dQ kernels.

    M rows = BM tokens × G heads, padded to 16: 64 rows with 4 warps of 16 rows (FullRow, so P and
        dS stay in registers between MMAs); G = 128 needs 128 rows and 8 warps.
    BN: 64 keys per step.
    num_stages: 1. The tile count depends on where the sequence starts (data-dependent), and
        TileLang 0.1.15 cannot compile deeper pipelines over a dynamic trip count.
    """
    BM = max(1, 64 // G)
    M = pad16(BM * G)
    return dict(BM=BM, M=M, BN=64, threads=32 * (M // 16), num_stages=1)


def pick_dkv_config(G: int, K: int, V: int) -> dict:
    """Tile choices of the dK/dV kernel: BN = 64 key rows, M query rows per step as above. Its
    dK `[BN, K]` + dV `[BN, V]` fp32 accumulators fit 4 warps owning 16 rows each up to K = V = 192;
    at 256 they split columns over 8 warps (P and dS then go through shared memory)."""
    cfg = pick_config(G, K, V)
    cfg["threads"] = 256 if max(K, V) >= 256 else 128
    return cfg


@T.macro
def load_rows(X, X_s, i_b, t0, i_h, G: int, BM: int, M: int):
    """X_s `[M, D]` <- row r = (token t0 + r // G, head i_h·G + r % G) of X `[B, T, HQ, D]`; rows past
    BM·G are zero, and so are rows past the end of the batch row (TileLang predicates every global
    read on the tensor's bounds; leaving that test to it keeps the copy a cp.async)."""
    for r, d in T.Parallel(M, X_s.shape[1]):
        X_s[r, d] = T.if_then_else(r < BM * G, X[i_b, t0 + r // G, i_h * G + r % G, d], 0)


@T.macro
def load_row_meta(Offsets, TokSeq, t0, Tn, tok_s, bos_s, G: int, BM: int, M: int):
    """tok_s[r] = the row's token (-1 for padding rows), bos_s[r] = its sequence's first row."""
    for r in T.Parallel(M):
        live = r < BM * G and t0 + r // G < Tn
        tok_s[r] = T.if_then_else(live, t0 + r // G, -1)
        bos_s[r] = T.if_then_else(live, Offsets[TokSeq[T.min(t0 + r // G, Tn - 1)]], 0)


@tilelang.jit(pass_configs=PASS_CONFIGS)
def sliding_fwd(H: int, G: int, K: int, V: int, W: int, dtype: str, scale: float,
                BM: int = 4, M: int = 64, BN: int = 64, threads: int = 128, num_stages: int = 1):
    """Kernel(Q, K, V, Gate, Offsets, TokSeq, O, OG, LSE): the branch output O, OG = Gate·O, LSE."""
    B, Tn, N1 = T.dynamic("B, T, N1")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, K], dtype),
        Kt: T.Tensor([B, Tn, H, K], dtype),
        Vt: T.Tensor([B, Tn, H, V], dtype),
        Gate: T.Tensor([B, Tn, HQ], dtype),
        Offsets: T.Tensor([N1], "int32"),
        TokSeq: T.Tensor([Tn], "int32"),
        O: T.Tensor([B, Tn, HQ, V], dtype),
        OG: T.Tensor([B, Tn, HQ, V], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(Tn, BM), B * H, threads=threads) as (i_m, i_bh):
            Q_s = T.alloc_shared([M, K], dtype)
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            O_s = T.alloc_shared([M, V], dtype)
            lse_s = T.alloc_shared([M], acc)
            tok_s = T.alloc_shared([M], "int32")
            bos_s = T.alloc_shared([M], "int32")
            acc_s = T.alloc_fragment([M, BN], acc)
            acc_s_cast = T.alloc_fragment([M, BN], dtype)
            acc_o = T.alloc_fragment([M, V], acc)
            m = T.alloc_fragment([M], acc)
            m_prev = T.alloc_fragment([M], acc)
            r = T.alloc_fragment([M], acc)
            l = T.alloc_fragment([M], acc)
            l_blk = T.alloc_fragment([M], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            t0 = i_m * BM
            t_last = T.min(t0 + BM - 1, Tn - 1)
            lo = T.max(Offsets[TokSeq[t0]], t0 - W + 1)  # the first key any row of the tile needs

            load_rows(Q, Q_s, i_b, t0, i_h, G, BM, M)
            load_row_meta(Offsets, TokSeq, t0, Tn, tok_s, bos_s, G, BM, M)
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, -T.infinity(acc))

            for it in T.Pipelined(T.ceildiv(t_last - lo + 1, BN), num_stages=num_stages):
                ks = lo + it * BN
                T.copy(Kt[i_b, ks:ks + BN, i_h, :], K_s)
                for i, j in T.Parallel(M, BN):
                    acc_s[i, j] = T.if_then_else(
                        ks + j <= tok_s[i] and ks + j > tok_s[i] - W and ks + j >= bos_s[i], 0, -T.infinity(acc))
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                online_softmax_step(acc_s, acc_o, m, m_prev, r, l, l_blk, sc, M, BN, V)
                T.copy(acc_s, acc_s_cast)  # FullRow: each warp owns its rows, P stays in registers
                T.copy(Vt[i_b, ks:ks + BN, i_h, :], V_s)
                T.gemm(acc_s_cast, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            for i, j in T.Parallel(M, V):
                acc_o[i, j] = T.if_then_else(l[i] > 0, acc_o[i, j] / l[i], 0)
            T.copy(acc_o, O_s)
            for i in T.Parallel(M):
                l_blk[i] = T.if_then_else(l[i] > 0, T.log2(l[i]) + m[i] * sc, T.infinity(acc))
            T.copy(l_blk, lse_s)
            for rr, d in T.Parallel(M, V):
                if tok_s[rr] >= 0:
                    O[i_b, tok_s[rr], i_h * G + rr % G, d] = O_s[rr, d]
                    OG[i_b, tok_s[rr], i_h * G + rr % G, d] = O_s[rr, d] * Gate[i_b, tok_s[rr], i_h * G + rr % G]
            for rr in T.Parallel(M):
                if tok_s[rr] >= 0:
                    LSE[i_b, tok_s[rr], i_h * G + rr % G] = lse_s[rr]

    return main


@tilelang.jit(pass_configs=PASS_CONFIGS)
def sliding_bwd_dq(H: int, G: int, K: int, V: int, W: int, dtype: str, scale: float,
                   BM: int = 4, M: int = 64, BN: int = 64, threads: int = 128, num_stages: int = 1):
    """Kernel(Q, K, V, O, dOG, Gate, LSE, Offsets, TokSeq, dQ, Delta, dGate).

    As the selected dQ kernel: dGate = rowsum(dOG ∘ O), Delta = Gate·dGate, then per key tile
    dS = P ∘ (Gate·(dOG·Vᵀ) - Delta) and dQ = scale · dS·K.
    """
    B, Tn, N1 = T.dynamic("B, T, N1")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, K], dtype),
        Kt: T.Tensor([B, Tn, H, K], dtype),
        Vt: T.Tensor([B, Tn, H, V], dtype),
        O: T.Tensor([B, Tn, HQ, V], dtype),
        dO: T.Tensor([B, Tn, HQ, V], dtype),
        Gate: T.Tensor([B, Tn, HQ], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
        Offsets: T.Tensor([N1], "int32"),
        TokSeq: T.Tensor([Tn], "int32"),
        dQ: T.Tensor([B, Tn, HQ, K], dtype),
        Delta: T.Tensor([B, Tn, HQ], acc),
        dGate: T.Tensor([B, Tn, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(Tn, BM), B * H, threads=threads) as (i_m, i_bh):
            Q_s = T.alloc_shared([M, K], dtype)
            dO_s = T.alloc_shared([M, V], dtype)
            O_s = T.alloc_shared([M, V], dtype)
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            dQ_s = T.alloc_shared([M, K], dtype)
            lse_s = T.alloc_shared([M], acc)
            delta_s = T.alloc_shared([M], acc)
            gate_s = T.alloc_shared([M], acc)
            dgate_s = T.alloc_shared([M], acc)
            tok_s = T.alloc_shared([M], "int32")
            bos_s = T.alloc_shared([M], "int32")
            acc_s = T.alloc_fragment([M, BN], acc)
            acc_dp = T.alloc_fragment([M, BN], acc)
            ds_cast = T.alloc_fragment([M, BN], dtype)
            acc_dq = T.alloc_fragment([M, K], acc)
            do_o = T.alloc_fragment([M, V], acc)
            dgate = T.alloc_fragment([M], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            t0 = i_m * BM
            t_last = T.min(t0 + BM - 1, Tn - 1)
            lo = T.max(Offsets[TokSeq[t0]], t0 - W + 1)

            load_rows(Q, Q_s, i_b, t0, i_h, G, BM, M)
            load_rows(dO, dO_s, i_b, t0, i_h, G, BM, M)
            load_rows(O, O_s, i_b, t0, i_h, G, BM, M)
            load_row_meta(Offsets, TokSeq, t0, Tn, tok_s, bos_s, G, BM, M)
            for rr in T.Parallel(M):
                # padding rows: LSE = +inf makes their P exactly 0
                lse_s[rr] = T.if_then_else(tok_s[rr] >= 0, LSE[i_b, T.max(tok_s[rr], 0), i_h * G + rr % G], T.infinity(acc))
                gate_s[rr] = T.if_then_else(tok_s[rr] >= 0, T.cast(Gate[i_b, T.max(tok_s[rr], 0), i_h * G + rr % G], acc), 0)
            for i, d in T.Parallel(M, V):
                do_o[i, d] = T.cast(dO_s[i, d], acc) * T.cast(O_s[i, d], acc)
            T.reduce_sum(do_o, dgate, dim=1)
            T.copy(dgate, dgate_s)
            for rr in T.Parallel(M):
                delta_s[rr] = dgate_s[rr] * gate_s[rr]
            for rr in T.Parallel(M):
                if tok_s[rr] >= 0:
                    dGate[i_b, tok_s[rr], i_h * G + rr % G] = dgate_s[rr]
                    Delta[i_b, tok_s[rr], i_h * G + rr % G] = delta_s[rr]
            T.clear(acc_dq)

            for it in T.Pipelined(T.ceildiv(t_last - lo + 1, BN), num_stages=num_stages):
                ks = lo + it * BN
                T.copy(Kt[i_b, ks:ks + BN, i_h, :], K_s)
                T.copy(Vt[i_b, ks:ks + BN, i_h, :], V_s)
                for i, j in T.Parallel(M, BN):
                    acc_s[i, j] = T.if_then_else(
                        ks + j <= tok_s[i] and ks + j > tok_s[i] - W and ks + j >= bos_s[i], 0, -T.infinity(acc))
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.clear(acc_dp)
                T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(M, BN):
                    acc_s[i, j] = T.exp2(acc_s[i, j] * sc - lse_s[i]) * (gate_s[i] * acc_dp[i, j] - delta_s[i])
                T.copy(acc_s, ds_cast)
                T.gemm(ds_cast, K_s, acc_dq, policy=T.GemmWarpPolicy.FullRow)

            for i, d in T.Parallel(M, K):
                acc_dq[i, d] = acc_dq[i, d] * scale
            T.copy(acc_dq, dQ_s)
            for rr, d in T.Parallel(M, K):
                if tok_s[rr] >= 0:
                    dQ[i_b, tok_s[rr], i_h * G + rr % G, d] = dQ_s[rr, d]

    return main


@tilelang.jit(pass_configs=PASS_CONFIGS)
def sliding_bwd_dkv(H: int, G: int, K: int, V: int, W: int, dtype: str, scale: float,
                    BM: int = 4, M: int = 64, BN: int = 64, threads: int = 128, num_stages: int = 1):
    """Kernel(Q, K, V, dOG, Gate, LSE, Delta, Offsets, TokSeq, dK, dV).

    One program per (key tile of BN keys, batch·kv head): the queries whose windows reach the
    tile's keys are tokens ks … ks+BN-1+W-1 (of any sequence; the mask keeps a key's own), walked
    BM tokens at a time. dV += (Pᵀ∘Gate)·dOG and dK += dSᵀ·Q, dS = P ∘ (Gate·dP - Delta).
    """
    B, Tn, N1 = T.dynamic("B, T, N1")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    rows_only = threads // 32 <= BN // 16  # see selected.selected_bwd_dkv
    policy = T.GemmWarpPolicy.FullRow if rows_only else T.GemmWarpPolicy.Square

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, K], dtype),
        Kt: T.Tensor([B, Tn, H, K], dtype),
        Vt: T.Tensor([B, Tn, H, V], dtype),
        dO: T.Tensor([B, Tn, HQ, V], dtype),
        Gate: T.Tensor([B, Tn, HQ], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
        Delta: T.Tensor([B, Tn, HQ], acc),
        Offsets: T.Tensor([N1], "int32"),
        TokSeq: T.Tensor([Tn], "int32"),
        dK: T.Tensor([B, Tn, H, K], dtype),
        dV: T.Tensor([B, Tn, H, V], dtype),
    ):
        with T.Kernel(T.ceildiv(Tn, BN), B * H, threads=threads) as (i_n, i_bh):
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            Q_s = T.alloc_shared([M, K], dtype)
            dO_s = T.alloc_shared([M, V], dtype)
            lse_s = T.alloc_shared([M], acc)
            delta_s = T.alloc_shared([M], acc)
            gate_s = T.alloc_shared([M], acc)
            tok_s = T.alloc_shared([M], "int32")
            bos_s = T.alloc_shared([M], "int32")
            dK_s = T.alloc_shared([BN, K], dtype)
            dV_s = T.alloc_shared([BN, V], dtype)
            acc_st = T.alloc_fragment([BN, M], acc)
            acc_dpt = T.alloc_fragment([BN, M], acc)
            p_cast = T.alloc_fragment([BN, M], dtype) if rows_only else T.alloc_shared([BN, M], dtype)
            ds_cast = T.alloc_fragment([BN, M], dtype) if rows_only else T.alloc_shared([BN, M], dtype)
            acc_dk = T.alloc_fragment([BN, K], acc)
            acc_dv = T.alloc_fragment([BN, V], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            ks = i_n * BN
            q_hi = T.min(ks + BN - 1 + W - 1, Tn - 1)  # the last query whose window reaches the tile

            T.copy(Kt[i_b, ks:ks + BN, i_h, :], K_s)
            T.copy(Vt[i_b, ks:ks + BN, i_h, :], V_s)
            T.clear(acc_dk)
            T.clear(acc_dv)

            for it in T.Pipelined(T.ceildiv(q_hi - ks + 1, BM), num_stages=num_stages):
                t0 = ks + it * BM
                load_rows(Q, Q_s, i_b, t0, i_h, G, BM, M)
                load_rows(dO, dO_s, i_b, t0, i_h, G, BM, M)
                for rr in T.Parallel(M):
                    # computed from t0, never read back from tok_s in this stage (async copies)
                    live = rr < BM * G and t0 + rr // G < Tn
                    tok = T.min(t0 + rr // G, Tn - 1)
                    tok_s[rr] = T.if_then_else(live, t0 + rr // G, -1)
                    bos_s[rr] = Offsets[TokSeq[tok]]
                    lse_s[rr] = T.if_then_else(live, LSE[i_b, tok, i_h * G + rr % G], T.infinity(acc))
                    delta_s[rr] = T.if_then_else(live, Delta[i_b, tok, i_h * G + rr % G], 0)
                    gate_s[rr] = T.if_then_else(live, T.cast(Gate[i_b, tok, i_h * G + rr % G], acc), 0)
                T.clear(acc_st)
                T.gemm(K_s, Q_s, acc_st, transpose_B=True, policy=policy)
                T.clear(acc_dpt)
                T.gemm(V_s, dO_s, acc_dpt, transpose_B=True, policy=policy)
                for i, j in T.Parallel(BN, M):
                    key = ks + i
                    ok = key <= tok_s[j] and key > tok_s[j] - W and key >= bos_s[j] and key < Tn
                    acc_st[i, j] = T.if_then_else(ok, T.exp2(acc_st[i, j] * sc - lse_s[j]), 0)
                    acc_dpt[i, j] = acc_st[i, j] * (gate_s[j] * acc_dpt[i, j] - delta_s[j])
                    acc_st[i, j] = acc_st[i, j] * gate_s[j]
                T.copy(acc_st, p_cast)
                T.copy(acc_dpt, ds_cast)
                T.gemm(p_cast, dO_s, acc_dv, policy=policy)
                T.gemm(ds_cast, Q_s, acc_dk, policy=policy)

            for i, d in T.Parallel(BN, K):
                acc_dk[i, d] = acc_dk[i, d] * scale
            T.copy(acc_dk, dK_s)
            T.copy(acc_dv, dV_s)
            for i, d in T.Parallel(BN, K):
                if ks + i < Tn:
                    dK[i_b, ks + i, i_h, d] = dK_s[i, d]
            for i, d in T.Parallel(BN, V):
                if ks + i < Tn:
                    dV[i_b, ks + i, i_h, d] = dV_s[i, d]

    return main


def sliding_kernels(H: int, G: int, K: int, V: int, W: int, dtype: str, scale: float):
    """The three kernels one shape family needs (forward, dQ, dK/dV), compiled or taken from the cache."""
    cfg = pick_config(G, K, V)
    return (sliding_fwd(H, G, K, V, W, dtype, scale, **cfg),
            sliding_bwd_dq(H, G, K, V, W, dtype, scale, **cfg),
            sliding_bwd_dkv(H, G, K, V, W, dtype, scale, **pick_dkv_config(G, K, V)))
