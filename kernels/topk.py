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


def pick_config(G: int, K: int, l: int, d: int, l_sel: int, JT: int = 0) -> dict:
    """BM·G = 64 query rows (4 warps of 16, FullRow); JT selection blocks per step so that their
    compressed keys are about 64: JT·l'/d of them plus the (l − d)/d reaching in from the left,
    padded to 16 (BN). JT > 0 overrides the step (benchmarks/profile_topn.py: fewer, larger steps)."""
    BM = max(1, 64 // G)
    M = pad16(BM * G)
    JT = JT or max(1, 64 * d // l_sel)
    BN = pad16((JT * l_sel + l - d) // d)
    return dict(BM=BM, M=M, BN=BN, JT=JT, threads=32 * (M // 16))


# block_topn's merges: "rank" ranks the n kept and the JT new candidates of a step against each other
# in shared memory (block barriers around it); "warp" keeps each token's top n in the registers of one
# warp, lets in only the new candidates that beat the n-th kept, and ranks those with shuffles
WARP_KEPT_REGS = 64  # registers a lane may spend on its tokens' kept lists (value + id) in "warp"


def warp_layout(BM: int, threads: int, n: int, JT: int) -> tuple:
    """(tokens per warp, kept entries per lane per token, new candidates per lane) of the warp merge:
    token bt belongs to warp bt % warps; entry p of its list to lane p % 32, register p // 32."""
    return -(-BM // (threads // 32)), -(-n // 32), -(-JT // 32)


def pick_topn_config(G: int, K: int, l: int, d: int, l_sel: int, n: int, merge: str = "warp", JT: int = 0,
                     q_regs: bool = False) -> dict:
    """pick_config plus block_topn's merge ("warp", the default, where its kept lists fit
    WARP_KEPT_REGS registers a lane, else "rank"; H200, paper config, 64k: 15.0 ms against the rank
    merge's 28.6) and, for "warp", whether Q stays in registers."""
    c = pick_config(G, K, l, d, l_sel, JT)
    if merge == "warp":
        tpw, R, _ = warp_layout(c["BM"], c["threads"], n, c["JT"])
        merge = "warp" if 2 * tpw * R <= WARP_KEPT_REGS else "rank"
    return dict(c, merge=merge, q_regs=q_regs and merge == "warp")


# what block_topn may use of an SM's 227 KB of shared memory, with room for TileLang's own
TOPN_SMEM = 200 * 1024


def topn_smem(G: int, K: int, l: int, d: int, l_sel: int, n: int, merge: str = "rank", JT: int = 0) -> int:
    """Bytes of shared memory block_topn allocates (its score tiles plus, for the "rank" merge, two
    candidate lists and the kept top n per token, 8 bytes an entry): past TOPN_SMEM the launcher
    ranks a score matrix instead (a large n with G = 1, whose tiles hold 64 tokens)."""
    c = pick_topn_config(G, K, l, d, l_sel, n, merge=merge, JT=JT)
    BM, M, BN, JT = c["BM"], c["M"], c["BN"], c["JT"]
    if c["merge"] == "warp":
        return M * K * 2 + BN * K * 2 + M * p_stride(BN, "warp") * 4 + BM * BN * 4 + M * 4
    tiles = M * K * 2 + BN * K * 2 + M * BN * 4 + BM * BN * 4 + M * 4 + BM * JT * 4
    return tiles + BM * (2 * n + JT) * 8


def p_stride(BN: int, merge: str) -> int:
    """Row stride of the probability tile P_s. The accumulator fragment stores it as column pairs of 8
    rows per instruction; with BN a multiple of 16 rows r and r + 2 share banks (4-way conflicts for
    the "rank" merge's 4-byte stores). The "warp" merge stores pairs (8 bytes: a half-warp's 4 rows at
    a time), conflict-free when the stride is 8 or 24 words modulo 32: BN + 8. "rank" keeps its
    stride (its code stays as measured)."""
    return BN + 8 if merge == "warp" else BN


@T.macro
def tile_span(TileStart, QOffsets, QSeq, KOffsets, i_m, BM: int):
    """(t0, bos, kbos, n_keys, n_tok, t_last) of query tile i_m: its first row, its sequence's first
    row and first compressed key, that sequence's key count, the tile's tokens (all in one sequence)
    and the position of its last token."""
    t0 = TileStart[i_m]
    sq = QSeq[t0]
    bos = QOffsets[sq]
    eos = QOffsets[sq + 1]
    kbos = KOffsets[sq]
    n_keys = KOffsets[sq + 1] - kbos
    n_tok = T.min(BM, eos - t0)
    return t0, bos, kbos, n_keys, n_tok, t0 + n_tok - 1 - bos


@T.macro
def load_tile(Q, LSE, Q_s, lse_s, i_b, i_h, t0, n_tok, Tq, G: int, M: int):
    """Q_s `[M, K]` and lse_s `[M]` of the tile's n_tok tokens × G heads (zero / +inf past them)."""
    for r, dd in T.Parallel(M, Q_s.shape[1]):
        Q_s[r, dd] = T.if_then_else(r < n_tok * G, Q[i_b, t0 + r // G, i_h * G + r % G, dd], 0)
    for r in T.Parallel(M):
        lse_s[r] = T.if_then_else(r < n_tok * G, LSE[i_b, T.min(t0 + r // G, Tq - 1), i_h * G + r % G],
                                  T.infinity("float32"))


def first_key(jt, JT: int, l: int, d: int, l_sel: int):
    """Compressed key i0 of step jt's first column: block j0 = jt·JT starts at key j0·l'/d, and the
    (l − d)/d keys before it reach into it."""
    return jt * JT * (l_sel // d) - (l - d) // d


@T.macro
def overlap_score(Pg_s, racc, bt, jj, jt, i0, JT: int, l: int, d: int, l_sel: int):
    """racc[0] <- the Eq. 9 score of block jt·JT + jj for token bt: the head-summed probabilities
    Pg_s `[BM, BN]` of the (l' + l − d)/d keys overlapping it, key i weighted by its overlap w / d."""
    NKJ = (l_sel + l - d) // d
    racc[0] = 0
    for kk in T.serial(NKJ):
        # key i overlaps block j by w tokens (Eq. 9's weight is w / d)
        i = (jt * JT + jj) * (l_sel // d) - (l - d) // d + kk
        w = T.max(T.min(i * d + l, (jt * JT + jj + 1) * l_sel) - T.max(i * d, (jt * JT + jj) * l_sel), 0)
        racc[0] += Pg_s[bt, i - i0] * (T.cast(w, "float32") / d)


@T.macro
def chunk_scores(Kc, Q_s, K_s, P_s, Pg_s, S_s, acc_s, lse_s, racc, tx, i_b, i_h, kbos, n_keys, t0, bos, n_tok, jt,
                 G: int, BM: int, M: int, BN: int, JT: int, l: int, d: int, l_sel: int, sc: float, threads: int,
                 with_s: bool):
    """S_s `[BM, JT]` <- the Eq. 9–10 scores of selection blocks jt·JT … jt·JT+JT-1 for the tile's
    tokens (unmasked; 0 where a token sees none of a block's keys).

    The step's compressed keys i0 … i0+BN-1 (i0 < 0 and keys past the stream are masked; rows outside
    the tensor read as zero) give p_cmp = exp2(q·k·sc − LSE) in P_s `[M, ≥ BN]`; the G heads of a
    token are summed first (Pg_s `[BM, BN]`), then each block takes the keys overlapping it
    (overlap_score). with_s False stops at Pg_s (block_topn's warp merge scores its blocks itself)."""
    i0 = first_key(jt, JT, l, d, l_sel)
    T.copy(Kc[i_b, kbos + i0:kbos + i0 + BN, i_h, :], K_s)
    T.clear(acc_s)
    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
    if with_s:
        for r, c in T.Parallel(M, BN):
            i = i0 + c
            t = t0 + r // G - bos
            ok = i >= 0 and i < n_keys and i * d + l - 1 <= t and r < n_tok * G
            P_s[r, c] = T.if_then_else(ok, T.exp2(acc_s[r, c] * sc - lse_s[r]), 0)
    else:
        # the same values, formed in the accumulator (LSE from registers) and stored as one vectorized copy
        for r, c in T.Parallel(M, BN):
            i = i0 + c
            t = t0 + r // G - bos
            ok = i >= 0 and i < n_keys and i * d + l - 1 <= t and r < n_tok * G
            acc_s[r, c] = T.if_then_else(ok, T.exp2(acc_s[r, c] * sc - lse_s[r]), 0)
        T.copy(acc_s, P_s[0:M, 0:BN])
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
    if with_s:
        for e in T.serial(T.ceildiv(BM * JT, threads)):
            bt = (e * threads + tx) // JT
            jj = (e * threads + tx) % JT
            if bt < BM:
                overlap_score(Pg_s, racc, bt, jj, jt, i0, JT, l, d, l_sel)
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
                             n_tok, jt, G, BM, M, BN, JT, l, d, l_sel, sc, threads, True)
                for bt, jj in T.Parallel(BM, JT):
                    j = jt * JT + jj
                    cur = (t0 + bt - bos) // l_sel  # the token's own block
                    if bt < n_tok and j < NS:
                        Scores[i_b, t0 + bt, i_h, j] = masked_score(S_s[bt, jj], j, cur)

    return main


NONE = 2147483647  # id of an empty slot (its score is -inf: it loses to every real block)


def any_set(masks, RJ: int):
    """Whether any of the RJ ballot masks has a lane set."""
    m = masks[0]
    for r in range(1, RJ):
        m = m | masks[r]
    return m != T.cast(0, "uint32")


def beats(v_a, i_a, v_b, i_b):
    """The selection order: a higher score first, the lower block id among equal scores."""
    return T.Or(v_a > v_b, T.And(v_a == v_b, i_a < i_b))


@tilelang.jit(pass_configs=PASS_CONFIGS)
def block_topn(H: int, G: int, K: int, l: int, d: int, l_sel: int, n: int, dtype: str, scale: float,
               BM: int = 4, M: int = 64, BN: int = 80, JT: int = 16, threads: int = 128, merge: str = "rank",
               q_regs: bool = False):
    """Kernel(Q, Kc, LSE, TileStart, QOffsets, QSeq, KOffsets, Ids): the top-n selection on chip.

    Ids `[B, Tq, H, n]` int32: block 0 and the two local blocks, then the highest scores among the
    blocks starting at or before the token, ties toward the lower id; ascending, -1 padding when a
    token sees fewer than n blocks (= reference.select_blocks on block_scores' scores). Each token
    keeps a running top n in shared memory: after every chunk of JT blocks the n kept and the JT new
    candidates are ranked against each other (a candidate's rank is how many of the n + JT beat it
    in the (score, -id) order: distinct, since ids are) and the first n stay. No score matrix.

    merge "warp" (same ids; pick_topn_config says where it fits): one warp per token keeps its top n
    sorted in registers; a step's blocks are scored by the lanes that merge them, only candidates
    beating the n-th kept enter, ranked with shuffles: no block barrier and no shared memory in the
    merge (topn_warp). q_regs (warp merge only): the tile's Q stays in registers for every step's MMA
    (wgmma with A from registers) instead of being read from shared memory each step."""
    if merge == "warp":
        return topn_warp(H, G, K, l, d, l_sel, n, dtype, scale, BM, M, BN, JT, threads, q_regs)
    if merge != "rank" or q_regs:
        raise ValueError(f"block_topn takes merge 'rank' or 'warp' (q_regs only with 'warp'), got {merge!r}, {q_regs}")
    return topn_rank(H, G, K, l, d, l_sel, n, dtype, scale, BM, M, BN, JT, threads)


def topn_rank(H: int, G: int, K: int, l: int, d: int, l_sel: int, n: int, dtype: str, scale: float,
              BM: int, M: int, BN: int, JT: int, threads: int):
    """block_topn's "rank" merge (the n + JT candidates of a step ranked in shared memory)."""
    B, Tq, Tk, N1, NT = T.dynamic("B, Tq, Tk, N1, NT")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    C = n + JT  # candidates per merge

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
            t0, bos, kbos, n_keys, n_tok, t_last = tile_span(TileStart, QOffsets, QSeq, KOffsets, i_m, BM)
            load_tile(Q, LSE, Q_s, lse_s, i_b, i_h, t0, n_tok, Tq, G, M)
            rank = T.alloc_local([1], "int32")
            for bt, c in T.Parallel(BM, n):
                top_v[bt, c] = -T.infinity(acc)
                top_i[bt, c] = NONE

            for jt in T.serial(T.ceildiv(t_last // l_sel + 1, JT)):
                chunk_scores(Kc, Q_s, K_s, P_s, Pg_s, S_s, acc_s, lse_s, racc, tx, i_b, i_h, kbos, n_keys, t0, bos,
                             n_tok, jt, G, BM, M, BN, JT, l, d, l_sel, sc, threads, True)
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


def topn_warp(H: int, G: int, K: int, l: int, d: int, l_sel: int, n: int, dtype: str, scale: float,
              BM: int, M: int, BN: int, JT: int, threads: int, q_regs: bool):
    """block_topn's "warp" merge. Token bt of the tile belongs to warp bt % warps (tpw tokens a warp);
    its kept list, sorted in the (score, -id) order, lives in registers: entry p in lane p % 32,
    register p // 32 (R a lane), empty slots (-inf, NONE). A step's block jt·JT + jj is scored by
    lane jj % 32 (overlap_score, the same sum as block_scores) and enters only if it beats the n-th
    kept: any other candidate is beaten by all n. Kept ids are all lower than the step's, so a kept
    entry beats a new one unless its score is strictly lower; an entering candidate's place is the
    number of kept scores >= its own (one ballot) plus the entering candidates beating it; position
    q of the new list is the entering candidate placed at q, or else kept entry q − (entering placed
    before q). Candidates scored -inf (blocks after the token) never enter: slots left empty hold -1
    in the output either way, so the ids equal the "rank" merge's."""
    B, Tq, Tk, N1, NT = T.dynamic("B, Tq, Tk, N1, NT")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    warps = threads // 32
    tpw, R, RJ = warp_layout(BM, threads, n, JT)
    BNP = p_stride(BN, "warp")
    NEG = -T.infinity(acc)
    last_r, last_lane = (n - 1) // 32, (n - 1) % 32  # where the n-th kept entry lives

    def ballot(pred):
        return T.cast(T.ballot_sync(pred), "uint32")

    @T.macro
    def next_entering(bits, src):
        """src[0] <- the lowest lane set in bits[0], which loses it."""
        src[0] = T.cast(T.popcount((bits[0] & (T.cast(0, "uint32") - bits[0])) - T.cast(1, "uint32")), "int32")
        bits[0] = bits[0] ^ (T.cast(1, "uint32") << T.cast(src[0], "uint32"))

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
            P_s = T.alloc_shared([M, BNP], acc)
            Pg_s = T.alloc_shared([BM, BN], acc)
            lse_s = T.alloc_shared([M], acc)
            acc_s = T.alloc_fragment([M, BN], acc)
            Q_f = T.alloc_fragment([M, K], dtype) if q_regs else Q_s  # the MMA's A operand
            racc = T.alloc_local([1], acc)
            kv = T.alloc_local([tpw * R], acc)  # kept scores, sorted (token k's in k·R … k·R+R-1)
            ki = T.alloc_local([tpw * R], "int32")  # their block ids
            cv = T.alloc_local([RJ], acc)  # this lane's new candidates: score, id, entering lanes
            cj = T.alloc_local([RJ], "int32")
            enter = T.alloc_local([RJ], "uint32")
            place = T.alloc_local([RJ], "int32")  # an entering candidate's place in the new list
            nv = T.alloc_local([R], acc)  # the new list being gathered
            ni = T.alloc_local([R], "int32")
            before = T.alloc_local([R], "int32")  # entering candidates placed before q
            thr = T.alloc_local([1], acc)  # the n-th kept: score, id
            thr_i = T.alloc_local([1], "int32")
            bits = T.alloc_local([1], "uint32")
            src = T.alloc_local([1], "int32")
            v2 = T.alloc_local([1], acc)
            j2 = T.alloc_local([1], "int32")
            q2 = T.alloc_local([1], "int32")
            cnt = T.alloc_local([1], "int32")
            rnk = T.alloc_local([1], "int32")
            tx = T.get_thread_binding()
            lane = tx % 32
            warp = tx // 32

            i_b = i_bh // H
            i_h = i_bh % H
            t0, bos, kbos, n_keys, n_tok, t_last = tile_span(TileStart, QOffsets, QSeq, KOffsets, i_m, BM)
            load_tile(Q, LSE, Q_s, lse_s, i_b, i_h, t0, n_tok, Tq, G, M)
            if q_regs:
                T.copy(Q_s, Q_f)
            for e in T.unroll(tpw * R, explicit=True):
                kv[e] = NEG
                ki[e] = NONE

            for jt in T.serial(T.ceildiv(t_last // l_sel + 1, JT)):
                chunk_scores(Kc, Q_f, K_s, P_s, Pg_s, Pg_s, acc_s, lse_s, racc, tx, i_b, i_h, kbos, n_keys, t0, bos,
                             n_tok, jt, G, BM, M, BN, JT, l, d, l_sel, sc, threads, False)
                i0 = first_key(jt, JT, l, d, l_sel)
                for k in T.unroll(tpw, explicit=True):
                    bt = warp + warps * k
                    cur = (t0 + bt - bos) // l_sel  # the token's own block
                    if bt < n_tok:  # the same for the whole warp: shuffles and ballots below are warp-wide
                        for r in T.unroll(RJ, explicit=True):
                            racc[0] = 0
                            if lane + 32 * r < JT:
                                overlap_score(Pg_s, racc, bt, lane + 32 * r, jt, i0, JT, l, d, l_sel)
                            cj[r] = jt * JT + lane + 32 * r
                            cv[r] = T.if_then_else(lane + 32 * r < JT, masked_score(racc[0], cj[r], cur), NEG)
                        thr[0] = T.shfl_sync(kv[k * R + last_r], last_lane)
                        thr_i[0] = T.shfl_sync(ki[k * R + last_r], last_lane)
                        for r in T.unroll(RJ, explicit=True):
                            enter[r] = ballot(T.And(cv[r] > NEG, beats(cv[r], cj[r], thr[0], thr_i[0])))
                        if any_set(enter, RJ):
                            # places of the entering candidates
                            for rr in T.unroll(RJ, explicit=True):
                                place[rr] = 0
                            for rr in T.unroll(RJ, explicit=True):
                                bits[0] = enter[rr]
                                for e2 in T.serial(T.cast(T.popcount(enter[rr]), "int32")):
                                    next_entering(bits, src)
                                    v2[0] = T.shfl_sync(cv[rr], src[0])
                                    j2[0] = T.shfl_sync(cj[rr], src[0])
                                    cnt[0] = 0
                                    for r in T.unroll(R, explicit=True):
                                        cnt[0] += T.cast(T.popcount(ballot(kv[k * R + r] >= v2[0])), "int32")
                                    for r in T.unroll(RJ, explicit=True):
                                        place[r] += T.if_then_else(beats(v2[0], j2[0], cv[r], cj[r]), 1, 0)
                                    if lane == src[0]:
                                        place[rr] += cnt[0]
                            # gather: position q takes the entering candidate placed there, else a kept entry
                            for r in T.unroll(R, explicit=True):
                                before[r] = 0
                                nv[r] = NEG
                                ni[r] = -1
                            for rr in T.unroll(RJ, explicit=True):
                                bits[0] = enter[rr]
                                for e2 in T.serial(T.cast(T.popcount(enter[rr]), "int32")):
                                    next_entering(bits, src)
                                    v2[0] = T.shfl_sync(cv[rr], src[0])
                                    j2[0] = T.shfl_sync(cj[rr], src[0])
                                    q2[0] = T.shfl_sync(place[rr], src[0])
                                    for r in T.unroll(R, explicit=True):
                                        before[r] += T.if_then_else(q2[0] < lane + 32 * r, 1, 0)
                                        if q2[0] == lane + 32 * r:
                                            nv[r] = v2[0]
                                            ni[r] = j2[0]
                            for r in T.unroll(R, explicit=True):
                                # kept entry lane + 32r − before[r]: every register shuffled (all lanes
                                # take part), the right one kept
                                src[0] = lane + 32 * r - before[r]
                                for r2 in T.unroll(R, explicit=True):
                                    v2[0] = T.shfl_sync(kv[k * R + r2], src[0] % 32)
                                    j2[0] = T.shfl_sync(ki[k * R + r2], src[0] % 32)
                                    if ni[r] == -1 and src[0] // 32 == r2:
                                        nv[r] = v2[0]
                                        ni[r] = j2[0]
                            for r in T.unroll(R, explicit=True):
                                kv[k * R + r] = T.if_then_else(lane + 32 * r < n, nv[r], NEG)
                                ki[k * R + r] = T.if_then_else(lane + 32 * r < n, ni[r], NONE)

            # the kept blocks in ascending id order, then -1 for slots that hold no visible block
            for k in T.unroll(tpw, explicit=True):
                bt = warp + warps * k
                if bt < n_tok:
                    for r in T.unroll(R, explicit=True):
                        src[0] = T.if_then_else(kv[k * R + r] > NEG, ki[k * R + r], NONE)  # this lane's entry
                        rnk[0] = 0
                        for r2 in T.unroll(R, explicit=True):
                            for o in T.serial(T.min(32, n - 32 * r2)):
                                j2[0] = T.shfl_sync(T.if_then_else(kv[k * R + r2] > NEG, ki[k * R + r2], NONE), o)
                                rnk[0] += T.if_then_else(
                                    T.Or(j2[0] < src[0], T.And(j2[0] == src[0], 32 * r2 + o < lane + 32 * r)), 1, 0)
                        if lane + 32 * r < n:
                            Ids[i_b, t0 + bt, i_h, rnk[0]] = T.if_then_else(src[0] == NONE, -1, src[0])

    return main
