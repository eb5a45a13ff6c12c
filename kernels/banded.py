"""Banded causal attention: NSA's sliding branch, and (with strided keys) its compressed branch.

Queries are tokens; key i of a sequence sits at position p(i) = i·KS + KC of that sequence. A query
at position t attends to the keys with t - W < p(i) <= t:
    sliding window:  KS = 1, KC = 0, window W        (keys are the tokens themselves)
    compressed:      KS = d, KC = l - 1, W "infinite" (key i summarizes tokens i·d … i·d+l-1)
Shapes: Q `[B, Tq, HQ, K]`, K `[B, Tk, H, K]`, V `[B, Tk, H, V]`, Gate `[B, Tq, HQ]`, O/OG
`[B, Tq, HQ, V]`, LSE `[B, Tq, HQ]` (fp32, base 2; +inf for a row that sees nothing).
QOffsets/KOffsets `[N+1]`: each sequence's first query / key row; QSeq `[Tq]`, KSeq `[Tk]`: the
sequence of each row (a fixed-length batch is one sequence per batch row). B, Tq, Tk and N are
dynamic; W, KS, KC are compile-time (the host caps W at 2^30, "the whole sequence", which keeps
t - W inside int32).

Rows of a program are (token, head) pairs: BM consecutive tokens × the G query heads of one kv head,
padded to a multiple of 16 (M rows); every K/V tile it loads serves all of them. It visits exactly
the key tiles between the lowest and the highest key any of its rows sees (key_range); a row's mask
keeps its own sequence's visible keys, so a tile may straddle sequences. Backward: dQ per query
tile like the forward; dK/dV per key tile of BN keys walking the query tiles that can see it. Each
program owns the rows it writes: no atomics.
"""

import tilelang
import tilelang.language as T

from .common import (LOG2E, PASS_CONFIGS, in_dtype, normalized, online_softmax_step, pad16, pipelined, rescale_rows,
                     row_lse, softmax_init, softmax_scores_step)

# A window this long covers any sequence the int32 kernels index; it also means "no window".
W_CAP = 1 << 30

# O_FP32 (o_dtype="float32" in banded_fwd and banded_bwd_dq, and in selected.py's): the forward
# stores the O the backward reads in fp32 instead of bf16/fp16. The dQ kernel's Delta = rowsum(dO ∘ O)
# then matches the P it recomputes: Σ_j dS_j = Σ_j P_j (dP_j - Delta) is 0 up to fp32 rounding. From
# a bf16 O it is off by about |dO|·|O|·2^-9, which dQ carries as that residual times the row's
# P-weighted key; where one key dominates a row, its true dQ (∝ the other keys' P) is small and the
# residual can exceed the per-row allowance (docs/perf-notes.md; tools/emulate_dq.py). Costs 2 more
# bytes per O element (memory, and one write + one read). Off by default: the default kernels'
# generated code is unchanged.
# DELTA_PASS (delta_pass=True in banded_bwd_dq): Delta = Gate·Σ_j P_j dP_j from a first pass over
# the row's key tiles, exactly consistent with the P of dS (O_FP32 still leaves the forward's bf16 P
# inside O). Costs the dQ kernel's Q·Kᵀ and dO·Vᵀ and its K/V reads a second time; no memory.


