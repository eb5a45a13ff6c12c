"""NSA decode: one new query token per sequence over its cache, in three or four launches and no host sync.

A step for N sequences (the new token at position t = Len[n] - 1, already in the caches):

  1. `decode_compressed`  the G query heads of each kv head attend over the compressed stream, its
     tiles split over NS1 programs; each writes a normalized partial (O_part, LSE_part base 2) and
     the raw logits q·k·scale·log2e (Logits), which the selection reuses.
  2. `choose_blocks`      (a macro) the top-n blocks of a (sequence, kv head): the LSE of the G heads
     from the NS1 partials, p_cmp = exp2(logit - LSE) summed over the group, the Eq. 9 block
     scores, then the top n (ties toward the lower id, block 0 and the two local blocks forced):
     by ranking every block against all, inside `decode_sparse` by each of its splits (short
     caches: one launch fewer), or by n rounds of a block-wide argmax in `decode_select` (one
     1024-thread program per kv head, for long caches).
  3. `decode_sparse`      the selected blocks (grid z = 0) and the sliding ring (z = 1, slot by slot:
     softmax ignores order), each split over NS3 programs.
  4. `decode_combine`     per (sequence, query head): the LSE merge of each branch's partials, times
     its gate, summed: O `[N, HQ, V]`.

Every trip count comes from device tensors (Len, NumCmp, WinCount), so a step is CUDA-graph
capturable. Kernels after the first are launched as programmatic dependents (PDL): each may start while its
predecessor finishes, does what needs none of its predecessor's output (indices, the Q rows), and
waits (`T.pdl_sync`) before reading it; each predecessor signals (`T.pdl_trigger`) once a program
has written its results. Partials share one buffer: columns [0, NS1) compressed, then NS3
selected, NS3 sliding.

Shapes: Q `[N, HQ, K]`; compressed stream Kc/Vc `[N, CC, H, K|V]`; raw cache Ks/Vs `[N, CAP, H,
K|V]`; ring Kw/Vw `[N, RW, H, K|V]`; O_part `[N, HQ, NST, V]` and LSE_part `[N, HQ, NST]` fp32.
"""

import tilelang
import tilelang.language as T

from .common import LOG2E, PASS_CONFIGS, normalized, online_softmax_step, pad16, row_lse, softmax_init

# the selection keeps a sequence's block scores in shared memory (inside decode_sparse next to its
# Q rows and one K/V tile, ≤ 64 KB at K = V = 256)
SELECT_SMEM_BYTES = 144 * 1024
MAX_SPLITS = 64  # programs per (sequence, kv head, branch); the merges unroll over this many


