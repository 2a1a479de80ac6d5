"""The ring's zigzag layout: rank ``i`` of ``k`` holds chunks ``i`` and ``2k-1-i``.

The same exactness checks as the contiguous layout (every case against the dense oracle,
forward and gradients, float64, fresh inputs, on 2 and 4 gloo processes), plus what the
layout is for: under a causal mask every rank computes the same number of query-key
pairs, where contiguous shards leave most of the work to the last ranks.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import FLOAT64_RING_TOL, spawn

from dilated_attention_pytorch import MultiheadDilatedAttention
from dilated_attention_pytorch.backends import BlockOps
from dilated_attention_pytorch.distributed import (
    gather_sequence,
    ring_dilated_attention,
    shard_sequence,
    zigzag_order,
)
from dilated_attention_pytorch.oracle import dense_dilated_attention
from dilated_attention_pytorch.ring import RingMultiheadDilatedAttention

pytestmark = pytest.mark.distributed

# The module (the package exports a function of the same name).
ring_module = importlib.import_module(
    "dilated_attention_pytorch.distributed.ring_dilated_attention"
)


@dataclass(frozen=True)
class ZigzagCase:
    name: str
    local_len: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    is_causal: bool = True
    branch_mixing: str = "softmax"
    heads: int = 4
    kv_heads: int = 4
    mask: bool = False
    ring_size: int | None = None
    dropout: float = 0.0  # the oracle drops the entries of the seed the ring draws


CASES = {
    2: [
        # Dense causal ring: the case the layout is for.
        ZigzagCase("dense", 8, (16,), (1,)),
        # LongNet: local branches (inside a chunk), one of a whole shard, one over all.
        ZigzagCase("longnet", 12, (3, 12, 24), (1, 2, 3), kv_heads=2),
        ZigzagCase("non-causal", 8, (4, 16), (2, 3), is_causal=False, mask=True),
        ZigzagCase("head-split", 8, (2, 8, 64), (2, 4, 4), branch_mixing="head_split"),
        ZigzagCase("dropout", 8, (4, 16), (1, 2), kv_heads=2, dropout=0.3),
    ],
    4: [
        ZigzagCase("dense", 8, (32,), (1,), kv_heads=1),
        # Segments of two shards: in zigzag order they spread over all four ranks.
        ZigzagCase("longnet", 16, (8, 16, 32, 64), (1, 2, 4, 4), kv_heads=2),
        ZigzagCase("masked", 12, (6, 48), (2, 3), mask=True),
        ZigzagCase("non-causal", 8, (4, 16, 32), (1, 2, 4), is_causal=False),
        ZigzagCase("two-rings", 12, (6, 24), (2, 2), ring_size=2),
        ZigzagCase("dropout", 8, (8, 32), (1, 2), mask=True, dropout=0.3),
    ],
}


def _counting_ops(ops: BlockOps, pairs: list[int]) -> BlockOps:
    """``ops`` that add to ``pairs[0]`` the query-key pairs each forward block computes."""

    def forward(q, k, v, *, causal, **kwargs):
        n_q, n_k = q.shape[1], k.shape[1]
        count = n_q * (n_q + 1) // 2 if causal else n_q * n_k
        pairs[0] += q.shape[0] * q.shape[2] * count
        return ops.forward(q, k, v, causal=causal, **kwargs)

    return BlockOps(ops.name, forward, ops.backward)


def _worker(rank: int, world_size: int, payload: tuple[list[str], int]) -> dict[str, Any]:
    names, seed = payload
    cases = {c.name: c for c in CASES[world_size]}
    pairs = [0]
    original = ring_module.select_block_ops
    ring_module.select_block_ops = lambda *a: _counting_ops(original(*a), pairs)
    records: dict[str, Any] = {}
    try:
        for i, name in enumerate(names):
            c = cases[name]
            size = c.ring_size or world_size
            row = rank // size
            groups = [dist.new_group(list(range(j, j + size))) for j in range(0, world_size, size)]
            group = groups[row] if c.ring_size else None
            g = torch.Generator().manual_seed(seed + i)
            N = c.local_len * size
            q = torch.randn(world_size // size, N, c.heads, 8, generator=g, dtype=torch.float64)
            k, v = (
                torch.randn(world_size // size, N, c.kv_heads, 8, generator=g, dtype=torch.float64)
                for _ in range(2)
            )
            dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
            mask = torch.rand(q.shape[:2], generator=g) < 0.25 if c.mask else None
            q, k, v, dout = (t[row : row + 1] for t in (q, k, v, dout))
            mask = None if mask is None else mask[row : row + 1]
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            settings = dict(is_causal=c.is_causal, branch_mixing=c.branch_mixing)
            # The ring draws its dropout seed from the default generator, seeded alike.
            torch.manual_seed(seed + i)
            drawn = int(torch.randint(0, 2**62, (1,)).item())
            ref = dense_dilated_attention(
                *full, c.segment_lengths, c.dilation_rates, key_padding_mask=mask,
                dropout_p=c.dropout, dropout_seed=drawn, **settings,
            )  # fmt: skip
            ref.backward(dout)
            result = {}
            for layout in ("zigzag", "contiguous"):
                shards = [
                    shard_sequence(t, group, layout=layout).requires_grad_() for t in (q, k, v)
                ]
                shard_mask = None if mask is None else shard_sequence(mask, group, layout=layout)
                pairs[0] = 0
                torch.manual_seed(seed + i)
                out = ring_dilated_attention(
                    *shards, c.segment_lengths, c.dilation_rates, group=dist.group.WORLD,
                    ring_size=c.ring_size, key_padding_mask=shard_mask, layout=layout,
                    dropout_p=c.dropout, **settings,
                )  # fmt: skip
                out.backward(shard_sequence(dout, group, layout=layout))
                got = [out.detach(), *(s.grad for s in shards)]
                whole = [gather_sequence(t, group, layout=layout) for t in got]
                result[layout] = {"pairs": pairs[0], "outputs": whole}
            want = [ref.detach(), *(f.grad for f in full)]
            result["want"] = want
            records[name] = result
    finally:
        ring_module.select_block_ops = original
    return records


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def results(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world_size = request.param
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh inputs on every run
    names = [c.name for c in CASES[world_size]]
    return world_size, spawn(_worker, world_size, (names, seed))


def test_zigzag_ring_matches_the_oracle(results: tuple[int, list[dict[str, Any]]]) -> None:
    world_size, per_rank = results
    for case in CASES[world_size]:
        for rank, res in enumerate(per_rank):
            record = res[case.name]
            for layout in ("zigzag", "contiguous"):
                for got, want in zip(record[layout]["outputs"], record["want"], strict=True):
                    torch.testing.assert_close(
                        got,
                        want,
                        **FLOAT64_RING_TOL,
                        msg=lambda m, n=case.name, r=rank: f"{n} r{r}: {m}",
                    )


def test_zigzag_balances_causal_work(results: tuple[int, list[dict[str, Any]]]) -> None:
    # The dense causal ring: with contiguous shards rank j computes (2j + 1) / k^2 of the
    # triangle; zigzag gives every rank the same share (pairs counted in the forward).
    world_size, per_rank = results
    zigzag = [res["dense"]["zigzag"]["pairs"] for res in per_rank]
    contiguous = [res["dense"]["contiguous"]["pairs"] for res in per_rank]
    assert sum(zigzag) == sum(contiguous)  # the same work, only placed differently
    assert max(zigzag) == min(zigzag), zigzag
    assert max(contiguous) > 1.5 * min(contiguous), contiguous
    if world_size == 4:
        # LongNet (branches 8..64 over shards of 16): contiguous shards give the ranks
        # 512, 640, 640 and 768 pairs; zigzag gives each 640.
        work = [res["longnet"]["zigzag"]["pairs"] for res in per_rank]
        assert max(work) == min(work), work
        work = [res["longnet"]["contiguous"]["pairs"] for res in per_rank]
        assert max(work) > 1.15 * sum(work) / len(work), work


def test_zigzag_order_is_the_layout_of_the_ranks() -> None:
    # N = 16 over k = 2 ranks: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1, 2.
    assert zigzag_order(16, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    order = zigzag_order(48, 4)
    assert sorted(order.tolist()) == list(range(48))
    with pytest.raises(ValueError, match=r"2k = 6 equal chunks.*multiple of 6, got 16"):
        zigzag_order(16, 3)


def _errors_worker(rank: int, world_size: int, _: Any) -> dict[str, str]:
    q = torch.randn(1, 8, 4, 8, dtype=torch.float64)
    cases = {
        "odd-shard": (torch.randn(1, 7, 4, 8, dtype=torch.float64), ([7, 14], [1, 1]), {}),
        "segment-across-chunks": (q, ([8, 16], [1, 2]), {}),  # w = 8 > L/2 but != L: fine
        "segment-not-dividing-half": (torch.randn(1, 12, 4, 8), ([4, 24], [1, 2]), {}),
        "documents": (q, ([4, 16], [1, 2]), {"cu_seqlens": torch.tensor([0, 5, 16])}),
        "unknown-layout": (q, ([4, 16], [1, 2]), {"layout": "striped"}),
        "ranks-disagree": (q, ([4, 16], [1, 2]), {"layout": "zigzag" if rank else "contiguous"}),
    }
    errors = {}
    for name, (x, branches, kwargs) in cases.items():
        kwargs = {"layout": "zigzag", "is_causal": True, **kwargs}
        try:
            ring_dilated_attention(x, x, x, *branches, **kwargs)
            errors[name] = ""
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


def test_zigzag_errors_say_what_to_do() -> None:
    for errors in spawn(_errors_worker, 2):
        assert re.search(r"shard length L = N/k must be even, got L = 7", errors["odd-shard"])
        assert errors["segment-across-chunks"] == ""
        assert re.search(
            r"branch 0 \(segment length 4, dilation 1\) does not tile half a shard.*L/2 = 6",
            errors["segment-not-dividing-half"],
        )
        assert "layout='zigzag' does not take cu_seqlens" in errors["documents"]
        assert (
            "layout must be one of ['contiguous', 'zigzag'], got 'striped'"
            in (errors["unknown-layout"])
        )
        assert re.search(
            r"settings differ between ranks.*layout='zigzag'", errors["ranks-disagree"]
        )


def _module_worker(rank: int, world_size: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)  # the same weights and inputs on every rank
    ring = RingMultiheadDilatedAttention(32, 4, [4, 16, 32], [1, 2, 4], dtype=torch.float64)
    zigzag = RingMultiheadDilatedAttention(
        32, 4, [4, 16, 32], [1, 2, 4], layout="zigzag", dtype=torch.float64
    )
    single = MultiheadDilatedAttention(32, 4, [4, 16, 32], [1, 2, 4], dtype=torch.float64)
    zigzag.load_state_dict(ring.state_dict())
    single.load_state_dict(ring.state_dict())
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    ref = single(x, is_causal=True)[0]
    inner = ring.attention
    pairs = [
        # "auto": zigzag for a causal call on the whole sequence, contiguous otherwise.
        (torch.tensor(inner.resolve_layout(x, 2, True, False, False) == "zigzag"),
         torch.tensor(True)),
        (torch.tensor(inner.resolve_layout(x, 2, True, True, False) == "contiguous"),
         torch.tensor(True)),
        # 48 tokens on 3 ranks: w = 32 neither divides N nor covers it, so the segments are
        # not mirrored about the middle and zigzag would balance nothing.
        (torch.tensor(inner.resolve_layout(torch.empty(1, 48, 1), 3, True, False, False)
                      == "contiguous"), torch.tensor(True)),
        (ring(x, is_causal=True)[0], ref),
        # Shards in the zigzag layout, made by shard_sequence.
        (zigzag(shard_sequence(x, layout="zigzag"), is_causal=True, already_split=True)[0],
         shard_sequence(ref, layout="zigzag")),
    ]  # fmt: skip
    try:  # 30 tokens do not cut into 2k = 4 chunks: raised on every rank
        zigzag(torch.randn(1, 30, 32, dtype=torch.float64), is_causal=True)
        error = ""
    except ValueError as exc:
        error = str(exc)
    return [(a.detach(), b.detach()) for a, b in pairs], error


def test_ring_layer_runs_causal_calls_in_zigzag_order() -> None:
    seed = int(torch.randint(0, 2**31, ()).item())
    for pairs, error in spawn(_module_worker, 2, seed):
        for got, want in pairs:
            torch.testing.assert_close(got, want, **FLOAT64_RING_TOL)
        assert re.search(r"whole sequence of 30 tokens into 2k = 4 equal chunks", error), error
