"""The comparison helpers themselves (CPU): a correct low-precision result passes, one wrong row or
one wrong short sequence fails, though the relative error over the whole tensor stays below 1e-2."""
import pytest
import torch

import reference as R
from reference.inputs import random_qkv
from tests.utils import assert_close, hostile_cu, rel_err, run_both, segments


def sliding_case(T=300, W=32):
    cu = hostile_cu(T, 8, 16, device="cpu")
    q, k, v = random_qkv(1, T, 4, 2, 32, 32, dtype=torch.bfloat16, seed=5)
    ref = lambda q, k, v: R.naive_nsa(q, k, v, None, None, None, None, 64, W, None, cu)  # noqa: E731
    # "ours": the float32 reference rounded to bf16, as a kernel with fp32 accumulation would be
    ours = lambda q, k, v: R.naive_nsa(q.float(), k.float(), v.float(), None, None, None, None, 64, W, None,  # noqa: E731
                                       cu).to(q.dtype)
    return run_both(ours, ref, [q, k, v]), cu, T


def test_low_precision_computes_in_the_inputs_dtype():
    q, k, v = random_qkv(1, 50, 4, 2, 32, 32, dtype=torch.bfloat16, seed=1)
    full = R.naive_nsa(q, k, v, window_size=16).float()
    with R.low_precision():
        low = R.naive_nsa(q, k, v, window_size=16).float()
    assert 0 < rel_err(low, full) < 1e-2
    assert torch.equal(R.naive_nsa(q, k, v, window_size=16).float(), full)  # the context is left


def test_a_right_answer_passes():
    (ours, ref, lp), cu, T = sliding_case()
    assert_close(ours, ref, lp, ["o", "dq", "dk", "dv"], torch.bfloat16, segments(1, T, cu))


@pytest.mark.parametrize("where", ["row", "sequence"])
def test_one_wrong_row_or_sequence_fails(where):
    (ours, ref, lp), cu, T = sliding_case()
    o = ours[0].detach().clone()
    if where == "row":
        o[0, 200, 1] *= 0.7  # one (token, head) row partly wrong, as a missed key tile makes it
    else:
        s, e = cu[4].item(), cu[5].item()  # a sequence of a few tokens
        o[0, s:e] *= 0.97
    assert rel_err(o, ref[0]) < 1e-2  # invisible to one norm over the whole tensor
    with pytest.raises(AssertionError, match="rows off" if where == "row" else "sequence"):
        assert_close([o], ref[:1], lp[:1], ["o"], torch.bfloat16, segments(1, T, cu))
