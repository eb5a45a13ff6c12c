"""Decode glue on the CPU: tile tables and the merge of split softmax partials (the kernels that
fill the partials are tested on the GPU through the layer, tests/test_layer.py)."""
import torch

from nsa_module.decode import block_tiles, contiguous_tiles, merge_partials


def test_contiguous_tiles_cover_each_sequence_and_nothing_more():
    t = contiguous_tiles(torch.tensor([0, 1, 64, 65, 200], dtype=torch.int32), H=2, BN=64, max_keys=200)
    assert t.shape == (5, 2, 4) and t.dtype == torch.int32 and t.is_contiguous()
    assert t[:, 0].tolist() == [[-1, -1, -1, -1], [0, -1, -1, -1], [0, -1, -1, -1], [0, 64, -1, -1],
                                [0, 64, 128, 192]]
    assert torch.equal(t[:, 0], t[:, 1])


def test_block_tiles_keep_padding():
    idx = torch.tensor([[[0, 3, -1]]])
    assert block_tiles(idx, 32).tolist() == [[[0, 96, -1]]]


def test_merge_partials_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 100, generator=g) * 3  # logits of 3 rows × 4 heads over 100 keys (base 2)
    v = torch.randn(100, 8, generator=g)
    splits = [range(0, 10), range(10, 60), range(60, 60), range(60, 100)]  # one empty split
    o_part, lse_part = [], []
    for r in splits:
        r = list(r)
        if not r:
            o_part.append(torch.zeros(3, 4, 8))
            lse_part.append(torch.full((3, 4), float("-inf")))
            continue
        p = torch.exp2(s[..., r] - s[..., r].amax(-1, keepdim=True))
        o_part.append(p @ v[r] / p.sum(-1, keepdim=True))
        lse_part.append(torch.log2(torch.exp2(s[..., r]).sum(-1)))
    o, lse = merge_partials(torch.stack(o_part, -2), torch.stack(lse_part, -1))
    p = torch.softmax(s * torch.log(torch.tensor(2.0)), -1)
    assert torch.allclose(o, p @ v, atol=1e-5)
    assert torch.allclose(lse, torch.log2(torch.exp2(s).sum(-1)), atol=1e-5)


def test_merge_partials_of_nothing_is_zero_not_nan():
    o, lse = merge_partials(torch.zeros(2, 3, 5), torch.full((2, 3), float("-inf")))
    assert (o == 0).all() and torch.isinf(lse).all() and (lse < 0).all()
