"""Selection-block scores and the top-n selection of NSA (paper Eqs. 8–12), recomputed from q·k_cmp.

For token t and kv head h: p_cmp[g, i] = exp2(q_g·k_i·sc − LSE_g) over the compressed keys i it sees
(i·d + l − 1 <= t; LSE from the compressed attention's forward), then
    score[j] = Σ_g Σ_i p_cmp[g, i] · overlap(i, j) / d
where overlap(i, j) is the number of tokens compressed block i (tokens i·d … i·d+l−1) shares with
selection block j (tokens j·l' … j·l'+l'−1) (Eq. 9), summed over the G heads of the group (Eq. 10).
The [T, T/d] probabilities never leave the chip: a program (BM tokens of one sequence × one kv
head) walks the selection blocks JT at a time (chunk_scores), loading the BN compressed keys that
overlap them. block_topn keeps each token's top n as it goes and writes only the chosen ids
`[B, T, H, n]`; block_scores writes every block's masked score `[B, T, H, NS]` (fp32: +inf for
block 0 and the two local blocks, -inf for blocks after the token's).

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


# what block_topn may use of an SM's 227 KB of shared memory, with room for TileLang's own
TOPN_SMEM = 200 * 1024


def topn_smem(G: int, K: int, l: int, d: int, l_sel: int, n: int) -> int:
    """Bytes of shared memory block_topn allocates (its score tiles plus two candidate lists and
    the kept top n per token, 8 bytes an entry): past TOPN_SMEM the launcher ranks a score matrix
    instead (a large n with G = 1, whose tiles hold 64 tokens)."""
    c = pick_config(G, K, l, d, l_sel)
    BM, M, BN, JT = c["BM"], c["M"], c["BN"], c["JT"]
    tiles = M * K * 2 + BN * K * 2 + M * BN * 4 + BM * BN * 4 + M * 4 + BM * JT * 4
    return tiles + BM * (2 * n + JT) * 8


@T.macro
def load_tile(Q, LSE, Q_s, lse_s, i_b, i_h, t0, n_tok, Tq, G: int, M: int):
    """Q_s `[M, K]` and lse_s `[M]` of the tile's n_tok tokens × G heads (zero / +inf past them)."""
    for r, dd in T.Parallel(M, Q_s.shape[1]):
        Q_s[r, dd] = T.if_then_else(r < n_tok * G, Q[i_b, t0 + r // G, i_h * G + r % G, dd], 0)
    for r in T.Parallel(M):
        lse_s[r] = T.if_then_else(r < n_tok * G, LSE[i_b, T.min(t0 + r // G, Tq - 1), i_h * G + r % G],
                                  T.infinity("float32"))


@T.macro
def chunk_scores(Kc, Q_s, K_s, P_s, Pg_s, S_s, acc_s, lse_s, racc, tx, i_b, i_h, kbos, n_keys, t0, bos, n_tok, jt,
                 G: int, BM: int, M: int, BN: int, JT: int, l: int, d: int, l_sel: int, sc: float, threads: int):
    """S_s `[BM, JT]` <- the Eq. 9–10 scores of selection blocks jt·JT … jt·JT+JT-1 for the tile's
    tokens (unmasked; 0 where a token sees none of a block's keys).

    The step's compressed keys i0 … i0+BN-1 (i0 < 0 and keys past the stream are masked; rows outside
    the tensor read as zero) give p_cmp = exp2(q·k·sc − LSE) in P_s `[M, BN]`; the G heads of a
    token are summed first (Pg_s `[BM, BN]`), then each block takes the keys overlapping it,
    weighted by the overlap w / d (Eq. 9)."""
    NKJ = (l_sel + l - d) // d  # compressed keys overlapping one selection block
    first_key = (l - d) // d  # key i0 of a step with first block j0 is j0·l'/d − first_key
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
    for e in T.serial(T.ceildiv(BM * BN, threads)):
        bt = (e * threads + tx) // BN
        c = (e * threads + tx) % BN
        if bt < BM:
            racc[0] = 0
            for g in T.serial(G):
                racc[0] += P_s[bt * G + g, c]
            Pg_s[bt, c] = racc[0]
    T.sync_threads()
    for e in T.serial(T.ceildiv(BM * JT, threads)):
        bt = (e * threads + tx) // JT
        jj = (e * threads + tx) % JT
        if bt < BM:
            racc[0] = 0
            for kk in T.serial(NKJ):
                # key i overlaps block j by w tokens (Eq. 9's weight is w / d)
                i = (jt * JT + jj) * (l_sel // d) - first_key + kk
                w = T.max(T.min(i * d + l, (jt * JT + jj + 1) * l_sel) - T.max(i * d, (jt * JT + jj) * l_sel), 0)
                racc[0] += Pg_s[bt, i - i0] * (T.cast(w, "float32") / d)
            S_s[bt, jj] = racc[0]
    T.sync_threads()


def masked_score(score, j, cur):
    """The selection rule on block j's score for a token in block cur: blocks after the token's own
    can't be chosen (-inf), block 0 and the two local ones must be (+inf)."""
    return T.if_then_else(j > cur, -T.infinity("float32"),
                          T.if_then_else(T.Or(T.Or(j == 0, j == cur), j == cur - 1), T.infinity("float32"), score))


@tilelang.jit(pass_configs=PASS_CONFIGS)
def block_scores(H: int, G: int, K: int, l: int, d: int, l_sel: int, dtype: str, scale: float,
                 BM: int = 4, M: int = 64, BN: int = 80, JT: int = 16, threads: int = 128):
    """Kernel(Q, Kc, LSE, TileStart, QOffsets, QSeq, KOffsets, Scores): the masked scores of every
    selection block (block_topn chooses from them on chip; this one is kept for tests and tools)."""
    B, Tq, Tk, N1, NT, NS = T.dynamic("B, Tq, Tk, N1, NT, NS")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"

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
            Pg_s = T.alloc_shared([BM, BN], acc)
            lse_s = T.alloc_shared([M], acc)
            S_s = T.alloc_shared([BM, JT], acc)
            acc_s = T.alloc_fragment([M, BN], acc)
            racc = T.alloc_local([1], acc)
            tx = T.get_thread_binding()

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
            load_tile(Q, LSE, Q_s, lse_s, i_b, i_h, t0, n_tok, Tq, G, M)

            # selection blocks visible to the last token: 0 … t_last // l'
            for jt in T.serial(T.ceildiv(t_last // l_sel + 1, JT)):
                chunk_scores(Kc, Q_s, K_s, P_s, Pg_s, S_s, acc_s, lse_s, racc, tx, i_b, i_h, kbos, n_keys, t0, bos,
                             n_tok, jt, G, BM, M, BN, JT, l, d, l_sel, sc, threads)
                for bt, jj in T.Parallel(BM, JT):
                    j = jt * JT + jj
                    cur = (t0 + bt - bos) // l_sel  # the token's own block
                    if bt < n_tok and j < NS:
                        Scores[i_b, t0 + bt, i_h, j] = masked_score(S_s[bt, jj], j, cur)

    return main


def beats(v_a, i_a, v_b, i_b):
    """The selection order: a higher score first, the lower block id among equal scores."""
    return T.Or(v_a > v_b, T.And(v_a == v_b, i_a < i_b))


@tilelang.jit(pass_configs=PASS_CONFIGS)
def block_topn(H: int, G: int, K: int, l: int, d: int, l_sel: int, n: int, dtype: str, scale: float,
               BM: int = 4, M: int = 64, BN: int = 80, JT: int = 16, threads: int = 128):
    """Kernel(Q, Kc, LSE, TileStart, QOffsets, QSeq, KOffsets, Ids): the top-n selection on chip.

    Ids `[B, Tq, H, n]` int32: block 0 and the two local blocks, then the highest scores among the
    blocks starting at or before the token, ties toward the lower id; ascending, -1 padding when a
    token sees fewer than n blocks (= reference.select_blocks on block_scores' scores). Each token
    keeps a running top n in shared memory: after every chunk of JT blocks the n kept and the JT new
    candidates are ranked against each other (a candidate's rank is how many of the n + JT beat it
    in the (score, -id) order: distinct, since ids are) and the first n stay. No score matrix."""
    B, Tq, Tk, N1, NT = T.dynamic("B, Tq, Tk, N1, NT")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    C = n + JT  # candidates per merge
    NONE = 2147483647  # id of an empty slot (its score is -inf: it loses to every real block)

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tq, HQ, K], dtype),
        Kc: T.Tensor([B, Tk, H, K], dtype),
        LSE: T.Tensor([B, Tq, HQ], acc),
        TileStart: T.Tensor([NT], "int32"),
        QOffsets: T.Tensor([N1], "int32"),
        QSeq: T.Tensor([Tq], "int32"),
        KOffsets: T.Tensor([N1], "int32"),
        Ids: T.Tensor([B, Tq, H, n], "int32"),
    ):
        with T.Kernel(NT, B * H, threads=threads) as (i_m, i_bh):
            Q_s = T.alloc_shared([M, K], dtype)
            K_s = T.alloc_shared([BN, K], dtype)
            P_s = T.alloc_shared([M, BN], acc)
            Pg_s = T.alloc_shared([BM, BN], acc)
            lse_s = T.alloc_shared([M], acc)
            S_s = T.alloc_shared([BM, JT], acc)
            cand_v = T.alloc_shared([BM, C], acc)
            cand_i = T.alloc_shared([BM, C], "int32")
            top_v = T.alloc_shared([BM, n], acc)
            top_i = T.alloc_shared([BM, n], "int32")
            acc_s = T.alloc_fragment([M, BN], acc)
            racc = T.alloc_local([1], acc)
            tx = T.get_thread_binding()

            i_b = i_bh // H
            i_h = i_bh % H
            t0 = TileStart[i_m]
            sq = QSeq[t0]
            bos = QOffsets[sq]
            eos = QOffsets[sq + 1]
            kbos = KOffsets[sq]
            n_keys = KOffsets[sq + 1] - kbos
            n_tok = T.min(BM, eos - t0)  # tokens of this tile (all in sequence sq)
            t_last = t0 + n_tok - 1 - bos  # position of the tile's last token
            load_tile(Q, LSE, Q_s, lse_s, i_b, i_h, t0, n_tok, Tq, G, M)
            rank = T.alloc_local([1], "int32")
            for bt, c in T.Parallel(BM, n):
                top_v[bt, c] = -T.infinity(acc)
                top_i[bt, c] = NONE

            for jt in T.serial(T.ceildiv(t_last // l_sel + 1, JT)):
                chunk_scores(Kc, Q_s, K_s, P_s, Pg_s, S_s, acc_s, lse_s, racc, tx, i_b, i_h, kbos, n_keys, t0, bos,
                             n_tok, jt, G, BM, M, BN, JT, l, d, l_sel, sc, threads)
                for e in T.serial(T.ceildiv(BM * C, threads)):
                    bt = (e * threads + tx) // C
                    c = (e * threads + tx) % C
                    j = jt * JT + c - n
                    cur = (t0 + bt - bos) // l_sel  # the token's own block
                    if bt < BM:
                        if c < n:
                            cand_v[bt, c] = top_v[bt, c]
                            cand_i[bt, c] = top_i[bt, c]
                        else:
                            cand_v[bt, c] = masked_score(S_s[bt, c - n], j, cur)
                            cand_i[bt, c] = j
                T.sync_threads()
                for e in T.serial(T.ceildiv(BM * C, threads)):
                    bt = (e * threads + tx) // C
                    c = (e * threads + tx) % C
                    if bt < BM:
                        rank[0] = 0
                        for o in T.serial(C):
                            rank[0] += T.if_then_else(
                                beats(cand_v[bt, o], cand_i[bt, o], cand_v[bt, c], cand_i[bt, c]), 1, 0)
                        if rank[0] < n:
                            top_v[bt, rank[0]] = cand_v[bt, c]
                            top_i[bt, rank[0]] = cand_i[bt, c]
                T.sync_threads()

            # the kept blocks in ascending id order, then -1 for slots that hold no visible block
            for e in T.serial(T.ceildiv(BM * n, threads)):
                bt = (e * threads + tx) // n
                c = (e * threads + tx) % n
                if bt < n_tok:
                    rank[0] = 0
                    mine = T.if_then_else(top_v[bt, c] > -T.infinity(acc), top_i[bt, c], NONE)
                    for o in T.serial(n):
                        other = T.if_then_else(top_v[bt, o] > -T.infinity(acc), top_i[bt, o], NONE)
                        rank[0] += T.if_then_else(other < mine or (other == mine and o < c), 1, 0)
                    Ids[i_b, t0 + bt, i_h, rank[0]] = T.if_then_else(mine == NONE, -1, mine)

    return main
