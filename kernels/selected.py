"""Selected-block attention (NSA's second branch): forward and backward kernel factories.

Shapes (varlen packs sequences along T with B = 1; a fixed-length batch is B rows of one sequence):
    Q `[B, T, HQ, K]`, K `[B, T, H, K]`, V `[B, T, H, V]`, O `[B, T, HQ, V]`, LSE `[B, T, HQ]` (fp32, base 2)
    BlockIdx `[B, T, H, S]` int32 block ids per sequence, BlockCnt `[B, T, H]` int32 slots used
    Offsets `[N+1]` int32 sequence starts, TokSeq `[T]` int32 the sequence of each token
B, T and N are dynamic: new lengths never recompile. Compile-time constants: H, G, K, V, S, BS, the
dtype, the scale and the tile config.

Forward: one program per (token, batch·kv head). The G query heads of the group form one Q tile
(padded to 16 rows for the MMA) and stream the selected blocks, BN keys at a time, through an exp2
online softmax. A slot is skipped when it is past block_counts, negative, or its block starts after
the token (which also rejects every id past the sequence's end without forming id·BS, so huge ids
cannot overflow into a valid address); the block holding the token is masked key by key.

Backward: dQ per (token, batch·kv head) like the forward (it also gives Delta and the gate's
gradient); dK/dV per (key tile, batch·kv head) over the inverted index nsa_module builds: the
tokens that selected the block, BQ of them per step. No atomics; deterministic.
"""

import tilelang
import tilelang.language as T

from .common import LOG2E, PASS_CONFIGS, in_dtype, normalized, online_softmax_step, pad16, row_lse, softmax_init


@T.macro
def load_group(X, X_s, i_b, i_t, i_h, G: int, GP: int):
    """X_s `[GP, D]` <- the G rows of head group i_h of token i_t (X `[B, T, HQ, D]`), zero-padded to GP
    rows for the MMA."""
    if G == GP:
        T.copy(X[i_b, i_t, i_h * G:(i_h + 1) * G, :], X_s)
    else:
        for g, d in T.Parallel(GP, X_s.shape[1]):
            X_s[g, d] = T.if_then_else(g < G, X[i_b, i_t, i_h * G + g, d], 0)


