"""Ring modules on gloo (CPU) against the single-process modules with the same weights."""

from __future__ import annotations

import importlib
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


def _validate_once(rank: int, world_size: int) -> dict[str, Any]:
    """Count the collective checks a module runs: once per input signature."""
    # The module, not the function of the same name that the package exports.
    ring_impl = importlib.import_module(
        "dilated_attention_pytorch.distributed.ring_dilated_attention"
    )

    calls = []
    original = ring_impl.check_ring_call

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return original(*args, **kwargs)

    ring_impl.check_ring_call = counting
    try:
        torch.manual_seed(5)
        q = torch.randn(1, 16, 4, 8, dtype=torch.float64)
        module = StandardRingAttention(SEGMENTS, DILATIONS)
        always = StandardRingAttention(SEGMENTS, DILATIONS, validate="always")
        for _ in range(3):
            module(q, q, q)
        module(q[:, :8], q[:, :8], q[:, :8])  # a new shard length: checked again
        module(q, q, q, is_causal=True)  # a new option: checked again
        for _ in range(2):
            always(q, q, q)
        counted = list(calls)
        # Shards of different lengths on the two ranks, both signatures new: the
        # collective check runs on every rank, and every rank raises.
        n = 2 if rank == 0 else 4
        try:
            module(q[:, :n], q[:, :n], q[:, :n])
            error = None
        except ValueError as exc:
            error = str(exc)
    finally:
        ring_impl.check_ring_call = original
    return {"calls": counted, "mismatch_error": error}


def _worker(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    return {
        "multihead": _multihead(rank, world_size, False),
        "multihead-causal": _multihead(rank, world_size, True),
        "plain": _plain(rank, world_size),
        "validate": _validate_once(rank, world_size),
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


def test_collective_check_runs_once_per_signature(results: list[dict[str, Any]]) -> None:
    for res in results:
        # 3 calls of one signature -> 1 check; new length -> 1; causal -> 1; "always" -> 2.
        assert (
            res["validate"]["calls"]
            == [(1, 16, 4, 8), (1, 8, 4, 8), (1, 16, 4, 8)] + [(1, 16, 4, 8)] * 2
        )
        assert res["validate"]["mismatch_error"] is not None
        assert "the local shards differ between ranks" in res["validate"]["mismatch_error"]


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
