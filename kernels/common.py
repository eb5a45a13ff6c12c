"""Pieces every NSA kernel family shares: dtypes, pass configs and the exp2 online softmax (its
state, step and epilogue)."""

import os

import tilelang
import tilelang.language as T

LOG2E = 1.4426950408889634

# Compile for Hopper without a GPU (CI, this repo's `compile` tests): TileLang reads this. sm_90a, not
# sm_90: the kernels use wgmma, which nvcc only enables for sm_90a; a plain sm_90 build compiles but
# hits CUTLASS's "wgmma without SM90A" device assert on the H100 (seen on the device).
SM90_TARGET = '{"kind": "cuda", "arch": "sm_90a"}'

# Warp specialization stays off: with TileLang 0.1.15's automatic producer/consumer split our
# data-dependent pipelined loops gave run-to-run different results (a race, seen on the H100 in the
# forward at BS = 32 and in dK); plain software pipelining was exact and deterministic. See
# docs/perf-notes.md. NSA_TL_WARP_SPECIALIZE=1 turns it back on for experiments.
PASS_CONFIGS = {
    tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True,
    tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: os.environ.get("NSA_TL_WARP_SPECIALIZE") != "1",
}
if os.environ.get("NSA_TL_NO_TMA") == "1":  # experiments: cp.async instead of TMA
    PASS_CONFIGS[tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER] = True


def tl_dtype(dtype) -> str:
    """'float16' / 'bfloat16' from a torch dtype or a string."""
    name = str(dtype).replace("torch.", "")
    if name not in ("float16", "bfloat16"):
        raise TypeError(f"NSA kernels take float16 or bfloat16 tensors, got {dtype}")
    return name


def pad16(n: int) -> int:
    """MMA tiles need multiples of 16 rows: the G heads of a group are padded up to one."""
    return max(16, (n + 15) // 16 * 16)


@T.macro
def softmax_init(acc_o, m, l):
    """An empty running softmax: no output, sum 0, max -inf."""
    T.fill(acc_o, 0)
    T.fill(l, 0)
    T.fill(m, -T.infinity("float32"))


def in_dtype(x, dtype: str):
    """x as dtype: itself when it already is (so a kernel's default expressions stay as they were)."""
    return x if x.dtype == dtype else T.cast(x, dtype)


def normalized(o, l):
    """An output element o of a row with softmax sum l, normalized: 0 for a row that saw nothing."""
    return T.if_then_else(l > 0, o / l, 0)


def row_lse(l, m, sc, empty):
    """A row's base-2 log-sum-exp log2(l) + m·sc (m the running max of the raw scores, sc the scale
    times log2 e); `empty` for a row that saw nothing (+inf where a backward reads it, so that its
    exp2(s - LSE) is 0; -inf where partials are merged)."""
    return T.if_then_else(l > 0, T.log2(l) + m * sc, empty)


@T.macro
def softmax_scores_step(acc_s, m, m_prev, r, l, l_blk, sc, GP, BN):
    """The row half of a FlashAttention step on a masked score tile acc_s `[GP, BN]` (raw q·k, -inf
    where masked): updates the running max m and sum l (per row, base 2 with the scale sc folded in),
    leaves in r the factor the output accumulator must be rescaled by (rescale_rows) and in acc_s the
    tile's unnormalized probabilities. A row whose tile is fully masked and has seen nothing stays at
    m = -inf, l = 0: the guard keeps exp2(-inf - -inf) out, so such a row ends at 0, never NaN.
    """
    T.copy(m, m_prev)
    T.reduce_max(acc_s, m, dim=1, clear=False)
    for i in T.Parallel(GP):
        r[i] = T.if_then_else(m[i] == -T.infinity("float32"), 1.0, T.exp2((m_prev[i] - m[i]) * sc))
    for i, j in T.Parallel(GP, BN):
        acc_s[i, j] = T.exp2(acc_s[i, j] * sc - T.if_then_else(m[i] == -T.infinity("float32"), 0.0, m[i] * sc))
    T.reduce_sum(acc_s, l_blk, dim=1)
    for i in T.Parallel(GP):
        l[i] = l[i] * r[i] + l_blk[i]


@T.macro
def rescale_rows(acc_o, r, GP, V):
    """acc_o `[GP, V]` row i times r[i] (the other half of a step, split off so that an overlapped
    schedule can run it once the accumulator's last MMA is done)."""
    for i, j in T.Parallel(GP, V):
        acc_o[i, j] *= r[i]


@T.macro
def online_softmax_step(acc_s, acc_o, m, m_prev, r, l, l_blk, sc, GP, BN, V):
    """One FlashAttention step on a masked score tile acc_s `[GP, BN]`: softmax_scores_step, then
    acc_o `[GP, V]` rescaled to the new running max (rescale_rows)."""
    softmax_scores_step(acc_s, m, m_prev, r, l, l_blk, sc, GP, BN)
    rescale_rows(acc_o, r, GP, V)


def pipelined(extent, num_stages: int, n_loads: int, n_stmts: int):
    """A software-pipelined loop over a data-dependent extent.

    num_stages 1: TileLang's own schedule (single-buffered tiles; each load is issued once its
    buffer's last reader is done, so it overlaps the rest of the iteration).
    num_stages 2: double-buffered tiles, the first n_loads statements of the n_stmts-statement body
    (its global → shared copies) issued one whole iteration ahead. Written as an explicit
    order/stage schedule because TileLang 0.1.15's inferred schedule for num_stages >= 2 over a
    dynamic extent unrolls its epilogue into a `cp.async.wait_group(1 - it)` that does not compile
    ("Downcast from tirx.Sub to ir.IntImm"); the explicit one drains with constant waits. The body
    must list its loads first, and n_stmts must count its top-level statements after macro
    expansion (a mismatch fails to compile, it cannot run wrong).
    """
    if num_stages <= 1:
        return T.Pipelined(extent, num_stages=num_stages)
    return T.Pipelined(extent, order=list(range(n_stmts)), stage=[0] * n_loads + [1] * (n_stmts - n_loads))