def pick_config(G: int, K: int, V: int, rows: int = 64, BN: int = 64, num_stages: int = 1,
                overlap: bool = False) -> dict:
    """Tile choices of the forward and dQ kernels (pick_dq_config: the same less `overlap`).

    M rows = BM tokens × G heads, BM = rows // G (at least 1), padded to 16; one warp per 16 rows
        (FullRow, so P and dS stay in registers between MMAs): 64 rows, 4 warps, one warpgroup
        (G = 128 needs 128 rows and 8 warps).
    BN: 64 keys per step.
    num_stages: 1, TileLang's single-buffered schedule (each tile's load is issued as soon as its
        buffer's last reader is done, so it overlaps the rest of the step); 2 double-buffers the
        K/V tiles a whole step ahead (common.pipelined).
    overlap: the forward's FlashAttention-3 schedule inside the warpgroup (banded_overlap_loop:
        step j's QKᵀ and step j-1's PV in flight during step j's softmax, K/V double-buffered by
        TMA); needs one warpgroup (M = 64) and num_stages 1.
    Measured on the H200 (docs/perf-notes.md, issue 14): 128 rows and num_stages 2 each made the
    forward 1.3–1.5× slower and the backward a little slower; these defaults are the fastest tried.
    """
    BM = max(1, rows // G)
    M = pad16(BM * G)
    if overlap and (M != 64 or num_stages != 1):
        raise ValueError(f"the overlapped forward runs one warpgroup of 64 rows, single-staged; got M = {M}, "
                         f"num_stages = {num_stages}")
    return dict(BM=BM, M=M, BN=BN, threads=32 * (M // 16), num_stages=num_stages, overlap=overlap)


def pick_dq_config(G: int, K: int, V: int) -> dict:
    """Tile choices of the dQ kernel: the forward's (pick_config) without its overlap switch."""
    cfg = pick_config(G, K, V)
    del cfg["overlap"]
    return cfg


def pick_dkv_config(G: int, K: int, V: int, num_stages: int = 1, BN: int = 64, threads: int = 0) -> dict:
    """Tile choices of the dK/dV kernel: BN = 64 key rows, M = 64 query rows (BM = 64 // G tokens)
    per step. Its dK `[BN, K]` + dV `[BN, V]` fp32 accumulators fit 4 warps owning 16 rows each up to
    K = V = 192; at 256 they split columns over 8 warps (P and dS then go through shared memory).
    num_stages 2 (the next step's Q/dO rows loaded during this one) measured no faster; it compiles
    only for a power-of-two G (otherwise TileLang 0.1.15 cannot prove the gathered rows' 16-byte
    alignment and emits 2-byte cp.async copies)."""
    if num_stages > 1 and G & (G - 1):
        raise ValueError(f"double-buffered dK/dV needs a power-of-two G, got {G}")
    cfg = pick_config(G, K, V, rows=64, BN=BN, num_stages=num_stages)
    del cfg["overlap"]
    cfg["threads"] = threads or (256 if max(K, V) >= 256 else 128)
    return cfg


@T.macro
def load_rows(X, X_s, i_b, t0, i_h, G: int, BM: int, M: int):
    """X_s `[M, D]` <- row r = (token t0 + r // G, head i_h·G + r % G) of X `[B, T, HQ, D]`; rows past
    BM·G are zero, and so are rows past the end of the batch row (TileLang predicates every global
    read on the tensor's bounds; leaving that test to it keeps the copy a cp.async)."""
    for r, d in T.Parallel(M, X_s.shape[1]):
        X_s[r, d] = T.if_then_else(r < BM * G, X[i_b, t0 + r // G, i_h * G + r % G, d], 0)


@T.macro
def load_row_meta(QOffsets, QSeq, KOffsets, t0, Tq, tpos_s, kbos_s, G: int, BM: int, M: int):
    """tpos_s[r] = the row's position in its sequence (-1 for padding rows past BM·G or Tq),
    kbos_s[r] = the first key row of its sequence."""
    for r in T.Parallel(M):
        tq = T.min(t0 + r // G, Tq - 1)
        live = r < BM * G and t0 + r // G < Tq
        tpos_s[r] = T.if_then_else(live, tq - QOffsets[QSeq[tq]], -1)
        kbos_s[r] = KOffsets[QSeq[tq]]


@T.macro
def band_mask(acc_s, kt, tpos_s, kbos_s, M: int, BN: int, W: int, KS: int, KC: int):
    """acc_s `[M, BN]` <- 0 where row i sees key kt + j (same sequence, t - W < p <= t), else -inf."""
    for i, j in T.Parallel(M, BN):
        p = (kt + j - kbos_s[i]) * KS + KC
        acc_s[i, j] = T.if_then_else(kt + j >= kbos_s[i] and p <= tpos_s[i] and p > tpos_s[i] - W,
                                     0, -T.infinity("float32"))


@T.macro
def key_range(QOffsets, QSeq, KOffsets, t0, Tq, lo, n_tiles, BM: int, BN: int, W: int, KS: int, KC: int):
    """lo[0]: the first key any row of the tile [t0, t0+BM) sees; n_tiles[0]: BN-key tiles from it to
    the highest key any row sees (0 if none).

    Rows of one sequence see more keys the later they are, and a later sequence's keys lie after an
    earlier one's, so the first row bounds the range below and the last row above, with one catch
    when the tile holds the end of one sequence and the start of the next: if the last row sees no
    key yet (compressed branch, t < l - 1), the highest key seen is still the previous sequence's
    last, just before the last row's stream starts. Clamping the last row's own bound at one below
    its stream keeps those keys in range (a single-sequence tile then gets hi < lo: no tiles)."""
    t_first = t0 - QOffsets[QSeq[t0]]
    t_last_row = T.min(t0 + BM - 1, Tq - 1)
    t_last = t_last_row - QOffsets[QSeq[t_last_row]]
    lo[0] = KOffsets[QSeq[t0]] + T.max(0, T.floordiv(t_first - W - KC, KS) + 1)
    hi = KOffsets[QSeq[t_last_row]] + T.max(T.floordiv(t_last - KC, KS), -1)
    n_tiles[0] = T.ceildiv(T.max(hi - lo[0] + 1, 0), BN)


@T.macro
def load_tile(X, X_s, bar, i_b, kt, i_h, s, BN: int):
    """X_s[s] `[BN, D]` <- rows kt … kt+BN-1 of kv head i_h of X `[B, Tk, H, D]` by TMA (rows past Tk
    arrive as zeros), completing barrier bar[s] (every thread arrives; the bytes land later)."""
    T.tma_copy(X[i_b, kt:kt + BN, i_h, :], X_s[s, :, :], barrier=bar[s])
    T.barrier_arrive(bar[s])


@T.macro
def banded_overlap_loop(Kt, Vt, Q_s, K_s, V_s, bar_k, bar_v, acc_s, acc_s_cast, acc_o, m, m_prev, r, l, l_blk,
                        tpos_s, kbos_s, lo, n, i_b, i_h, M: int, BN: int, V: int, W: int, KS: int, KC: int, sc: float,
                        threads: int):
    """The forward's key loop as FlashAttention-3 schedules it inside one warpgroup: step j issues
    QKᵀ of tile j and PV of tile j-1 as asynchronous wgmma, runs tile j's softmax once the first is
    done (while PV runs) and rescales the output once the second is. K_s, V_s `[2, BN, D]` are double
    buffers filled by TMA: step j starts with a block barrier (every warp done with step j-1's MMAs,
    whose buffers it then refills) and issues K of tile j+1 and V of tile j, so each load has a
    whole step to land. Same arithmetic in the same order as the plain loop (acc_o rescaled by step
    j's factor, then P_j·V_j added), so O and LSE agree with it exactly.
    Tile t's K (V) is the (t // 2)-th load into buffer t % 2: its barrier phase is (t // 2) % 2."""
    # the fences keep nvcc from moving reads of an MMA's registers above its wait (registers a thread)
    regs_s, regs_o = M * BN // threads, M * V // threads
    if n > 0:
        load_tile(Kt, K_s, bar_k, i_b, lo[0], i_h, 0, BN)
    T.clear(acc_s_cast)  # first read at step 1, after step 0 writes it; cleared for TileLang's init check
    for j in T.serial(n):
        s = j % 2
        T.sync_threads()
        if j + 1 < n:
            load_tile(Kt, K_s, bar_k, i_b, lo[0] + (j + 1) * BN, i_h, 1 - s, BN)
        load_tile(Vt, V_s, bar_v, i_b, lo[0] + j * BN, i_h, s, BN)
        band_mask(acc_s, lo[0] + j * BN, tpos_s, kbos_s, M, BN, W, KS, KC)
        T.barrier_wait(bar_k[s], (j // 2) % 2)
        T.wgmma_gemm(Q_s, K_s[s, :, :], acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        if j > 0:
            T.barrier_wait(bar_v[1 - s], ((j - 1) // 2) % 2)
            T.wgmma_gemm(acc_s_cast, V_s[1 - s, :, :], acc_o, policy=T.GemmWarpPolicy.FullRow)
            T.wait_wgmma(1)  # QKᵀ of tile j done, PV of tile j-1 may still run
        else:
            T.wait_wgmma(0)
        T.warpgroup_fence_operand(acc_s, num_regs=regs_s)
        softmax_scores_step(acc_s, m, m_prev, r, l, l_blk, sc, M, BN)
        T.wait_wgmma(0)
        T.warpgroup_fence_operand(acc_o, num_regs=regs_o)
        T.warpgroup_fence_operand(acc_s_cast, num_regs=regs_s // 2)
        rescale_rows(acc_o, r, M, V)
        T.copy(acc_s, acc_s_cast)
    if n > 0:
        T.barrier_wait(bar_v[(n - 1) % 2], ((n - 1) // 2) % 2)
        T.gemm(acc_s_cast, V_s[(n - 1) % 2, :, :], acc_o, policy=T.GemmWarpPolicy.FullRow)


@tilelang.jit(pass_configs=PASS_CONFIGS)
def banded_fwd(H: int, G: int, K: int, V: int, W: int, KS: int, KC: int, dtype: str, scale: float,
               BM: int = 4, M: int = 64, BN: int = 64, threads: int = 128, num_stages: int = 1,
               overlap: bool = False, o_dtype: str = ""):
    """Kernel(Q, K, V, Gate, QOffsets, QSeq, KOffsets, O, OG, LSE): O, OG = Gate·O and LSE.

    overlap: the key loop of banded_overlap_loop (pick_config) instead of TileLang's pipeline.
    O, which only the backward reads, is stored in o_dtype ("" = dtype; "float32": O_FP32 below);
    OG is the bf16/fp16 O times the gate either way."""
    B, Tq, Tk, N1 = T.dynamic("B, Tq, Tk, N1")
    od = o_dtype or dtype
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tq, HQ, K], dtype),
        Kt: T.Tensor([B, Tk, H, K], dtype),
        Vt: T.Tensor([B, Tk, H, V], dtype),
        Gate: T.Tensor([B, Tq, HQ], dtype),
        QOffsets: T.Tensor([N1], "int32"),
        QSeq: T.Tensor([Tq], "int32"),
        KOffsets: T.Tensor([N1], "int32"),
        O: T.Tensor([B, Tq, HQ, V], od),
        OG: T.Tensor([B, Tq, HQ, V], dtype),
        LSE: T.Tensor([B, Tq, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(Tq, BM), B * H, threads=threads) as (i_m, i_bh):
            Q_s = T.alloc_shared([M, K], dtype)
            K_s = T.alloc_shared([2, BN, K] if overlap else [BN, K], dtype)
            V_s = T.alloc_shared([2, BN, V] if overlap else [BN, V], dtype)
            O_s = T.alloc_shared([M, V], od)
            lse_s = T.alloc_shared([M], acc)
            tpos_s = T.alloc_shared([M], "int32")
            kbos_s = T.alloc_shared([M], "int32")
            lo = T.alloc_local([1], "int32")
            n_tiles = T.alloc_local([1], "int32")
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
            key_range(QOffsets, QSeq, KOffsets, t0, Tq, lo, n_tiles, BM, BN, W, KS, KC)
            load_rows(Q, Q_s, i_b, t0, i_h, G, BM, M)
            load_row_meta(QOffsets, QSeq, KOffsets, t0, Tq, tpos_s, kbos_s, G, BM, M)
            softmax_init(acc_o, m, l)

            if overlap:
                bar_k = T.alloc_barrier([threads] * 2)
                bar_v = T.alloc_barrier([threads] * 2)
                T.sync_threads()  # Q_s, tpos_s, kbos_s written by all threads before the first MMA
                banded_overlap_loop(Kt, Vt, Q_s, K_s, V_s, bar_k, bar_v, acc_s, acc_s_cast, acc_o, m, m_prev, r, l,
                                    l_blk, tpos_s, kbos_s, lo, n_tiles[0], i_b, i_h, M, BN, V, W, KS, KC, sc, threads)
            else:
                # 13 statements (online_softmax_step is 7), the K and V loads first when double-buffered
                for it in pipelined(n_tiles[0], num_stages, 2, 13):
                    kt = lo[0] + it * BN
                    T.copy(Kt[i_b, kt:kt + BN, i_h, :], K_s)
                    if num_stages > 1:
                        T.copy(Vt[i_b, kt:kt + BN, i_h, :], V_s)
                    band_mask(acc_s, kt, tpos_s, kbos_s, M, BN, W, KS, KC)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    online_softmax_step(acc_s, acc_o, m, m_prev, r, l, l_blk, sc, M, BN, V)
                    T.copy(acc_s, acc_s_cast)  # FullRow: each warp owns its rows, P stays in registers
                    if num_stages <= 1:  # single-buffered: V's load overlaps QKᵀ and the softmax
                        T.copy(Vt[i_b, kt:kt + BN, i_h, :], V_s)
                    T.gemm(acc_s_cast, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            for i, j in T.Parallel(M, V):
                acc_o[i, j] = normalized(acc_o[i, j], l[i])
            T.copy(acc_o, O_s)
            for i in T.Parallel(M):
                l_blk[i] = row_lse(l[i], m[i], sc, T.infinity(acc))
            T.copy(l_blk, lse_s)
            for rr, d in T.Parallel(M, V):
                if tpos_s[rr] >= 0:
                    O[i_b, t0 + rr // G, i_h * G + rr % G, d] = O_s[rr, d]
                    OG[i_b, t0 + rr // G, i_h * G + rr % G, d] = in_dtype(O_s[rr, d], dtype) * Gate[
                        i_b, t0 + rr // G, i_h * G + rr % G]
            for rr in T.Parallel(M):
                if tpos_s[rr] >= 0:
                    LSE[i_b, t0 + rr // G, i_h * G + rr % G] = lse_s[rr]

    return main


@tilelang.jit(pass_configs=PASS_CONFIGS)
def banded_bwd_dq(H: int, G: int, K: int, V: int, W: int, KS: int, KC: int, dtype: str, scale: float,
                  BM: int = 4, M: int = 64, BN: int = 64, threads: int = 128, num_stages: int = 1, o_dtype: str = "",
                  delta_pass: bool = False):
    """Kernel(Q, K, V, O, dOG, Gate, LSE, QOffsets, QSeq, KOffsets, dQ, Delta, dGate).

    As the selected dQ kernel: dGate = rowsum(dOG ∘ O), Delta = Gate·dGate, then per key tile
    dS = P ∘ (Gate·(dOG·Vᵀ) - Delta) and dQ = scale · dS·K. O in o_dtype (banded_fwd's).
    delta_pass (DELTA_PASS below): Delta = Gate·Σ_j P_j (dOG·v_j) instead, from a first pass over the
    row's key tiles with the same P as dS (dGate stays rowsum(dOG ∘ O)).
    """
    B, Tq, Tk, N1 = T.dynamic("B, Tq, Tk, N1")
    od = o_dtype or dtype
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tq, HQ, K], dtype),
        Kt: T.Tensor([B, Tk, H, K], dtype),
        Vt: T.Tensor([B, Tk, H, V], dtype),
        O: T.Tensor([B, Tq, HQ, V], od),
        dO: T.Tensor([B, Tq, HQ, V], dtype),
        Gate: T.Tensor([B, Tq, HQ], dtype),
        LSE: T.Tensor([B, Tq, HQ], acc),
        QOffsets: T.Tensor([N1], "int32"),
        QSeq: T.Tensor([Tq], "int32"),
        KOffsets: T.Tensor([N1], "int32"),
        dQ: T.Tensor([B, Tq, HQ, K], dtype),
        Delta: T.Tensor([B, Tq, HQ], acc),
        dGate: T.Tensor([B, Tq, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(Tq, BM), B * H, threads=threads) as (i_m, i_bh):
            Q_s = T.alloc_shared([M, K], dtype)
            dO_s = T.alloc_shared([M, V], dtype)
            O_s = T.alloc_shared([M, V], od)
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            dQ_s = T.alloc_shared([M, K], dtype)
            lse_s = T.alloc_shared([M], acc)
            delta_s = T.alloc_shared([M], acc)
            gate_s = T.alloc_shared([M], acc)
            dgate_s = T.alloc_shared([M], acc)
            tpos_s = T.alloc_shared([M], "int32")
            kbos_s = T.alloc_shared([M], "int32")
            lo = T.alloc_local([1], "int32")
            n_tiles = T.alloc_local([1], "int32")
            acc_s = T.alloc_fragment([M, BN], acc)
            acc_dp = T.alloc_fragment([M, BN], acc)
            ds_cast = T.alloc_fragment([M, BN], dtype)
            acc_dq = T.alloc_fragment([M, K], acc)
            do_o = T.alloc_fragment([M, V], acc)
            dgate = T.alloc_fragment([M], acc)
            p_dp = T.alloc_fragment([M], acc) if delta_pass else None
            p_dp_sum = T.alloc_fragment([M], acc) if delta_pass else None
            p_dp_s = T.alloc_shared([M], acc) if delta_pass else None

            i_b = i_bh // H
            i_h = i_bh % H
            t0 = i_m * BM
            key_range(QOffsets, QSeq, KOffsets, t0, Tq, lo, n_tiles, BM, BN, W, KS, KC)
            load_rows(Q, Q_s, i_b, t0, i_h, G, BM, M)
            load_rows(dO, dO_s, i_b, t0, i_h, G, BM, M)
            load_rows(O, O_s, i_b, t0, i_h, G, BM, M)
            load_row_meta(QOffsets, QSeq, KOffsets, t0, Tq, tpos_s, kbos_s, G, BM, M)
            for rr in T.Parallel(M):
                # padding rows: LSE = +inf makes their P exactly 0
                tq = T.min(t0 + rr // G, Tq - 1)
                lse_s[rr] = T.if_then_else(tpos_s[rr] >= 0, LSE[i_b, tq, i_h * G + rr % G], T.infinity(acc))
                gate_s[rr] = T.if_then_else(tpos_s[rr] >= 0, T.cast(Gate[i_b, tq, i_h * G + rr % G], acc), 0)
            for i, d in T.Parallel(M, V):
                do_o[i, d] = T.cast(dO_s[i, d], acc) * T.cast(O_s[i, d], acc)
            T.reduce_sum(do_o, dgate, dim=1)
            T.copy(dgate, dgate_s)
            if delta_pass:
                T.clear(p_dp_sum)
                for it in T.Pipelined(n_tiles[0], num_stages=1):
                    kt = lo[0] + it * BN
                    T.copy(Kt[i_b, kt:kt + BN, i_h, :], K_s)
                    T.copy(Vt[i_b, kt:kt + BN, i_h, :], V_s)
                    band_mask(acc_s, kt, tpos_s, kbos_s, M, BN, W, KS, KC)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    T.clear(acc_dp)
                    T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    for i, j in T.Parallel(M, BN):
                        acc_s[i, j] = T.exp2(acc_s[i, j] * sc - lse_s[i]) * acc_dp[i, j]
                    T.reduce_sum(acc_s, p_dp, dim=1)
                    for i in T.Parallel(M):
                        p_dp_sum[i] = p_dp_sum[i] + p_dp[i]
                T.copy(p_dp_sum, p_dp_s)
                for rr in T.Parallel(M):
                    delta_s[rr] = p_dp_s[rr] * gate_s[rr]
            else:
                for rr in T.Parallel(M):
                    delta_s[rr] = dgate_s[rr] * gate_s[rr]
            for rr in T.Parallel(M):
                if tpos_s[rr] >= 0:
                    dGate[i_b, t0 + rr // G, i_h * G + rr % G] = dgate_s[rr]
                    Delta[i_b, t0 + rr // G, i_h * G + rr % G] = delta_s[rr]
            T.clear(acc_dq)

            for it in pipelined(n_tiles[0], num_stages, 2, 9):
                kt = lo[0] + it * BN
                T.copy(Kt[i_b, kt:kt + BN, i_h, :], K_s)
                T.copy(Vt[i_b, kt:kt + BN, i_h, :], V_s)
                band_mask(acc_s, kt, tpos_s, kbos_s, M, BN, W, KS, KC)
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
                if tpos_s[rr] >= 0:
                    dQ[i_b, t0 + rr // G, i_h * G + rr % G, d] = dQ_s[rr, d]

    return main


@T.macro
def dkv_query_step(Q, dO, LSE, Delta, Gate, QOffsets, QSeq, KOffsets, K_s, V_s, Q_s, dO_s, lse_s, delta_s,
                   gate_s, tpos_s, kbos_s, acc_st, acc_dpt, p_cast, ds_cast, acc_dk, acc_dv, i_b, i_h, kt, t0,
                   Tq, Tk, G: int, BM: int, M: int, BN: int, W: int, KS: int, KC: int, sc: float, policy):
    """dK/dV of key tile [kt, kt+BN) += the contribution of query tokens [t0, t0+BM) (all G heads):
    dV += (Pᵀ∘Gate)·dOG, dK += dSᵀ·Q (unscaled), dS = P ∘ (Gate·dP - Delta).
    12 statements, the first three the loads a double-buffered loop issues one step ahead."""
    load_rows(Q, Q_s, i_b, t0, i_h, G, BM, M)
    load_rows(dO, dO_s, i_b, t0, i_h, G, BM, M)
    for rr in T.Parallel(M):
        # computed from t0 and global tensors, never read back from a shared tile in this stage
        # (TileLang may make these copies asynchronous)
        tq = T.min(t0 + rr // G, Tq - 1)
        live = rr < BM * G and t0 + rr // G < Tq
        tpos_s[rr] = T.if_then_else(live, tq - QOffsets[QSeq[tq]], -1)
        kbos_s[rr] = KOffsets[QSeq[tq]]
        lse_s[rr] = T.if_then_else(live, LSE[i_b, tq, i_h * G + rr % G], T.infinity("float32"))
        delta_s[rr] = T.if_then_else(live, Delta[i_b, tq, i_h * G + rr % G], 0)
        gate_s[rr] = T.if_then_else(live, T.cast(Gate[i_b, tq, i_h * G + rr % G], "float32"), 0)
    T.clear(acc_st)
    T.gemm(K_s, Q_s, acc_st, transpose_B=True, policy=policy)
    T.clear(acc_dpt)
    T.gemm(V_s, dO_s, acc_dpt, transpose_B=True, policy=policy)
    for i, j in T.Parallel(BN, M):
        p = (kt + i - kbos_s[j]) * KS + KC
        ok = kt + i < Tk and kt + i >= kbos_s[j] and p <= tpos_s[j] and p > tpos_s[j] - W
        acc_st[i, j] = T.if_then_else(ok, T.exp2(acc_st[i, j] * sc - lse_s[j]), 0)
        acc_dpt[i, j] = acc_st[i, j] * (gate_s[j] * acc_dpt[i, j] - delta_s[j])
        acc_st[i, j] = acc_st[i, j] * gate_s[j]
    T.copy(acc_st, p_cast)
    T.copy(acc_dpt, ds_cast)
    T.gemm(p_cast, dO_s, acc_dv, policy=policy)
    T.gemm(ds_cast, Q_s, acc_dk, policy=policy)


@T.macro
def dkv_tile_start(Kt, Vt, K_s, V_s, acc_dk, acc_dv, i_b, i_h, kt, BN):
    """A dK/dV program's key tile [kt, kt+BN) into shared memory, its accumulators cleared."""
    T.copy(Kt[i_b, kt:kt + BN, i_h, :], K_s)
    T.copy(Vt[i_b, kt:kt + BN, i_h, :], V_s)
    T.clear(acc_dk)
    T.clear(acc_dv)


def dkv_key_tile(QOffsets, KOffsets, KSeq, kt, Tk, BN: int, KS: int, KC: int):
    """Where key tile [kt, kt+BN) sits among the queries: (its last key k_last, the first query that
    sees key kt, the position k_last ends at). The last query that sees the tile is q_last_key +
    min(W, end of k_last's sequence - q_last_key) - 1: overflow-free, the window is clipped to what
    is left of the sequence before it is added."""
    k_last = T.min(kt + BN - 1, Tk - 1)
    q_lo = QOffsets[KSeq[kt]] + (kt - KOffsets[KSeq[kt]]) * KS + KC
    return k_last, q_lo, QOffsets[KSeq[k_last]] + (k_last - KOffsets[KSeq[k_last]]) * KS + KC


def _dkv_policy(threads: int, BN: int):
    rows_only = threads // 32 <= BN // 16  # see selected.selected_bwd_dkv
    return rows_only, (T.GemmWarpPolicy.FullRow if rows_only else T.GemmWarpPolicy.Square)


@tilelang.jit(pass_configs=PASS_CONFIGS)
def banded_bwd_dkv(H: int, G: int, K: int, V: int, W: int, KS: int, KC: int, dtype: str, scale: float,
                   BM: int = 4, M: int = 64, BN: int = 64, threads: int = 128, num_stages: int = 1):
    """Kernel(Q, K, V, dOG, Gate, LSE, Delta, QOffsets, QSeq, KOffsets, KSeq, dK, dV).

    One program per (key tile of BN keys, batch·kv head). The queries that can see the tile run
    from the first key's position to the last key's position + W - 1 (capped at its sequence's
    end), walked BM tokens at a time (dkv_query_step). Each program owns its rows: no atomics.
    """
    B, Tq, Tk, N1 = T.dynamic("B, Tq, Tk, N1")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    rows_only, policy = _dkv_policy(threads, BN)

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tq, HQ, K], dtype),
        Kt: T.Tensor([B, Tk, H, K], dtype),
        Vt: T.Tensor([B, Tk, H, V], dtype),
        dO: T.Tensor([B, Tq, HQ, V], dtype),
        Gate: T.Tensor([B, Tq, HQ], dtype),
        LSE: T.Tensor([B, Tq, HQ], acc),
        Delta: T.Tensor([B, Tq, HQ], acc),
        QOffsets: T.Tensor([N1], "int32"),
        QSeq: T.Tensor([Tq], "int32"),
        KOffsets: T.Tensor([N1], "int32"),
        KSeq: T.Tensor([Tk], "int32"),
        dK: T.Tensor([B, Tk, H, K], dtype),
        dV: T.Tensor([B, Tk, H, V], dtype),
    ):
        with T.Kernel(T.ceildiv(Tk, BN), B * H, threads=threads) as (i_n, i_bh):
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            Q_s = T.alloc_shared([M, K], dtype)
            dO_s = T.alloc_shared([M, V], dtype)
            lse_s = T.alloc_shared([M], acc)
            delta_s = T.alloc_shared([M], acc)
            gate_s = T.alloc_shared([M], acc)
            tpos_s = T.alloc_shared([M], "int32")
            kbos_s = T.alloc_shared([M], "int32")
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
            kt = i_n * BN
            k_last, q_lo, q_last_key = dkv_key_tile(QOffsets, KOffsets, KSeq, kt, Tk, BN, KS, KC)
            q_hi = q_last_key + T.min(W, QOffsets[KSeq[k_last] + 1] - q_last_key) - 1
            dkv_tile_start(Kt, Vt, K_s, V_s, acc_dk, acc_dv, i_b, i_h, kt, BN)

            for it in pipelined(T.ceildiv(T.max(q_hi - q_lo + 1, 0), BM), num_stages, 3, 12):
                dkv_query_step(Q, dO, LSE, Delta, Gate, QOffsets, QSeq, KOffsets, K_s, V_s, Q_s, dO_s, lse_s,
                               delta_s, gate_s, tpos_s, kbos_s, acc_st, acc_dpt, p_cast, ds_cast, acc_dk, acc_dv,
                               i_b, i_h, kt, q_lo + it * BM, Tq, Tk, G, BM, M, BN, W, KS, KC, sc, policy)

            for i, d in T.Parallel(BN, K):
                acc_dk[i, d] = acc_dk[i, d] * scale
            T.copy(acc_dk, dK_s)
            T.copy(acc_dv, dV_s)
            for i, d in T.Parallel(BN, K):
                if kt + i < Tk:
                    dK[i_b, kt + i, i_h, d] = dK_s[i, d]
            for i, d in T.Parallel(BN, V):
                if kt + i < Tk:
                    dV[i_b, kt + i, i_h, d] = dV_s[i, d]

    return main


@tilelang.jit(pass_configs=PASS_CONFIGS)
def banded_bwd_dkv_split(H: int, G: int, K: int, V: int, W: int, KS: int, KC: int, dtype: str, scale: float,
                         BM: int = 4, M: int = 64, BN: int = 64, threads: int = 128, num_stages: int = 1):
    """Kernel(Q, K, V, dOG, Gate, LSE, Delta, QOffsets, QSeq, KOffsets, KSeq, Split, dKacc, dVacc).

    banded_bwd_dkv with each key tile's query range dealt out over NS = len(Split) programs (query
    tiles it ≡ program mod NS), adding into fp32 dKacc/dVacc `[B, Tk, H, K|V]` (zeroed by the host)
    with atomics. For the compressed branch: its T/d keys make only T/(d·BN) key tiles per head,
    each seen by every later query, so one program per key tile leaves the GPU idle (measured: at
    8k, l = d = 64, 8 programs); partial sums per split would need NS·Tk·H·(K+V) fp32 of memory
    where the atomics need one copy. Run-to-run results can differ in the last fp32 bits.
    """
    B, Tq, Tk, N1, NS = T.dynamic("B, Tq, Tk, N1, NS")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    rows_only, policy = _dkv_policy(threads, BN)

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tq, HQ, K], dtype),
        Kt: T.Tensor([B, Tk, H, K], dtype),
        Vt: T.Tensor([B, Tk, H, V], dtype),
        dO: T.Tensor([B, Tq, HQ, V], dtype),
        Gate: T.Tensor([B, Tq, HQ], dtype),
        LSE: T.Tensor([B, Tq, HQ], acc),
        Delta: T.Tensor([B, Tq, HQ], acc),
        QOffsets: T.Tensor([N1], "int32"),
        QSeq: T.Tensor([Tq], "int32"),
        KOffsets: T.Tensor([N1], "int32"),
        KSeq: T.Tensor([Tk], "int32"),
        Split: T.Tensor([NS], "int32"),
        dKacc: T.Tensor([B, Tk, H, K], acc),
        dVacc: T.Tensor([B, Tk, H, V], acc),
    ):
        with T.Kernel(T.ceildiv(Tk, BN), B * H, NS, threads=threads) as (i_n, i_bh, i_s):
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            Q_s = T.alloc_shared([M, K], dtype)
            dO_s = T.alloc_shared([M, V], dtype)
            lse_s = T.alloc_shared([M], acc)
            delta_s = T.alloc_shared([M], acc)
            gate_s = T.alloc_shared([M], acc)
            tpos_s = T.alloc_shared([M], "int32")
            kbos_s = T.alloc_shared([M], "int32")
            acc_st = T.alloc_fragment([BN, M], acc)
            acc_dpt = T.alloc_fragment([BN, M], acc)
            p_cast = T.alloc_fragment([BN, M], dtype) if rows_only else T.alloc_shared([BN, M], dtype)
            ds_cast = T.alloc_fragment([BN, M], dtype) if rows_only else T.alloc_shared([BN, M], dtype)
            acc_dk = T.alloc_fragment([BN, K], acc)
            acc_dv = T.alloc_fragment([BN, V], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            kt = i_n * BN
            k_last, q_lo, q_last_key = dkv_key_tile(QOffsets, KOffsets, KSeq, kt, Tk, BN, KS, KC)
            q_hi = q_last_key + T.min(W, QOffsets[KSeq[k_last] + 1] - q_last_key) - 1
            n_q = T.ceildiv(T.max(q_hi - q_lo + 1, 0), BM)
            dkv_tile_start(Kt, Vt, K_s, V_s, acc_dk, acc_dv, i_b, i_h, kt, BN)

            for it in pipelined(T.ceildiv(T.max(n_q - i_s, 0), NS), num_stages, 3, 12):
                dkv_query_step(Q, dO, LSE, Delta, Gate, QOffsets, QSeq, KOffsets, K_s, V_s, Q_s, dO_s, lse_s,
                               delta_s, gate_s, tpos_s, kbos_s, acc_st, acc_dpt, p_cast, ds_cast, acc_dk, acc_dv,
                               i_b, i_h, kt, q_lo + (i_s + it * NS) * BM, Tq, Tk, G, BM, M, BN, W, KS, KC, sc,
                               policy)

            if i_s < n_q:
                for i, d in T.Parallel(BN, K):
                    if kt + i < Tk:
                        T.atomic_add(dKacc[i_b, kt + i, i_h, d], acc_dk[i, d] * scale)
                for i, d in T.Parallel(BN, V):
                    if kt + i < Tk:
                        T.atomic_add(dVacc[i_b, kt + i, i_h, d], acc_dv[i, d])

    return main


def splits_query_range(W: int) -> bool:
    """Without a window (compressed branch, or W past any sequence) a key tile is seen by every later
    query: its dK/dV work is split over programs (banded_bwd_dkv_split)."""
    return W >= W_CAP


def banded_kernels(H: int, G: int, K: int, V: int, W: int, KS: int, KC: int, dtype: str, scale: float,
                   o_dtype: str = ""):
    """The three kernels one shape family needs (forward, dQ, dK/dV), compiled or taken from the cache."""
    cfg = pick_config(G, K, V)
    dkv = banded_bwd_dkv_split if splits_query_range(W) else banded_bwd_dkv
    extra = dict(o_dtype=o_dtype) if o_dtype else {}
    return (banded_fwd(H, G, K, V, W, KS, KC, dtype, scale, **cfg, **extra),
            banded_bwd_dq(H, G, K, V, W, KS, KC, dtype, scale, **pick_dq_config(G, K, V), **extra),
            dkv(H, G, K, V, W, KS, KC, dtype, scale, **pick_dkv_config(G, K, V)))


def sliding_kernels(H: int, G: int, K: int, V: int, W: int, dtype: str, scale: float, o_dtype: str = ""):
    """The sliding window's kernels: keys are the tokens (KS = 1, KC = 0)."""
    return banded_kernels(H, G, K, V, min(W, W_CAP), 1, 0, dtype, scale, o_dtype)