def pick_config(G: int) -> dict:
    """M = G rows padded to 16, one warp per 16 rows (FullRow keeps P in registers; with fewer rows
    than warps TileLang would split the columns). Small programs, many of them: the host splits
    the tiles so that the GPU holds several programs per SM."""
    M = pad16(G)
    return dict(M=M, threads=32 * (M // 16))


def select_blocks_max(capacity: int, d: int, l_sel: int) -> int:
    """The selection's compile-time bound on a sequence's selection blocks for a raw cache of
    `capacity` tokens: a power of two (one kernel per doubling of the cache), or 0 if its scores
    would not fit in shared memory."""
    nb = 32
    while nb * l_sel < capacity:
        nb *= 2
    return nb if nb * (l_sel // d + 1) * 4 <= SELECT_SMEM_BYTES else 0


@T.macro
def load_tile(K_s, V_s, Kc, Vc, i_n, i_h, k0, BN):
    """Rows k0 … k0+BN-1 of one sequence's kv head into shared memory as bulk copies (rows past
    the tensor's end read as 0; the caller masks rows that do not exist yet)."""
    T.copy(Kc[i_n, k0:k0 + BN, i_h, :], K_s)
    T.copy(Vc[i_n, k0:k0 + BN, i_h, :], V_s)


@T.macro
def start_rows(Q, Q_s, acc_o, m, l_run, i_n, i_h, G, M, K):
    """The G query heads of kv head i_h as M rows (padding rows 0); an empty running softmax."""
    for g, c in T.Parallel(M, K):
        Q_s[g, c] = T.if_then_else(g < G, Q[i_n, i_h * G + T.min(g, G - 1), c], 0)
    softmax_init(acc_o, m, l_run)


@T.macro
def softmax_pv(acc_s, acc_s_cast, V_s, acc_o, m, m_prev, r, l_run, l_blk, sc, M, BN, V):
    """Fold a masked score tile into the running softmax and add P·V to acc_o."""
    online_softmax_step(acc_s, acc_o, m, m_prev, r, l_run, l_blk, sc, M, BN, V)
    T.copy(acc_s, acc_s_cast)
    T.gemm(acc_s_cast, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)


@T.macro
def write_partial(O_part, LSE_part, acc_o, m, l_run, i_n, i_h, col, G, M, V, sc):
    """The program's normalized output and base-2 LSE (0 and -inf if it saw nothing)."""
    for g, c in T.Parallel(M, V):
        if g < G:
            O_part[i_n, i_h * G + g, col, c] = normalized(acc_o[g, c], l_run[g])
    for g in T.Parallel(M):
        if g < G:
            LSE_part[i_n, i_h * G + g, col] = row_lse(l_run[g], m[g], sc, -T.infinity("float32"))


@tilelang.jit(pass_configs=PASS_CONFIGS)
def decode_compressed(H: int, G: int, K: int, V: int, BN: int, dtype: str, scale: float,
                      M: int = 16, threads: int = 32, async_copy: bool = True):
    """Kernel(Q, Kc, Vc, NumCmp, Split1, Logits, O_part, LSE_part): NS1 = len(Split1) programs per
    (sequence, kv head); program s takes tiles s, s + NS1, … of the NumCmp[n] compressed keys.
    async_copy: the tile loop as a one-stage software pipeline, so a tile's K and V arrive as
    asynchronous bulk copies issued together (else through registers)."""
    N, CC, NS1, NST = T.dynamic("N, CC, NS1, NST")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"

    @T.prim_func
    def main(
        Q: T.Tensor([N, HQ, K], dtype),
        Kc: T.Tensor([N, CC, H, K], dtype),
        Vc: T.Tensor([N, CC, H, V], dtype),
        NumCmp: T.Tensor([N], "int32"),
        Split1: T.Tensor([NS1], "int32"),
        Logits: T.Tensor([N, HQ, CC], acc),
        O_part: T.Tensor([N, HQ, NST, V], acc),
        LSE_part: T.Tensor([N, HQ, NST], acc),
    ):
        with T.Kernel(NS1, N * H, threads=threads) as (i_s, i_nh):
            Q_s = T.alloc_shared([M, K], dtype)
            K_s = T.alloc_shared([BN, K], dtype)
            V_s = T.alloc_shared([BN, V], dtype)
            acc_s = T.alloc_fragment([M, BN], acc)
            acc_s_cast = T.alloc_fragment([M, BN], dtype)
            acc_o = T.alloc_fragment([M, V], acc)
            m = T.alloc_fragment([M], acc)
            m_prev = T.alloc_fragment([M], acc)
            r = T.alloc_fragment([M], acc)
            l_run = T.alloc_fragment([M], acc)  # the softmax sums (l is the compression block here)
            l_blk = T.alloc_fragment([M], acc)

            nk = T.alloc_local([1], "int32")  # in a register (an expression is reloaded at every use)
            i_n = i_nh // H
            i_h = i_nh % H
            nk[0] = T.min(NumCmp[i_n], CC)
            n_keys = nk[0]
            start_rows(Q, Q_s, acc_o, m, l_run, i_n, i_h, G, M, K)

            n_it = T.ceildiv(T.max(T.ceildiv(n_keys, BN) - i_s, 0), NS1)
            for it in (T.Pipelined(n_it, num_stages=1) if async_copy else T.serial(n_it)):
                k0 = (i_s + it * NS1) * BN
                load_tile(K_s, V_s, Kc, Vc, i_n, i_h, k0, BN)
                for g, j in T.Parallel(M, BN):
                    acc_s[g, j] = T.if_then_else(k0 + j < n_keys, 0, -T.infinity(acc))
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for g, j in T.Parallel(M, BN):
                    if g < G and k0 + j < n_keys:
                        Logits[i_n, i_h * G + g, k0 + j] = acc_s[g, j] * sc
                softmax_pv(acc_s, acc_s_cast, V_s, acc_o, m, m_prev, r, l_run, l_blk, sc, M, BN, V)

            write_partial(O_part, LSE_part, acc_o, m, l_run, i_n, i_h, i_s, G, M, V, sc)
            T.pdl_trigger()  # the selection may launch (it waits for this grid before reading)

    return main


LCH = 16  # bound on a thread's split LSEs in flight together


def lse_lanes(G: int, threads: int):
    """The LSE merge's layout: TPH threads a head (a power of two ≤ 32), LT loads each in flight,
    log2(TPH) shuffle levels."""
    tph = 1
    while tph * 2 <= min(32, threads // G):
        tph *= 2
    return tph, min(LCH, max(2, 32 // tph)), tph.bit_length() - 1

KEY_MIN = -(2 ** 31)  # below every float's order key
KEY_NEG_INF = -2139095041  # order key of -inf: a block that cannot be chosen
KEY_POS_INF = 2139095040  # order key of +inf: a forced block
BIG = 2 ** 30  # an id past every block


def order_key(key, j):
    """Block j's score key and id as one int64 ordered as the selection ranks blocks: higher key
    first, then the lower id (unique, so one compare decides)."""
    return T.cast(key, "int64") * (2 ** 32) + (2 ** 31 - 1 - j)


@T.macro
def read_counts(sv, NumCmp, Len, i_n, CC, l_sel, NB_MAX):
    """sv = (compressed keys, the new token's block cur, blocks 0 … cur up to NB_MAX) of sequence
    i_n, held in registers: an expression would be re-read from global memory at every use."""
    sv[0] = T.min(NumCmp[i_n], CC)
    sv[1] = (Len[i_n] - 1) // l_sel
    sv[2] = T.min(sv[1] + 1, NB_MAX)


@T.macro
def merge_head_lse(LSE_part, lse_s, a, b, ev, tx, i_n, i_h, NS1, G, threads, lse_lanes):
    """lse_s `[G]` <- each head's LSE merged from decode_compressed's NS1 partials: TPH threads a
    head, each an online log-sum-exp over its splits (LT loads in flight at a time), merged across
    the group by shuffles."""
    acc = "float32"
    TPH, LT, LOG_TPH = lse_lanes
    HPP = threads // TPH  # heads per pass
    for ps in T.unroll((G + HPP - 1) // HPP):
        g = ps * HPP + tx // TPH
        a[0] = -T.infinity(acc)
        b[0] = 0
        for sb in T.serial(T.ceildiv(NS1, TPH * LT)):
            for u in T.unroll(LT):
                x = LSE_part[i_n, i_h * G + T.min(g, G - 1), T.min((sb * LT + u) * TPH + tx % TPH, NS1 - 1)]
                ev[u] = T.if_then_else((sb * LT + u) * TPH + tx % TPH < NS1, x, -T.infinity(acc))
            ev[LT] = a[0]
            for u in T.unroll(LT):
                ev[LT] = T.max(ev[LT], ev[u])
            b[0] = T.if_then_else(ev[LT] > -T.infinity(acc), b[0] * T.exp2(a[0] - ev[LT]), 0)
            for u in T.unroll(LT):
                b[0] += T.if_then_else(ev[LT] > -T.infinity(acc), T.exp2(ev[u] - ev[LT]), 0)
            a[0] = ev[LT]
        for k in T.unroll(LOG_TPH):
            ev[0] = T.shfl_xor(a[0], TPH >> (k + 1))
            ev[1] = T.shfl_xor(b[0], TPH >> (k + 1))
            ev[2] = T.max(a[0], ev[0])
            b[0] = T.if_then_else(ev[2] > -T.infinity(acc),
                                  b[0] * T.exp2(a[0] - ev[2]) + ev[1] * T.exp2(ev[0] - ev[2]), 0)
            a[0] = ev[2]
        if tx % TPH == 0 and g < G:
            lse_s[g] = T.if_then_else(b[0] > 0, a[0] + T.log2(b[0]), -T.infinity(acc))
    T.sync_threads()


@T.macro
def key_probs(Logits, lse_s, P_s, pu, tx, i_n, i_h, n_keys, CC, G, U, threads):
    """P_s[i] <- Σ_g p_cmp of compressed key i (Eq. 10's sum over the group), from its logits and
    the heads' LSEs; U keys per thread a step."""
    for kb in T.serial(T.ceildiv(n_keys, threads * U)):
        for u in T.unroll(U):
            pu[u] = 0
        for g in T.unroll(G):
            for u in T.unroll(U):
                ik = (kb * U + u) * threads + tx
                y = Logits[i_n, i_h * G + g, T.min(ik, CC - 1)]
                pu[u] += T.exp2(y - lse_s[g])
        for u in T.unroll(U):
            ik2 = (kb * U + u) * threads + tx
            if ik2 < n_keys:
                P_s[ik2] = pu[u]
    T.sync_threads()


@T.macro
def block_keys(P_s, S_s, a, bk, bi, tx, n_keys, cur, NB, threads, l, d, l_sel, track_best):
    """S_s[j] <- the Eq. 9 score of selection block j as an order-preserving int32 key (float bits,
    negatives flipped), +inf's key for the forced blocks (0 and the two local ones); with
    track_best each thread also keeps its best block (bk, bi) for the tournament."""
    acc = "float32"
    R = l_sel // d  # compressed keys per selection block stride
    NKJ = (l_sel + l - d) // d  # compressed keys overlapping one selection block
    first_key = (l - d) // d  # of block j: keys j·R - first_key … j·R - first_key + NKJ - 1
    bk[0] = KEY_MIN
    bi[0] = BIG
    for jb in T.serial(T.ceildiv(NB, threads)):
        j = jb * threads + tx
        if j < NB:
            a[0] = 0
            for kk in T.unroll(NKJ):
                i = j * R - first_key + kk
                w = T.max(T.min(i * d + l, (j + 1) * l_sel) - T.max(i * d, j * l_sel), 0)
                if i >= 0 and i < n_keys:
                    a[0] += P_s[i] * (T.cast(w, acc) / d)
            bits = T.reinterpret(a[0], "int32")
            key = T.if_then_else(j == 0 or j == cur or j == cur - 1, KEY_POS_INF,
                                 T.if_then_else(bits >= 0, bits, bits ^ 0x7FFFFFFF))
            S_s[j] = key
            if track_best and key > bk[0]:  # ascending ids: the first of equal keys stays
                bk[0] = key
                bi[0] = j
    # every thread is done reading P_s: the shared-memory planner may place what follows on it,
    # and TileLang inserts no barrier for that reuse by itself
    T.sync_threads()


@T.macro
def rank_blocks(S_s, sel_s, C_s, rk, cj, cv, tx, NB, threads, n, OWN, NB_MAX):
    """For few blocks: every block's rank among all, the top n placed by rank into sel_s."""
    # each block's rank among all: keys made unique as (key, -id) in one int64 (higher key
    # first, then the lower id), so a comparison is one 64-bit compare; the top n fill sel_s
    for jb in T.serial(T.ceildiv(NB_MAX, threads)):  # the thread that wrote S_s[j]
        if jb * threads + tx < NB_MAX:
            C_s[jb * threads + tx] = order_key(
                T.if_then_else(jb * threads + tx < NB, S_s[jb * threads + tx], KEY_MIN), jb * threads + tx)
    for t in T.serial(T.ceildiv(n, threads)):
        if t * threads + tx < n:
            sel_s[t * threads + tx] = -1
    T.sync_threads()  # C_s complete, sel_s cleared
    for o in T.unroll(OWN):
        rk[o] = 0
        cj[o] = C_s[o * threads + tx]
    for ib in T.serial(T.ceildiv(NB, 4)):  # past NB: padding, below every block
        for u in T.vectorized(4):
            cv[u] = C_s[ib * 4 + u]
        for u in T.unroll(4):
            for o in T.unroll(OWN):
                rk[o] += T.if_then_else(cv[u] > cj[o], 1, 0)
    for o in T.unroll(OWN):
        if o * threads + tx < NB and rk[o] < n and S_s[o * threads + tx] > KEY_NEG_INF:
            sel_s[rk[o]] = o * threads + tx


@T.macro
def tourney_blocks(S_s, sel_s, cand_k, cand_i, hp, sl_, c64, bk, bi, pk, tx, NB, threads, n, one_each):
    """For many blocks: each warp its own top n, best first, then warp 0 merges the warps' lists
    (see choose_blocks)."""
    NW = threads // 32
    lane = tx % 32
    warp = tx // 32
    if one_each:
        # a block per thread: its rank in the warp from 32 shuffles of the (key, -id) int64s
        c64[0] = order_key(T.if_then_else(tx < NB, S_s[T.min(tx, NB - 1)], KEY_MIN), tx)
        pk[0] = 0
        for i in T.unroll(32):
            c64[1] = T.shfl_sync(c64[0], i)
            pk[0] += T.if_then_else(c64[1] > c64[0], 1, 0)
        if pk[0] < n:
            cand_k[warp, pk[0]] = T.if_then_else(tx < NB, S_s[T.min(tx, NB - 1)], KEY_MIN)
            cand_i[warp, pk[0]] = T.if_then_else(tx < NB, tx, BIG)
    else:
        for rnd in T.serial(n):  # each warp's top n, best first
            wk = T.warp_reduce_max(bk[0])
            wi = T.warp_reduce_min(T.if_then_else(bk[0] == wk, bi[0], BIG))
            if lane == 0:
                cand_k[warp, rnd] = wk
                cand_i[warp, rnd] = wi
            if wi < BIG and wi == bi[0]:  # (a warp with no blocks left reports BIG)
                # the owner moves on to its best block ranked after the winner (S_s stays
                # read-only: no thread reads another's blocks, so no barrier is needed here)
                pk[0] = bk[0]
                bk[0] = KEY_MIN
                bi[0] = BIG
                for jb2 in T.serial(T.ceildiv(NB, threads)):
                    j2 = jb2 * threads + tx
                    if j2 < NB:
                        k3 = S_s[j2]
                        if (k3 < pk[0] or (k3 == pk[0] and j2 > wi)) and k3 > bk[0]:
                            bk[0] = k3
                            bi[0] = j2
    T.sync_threads()
    if warp == 0:  # merge the NW sorted lists: lane w holds the head of warp w's
        # only shared-memory reads in here (a write would make TileLang put a barrier inside
        # this one-warp branch): round r's winner stays in lane r % 32's register sl[r // 32]
        hp[0] = 0
        bk[0] = T.if_then_else(lane < NW, cand_k[T.min(lane, NW - 1), 0], KEY_MIN)
        bi[0] = T.if_then_else(lane < NW, cand_i[T.min(lane, NW - 1), 0], BIG)
        for rnd in T.serial(n):
            gk = T.warp_reduce_max(bk[0])
            gi = T.warp_reduce_min(T.if_then_else(bk[0] == gk, bi[0], BIG))
            for q in T.unroll((n + 31) // 32):
                if rnd == q * 32 + lane:
                    sl_[q] = T.if_then_else(gk > KEY_NEG_INF, gi, -1)
            if bk[0] == gk and bi[0] == gi:
                hp[0] += 1
                bk[0] = T.if_then_else(hp[0] < n, cand_k[T.min(lane, NW - 1), T.min(hp[0], n - 1)], KEY_MIN)
                bi[0] = T.if_then_else(hp[0] < n, cand_i[T.min(lane, NW - 1), T.min(hp[0], n - 1)], BIG)
        for q in T.unroll((n + 31) // 32):
            if q * 32 + lane < n:
                sel_s[q * 32 + lane] = sl_[q]


@T.macro
def choose_blocks(LSE_part, Logits, lse_s, P_s, S_s, sel_s, a, b, ev, pu, bk, bi, pk, tx, i_n, i_h,
                  n_keys, cur, NB, NS1, CC, G, U, threads, l, d, l_sel, n, lse_lanes, rank=None, tourney=None):
    """The top-n blocks of (sequence i_n, kv head i_h) into sel_s (best first, -1 when fewer than
    n can be chosen), by all `threads` threads of the program, in four steps:
    merge_head_lse (each head's LSE), key_probs (Σ_g p_cmp per compressed key, Eq. 10),
    block_keys (the Eq. 9 block scores as int32 keys; ties go to the lower id), then
    rank_blocks for few blocks (`rank` = its buffers: each block's rank among all as a count of the
    blocks that beat it, one 64-bit compare each) or tourney_blocks for many (`tourney`: the warps'
    candidate lists in shared memory, the merge's registers, and whether a thread holds one block):
    each warp its own top n, best first — with a block a thread, each block's rank in its warp from
    32 shuffles; else n rounds of two single-instruction warp reductions (max key, then min id among
    equal keys), each thread caching the best of its own blocks j ≡ tx and only the owner of a
    round's winner rescanning for its best after it; then, after one barrier, warp 0 merges the
    warps' sorted lists (lane w holds the head of warp w's) in n rounds of warp reductions: no
    barrier inside a round."""
    merge_head_lse(LSE_part, lse_s, a, b, ev, tx, i_n, i_h, NS1, G, threads, lse_lanes)
    key_probs(Logits, lse_s, P_s, pu, tx, i_n, i_h, n_keys, CC, G, U, threads)
    block_keys(P_s, S_s, a, bk, bi, tx, n_keys, cur, NB, threads, l, d, l_sel, rank is None)
    if rank is not None:
        C_s, rk, cj, cv, OWN, NB_MAX = rank
        rank_blocks(S_s, sel_s, C_s, rk, cj, cv, tx, NB, threads, n, OWN, NB_MAX)
    else:
        cand_k, cand_i, hp, sl_, c64, one_each = tourney
        tourney_blocks(S_s, sel_s, cand_k, cand_i, hp, sl_, c64, bk, bi, pk, tx, NB, threads, n, one_each)
    T.sync_threads()


@T.macro
def write_ids(sel_s, BlockIdx, rank, tx, i_n, i_h, n):
    """BlockIdx[i_n, i_h] = the chosen ids ascending, -1 last (each id's rank among the chosen)."""
    if tx < n:
        rank[0] = 0
        for k in T.serial(n):
            ka = T.if_then_else(sel_s[k] >= 0, sel_s[k], BIG)
            kt = T.if_then_else(sel_s[tx] >= 0, sel_s[tx], BIG)
            rank[0] += T.if_then_else(ka < kt or (ka == kt and k < tx), 1, 0)
        BlockIdx[i_n, i_h, rank[0]] = sel_s[tx]


@tilelang.jit(pass_configs=PASS_CONFIGS)
def decode_select(H: int, G: int, l: int, d: int, l_sel: int, n: int, NB_MAX: int, threads: int = 1024,
                  U: int = 1):
    """Kernel(Logits, LSE_part, Split1, NumCmp, Len, BlockIdx): the top-n selection blocks of each
    (sequence, kv head), one program each (choose_blocks), sequences of at most NB_MAX blocks."""
    N, CC, NS1, NST = T.dynamic("N, CC, NS1, NST")
    HQ = H * G
    acc = "float32"

    @T.prim_func
    def main(
        Logits: T.Tensor([N, HQ, CC], acc),
        LSE_part: T.Tensor([N, HQ, NST], acc),
        Split1: T.Tensor([NS1], "int32"),
        NumCmp: T.Tensor([N], "int32"),
        Len: T.Tensor([N], "int32"),
        BlockIdx: T.Tensor([N, H, n], "int32"),
    ):
        with T.Kernel(N * H, threads=threads) as i_nh:
            lse_s = T.alloc_shared([G], acc)
            P_s = T.alloc_shared([NB_MAX * (l_sel // d)], acc)  # Σ_g p_cmp per compressed key
            S_s = T.alloc_shared([NB_MAX], "int32")  # block score keys
            cand_k = T.alloc_shared([threads // 32, n], "int32")  # each warp's top n, best first
            cand_i = T.alloc_shared([threads // 32, n], "int32")
            sel_s = T.alloc_shared([n], "int32")
            a = T.alloc_local([1], acc)
            b = T.alloc_local([1], acc)
            ev = T.alloc_local([LCH + 1], acc)
            pu = T.alloc_local([U], acc)
            bk = T.alloc_local([1], "int32")
            bi = T.alloc_local([1], "int32")
            pk = T.alloc_local([1], "int32")
            rank = T.alloc_local([1], "int32")
            sv = T.alloc_local([3], "int32")  # read_counts
            hp = T.alloc_local([1], "int32")  # the merge's position in a lane's list
            sl_ = T.alloc_local([(n + 31) // 32], "int32")  # the merge's winners, round r in lane r % 32
            c64 = T.alloc_local([2], "int64")  # a block's (key, -id) and the one shuffled in
            tx = T.get_thread_binding(0)
            i_n = i_nh // H
            i_h = i_nh % H
            read_counts(sv, NumCmp, Len, i_n, CC, l_sel, NB_MAX)
            T.pdl_sync()  # decode_compressed's logits and partials are complete from here on
            choose_blocks(LSE_part, Logits, lse_s, P_s, S_s, sel_s, a, b, ev, pu, bk, bi, pk, tx, i_n, i_h,
                          sv[0], sv[1], sv[2], NS1, CC, G, U, threads, l, d, l_sel, n, lse_lanes(G, threads),
                          tourney=(cand_k, cand_i, hp, sl_, c64, NB_MAX <= threads and n <= 32))
            write_ids(sel_s, BlockIdx, rank, tx, i_n, i_h, n)
            T.pdl_trigger()

    return main


def pick_sparse_config(G: int, n: int, fuse_select: bool) -> dict:
    """decode_sparse: one warp per 16 rows of the G heads; choosing the blocks too wants at least
    four warps (the attention then runs on 64 rows, the G heads and zero padding)."""
    M = max(64 if fuse_select else 16, pad16(G))
    threads = 32 * (M // 16)
    assert not fuse_select or n <= threads, "the ranking gives one thread per selected block"
    return dict(M=M, threads=threads)


@tilelang.jit(pass_configs=PASS_CONFIGS)
def decode_sparse(H: int, G: int, K: int, V: int, l: int, d: int, l_sel: int, n: int, NB_MAX: int,
                  window: bool, fuse_select: bool, dtype: str, scale: float, BT: int = 32, M: int = 16,
                  threads: int = 32, U: int = 4):
    """Kernel(Q, Logits, NumCmp, Ks, Vs, Len, Kw, Vw, WinCount, Split1, Split3, BlockIdx, O_part, LSE_part).

    Grid (NS3, N·H, 1 + window). z = 0 attends over the n selected blocks of l' raw tokens in tiles
    of BT rows (keys at rows >= Len[n] do not exist yet), z = 1 over the ring's min(WinCount[n], RW)
    filled slots. Program s takes tiles s, s + NS3, …; its partial goes to column NS1 + z·NS3 + s.

    The blocks: read from BlockIdx (decode_select wrote it), or with fuse_select chosen here —
    every split of a (sequence, kv head) runs choose_blocks itself, ranking the ≤ NB_MAX blocks
    (side by side, so it costs no time and saves a launch; split 0 writes BlockIdx). LSE_part's
    columns < NS1 are read then."""
    N, CC, CAP, RW, NS1, NS3, NST = T.dynamic("N, CC, CAP, RW, NS1, NS3, NST")
    HQ = H * G
    sc = scale * LOG2E
    acc = "float32"
    TPB = l_sel // BT  # tiles per selected block

    @T.prim_func
    def main(
        Q: T.Tensor([N, HQ, K], dtype),
        Logits: T.Tensor([N, HQ, CC], acc),
        NumCmp: T.Tensor([N], "int32"),
        Ks: T.Tensor([N, CAP, H, K], dtype),
        Vs: T.Tensor([N, CAP, H, V], dtype),
        Len: T.Tensor([N], "int32"),
        Kw: T.Tensor([N, RW, H, K], dtype),
        Vw: T.Tensor([N, RW, H, V], dtype),
        WinCount: T.Tensor([N], "int32"),
        Split1: T.Tensor([NS1], "int32"),
        Split3: T.Tensor([NS3], "int32"),
        BlockIdx: T.Tensor([N, H, n], "int32"),
        O_part: T.Tensor([N, HQ, NST, V], acc),
        LSE_part: T.Tensor([N, HQ, NST], acc),
    ):
        with T.Kernel(NS3, N * H, 2 if window else 1, threads=threads) as (i_s, i_nh, i_br):
            Q_s = T.alloc_shared([M, K], dtype)
            K_s = T.alloc_shared([BT, K], dtype)
            V_s = T.alloc_shared([BT, V], dtype)
            sel_s = T.alloc_shared([n], "int32")  # the block ids (any order)
            acc_s = T.alloc_fragment([M, BT], acc)
            acc_s_cast = T.alloc_fragment([M, BT], dtype)
            acc_o = T.alloc_fragment([M, V], acc)
            m = T.alloc_fragment([M], acc)
            m_prev = T.alloc_fragment([M], acc)
            r = T.alloc_fragment([M], acc)
            l_run = T.alloc_fragment([M], acc)
            l_blk = T.alloc_fragment([M], acc)

            tx = T.get_thread_binding(0)
            i_n = i_nh // H
            i_h = i_nh % H
            n_win = T.min(WinCount[i_n], RW)
            n_tiles = T.if_then_else(i_br == 0, n * TPB, T.ceildiv(n_win, BT))
            limit = T.if_then_else(i_br == 0, Len[i_n], n_win)
            start_rows(Q, Q_s, acc_o, m, l_run, i_n, i_h, G, M, K)
            T.pdl_sync()  # the predecessor's output (logits and partials, or the ids) is complete
            if fuse_select:
                lse_s = T.alloc_shared([G], acc)
                P_s = T.alloc_shared([NB_MAX * (l_sel // d)], acc)
                S_s = T.alloc_shared([NB_MAX], "int32")
                a = T.alloc_local([1], acc)
                b = T.alloc_local([1], acc)
                ev = T.alloc_local([LCH + 1], acc)
                pu = T.alloc_local([U], acc)
                bk = T.alloc_local([1], "int32")
                bi = T.alloc_local([1], "int32")
                pk = T.alloc_local([1], "int32")
                rank = T.alloc_local([1], "int32")
                sv = T.alloc_local([3], "int32")  # read_counts
                OWN = (NB_MAX + threads - 1) // threads  # blocks a thread ranks
                C_s = T.alloc_shared([NB_MAX], "int64")  # (key, -id) of each block
                rk = T.alloc_local([OWN], "int32")
                cj = T.alloc_local([OWN], "int64")
                cv = T.alloc_local([4], "int64")
                if i_br == 0:
                    read_counts(sv, NumCmp, Len, i_n, CC, l_sel, NB_MAX)
                    choose_blocks(LSE_part, Logits, lse_s, P_s, S_s, sel_s, a, b, ev, pu, bk, bi, pk, tx,
                                  i_n, i_h, sv[0], sv[1], sv[2], NS1, CC, G, U, threads, l, d,
                                  l_sel, n, lse_lanes(G, threads), (C_s, rk, cj, cv, OWN, NB_MAX))
                    if i_s == 0:
                        write_ids(sel_s, BlockIdx, rank, tx, i_n, i_h, n)
            else:
                for t in T.Parallel(n):
                    sel_s[t] = BlockIdx[i_n, i_h, t]
                T.sync_threads()

            for it in T.serial(T.ceildiv(T.max(n_tiles - i_s, 0), NS3)):
                tile = i_s + it * NS3
                blk = T.if_then_else(i_br == 0, sel_s[T.min(tile // TPB, n - 1)], 0)
                # a padded block (-1) reads block 0 and masks it all
                k0 = T.if_then_else(i_br == 0, T.max(blk, 0) * l_sel + (tile % TPB) * BT, tile * BT)
                if i_br == 0:
                    load_tile(K_s, V_s, Ks, Vs, i_n, i_h, k0, BT)
                else:
                    load_tile(K_s, V_s, Kw, Vw, i_n, i_h, k0, BT)
                for g, jj in T.Parallel(M, BT):
                    acc_s[g, jj] = T.if_then_else(blk >= 0 and k0 + jj < limit, 0, -T.infinity(acc))
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                softmax_pv(acc_s, acc_s_cast, V_s, acc_o, m, m_prev, r, l_run, l_blk, sc, M, BT, V)

            write_partial(O_part, LSE_part, acc_o, m, l_run, i_n, i_h, NS1 + i_br * NS3 + i_s, G, M, V, sc)
            T.pdl_trigger()

    return main


@tilelang.jit(pass_configs=PASS_CONFIGS)
def decode_combine(HQ: int, V: int, window: bool, dtype: str, threads: int = 512):
    """Kernel(O_part, LSE_part, Split1, Split3, Gcmp, Gslc, Gswa, O): per (sequence, query head),
    each branch's partials merged by their LSE (a branch that saw nothing gives 0, never NaN),
    times its gate `[N, HQ]`, summed into O `[N, HQ, V]`. At most MAX_SPLITS partials a branch.

    Warp b computes branch b's weights (gate · exp2(lse - max) / Σ) into one row over the NST
    partial columns; then the threads, as SL slices × V/4 column quads, each sum the columns
    ≡ slice (mod SL) with their loads unrolled and clamped (weight 0 past NST) so that they are in
    flight together; the slices are added through shared memory. At B = 1 a step has ~80 partials
    a head: one round of loads instead of one per 16 partials."""
    N, NS1, NS3, NST = T.dynamic("N, NS1, NS3, NST")
    acc = "float32"
    NBR = 3 if window else 2
    PL = MAX_SPLITS // 32  # splits per lane
    QD = V // 4  # column quads (16-byte loads)
    SL = threads // QD  # slices of the partial columns
    CHUNK = 8  # columns per slice with their loads in flight together
    assert SL >= 1 and threads >= V and threads // 32 >= NBR  # threads past SL·QD only add the slices

    @T.prim_func
    def main(
        O_part: T.Tensor([N, HQ, NST, V], acc),
        LSE_part: T.Tensor([N, HQ, NST], acc),
        Split1: T.Tensor([NS1], "int32"),
        Split3: T.Tensor([NS3], "int32"),
        Gcmp: T.Tensor([N, HQ], dtype),
        Gslc: T.Tensor([N, HQ], dtype),
        Gswa: T.Tensor([N, HQ], dtype),
        O: T.Tensor([N, HQ, V], dtype),
    ):
        with T.Kernel(N * HQ, threads=threads) as i_nq:
            w_s = T.alloc_shared([3 * MAX_SPLITS], acc)  # weight of each partial column
            red_s = T.alloc_shared([SL, V], acc)  # each slice's sums
            e = T.alloc_local([PL], acc)
            mx = T.alloc_local([1], acc)
            den = T.alloc_local([1], acc)
            o4 = T.alloc_local([4], acc)
            tx = T.get_thread_binding(0)
            lane = tx % 32
            br = tx // 32
            sl = tx // QD
            cq = tx % QD
            i_n = i_nq // HQ
            i_q = i_nq % HQ
            T.pdl_sync()  # every partial is complete from here on
            if br < NBR:
                lo = T.if_then_else(br == 0, 0, NS1 + (br - 1) * NS3)
                ns = T.if_then_else(br == 0, NS1, NS3)
                mx[0] = -T.infinity(acc)
                for u in T.unroll(PL):
                    x = LSE_part[i_n, i_q, T.min(lo + T.min(u * 32 + lane, ns - 1), NST - 1)]
                    e[u] = T.if_then_else(u * 32 + lane < ns, x, -T.infinity(acc))
                    mx[0] = T.max(mx[0], e[u])
                mx[0] = T.warp_reduce_max(mx[0])
                den[0] = 0
                for u in T.unroll(PL):
                    e[u] = T.if_then_else(mx[0] > -T.infinity(acc), T.exp2(e[u] - mx[0]), 0)
                    den[0] += e[u]
                den[0] = T.warp_reduce_sum(den[0])
                gate = T.if_then_else(br == 0, Gcmp[i_n, i_q], T.if_then_else(br == 1, Gslc[i_n, i_q], Gswa[i_n, i_q]))
                for u in T.unroll(PL):
                    if u * 32 + lane < ns:
                        w_s[lo + u * 32 + lane] = T.if_then_else(den[0] > 0, e[u] * T.cast(gate, acc) / den[0], 0)
            T.sync_threads()
            if sl < SL:
                for v in T.vectorized(4):
                    o4[v] = 0
                for cb in T.serial(T.ceildiv(T.ceildiv(NST, SL), CHUNK)):
                    for u in T.unroll(CHUNK):
                        col = (cb * CHUNK + u) * SL + sl
                        wt = T.if_then_else(col < NST, w_s[T.min(col, NST - 1)], 0)
                        for v in T.vectorized(4):
                            o4[v] += wt * O_part[i_n, i_q, T.min(col, NST - 1), cq * 4 + v]
                for v in T.vectorized(4):
                    red_s[sl, cq * 4 + v] = o4[v]
            T.sync_threads()
            if tx < V:
                o4[0] = 0
                for k in T.serial(SL):
                    o4[0] += red_s[k, tx]
                O[i_n, i_q, tx] = T.cast(o4[0], dtype)

    return main
