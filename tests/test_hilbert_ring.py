"""HilbertRingAttention: dilated attention in Hilbert-curve order, on one device and a ring."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from distributed_utils import spawn, value_errors

from dilated_attention_pytorch import (
    HilbertRingAttention,
    HilbertRingMultiheadAttention,
    MultiheadDilatedAttention,
    dense_dilated_attention,
    hilbert_permutation,
    inverse_permutation,
)

SEGMENTS, DILATIONS = (8, 32, 64), (1, 2, 4)
TOL = {"atol": 1e-10, "rtol": 1e-10}


def _expected(q, k, v, grid, **kw):
    # The definition: permute into curve order, the oracle there, permute back.
    perm = hilbert_permutation(*grid)
    out = dense_dilated_attention(q[:, perm], k[:, perm], v[:, perm], SEGMENTS, DILATIONS, **kw)
    return out[:, inverse_permutation(perm)]


@pytest.mark.parametrize(
    ("N", "options", "grid"),
    [
        (64, {}, (8, 8)),
        (64, {"hilbert_level": 3}, (8, 8)),
        (60, {"grid_size": (6, 10)}, (6, 10)),
        (45, {"grid_size": (9, 5)}, (9, 5)),
    ],
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_the_oracle_in_curve_order(N, options, grid, is_causal) -> None:
    q, k, v = (torch.randn(2, N, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = HilbertRingAttention(SEGMENTS, DILATIONS, **options)(q, k, v, is_causal=is_causal)
    want = _expected(q, k, v, grid, is_causal=is_causal)
    torch.testing.assert_close(got, want, **TOL)
    dout = torch.randn_like(got)
    for g, w in zip(
        torch.autograd.grad(got, (q, k, v), dout),
        torch.autograd.grad(want, (q, k, v), dout),
        strict=True,
    ):
        torch.testing.assert_close(g, w, **TOL)


def test_grid_errors() -> None:
    q = torch.randn(1, 60, 2, 8)
    with pytest.raises(ValueError, match="60 tokens is not a square grid; pass grid_size"):
        HilbertRingAttention([8], [1])(q, q, q)
    with pytest.raises(ValueError, match=r"hilbert_level=2 means a 4 x 4 grid of 16 tokens"):
        HilbertRingAttention([8], [1], hilbert_level=2)(q, q, q)
    with pytest.raises(ValueError, match=r"grid_size=\(6, 9\) has 54 cells but the sequence"):
        HilbertRingAttention([8], [1], grid_size=(6, 9))(q, q, q)
    with pytest.raises(TypeError, match="grid_size must be a"):
        HilbertRingAttention([8], [1], grid_size=60)


def _ring(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    torch.manual_seed(11)  # the same data on every rank
    q, k, v = (torch.randn(1, 64, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = HilbertRingAttention(SEGMENTS, DILATIONS)(q, k, v, is_causal=True)
    want = _expected(q, k, v, (8, 8), is_causal=True)
    dout = torch.randn(1, 64, 4, 8, dtype=torch.float64)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    torch.manual_seed(12)
    layer = HilbertRingMultiheadAttention(32, 4, SEGMENTS, DILATIONS, dtype=torch.float64)
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    # The multi-head form equals the plain layer applied in curve order and put back.
    plain = MultiheadDilatedAttention(32, 4, SEGMENTS, DILATIONS, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    perm = hilbert_permutation(8, 8)
    want_layer = plain(x[:, perm])[0][:, inverse_permutation(perm)]
    return {
        "pairs": [(got.detach(), want.detach()), (layer(x)[0].detach(), want_layer.detach())]
        + list(zip(grads, want_grads, strict=True))
    }


def test_hilbert_ring_on_two_ranks() -> None:
    for rank, res in enumerate(spawn(_ring, 2)):
        for i, (got, want) in enumerate(res["pairs"]):
            torch.testing.assert_close(
                got, want, **TOL, msg=lambda m, i=i, rank=rank: f"rank {rank} #{i}: {m}"
            )


def _grid_differs(rank: int, world_size: int, _: Any) -> str | None:
    # Whole-sequence calls order the sequence by the grid before splitting it: ranks with
    # different grids would hold shards of different orders (a silently wrong result).
    q = torch.randn(1, 32, 2, 8, dtype=torch.float64)
    module = HilbertRingAttention([8], [1], grid_size=(16, 2) if rank else (2, 16))
    return value_errors({"call": lambda: module(q, q, q)})["call"]


def test_a_grid_differing_between_ranks_raises_on_every_rank() -> None:
    for rank, error in enumerate(spawn(_grid_differs, 2)):
        assert error is not None, f"rank {rank} did not raise"
        assert re.search(
            r"the settings differ between ranks.*rank 0 has .*Hilbert grid \(2, 16\).*"
            r"rank 1 has .*Hilbert grid \(16, 2\)",
            error,
            flags=re.S,
        ), error


def _grid_cases(rank: int, world_size: int, _: Any) -> dict[str, str | None]:
    q = torch.randn(1, 32, 2, 8, dtype=torch.float64)
    calls = {
        # A grid that does not fit on one rank: every rank raises (none waits).
        "misfit": lambda: HilbertRingAttention([8], [1], grid_size=(4, 4) if rank else (2, 16))(
            q, q, q
        ),
        # Shards: no grid is used, so grids may differ.
        "shards": lambda: HilbertRingAttention([8], [1], grid_size=(16, 2) if rank else (2, 16))(
            q[:, :16], q[:, :16], q[:, :16], already_split=True
        ),
    }
    return value_errors(calls)


def test_grid_errors_reach_every_rank_and_shards_ignore_the_grid() -> None:
    for rank, errors in enumerate(spawn(_grid_cases, 2)):
        assert errors["misfit"] is not None, f"rank {rank} did not raise"
        assert re.search(r"invalid input on rank\(s\) \[1\].*grid_size=\(4, 4\) has 16 cells",
                         errors["misfit"], flags=re.S), errors["misfit"]  # fmt: skip
        assert errors["shards"] is None, errors["shards"]
