"""Selection-block scores for NSA's top-n selection (paper Eqs. 8–10), recomputed from q·k_cmp.

For token t and kv head h: p_cmp[g, i] = exp2(q_g·k_i·sc − LSE_g) over the compressed keys i it sees
(i·d + l − 1 <= t; LSE from the compressed attention's forward), then
    score[j] = Σ_g Σ_i p_cmp[g, i] · overlap(i, j) / d
where overlap(i, j) is the number of tokens compressed block i (tokens i·d … i·d+l−1) shares with
selection block j (tokens j·l' … j·l'+l'−1) (Eq. 9), summed over the G heads of the group (Eq. 10).
The [T, T/d] probabilities never leave the chip: a program (BM tokens of one sequence × one kv
head) walks the selection blocks JT at a time, loads the BN compressed keys that overlap them,
and writes Scores `[B, T, H, NS]` (fp32), T/l' per token instead of G·T/d, with the selection's
masks applied: +inf for block 0 and the two local blocks, -inf for blocks after the token's (and,
left as the host filled them, for blocks past the tile's last token). The top-n choice is then a
plain row-wise ranking (nsa_module.topk).

Shapes: Q `[B, Tq, HQ, K]`, Kc `[B, Tk, H, K]`, LSE `[B, Tq, HQ]` (base 2), TileStart `[NT]` (each
query tile's first row; tiles never straddle sequences), QOffsets/KOffsets `[N+1]`, QSeq `[Tq]`.
"""

import tilelang
import tilelang.language as T

from .common import LOG2E, PASS_CONFIGS, pad16


def pick_config(G: int, K: int, l: int, d: int, l_sel: int) -> dict:
    """BM·G = 64 query rows (4 warps of 16, FullRow); JT selection blocks per step so that their
    compressed keys are about 64: JT·l'/d of them plus the (l − d)/d reaching in from the left,
    padded to 16 (BN)."""
    BM = max(1, 64 // G)
    M = pad16(BM * G)
    JT = max(1, 64 * d // l_sel)
    BN = pad16((JT * l_sel + l - d) // d)
    return dict(BM=BM, M=M, BN=BN, JT=JT, threads=32 * (M // 16))


@tilelang.jit(pass_configs=PASS_CONFIGS)
def block_scores(H: int, G: int, K: int, l: int, d: int, l_sel: int, dtype: str, scale: float,
                 BM: int = 4, M: int = 64, BN: int = 80, JT: int = 16, threads: int = 128):
    """Kernel(Q, Kc, LSE, TileStart, QOffsets, QSeq, KOffsets, Scores)."""
    B, Tq, Tk, N1, NT, NS = T.dynamic("B, Tq, Tk, N1, NT, NS")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    NKJ = (l_sel + l - d) // d  # compressed keys overlapping one selection block
    first_key = (l - d) // d  # key i0 of a step with first block j0 is j0·l'/d − first_key

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tq, HQ, K], dtype),
        Kc: T.Tensor([B, Tk, H, K], dtype),
        LSE: T.Tensor([B, Tq, HQ], acc),
        TileStart: T.Tensor([NT], "int32"),
        QOffsets: T.Tensor([N1], "int32"),
        QSeq: T.Tensor([Tq], "int32"),
        KOffsets: T.Tensor([N1], "int32"),
        Scores: T.Tensor([B, Tq, H, NS], acc),
    ):
        with T.Kernel(NT, B * H, threads=threads) as (i_m, i_bh):
            Q_s = T.alloc_shared([M, K], dtype)
            K_s = T.alloc_shared([BN, K], dtype)
            P_s = T.alloc_shared([M, BN], acc)
            lse_s = T.alloc_shared([M], acc)
            S_s = T.alloc_shared([BM, JT], acc)
            acc_s = T.alloc_fragment([M, BN], acc)

            i_b = i_bh // H
            i_h = i_bh % H
            t0 = TileStart[i_m]
            n = QSeq[t0]
            bos = QOffsets[n]
            eos = QOffsets[n + 1]
            kbos = KOffsets[n]
            n_keys = KOffsets[n + 1] - kbos
            n_tok = T.min(BM, eos - t0)  # tokens of this tile (all in sequence n)
            t_last = t0 + n_tok - 1 - bos  # position of the tile's last token

            for r, dd in T.Parallel(M, K):
                Q_s[r, dd] = T.if_then_else(r < n_tok * G, Q[i_b, t0 + r // G, i_h * G + r % G, dd], 0)
            for r in T.Parallel(M):
                lse_s[r] = T.if_then_else(r < n_tok * G, LSE[i_b, T.min(t0 + r // G, Tq - 1), i_h * G + r % G],
                                          T.infinity(acc))

            # selection blocks visible to the last token: 0 … t_last // l'
            for jt in T.serial(T.ceildiv(t_last // l_sel + 1, JT)):
                # the step's keys i0 … i0+BN-1 (i0 < 0 and keys past the stream are masked; rows
                # outside the tensor read as zero)
                i0 = jt * JT * (l_sel // d) - first_key
                T.copy(Kc[i_b, kbos + i0:kbos + i0 + BN, i_h, :], K_s)
                T.clear(acc_s)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for r, c in T.Parallel(M, BN):
                    i = i0 + c
                    t = t0 + r // G - bos
                    ok = i >= 0 and i < n_keys and i * d + l - 1 <= t and r < n_tok * G
                    P_s[r, c] = T.if_then_else(ok, T.exp2(acc_s[r, c] * sc - lse_s[r]), 0)
                # every thread wrote part of P_s; TileLang 0.1.15 only syncs the threads that read it
                T.sync_threads()
                for bt, jj in T.Parallel(BM, JT):
                    S_s[bt, jj] = 0
                    for kk in T.serial(NKJ):
                        # key i overlaps block j by w tokens (Eq. 9's weight is w / d)
                        i = (jt * JT + jj) * (l_sel // d) - first_key + kk
                        w = T.max(T.min(i * d + l, (jt * JT + jj + 1) * l_sel) - T.max(i * d, (jt * JT + jj) * l_sel), 0)
                        for g in T.serial(G):
                            S_s[bt, jj] += P_s[bt * G + g, i - i0] * (T.cast(w, acc) / d)
                for bt, jj in T.Parallel(BM, JT):
                    j = jt * JT + jj
                    cur = (t0 + bt - bos) // l_sel  # the token's own block
                    if bt < n_tok and j < NS:
                        # the selection rule's masks, applied here so the host only ranks: blocks
                        # after the token's own can't be chosen, block 0 and the 2 local ones must be
                        Scores[i_b, t0 + bt, i_h, j] = T.if_then_else(
                            j > cur, -T.infinity(acc),
                            T.if_then_else(j == 0 or j == cur or j == cur - 1, T.infinity(acc), S_s[bt, jj]))

    return main