@T.macro
def collect_tiles(BlockIdx, i_b, i_t, i_h, n_s, t, tiles, n_tiles, S: int, BS: int, BN: int):
    """Write into shared `tiles` the start (in the sequence) of every BN-key tile the token reads,
    in slot order, and count them in the local n_tiles[0] (zeroed by the caller). A slot is read
    when it is below block_counts, its id is >= 0 and its block starts at or before t (which also
    rejects ids past the sequence's end before id·BS is formed, so no id can overflow).
    Every thread scans the S ids (the loads broadcast) so each holds the count; thread 0 writes.
    Compacting first lets the main loop run branch-free over exactly these tiles, so TileLang
    pipelines its loads asynchronously."""
    for s in T.serial(S):
        blk = BlockIdx[i_b, i_t, i_h, s]
        if s < n_s and blk >= 0 and blk <= t // BS:
            for sub in T.serial(BS // BN):
                if blk * BS + sub * BN <= t:
                    if T.get_thread_binding() == 0:
                        tiles[n_tiles[0]] = blk * BS + sub * BN
                    n_tiles[0] = n_tiles[0] + 1


def pick_config(G: int, K: int, V: int, BS: int) -> dict:
    """Tile choices of the selected kernels.

    BN: keys per step. A whole block when it is small; 64 keys otherwise (an MMA-friendly width
        whose K and V tiles at K = V = 256 still fit shared memory with the next tile in flight).
    threads: the warps split the columns of every MMA (the Q tile has only GP = 16 rows for G <= 16,
        so they cannot split rows): BN for Q·Kᵀ and dO·Vᵀ, V for P·V, K for dS·K. Each warp must own
        a multiple of 8 columns of each: 4 warps, 8 once GP >= 64 rows or the head dims reach 256,
        halved until BN, K and V all split so (2 warps for BN = 16 and for head dims 16, 48, 80, ...).
    num_stages: 1: the next tile's K and V loads (cp.async) fly while this tile computes. The loop
        runs over a data-dependent tile count, and TileLang 0.1.15 emits a non-constant
        cp.async wait for deeper pipelines over a dynamic extent, which does not compile.
    """
    GP = pad16(G)
    BN = min(BS, 64)
    warps = 8 if (GP >= 64 or max(K, V) >= 256) else 4
    while any(n % (8 * warps) for n in (BN, K, V)):
        warps //= 2
    threads = 32 * warps
    return dict(BN=BN, threads=threads, num_stages=1)


@tilelang.jit(pass_configs=PASS_CONFIGS)
def selected_fwd(H: int, G: int, K: int, V: int, S: int, BS: int, dtype: str, scale: float,
                 BN: int = 64, threads: int = 128, num_stages: int = 1, o_dtype: str = ""):
    """Kernel(Q, K, V, Gate, BlockIdx, BlockCnt, Offsets, TokSeq, O, OG, LSE): writes the branch
    output O (kept for the backward) in o_dtype ("" = dtype; "float32": kernels/banded.py O_FP32),
    the gated output OG = Gate·O (from O in dtype) and LSE."""
    B, Tn, N1 = T.dynamic("B, T, N1")
    od = o_dtype or dtype
    HQ = H * G
    GP = pad16(G)
    NSUB = BS // BN
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, K], dtype),
        Kt: T.Tensor([B, Tn, H, K], dtype),
        Vt: T.Tensor([B, Tn, H, V], dtype),
        Gate: T.Tensor([B, Tn, HQ], dtype),
        BlockIdx: T.Tensor([B, Tn, H, S], "int32"),
        BlockCnt: T.Tensor([B, Tn, H], "int32"),
        Offsets: T.Tensor([N1], "int32"),
        TokSeq: T.Tensor([Tn], "int32"),
        O: T.Tensor([B, Tn, HQ, V], od),
        OG: T.Tensor([B, Tn, HQ, V], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
    ):
        with T.Kernel(Tn, B * H, threads=threads) as (i_t, i_bh):
            Q_s = T.alloc_shared([GP, K], dtype)
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            P_s = T.alloc_shared([GP, BN], dtype)
            O_s = T.alloc_shared([GP, V], od)
            lse_s = T.alloc_shared([GP], acc)
            tiles = T.alloc_shared([S * NSUB], "int32")
            n_tiles = T.alloc_local([1], "int32")
            acc_s = T.alloc_fragment([GP, BN], acc)
            acc_o = T.alloc_fragment([GP, V], acc)
            m = T.alloc_fragment([GP], acc)
            m_prev = T.alloc_fragment([GP], acc)
            r = T.alloc_fragment([GP], acc)
            l = T.alloc_fragment([GP], acc)
            l_blk = T.alloc_fragment([GP], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            bos = Offsets[TokSeq[i_t]]
            t = i_t - bos  # position in its own sequence
            n_s = T.min(BlockCnt[i_b, i_t, i_h], S)

            load_group(Q, Q_s, i_b, i_t, i_h, G, GP)
            softmax_init(acc_o, m, l)
            n_tiles[0] = 0
            collect_tiles(BlockIdx, i_b, i_t, i_h, n_s, t, tiles, n_tiles, S, BS, BN)

            for it in T.Pipelined(n_tiles[0], num_stages=num_stages):
                start = tiles[it]
                T.copy(Kt[i_b, bos + start:bos + start + BN, i_h, :], K_s)
                for i, j in T.Parallel(GP, BN):  # only the tile holding t has keys after it
                    acc_s[i, j] = T.if_then_else(start + j <= t, 0, -T.infinity(acc))
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                online_softmax_step(acc_s, acc_o, m, m_prev, r, l, l_blk, sc, GP, BN, V)
                # the warps split the key columns of S but the value columns of O: P goes
                # through shared memory so every warp sees the whole probability tile
                T.copy(acc_s, P_s)
                T.copy(Vt[i_b, bos + start:bos + start + BN, i_h, :], V_s)
                T.gemm(P_s, V_s, acc_o, policy=T.GemmWarpPolicy.FullCol)

            for i, j in T.Parallel(GP, V):
                acc_o[i, j] = normalized(acc_o[i, j], l[i])
            T.copy(acc_o, O_s)
            for g, d in T.Parallel(G, V):
                O[i_b, i_t, i_h * G + g, d] = O_s[g, d]
                OG[i_b, i_t, i_h * G + g, d] = in_dtype(O_s[g, d], dtype) * Gate[i_b, i_t, i_h * G + g]
            # empty rows get LSE = +inf: the backward's exp2(s - LSE) is then 0, never NaN
            for i in T.Parallel(GP):
                l_blk[i] = row_lse(l[i], m[i], sc, T.infinity(acc))
            T.copy(l_blk, lse_s)
            for g in T.Parallel(G):
                LSE[i_b, i_t, i_h * G + g] = lse_s[g]

    return main


@tilelang.jit(pass_configs=PASS_CONFIGS)
def selected_bwd_dq(H: int, G: int, K: int, V: int, S: int, BS: int, dtype: str, scale: float,
                    BN: int = 64, threads: int = 128, num_stages: int = 1, o_dtype: str = ""):
    """Kernel(Q, K, V, O, dOG, Gate, LSE, BlockIdx, BlockCnt, Offsets, TokSeq, dQ, Delta, dGate).

    dOG is the gradient of the gated output OG = Gate·O. Per row: dGate = rowsum(dOG ∘ O), and the
    branch's own gradient dO = Gate·dOG gives Delta = rowsum(dO ∘ O) = Gate·dGate (saved for the
    dK/dV kernel). Then, query-centric like the forward, per selected tile:
    P = exp2(s·sc - LSE), dS = P ∘ (Gate·(dOG·Vᵀ) - Delta), dQ = scale · dS·K.
    Slots are skipped by the forward's rule. O in o_dtype (selected_fwd's).
    """
    B, Tn, N1 = T.dynamic("B, T, N1")
    od = o_dtype or dtype
    HQ = H * G
    GP = pad16(G)
    NSUB = BS // BN
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, K], dtype),
        Kt: T.Tensor([B, Tn, H, K], dtype),
        Vt: T.Tensor([B, Tn, H, V], dtype),
        O: T.Tensor([B, Tn, HQ, V], od),
        dO: T.Tensor([B, Tn, HQ, V], dtype),
        Gate: T.Tensor([B, Tn, HQ], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
        BlockIdx: T.Tensor([B, Tn, H, S], "int32"),
        BlockCnt: T.Tensor([B, Tn, H], "int32"),
        Offsets: T.Tensor([N1], "int32"),
        TokSeq: T.Tensor([Tn], "int32"),
        dQ: T.Tensor([B, Tn, HQ, K], dtype),
        Delta: T.Tensor([B, Tn, HQ], acc),
        dGate: T.Tensor([B, Tn, HQ], acc),
    ):
        with T.Kernel(Tn, B * H, threads=threads) as (i_t, i_bh):
            Q_s = T.alloc_shared([GP, K], dtype)
            dO_s = T.alloc_shared([GP, V], dtype)
            O_s = T.alloc_shared([GP, V], od)
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            dS_s = T.alloc_shared([GP, BN], dtype)
            dQ_s = T.alloc_shared([GP, K], dtype)
            lse_s = T.alloc_shared([GP], acc)
            delta_s = T.alloc_shared([GP], acc)
            gate_s = T.alloc_shared([GP], acc)
            dgate_s = T.alloc_shared([GP], acc)
            tiles = T.alloc_shared([S * NSUB], "int32")
            n_tiles = T.alloc_local([1], "int32")
            acc_s = T.alloc_fragment([GP, BN], acc)
            acc_dp = T.alloc_fragment([GP, BN], acc)
            acc_dq = T.alloc_fragment([GP, K], acc)
            do_o = T.alloc_fragment([GP, V], acc)
            delta = T.alloc_fragment([GP], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            bos = Offsets[TokSeq[i_t]]
            t = i_t - bos
            n_s = T.min(BlockCnt[i_b, i_t, i_h], S)

            load_group(Q, Q_s, i_b, i_t, i_h, G, GP)
            load_group(dO, dO_s, i_b, i_t, i_h, G, GP)
            load_group(O, O_s, i_b, i_t, i_h, G, GP)
            # padded rows: LSE = +inf makes their P exactly 0
            for g in T.Parallel(GP):
                lse_s[g] = T.if_then_else(g < G, LSE[i_b, i_t, i_h * G + g], T.infinity(acc))
                gate_s[g] = T.if_then_else(g < G, T.cast(Gate[i_b, i_t, i_h * G + g], acc), 0)
            for i, d in T.Parallel(GP, V):
                do_o[i, d] = T.cast(dO_s[i, d], acc) * T.cast(O_s[i, d], acc)
            T.reduce_sum(do_o, delta, dim=1)
            T.copy(delta, dgate_s)
            for g in T.Parallel(GP):
                delta_s[g] = dgate_s[g] * gate_s[g]
            for g in T.Parallel(G):
                dGate[i_b, i_t, i_h * G + g] = dgate_s[g]
                Delta[i_b, i_t, i_h * G + g] = delta_s[g]
            T.clear(acc_dq)
            n_tiles[0] = 0
            collect_tiles(BlockIdx, i_b, i_t, i_h, n_s, t, tiles, n_tiles, S, BS, BN)

            for it in T.Pipelined(n_tiles[0], num_stages=num_stages):
                start = tiles[it]
                T.copy(Kt[i_b, bos + start:bos + start + BN, i_h, :], K_s)
                T.copy(Vt[i_b, bos + start:bos + start + BN, i_h, :], V_s)
                for i, j in T.Parallel(GP, BN):
                    acc_s[i, j] = T.if_then_else(start + j <= t, 0, -T.infinity(acc))
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                T.clear(acc_dp)
                T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                for i, j in T.Parallel(GP, BN):
                    acc_s[i, j] = T.exp2(acc_s[i, j] * sc - lse_s[i]) * (gate_s[i] * acc_dp[i, j] - delta_s[i])
                T.copy(acc_s, dS_s)
                T.gemm(dS_s, K_s, acc_dq, policy=T.GemmWarpPolicy.FullCol)

            for i, d in T.Parallel(GP, K):
                acc_dq[i, d] = acc_dq[i, d] * scale
            T.copy(acc_dq, dQ_s)
            for g, d in T.Parallel(G, K):
                dQ[i_b, i_t, i_h * G + g, d] = dQ_s[g, d]

    return main


def pick_dkv_config(G: int, K: int, V: int, BS: int) -> dict:
    """Tile choices of the dK/dV kernel (one program per key tile of a block).

    BN: key rows per program, min(BS, 64): the dK `[BN, K]` and dV `[BN, V]` fp32 accumulators
        live in registers (64 per thread each at K = V = 128 with 4 warps).
    BQ: tokens of the pair list taken per step, so the MMAs are BN × BQ·GP instead of BN × GP:
        4 for G <= 16 (64 columns), 2 for G = 32, 1 from G = 64 (the columns already fill a tile);
        1 when the head dims reach 256 (registers and shared memory).
    threads: 4 warps, one per 16 key rows (FullRow: P and dS stay in registers as the next MMA's
        A operand); 8 warps splitting columns too when the head dims reach 256; BN // 16 warps
        below 64 rows.
    num_stages: 1, as in the forward (the pair loop has a data-dependent length).
    """
    BN = min(BS, 64)
    warps = BN // 16
    if max(K, V) >= 256 and BN == 64:
        warps = 8
    BQ = 1 if max(K, V) >= 256 else max(1, 64 // pad16(G))
    return dict(BN=BN, BQ=BQ, threads=32 * warps, num_stages=1)


@tilelang.jit(pass_configs=PASS_CONFIGS)
def selected_bwd_dkv(H: int, G: int, K: int, V: int, BS: int, dtype: str, scale: float,
                     BN: int = 64, BQ: int = 4, threads: int = 128, num_stages: int = 1):
    """Kernel(Q, K, V, dOG, Gate, LSE, Delta, BlkStart, BlkEnd, PairOff, PairTok, dK, dV).

    Key-centric over an inverted index (no atomics): program (key tile, batch·kv head) walks the
    tokens that selected its block, PairTok[PairOff[c] : PairOff[c+1]] with
    c = (b·H + h)·NB + block, BQ tokens per step: the columns of a step are (token, head) pairs,
    BQ·GP of them. With dO = Gate·dOG per column it accumulates dV += Pᵀ·dO and dK += dSᵀ·Q in
    registers, dS = P ∘ (dP - Delta). BlkStart/BlkEnd `[NB]`: each block's first row and its
    sequence's end (rows of one batch row). Every block gets a program, so blocks no token selected
    get dK = dV = 0. Columns past the list's end repeat its last token with LSE = +inf: P = 0.
    """
    B, Tn, NB, NP1, NPair = T.dynamic("B, T, NB, NP1, NPair")
    HQ = H * G
    GP = pad16(G)
    NC = BQ * GP
    NSUB = BS // BN
    sc = scale * LOG2E
    acc = "float32"
    # FullRow: each warp owns whole rows of Pᵀ/dSᵀ, which then feed the next MMA from registers;
    # with more warps than 16-row slices the columns split too and Pᵀ/dSᵀ go through shared memory
    rows_only = threads // 32 <= BN // 16
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
        BlkStart: T.Tensor([NB], "int32"),
        BlkEnd: T.Tensor([NB], "int32"),
        PairOff: T.Tensor([NP1], "int32"),
        PairTok: T.Tensor([NPair], "int32"),
        dK: T.Tensor([B, Tn, H, K], dtype),
        dV: T.Tensor([B, Tn, H, V], dtype),
    ):
        with T.Kernel(NB * NSUB, B * H, threads=threads) as (i_c, i_bh):
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            Q_s = T.alloc_shared([NC, K], dtype)
            dO_s = T.alloc_shared([NC, V], dtype)
            lse_s = T.alloc_shared([NC], acc)
            delta_s = T.alloc_shared([NC], acc)
            gate_s = T.alloc_shared([NC], acc)
            tok_s = T.alloc_shared([NC], "int32")
            dK_s = T.alloc_shared([BN, K], dtype)
            dV_s = T.alloc_shared([BN, V], dtype)
            acc_st = T.alloc_fragment([BN, NC], acc)
            acc_dpt = T.alloc_fragment([BN, NC], acc)
            p_cast = T.alloc_fragment([BN, NC], dtype) if rows_only else T.alloc_shared([BN, NC], dtype)
            ds_cast = T.alloc_fragment([BN, NC], dtype) if rows_only else T.alloc_shared([BN, NC], dtype)
            acc_dk = T.alloc_fragment([BN, K], acc)
            acc_dv = T.alloc_fragment([BN, V], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            blk = i_c // NSUB
            start = BlkStart[blk] + (i_c % NSUB) * BN
            end = BlkEnd[blk]
            c = (i_b * H + i_h) * NB + blk
            p0 = PairOff[c]
            n_pairs = PairOff[c + 1] - p0

            T.copy(Kt[i_b, start:start + BN, i_h, :], K_s)
            T.copy(Vt[i_b, start:start + BN, i_h, :], V_s)
            T.clear(acc_dk)
            T.clear(acc_dv)

            for it in T.Pipelined(T.ceildiv(n_pairs, BQ), num_stages=num_stages):
                # column j holds head j % GP of token number it·BQ + j // GP of the list
                # (clamped to the last, which the LSE = +inf below then silences)
                for j, d in T.Parallel(NC, K):
                    Q_s[j, d] = T.if_then_else(
                        j % GP < G,
                        Q[i_b, PairTok[p0 + T.min(it * BQ + j // GP, n_pairs - 1)], i_h * G + j % GP, d], 0)
                for j, d in T.Parallel(NC, V):
                    dO_s[j, d] = T.if_then_else(
                        j % GP < G,
                        dO[i_b, PairTok[p0 + T.min(it * BQ + j // GP, n_pairs - 1)], i_h * G + j % GP, d], 0)
                for j in T.Parallel(NC):
                    # index through PairTok, never through tok_s: these copies may be async, and
                    # tok_s is only complete once the pipeline waits for this stage
                    tok = PairTok[p0 + T.min(it * BQ + j // GP, n_pairs - 1)]
                    live = j % GP < G and it * BQ + j // GP < n_pairs
                    tok_s[j] = tok
                    lse_s[j] = T.if_then_else(live, LSE[i_b, tok, i_h * G + j % GP], T.infinity(acc))
                    delta_s[j] = T.if_then_else(live, Delta[i_b, tok, i_h * G + j % GP], 0)
                    gate_s[j] = T.if_then_else(live, T.cast(Gate[i_b, tok, i_h * G + j % GP], acc), 0)
                T.clear(acc_st)
                T.gemm(K_s, Q_s, acc_st, transpose_B=True, policy=policy)
                T.clear(acc_dpt)
                T.gemm(V_s, dO_s, acc_dpt, transpose_B=True, policy=policy)
                for i, j in T.Parallel(BN, NC):
                    # keys after the token, or past its sequence, take no part
                    acc_st[i, j] = T.if_then_else(start + i <= tok_s[j] and start + i < end,
                                                  T.exp2(acc_st[i, j] * sc - lse_s[j]), 0)
                    acc_dpt[i, j] = acc_st[i, j] * (gate_s[j] * acc_dpt[i, j] - delta_s[j])
                    acc_st[i, j] = acc_st[i, j] * gate_s[j]  # Pᵀ·(Gate·dOG) = (Pᵀ∘Gate)·dOG
                T.copy(acc_st, p_cast)
                T.copy(acc_dpt, ds_cast)
                T.gemm(p_cast, dO_s, acc_dv, policy=policy)
                T.gemm(ds_cast, Q_s, acc_dk, policy=policy)

            for i, d in T.Parallel(BN, K):
                acc_dk[i, d] = acc_dk[i, d] * scale
            T.copy(acc_dk, dK_s)
            T.copy(acc_dv, dV_s)
            # rows past the sequence's end belong to the next sequence's first block: not ours
            for i, d in T.Parallel(BN, K):
                if start + i < end:
                    dK[i_b, start + i, i_h, d] = dK_s[i, d]
            for i, d in T.Parallel(BN, V):
                if start + i < end:
                    dV[i_b, start + i, i_h, d] = dV_s[i, d]

    return main


def selected_kernels(H: int, G: int, K: int, V: int, S: int, BS: int, dtype: str, scale: float,
                     o_dtype: str = ""):
    """The three kernels one shape family needs (forward, dQ, dK/dV), compiled or taken from the cache."""
    cfg = pick_config(G, K, V, BS)
    extra = dict(o_dtype=o_dtype) if o_dtype else {}
    return (
        selected_fwd(H, G, K, V, S, BS, dtype, scale, **cfg, **extra),
        selected_bwd_dq(H, G, K, V, S, BS, dtype, scale, **cfg, **extra),
        selected_bwd_dkv(H, G, K, V, BS, dtype, scale, **pick_dkv_config(G, K, V, BS)),
    )
