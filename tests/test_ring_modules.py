"""Ring modules on gloo (CPU) against the single-process modules with the same weights."""

from __future__ import annotations

import importlib
import re
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
    got, _ = ring_module(x_local, is_causal=is_causal, already_split=True)
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
    got = ring(*(shard_sequence(t) for t in (q, k, v)), is_causal=True, already_split=True)
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
            module(q, q, q, already_split=True)
        short = q[:, :8]
        module(short, short, short, already_split=True)  # a new shard length: checked again
        module(q, q, q, is_causal=True, already_split=True)  # a new option: checked again
        for _ in range(2):
            always(q, q, q, already_split=True)
        counted = list(calls)
        # Shards of different lengths on the two ranks, both signatures new: the
        # collective check runs on every rank, and every rank raises.
        n = 2 if rank == 0 else 4
        try:
            module(q[:, :n], q[:, :n], q[:, :n], already_split=True)
            error = None
        except ValueError as exc:
            error = str(exc)
    finally:
        ring_impl.check_ring_call = original
    return {"calls": counted, "mismatch_error": error}


def _replicated(rank: int, world_size: int, ring_size: int | None) -> dict[str, Any]:
    """Whole sequence in and out (already_split=False), rings of ``ring_size`` side by side;
    rings of 2 with grouped-query attention (2 K/V heads for 4 query heads)."""
    k = world_size if ring_size is None else ring_size
    kv_heads = 2 if ring_size == 2 else 4
    ring_index = rank // k
    torch.manual_seed(100 + ring_index)  # every ring its own data, the same within a ring
    q = torch.randn(2, 32, 4, 8, dtype=torch.float64, requires_grad=True)
    kk, v = (
        torch.randn(2, 32, kv_heads, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    dout = torch.randn(2, 32, 4, 8, dtype=torch.float64)
    want = DilatedAttention(SEGMENTS, DILATIONS)(q, kk, v, is_causal=True)
    want_grads = torch.autograd.grad(want, (q, kk, v), dout)
    got = StandardRingAttention(SEGMENTS, DILATIONS, ring_size=ring_size)(q, kk, v, is_causal=True)
    got_grads = torch.autograd.grad(got, (q, kk, v), dout)
    # Shards of this ring (already_split=True), rank j of the ring holds tokens [j*L, (j+1)*L).
    L, j = 32 // k, rank % k
    local = [t.detach()[:, j * L : (j + 1) * L].clone().requires_grad_() for t in (q, kk, v)]
    split = StandardRingAttention(SEGMENTS, DILATIONS, ring_size=ring_size)(
        *local, is_causal=True, already_split=True
    )
    split_grads = torch.autograd.grad(split, local, dout[:, j * L : (j + 1) * L])
    # Multi-head layer, whole sequence: the single-device layer exactly, parameters included.
    torch.manual_seed(7)
    full_layer = MultiheadDilatedAttention(
        32, 4, SEGMENTS, DILATIONS, num_kv_heads=kv_heads, dtype=torch.float64
    )
    ring_layer = RingMultiheadDilatedAttention(
        32, 4, SEGMENTS, DILATIONS, ring_size=ring_size, num_kv_heads=kv_heads, dtype=torch.float64
    )
    ring_layer.load_state_dict(full_layer.state_dict())
    x = torch.randn(2, 32, 32, dtype=torch.float64, requires_grad=True)
    x_ring = x.detach().clone().requires_grad_()
    dy = torch.randn(2, 32, 32, dtype=torch.float64)
    full_layer(x, is_causal=True)[0].backward(dy)
    y_ring = ring_layer(x_ring, is_causal=True)[0]
    y_ring.backward(dy)
    return {
        "out": (got.detach(), want.detach()),
        "grads": list(zip(got_grads, want_grads, strict=True)),
        "split_out": (split.detach(), want.detach()[:, j * L : (j + 1) * L]),
        "split_grads": [
            (g, w[:, j * L : (j + 1) * L]) for g, w in zip(split_grads, want_grads, strict=True)
        ],
        "layer": [(x_ring.grad, x.grad)]
        + [
            (p.grad, dict(full_layer.named_parameters())[n].grad)
            for n, p in ring_layer.named_parameters()
        ],
    }


def _dropout_and_mask(rank: int, world_size: int, ring_size: int | None) -> dict[str, Any]:
    """Training mode with dropout and a key padding mask: with every rank's generator
    seeded like the single-device call, the ring drops the same entries (forward and
    backward), whole sequence in and out and already split."""
    k = world_size if ring_size is None else ring_size
    ring_index, j = rank // k, rank % k
    torch.manual_seed(300 + ring_index)
    q, kk, v = (torch.randn(2, 32, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 32, 4, 8, dtype=torch.float64)
    mask = torch.rand(2, 32) < 0.3
    mask[1, :20] = True  # many queries of batch 1 see no key in their local segments
    single = DilatedAttention(SEGMENTS, DILATIONS, dropout=0.25)
    torch.manual_seed(11)
    want = single(q, kk, v, is_causal=True, key_padding_mask=mask)
    want_grads = torch.autograd.grad(want, (q, kk, v), dout)
    ring = StandardRingAttention(SEGMENTS, DILATIONS, dropout=0.25, ring_size=ring_size)
    torch.manual_seed(11)
    got = ring(q, kk, v, is_causal=True, key_padding_mask=mask)
    got_grads = torch.autograd.grad(got, (q, kk, v), dout)
    L = 32 // k
    local = [t.detach()[:, j * L : (j + 1) * L].clone().requires_grad_() for t in (q, kk, v)]
    torch.manual_seed(11)
    split = ring(*local, is_causal=True, key_padding_mask=mask[:, j * L : (j + 1) * L],
                 already_split=True)  # fmt: skip
    split_grads = torch.autograd.grad(split, local, dout[:, j * L : (j + 1) * L])
    # The multi-head layer in training mode, whole sequence.
    torch.manual_seed(8)
    full_layer = MultiheadDilatedAttention(32, 4, SEGMENTS, DILATIONS, dropout=0.25,
                                           dtype=torch.float64)  # fmt: skip
    ring_layer = RingMultiheadDilatedAttention(
        32, 4, SEGMENTS, DILATIONS, ring_size=ring_size, dropout=0.25, dtype=torch.float64
    )
    ring_layer.load_state_dict(full_layer.state_dict())
    x = torch.randn(2, 32, 32, dtype=torch.float64, requires_grad=True)
    x_ring = x.detach().clone().requires_grad_()
    torch.manual_seed(12)
    y = full_layer(x, key_padding_mask=mask)[0]
    torch.manual_seed(12)
    y_ring = ring_layer(x_ring, key_padding_mask=mask)[0]
    y.sum().backward()
    y_ring.sum().backward()
    # Without the seed shared, the ring still drops entries (another draw of the mask).
    torch.manual_seed(13)
    other = ring(q, kk, v, is_causal=True, key_padding_mask=mask)
    errors = {}
    for name, call in {
        "length": lambda: ring(q[:, :31], kk[:, :31], v[:, :31]),
        "mask-shape": lambda: ring(q, kk, v, key_padding_mask=mask[:, :L]),
        # Only the first rank of each ring is wrong: every rank still raises (no hang).
        "one-rank-mask": lambda: ring(q, kk, v, key_padding_mask=mask[:, :L] if j == 0 else mask),
        "one-rank-length": lambda: ring(*(t[:, : 31 if j == 0 else 32] for t in (q, kk, v))),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return {
        "out": (got.detach(), want.detach()),
        "grads": list(zip(got_grads, want_grads, strict=True)),
        "split_out": (split.detach(), want.detach()[:, j * L : (j + 1) * L]),
        "split_grads": [
            (g, w[:, j * L : (j + 1) * L]) for g, w in zip(split_grads, want_grads, strict=True)
        ],
        "layer": [(y_ring.detach(), y.detach()), (x_ring.grad, x.grad)],
        "reseeded_differs": not torch.allclose(other, want),
        "errors": errors,
    }


def _worker4(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    return {
        "ring4": _replicated(rank, world_size, None),
        "rings2": _replicated(rank, world_size, 2),
        "dropout-mask-ring4": _dropout_and_mask(rank, world_size, None),
        "dropout-mask-rings2": _dropout_and_mask(rank, world_size, 2),
    }


@pytest.fixture(scope="module")
def results_w4() -> list[dict[str, Any]]:
    return spawn(_worker4, 4)


def _assert_pairs(pairs, rank: int, what: str) -> None:
    for i, (got, want) in enumerate(pairs):
        torch.testing.assert_close(
            got, want, **TOL, msg=lambda m, i=i: f"rank {rank}, {what} #{i}: {m}"
        )


@pytest.mark.parametrize("name", ["ring4", "rings2"])
def test_whole_sequence_in_and_out_is_the_single_device_module(
    results_w4: list[dict[str, Any]], results: list[dict[str, Any]], name: str
) -> None:
    # "ring4": one ring over 4 ranks; "rings2": two rings of 2 side by side, each with
    # its own data. Every rank gets the single-device output and gradients (not a
    # multiple of them), of the whole inputs and, for the layer, of every parameter.
    for rank, res in enumerate([*results_w4, *results] if name == "ring4" else results_w4):
        r = res[name]
        _assert_pairs([r["out"]], rank, "output")
        _assert_pairs(r["grads"], rank, "grad")
        _assert_pairs([r["split_out"]], rank, "already_split output")
        _assert_pairs(r["split_grads"], rank, "already_split grad")
        _assert_pairs(r["layer"], rank, "layer grad")


@pytest.mark.parametrize(
    "name", ["dropout-mask-ring2", "dropout-mask-ring4", "dropout-mask-rings2"]
)
def test_dropout_and_key_padding_mask_over_the_ring(
    results_w4: list[dict[str, Any]], results: list[dict[str, Any]], name: str
) -> None:
    per_rank = results if name == "dropout-mask-ring2" else results_w4
    for rank, res in enumerate(per_rank):
        r = res[name]
        _assert_pairs([r["out"]], rank, "output")
        _assert_pairs(r["grads"], rank, "grad")
        _assert_pairs([r["split_out"]], rank, "already_split output")
        _assert_pairs(r["split_grads"], rank, "already_split grad")
        _assert_pairs(r["layer"], rank, "layer")
        assert r["reseeded_differs"]
        errors = r["errors"]
        every = r"invalid input on rank\(s\) \[0, 1(, 2, 3)?\].*every rank raises"
        first = r"invalid input on rank\(s\) \[0(, 2)?\] .*every rank raises"
        length = r"31 tokens.*does not cut into \d equal shards"
        shape = (
            r"key_padding_mask must have shape \(B, N\) = \(2, 32\), the whole sequence.*"
            r"already_split=True"
        )
        assert re.search(every + ".*" + length, errors["length"]), errors["length"]
        assert re.search(every + ".*" + shape, errors["mask-shape"]), errors["mask-shape"]
        assert re.search(first + ".*" + shape, errors["one-rank-mask"]), errors["one-rank-mask"]
        assert re.search(first + ".*" + length, errors["one-rank-length"])


def _worker(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    return {
        "multihead": _multihead(rank, world_size, False),
        "multihead-causal": _multihead(rank, world_size, True),
        "plain": _plain(rank, world_size),
        "validate": _validate_once(rank, world_size),
        "ring4": _replicated(rank, world_size, None),  # named for the test: one ring of 2 here
        "dropout-mask-ring2": _dropout_and_mask(rank, world_size, None),
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


def test_without_process_group_a_ring_is_a_ring_of_one() -> None:
    from dilated_attention_pytorch import create_multihead_dilated_attention

    # Construction works anywhere (planning, memory estimates); a ring of one computes
    # the single-device result; a larger ring needs torch.distributed at forward.
    layer = create_multihead_dilated_attention(
        "ring", embed_dim=32, num_heads=4, segment_lengths=[8], dilation_rates=[1]
    )
    assert isinstance(layer, RingMultiheadDilatedAttention)
    q, k, v = (torch.randn(1, 16, 4, 8, dtype=torch.float64) for _ in range(3))
    want = DilatedAttention(SEGMENTS, DILATIONS)(q, k, v, is_causal=True)
    for already_split in (False, True):
        got = StandardRingAttention(SEGMENTS, DILATIONS)(
            q, k, v, is_causal=True, already_split=already_split
        )
        torch.testing.assert_close(got, want, **TOL)
    module = RingDilatedAttention(SEGMENTS, DILATIONS, ring_size=2)
    with pytest.raises(ValueError, match=r"ring_size=2 needs torch.distributed"):
        module(q, k, v)


def test_ring_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ring_size must be a positive int"):
        RingDilatedAttention(SEGMENTS, DILATIONS, ring_size=0)
