"""Ring modules on gloo (CPU) against the single-process modules with the same weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import spawn

from dilated_attention_pytorch import (
    DilatedAttention,
    MultiheadDilatedAttention,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
    shard_sequence,
)

pytestmark = pytest.mark.distributed

# float64 everywhere: the ring only reorders sums (see tests/test_ring.py), so 1e-10
# is far above rounding and far below any real error.
TOL = {"atol": 1e-10, "rtol": 1e-10}

SEGMENTS, DILATIONS = (4, 16, 32), (1, 2, 4)  # local, one shard, whole sequence (2 ranks)


def _multihead(rank: int, world_size: int, is_causal: bool) -> dict[str, Any]:
    torch.manual_seed(1234 + is_causal)  # same weights and inputs on every rank
    E, H, N = 32, 4, 32
    full_module = MultiheadDilatedAttention(E, H, SEGMENTS, DILATIONS, dtype=torch.float64)
    ring_module = RingMultiheadDilatedAttention(
        E, H, SEGMENTS, DILATIONS, ring_size=world_size, dtype=torch.float64
    )
    ring_module.load_state_dict(full_module.state_dict())
    x = torch.randn(2, N, E, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, N, E, dtype=torch.float64)

    want, _ = full_module(x, is_causal=is_causal)
    want.backward(dout)

    x_local = shard_sequence(x.detach(), dim=1).requires_grad_()
    got, _ = ring_module(x_local, is_causal=is_causal)
    got.backward(shard_sequence(dout, dim=1))
    # Each rank holds its share of the parameter gradients; their sum is the full one.
    param_grads = {}
    for name, p in ring_module.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        param_grads[name] = (grad, dict(full_module.named_parameters())[name].grad)
    return {
        "out": (got.detach(), shard_sequence(want.detach(), dim=1)),
        "dx": (x_local.grad, shard_sequence(x.grad, dim=1)),
        "params": param_grads,
    }


def _plain(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(99)
    q, k, v = (torch.randn(1, 32, 4, 8, dtype=torch.float64) for _ in range(3))
    want = DilatedAttention(SEGMENTS, DILATIONS)(q, k, v, is_causal=True)
    ring = StandardRingAttention(SEGMENTS, DILATIONS, ring_size=world_size).eval()
    got = ring(*(shard_sequence(t) for t in (q, k, v)), is_causal=True)
    from dilated_attention_pytorch import create_dilated_attention

    built = create_dilated_attention("ring", segment_lengths=SEGMENTS, dilation_rates=DILATIONS)
    return {
        "out": (got, shard_sequence(want)),
        "alias": StandardRingAttention is RingDilatedAttention,
        "factory": type(built) is RingDilatedAttention,
    }


def _worker(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    return {
        "multihead": _multihead(rank, world_size, False),
        "multihead-causal": _multihead(rank, world_size, True),
        "plain": _plain(rank, world_size),
    }


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return spawn(_worker, 2)


@pytest.mark.parametrize("name", ["multihead", "multihead-causal"])
def test_ring_multihead_matches_full_sequence(results: list[dict[str, Any]], name: str) -> None:
    for rank, res in enumerate(results):
        r = res[name]
        torch.testing.assert_close(*r["out"], **TOL, msg=lambda m, rank=rank: f"rank {rank}: {m}")
        torch.testing.assert_close(*r["dx"], **TOL, msg=lambda m, rank=rank: f"rank {rank}: {m}")
        for pname, (got, want) in r["params"].items():
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, p=pname: f"{p}: {m}")


def test_ring_dilated_attention_module(results: list[dict[str, Any]]) -> None:
    for res in results:
        torch.testing.assert_close(*res["plain"]["out"], **TOL)
        assert res["plain"]["alias"]
        assert res["plain"]["factory"]  # create_dilated_attention("ring", ...) under dist


def test_factory_ring_kind_needs_an_initialized_process_group() -> None:
    from dilated_attention_pytorch import create_multihead_dilated_attention

    with pytest.raises(
        ValueError,
        match="kind 'ring_multihead' cannot be built here: ring attention needs torch.distributed",
    ):
        create_multihead_dilated_attention(
            "ring_multihead", embed_dim=32, num_heads=4, segment_lengths=[8], dilation_rates=[1]
        )


def test_ring_module_without_process_group_raises() -> None:
    module = RingDilatedAttention(SEGMENTS, DILATIONS)
    q = torch.randn(1, 16, 4, 8)
    with pytest.raises(ValueError, match="ring attention needs torch.distributed"):
        module(q, q, q)


def test_ring_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ring_size must be a positive int"):
        RingDilatedAttention(SEGMENTS, DILATIONS, ring_size=0)
