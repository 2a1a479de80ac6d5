"""RingBlockSparseAttention on gloo against single-device block-sparse attention, and the
bytes it moves: exactly the kept key/value blocks a rank's queries need."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import spawn, value_errors

from dilated_attention_pytorch import (
    RingBlockSparseAttention,
    block_sparse_attention,
    create_block_sparse_attention,
)
from dilated_attention_pytorch.sparse import PATTERN_TYPES

pytestmark = pytest.mark.distributed

TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64, only summation order differs
BS, L, B, H, D = 16, 64, 2, 3, 8  # 4 blocks per rank


def _compare(rank: int, world: int, pattern_type: str, causal: bool, ring_size: int | None,
             split: bool, kv_heads: int = H) -> dict[str, Any]:  # fmt: skip
    k = world if ring_size is None else ring_size
    ring_index, j = rank // k, rank % k
    N = L * k
    torch.manual_seed(100 + ring_index)  # every ring its own data, the same within a ring
    q, dout = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(2))
    kk, v = (torch.randn(B, N, kv_heads, D, dtype=torch.float64) for _ in range(2))
    module = RingBlockSparseAttention(
        sparsity_ratio=0.7, pattern_type=pattern_type, block_size=BS, ring_size=ring_size,
        num_heads=H if pattern_type == "random" else None, dropout=0.2,
    )  # fmt: skip
    pattern = module.pattern(N, causal)
    leaves = [t.clone().requires_grad_() for t in (q, kk, v)]
    torch.manual_seed(5)
    want = block_sparse_attention(*leaves, pattern, dropout_p=0.2)
    want_grads = torch.autograd.grad(want, leaves, dout)
    part = slice(j * L, (j + 1) * L)
    if split:
        mine = [t[:, part].clone().requires_grad_() for t in (q, kk, v)]
        torch.manual_seed(5)
        got = module(*mine, is_causal=causal, already_split=True)
        grads = torch.autograd.grad(got, mine, dout[:, part])
        want, want_grads = want[:, part], [g[:, part] for g in want_grads]
    else:
        mine = [t.clone().requires_grad_() for t in (q, kk, v)]
        torch.manual_seed(5)
        got = module(*mine, is_causal=causal)
        grads = torch.autograd.grad(got, mine, dout)
    return {"pairs": [(got.detach(), want.detach())] + list(zip(grads, want_grads, strict=True))}


CASES = [(p, c, s) for p in PATTERN_TYPES for c in (False, True) for s in (False, True)]


def _worker(rank: int, world: int, _: Any) -> dict[str, Any]:
    res = {f"{p}-{c}-{s}": _compare(rank, world, p, c, None, s) for p, c, s in CASES}
    # Grouped-query attention: one K/V head for the 3 query heads (per-head and shared
    # patterns; the single-device reference is checked against repeated K/V elsewhere).
    res["gqa-random"] = _compare(rank, world, "random", True, None, True, kv_heads=1)
    res["gqa-dilated"] = _compare(rank, world, "dilated_sparse", False, None, False, kv_heads=1)
    if world == 4:  # two rings of 2 side by side
        res["rings2"] = _compare(rank, world, "dilated_sparse", True, 2, True)
    return res


@pytest.fixture(scope="module")
def results() -> dict[int, list[dict[str, Any]]]:
    return {w: spawn(_worker, w) for w in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_device(results, world: int) -> None:
    for rank, res in enumerate(results[world]):
        for name, r in res.items():
            for i, (got, want) in enumerate(r["pairs"]):
                torch.testing.assert_close(
                    got, want, **TOL, msg=lambda m, n=name, i=i, r=rank: f"rank {r} {n} #{i}: {m}"
                )


def _bytes_worker(rank: int, world: int, _: Any) -> dict[str, Any]:
    sent: list[tuple[int, int]] = []
    original = dist.batch_isend_irecv

    def p2p(ops):
        for op in ops:
            if op.op in (dist.isend, dist.send):
                sent.append((op.peer, op.tensor.numel() * op.tensor.element_size()))
        return original(ops)

    dist.batch_isend_irecv = p2p
    out: dict[str, Any] = {}
    try:
        # K/V heads: H, or 1 (grouped-query attention: only that head's blocks travel).
        for pattern_type, kv_heads in (("local_window", H), ("random", H), ("random", 1)):
            module = RingBlockSparseAttention(
                sparsity_ratio=0.8, pattern_type=pattern_type, block_size=BS
            )
            q = torch.randn(B, L, H, D, requires_grad=True)
            k, v = (torch.randn(B, L, kv_heads, D, requires_grad=True) for _ in range(2))
            sent.clear()
            y = module(q, k, v, already_split=True)
            forward = list(sent)
            sent.clear()
            y.sum().backward()
            mask = module.pattern(L * world).block_mask
            out[pattern_type, kv_heads] = {"forward": forward, "backward": list(sent),
                                           "mask": mask}  # fmt: skip
    finally:
        dist.batch_isend_irecv = original
    return out


@pytest.fixture(scope="module")
def byte_results() -> dict[int, list[dict[str, Any]]]:
    return {w: spawn(_bytes_worker, w) for w in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("pattern_type", "kv_heads"), [("local_window", H), ("random", H),
                                                        ("random", 1)])  # fmt: skip
def test_bytes_are_the_kept_blocks(byte_results, world: int, pattern_type: str,
                                   kv_heads: int) -> None:  # fmt: skip
    n = L // BS
    # K and V (forward) or dK and dV (backward) of one block, fp32, their K/V heads only.
    per_block = 2 * B * BS * kv_heads * D * 4
    for rank, res in enumerate(byte_results[world]):
        r = res[pattern_type, kv_heads]
        mask = r["mask"]
        for peer in range(world):
            if peer == rank:
                continue
            # Blocks of mine that the peer's queries keep: sent once, forward; their
            # gradients come back in the backward, so the peer sends those to me.
            mine_needed = mask[peer * n : (peer + 1) * n, rank * n : (rank + 1) * n].any(0).sum()
            peer_needed = mask[rank * n : (rank + 1) * n, peer * n : (peer + 1) * n].any(0).sum()
            fwd = sum(b for p, b in r["forward"] if p == peer)
            bwd = sum(b for p, b in r["backward"] if p == peer)
            assert fwd == int(mine_needed) * per_block, (rank, peer)
            assert bwd == int(peer_needed) * per_block, (rank, peer)
    if pattern_type == "local_window":
        # A window talks to neighbours only: the bytes per rank do not grow with the ranks.
        per_rank = [sum(b for _, b in res[pattern_type, kv_heads]["forward"])
                    for res in byte_results[world]]  # fmt: skip
        assert max(per_rank) <= 2 * per_block * (n if world > 1 else 0)


def _eval_then_train(module: RingBlockSparseAttention) -> None:
    q = torch.randn(1, 64, 2, 8)
    module.eval()
    module(q, q, q, already_split=True)
    module.train()
    module(q, q, q, already_split=True)


def _bad_worker(rank: int, world: int, _: Any) -> dict[str, str | None]:
    calls = {
        "shard-not-multiple-of-block": lambda: RingBlockSparseAttention(
            pattern_type="local_window", block_size=48
        )(*(torch.randn(1, 64, 2, 8) for _ in range(3)), already_split=True),
        "ratio-differs": lambda: RingBlockSparseAttention(
            pattern_type="local_window", block_size=16, sparsity_ratio=0.5 if rank else 0.6
        )(*(torch.randn(1, 64, 2, 8) for _ in range(3)), already_split=True),
        # Settings outside the block mask's shape that change what a rank computes.
        "seed-differs": lambda: RingBlockSparseAttention(
            pattern_type="random", block_size=16, sparsity_ratio=0.5, seed=rank
        )(*(torch.randn(1, 64, 2, 8) for _ in range(3)), already_split=True),
        "heads-differ": lambda: RingBlockSparseAttention(
            pattern_type="random",
            block_size=16,
            sparsity_ratio=0.5,
            num_heads=2 if rank else None,
        )(*(torch.randn(1, 64, 2, 8) for _ in range(3)), already_split=True),
        "scale-differs": lambda: RingBlockSparseAttention(
            pattern_type="local_window", block_size=16, scale=0.3 if rank else None
        )(*(torch.randn(1, 64, 2, 8) for _ in range(3)), already_split=True),
        "dropout-differs": lambda: RingBlockSparseAttention(
            pattern_type="local_window", block_size=16, dropout=0.5 if rank else 0.0
        )(*(torch.randn(1, 64, 2, 8) for _ in range(3)), already_split=True),
        # validate="once": an eval call (no dropout: the ranks agree) checked first; the
        # training call differs, and is checked again.
        "dropout-differs-after-eval": lambda: _eval_then_train(
            RingBlockSparseAttention(
                pattern_type="local_window", block_size=16, dropout=0.5 if rank else 0.0
            )
        ),
        # Grouped-query attention with a different K/V head count on rank 1.
        "kv-heads-differ": lambda: RingBlockSparseAttention(
            pattern_type="local_window", block_size=16
        )(
            torch.randn(1, 64, 2, 8),
            *(torch.randn(1, 64, 1 if rank else 2, 8) for _ in range(2)),
            already_split=True,
        ),
        "kv-heads-not-a-divisor": lambda: RingBlockSparseAttention(
            pattern_type="local_window", block_size=16
        )(
            torch.randn(1, 64, 3, 8),
            *(torch.randn(1, 64, 2, 8) for _ in range(2)),
            already_split=True,
        ),
        # A per-head pattern for 4 heads and q of 2 (it used to run on the first 2 masks).
        "per-head-count": lambda: RingBlockSparseAttention(
            pattern_type="random", block_size=16, sparsity_ratio=0.5, num_heads=4
        )(*(torch.randn(1, 64, 2, 8) for _ in range(3)), already_split=True),
        # The whole sequence, wrong on rank 0 only: rank 1 raises too instead of waiting.
        "one-rank-length": lambda: RingBlockSparseAttention(
            pattern_type="local_window", block_size=16
        )(*(torch.randn(1, 63 if rank == 0 else 64, 2, 8) for _ in range(3))),
    }
    return value_errors(calls)


def test_bad_input_raises_on_every_rank() -> None:
    expected = {
        "shard-not-multiple-of-block": r"invalid input on rank\(s\) \[0, 1\].*64 tokens, not a multiple of block_size=48",
        "ratio-differs": r"the ranks of a ring disagree.*sparsity_ratio\": 0.6.*sparsity_ratio\": 0.5",
        "seed-differs": r"the ranks of a ring disagree.*seed\": 0.*seed\": 1",
        "heads-differ": r"the ranks of a ring disagree.*num_heads\": null.*num_heads\": 2",
        "scale-differs": r"the ranks of a ring disagree.*scale=None.*scale=0.3",
        "dropout-differs": r"the ranks of a ring disagree.*dropout_p=0.0.*dropout_p=0.5",
        "dropout-differs-after-eval": r"the ranks of a ring disagree.*dropout_p=0.0.*dropout_p=0.5",
        "kv-heads-differ": r"the ranks of a ring disagree.*rank 0 has q shape/K/V heads/dtype/device/causal \(\(1, 64, 2, 8\), 2, .*rank 1 has .*\(\(1, 64, 2, 8\), 1, ",
        "kv-heads-not-a-divisor": r"invalid input on rank\(s\) \[0, 1\].*k has 2 heads, which must divide q's 3 heads",
        "per-head-count": r"invalid input on rank\(s\) \[0, 1\].*one block mask per head for 4 heads, but q has 2; build it with num_heads=2",
        "one-rank-length": r"invalid input on rank\(s\) \[0\] .*63 tokens.*does not cut into 2 equal shards",
    }  # fmt: skip
    for rank, errors in enumerate(spawn(_bad_worker, 2)):
        for name, pattern in expected.items():
            assert errors[name] is not None, f"rank {rank} did not raise for {name}"
            assert re.search(pattern, errors[name], flags=re.S), errors[name]


def _layer_worker(rank: int, world: int, _: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # The multi-head layer with 2 K/V heads for its 4 query heads and the ring as its
    # inner attention, on the whole sequence (the same on every rank), against the same
    # layer on one device: output, input and parameter gradients.
    torch.manual_seed(0)
    layer = create_block_sparse_attention(
        embed_dim=32, num_heads=4, sparsity_ratio=0.5, pattern_type="random", block_size=16,
        dtype=torch.float64, num_kv_heads=2,
    )  # fmt: skip
    one_device = copy.deepcopy(layer)
    layer.attention = RingBlockSparseAttention(block_size=16, sparsity_ratio=0.5,
                                               pattern_type="random")  # fmt: skip
    x = torch.randn(2, 32 * world, 32, dtype=torch.float64)
    results = []
    for m in (layer, one_device):
        leaf = x.clone().requires_grad_()
        out = m(leaf, is_causal=True)[0]
        results.append([out.detach(), *torch.autograd.grad(out.sum(), [leaf, *m.parameters()])])
    return list(zip(*results, strict=True))


def test_grouped_query_layer_over_the_ring() -> None:
    for rank, pairs in enumerate(spawn(_layer_worker, 2)):
        for i, (got, want) in enumerate(pairs):
            torch.testing.assert_close(
                got, want, **TOL, msg=lambda m, i=i, r=rank: f"rank {r} #{i}: {m}"
            )
