"""The dense oracle itself, against hand-computed cases and plain SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dilated_attention_pytorch.oracle import dense_dilated_attention, dilated_count_mask


def test_union_with_multiplicity_by_hand() -> None:
    # q = 0 makes every score 0, so the weights are the counts M normalised per row.
    v = torch.arange(4, dtype=torch.float64).reshape(1, 4, 1, 1) + 1.0  # v_p = p + 1
    q = k = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    out = dense_dilated_attention(q, k, v, [2, 4], [1, 1])
    # Query 0: branch (2,1) gives keys {0,1}, branch (4,1) gives {0,1,2,3}: counts 2,2,1,1.
    assert out[0, 0, 0, 0].item() == pytest.approx((2 * 1 + 2 * 2 + 3 + 4) / 6)
    # Query 3: keys {2,3} twice and {0,1} once.
    assert out[0, 3, 0, 0].item() == pytest.approx((1 + 2 + 2 * 3 + 2 * 4) / 6)


def test_dilation_offsets_by_hand() -> None:
    # N=6, one branch (w=6, r=2), 2 heads: head 0 sees even positions, head 1 odd ones.
    m = dilated_count_mask(6, 2, [6], [2])
    assert m[0, 0].tolist() == [1, 0, 1, 0, 1, 0]
    assert m[0, 1].tolist() == [0] * 6  # odd query, head 0: not covered
    assert m[1, 3].tolist() == [0, 1, 0, 1, 0, 1]
    # Partial last segment (N=7, w=4, r=2): positions 4..6 form a shorter segment.
    m = dilated_count_mask(7, 1, [4], [2])
    assert m[0, 6].tolist() == [0, 0, 0, 0, 1, 0, 1]
    # Causal keeps p' <= p.
    m = dilated_count_mask(7, 1, [4], [2], is_causal=True)
    assert m[0, 4].tolist() == [0, 0, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("is_causal", [False, True])
def test_single_global_branch_equals_dense_attention(is_causal: bool) -> None:
    q, k, v = (torch.randn(2, 33, 3, 8, dtype=torch.float64) for _ in range(3))
    out = dense_dilated_attention(q, k, v, [33], [1], is_causal=is_causal)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
def test_one_branch_equals_sdpa_with_block_mask(is_causal: bool) -> None:
    N, H, w, r = 23, 4, 8, 3
    q, k, v = (torch.randn(1, N, H, 8, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(N)
    allowed = torch.zeros(H, N, N, dtype=torch.bool)
    for h in range(H):
        sel = (pos % w) % r == h % r
        allowed[h] = (pos[:, None] // w == pos[None, :] // w) & sel[:, None] & sel[None, :]
        if is_causal:
            allowed[h] &= pos[None, :] <= pos[:, None]
    covered = allowed.any(-1)  # (H, N): rows SDPA can compute (others would be NaN)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[None]
    ).transpose(1, 2)
    out = dense_dilated_attention(q, k, v, [w], [r], is_causal=is_causal)
    mask = covered.T[None, :, :, None].expand_as(out)
    torch.testing.assert_close(out[mask], expected[mask], atol=1e-12, rtol=1e-12)
    assert torch.all(out[~mask] == 0)  # uncovered positions output 0


def test_head_split_uses_one_branch_per_head_group() -> None:
    m = dilated_count_mask(8, 3, [2, 8], [1, 2], branch_mixing="head_split")
    # groups: heads {0, 1} run (2, 1); head {2} runs (8, 2) with offset 0.
    assert m[0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert m[2, 0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert m[2, 1].sum() == 0
