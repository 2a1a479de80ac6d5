"""Ring attention over packed documents (``cu_seqlens``) that span ranks.

Every document is its own sequence: its segments start at its first token, so they do
not line up with the shards. A segment held by several ranks rings over exactly those
ranks; the rest of the sequence costs no transfer. Each case runs on gloo processes with
fresh inputs and is compared, forward and gradients in float64, with the dense oracle;
the bytes every rank sends, and to whom, are compared with a count made from the
definition (which positions of a segment a head uses) and the ring's schedule.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import FLOAT64_RING_TOL, spawn

from dilated_attention_pytorch import MultiheadDilatedAttention, ring_dilated_attention
from dilated_attention_pytorch.backends import BlockOps
from dilated_attention_pytorch.oracle import dense_dilated_attention
from dilated_attention_pytorch.ring import RingMultiheadDilatedAttention

pytestmark = pytest.mark.distributed


@dataclass(frozen=True)
class DocCase:
    name: str
    cu_seqlens: tuple[int, ...] | tuple[tuple[int, ...], ...]  # per ring when ring_size
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    is_causal: bool = False
    branch_mixing: str = "softmax"
    heads: int = 4
    kv_heads: int = 4
    local_len: int = 16
    ring_size: int | None = None

    def documents(self, rank: int) -> tuple[int, ...]:
        """The offsets of the documents of ``rank``'s ring."""
        if self.ring_size is None:
            return self.cu_seqlens  # type: ignore[return-value]
        return self.cu_seqlens[rank // self.ring_size]  # type: ignore[return-value]


CASES = {
    2: [
        # A document across the boundary: branch 0's segment [11, 19) and branch 1's
        # [3, 19) ring over both ranks; the rest stays local.
        DocCase("two-ranks", (0, 3, 21, 21, 32), (8, 16), (1, 2), is_causal=True, kv_heads=2),
        DocCase(
            "one-document",
            (0, 32),
            (8, 32),
            (2, 3),
            branch_mixing="head_split",
            heads=6,
            kv_heads=3,
        ),
    ],
    4: [
        # Rank 0 holds whole documents and sends nothing; 1-2 and 2-3 share documents.
        DocCase("neighbours", (0, 5, 16, 40, 44, 64), (8, 32), (1, 2), kv_heads=2),
        DocCase("neighbours-causal", (0, 5, 16, 40, 44, 64), (8, 32), (1, 2), is_causal=True),
        # A document over all four ranks, segments (of one branch) over two and over four.
        DocCase("long-document", (0, 10, 64), (8, 64), (1, 4), is_causal=True, kv_heads=1),
        DocCase("uneven", (0, 7, 7, 30, 63, 64), (5, 24), (3, 2), branch_mixing="head_split"),
        # Two rings of two ranks, each with its own documents.
        DocCase("two-rings", ((0, 12, 32), (0, 20, 25, 32)), (8, 16), (1, 2), ring_size=2),
    ],
}


def _inputs(case: DocCase, world_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Whole-sequence q, k, v (one per ring), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    rings = 1 if case.ring_size is None else world_size // case.ring_size
    N = case.local_len * world_size // rings
    shape, kv_shape = (rings, N, case.heads, 8), (rings, N, case.kv_heads, 8)
    q = torch.randn(shape, generator=g, dtype=torch.float64)
    k, v = (torch.randn(kv_shape, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _worker(rank: int, world_size: int, payload: tuple[list[str], int]) -> dict[str, Any]:
    names, seed = payload
    sends: list[tuple[int, int]] = []
    original = dist.batch_isend_irecv

    def p2p(ops: list[dist.P2POp]) -> Any:
        for op in ops:
            if op.op in (dist.isend, dist.send):
                sends.append((op.peer, op.tensor.numel() * op.tensor.element_size()))
        return original(ops)

    cases = {c.name: c for c in CASES[world_size]}
    records = {}
    dist.batch_isend_irecv = p2p
    try:
        for i, name in enumerate(names):
            c = cases[name]
            size = c.ring_size or world_size
            row, position = rank // size, rank % size
            q, k, v, dout = (t[row : row + 1] for t in _inputs(c, world_size, seed + i))
            cu = c.documents(rank)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            settings = dict(is_causal=c.is_causal, branch_mixing=c.branch_mixing)
            ref = dense_dilated_attention(
                *full, c.segment_lengths, c.dilation_rates, cu_seqlens=cu, **settings
            )
            ref.backward(dout)
            part = slice(position * c.local_len, (position + 1) * c.local_len)
            shards = [t[:, part].clone().requires_grad_() for t in (q, k, v)]
            sends.clear()
            out = ring_dilated_attention(
                *shards, c.segment_lengths, c.dilation_rates, cu_seqlens=torch.tensor(cu),
                ring_size=c.ring_size, **settings,
            )  # fmt: skip
            forward = list(sends)
            sends.clear()
            out.backward(dout[:, part])
            pairs = [(out.detach(), ref.detach()[:, part])]
            pairs += [(s.grad, f.grad[:, part]) for s, f in zip(shards, full, strict=True)]
            records[name] = {"pairs": pairs, "forward": forward, "backward": list(sends)}
    finally:
        dist.batch_isend_irecv = original
    return records


def _uses(case: DocCase, branch: int) -> set[tuple[int, int]]:
    """``(offset, K/V head)`` of the query heads running ``branch``, from the definition."""
    r, per_kv = case.dilation_rates[branch], case.heads // case.kv_heads
    if case.branch_mixing == "softmax":
        return {(h % r, h // per_kv) for h in range(case.heads)}
    G = len(case.segment_lengths)
    sizes = [case.heads // G + (1 if i < case.heads % G else 0) for i in range(G)]
    start = sum(sizes[:branch])
    return {(j % r, (start + j) // per_kv) for j in range(sizes[branch])}


def _expected_sends(case: DocCase, rank: int, world_size: int) -> tuple[int, int, set[int]]:
    """Bytes ``rank`` sends in the forward and the backward, and the ranks it may send to.

    Per branch and document, a segment ``[S, E)`` held by ranks ``m_0 < ... < m_{g-1}``
    forms a ring of those ranks. Member ``c``'s block: K and V of the positions
    ``p`` of its part with ``(p - S) mod r == o``, once per (offset, K/V head) in use.
    Non-causal, member ``c`` forwards every block but its successor's (``g - 1`` sends);
    causal, blocks only go to later members, so member ``c < g - 1`` sends the blocks of
    members ``0..c``. The backward sends them again, plus one dK/dV accumulator for
    every other member's block it attended to.
    """
    size = case.ring_size or world_size
    L, first_rank = case.local_len, rank - rank % size
    item = torch.tensor([], dtype=torch.float64).element_size()
    bounds = case.documents(rank)
    forward = backward = 0
    peers: set[int] = set()
    for i, (w, r) in enumerate(zip(case.segment_lengths, case.dilation_rates, strict=True)):
        uses = _uses(case, i)
        for d0, d1 in zip(bounds, bounds[1:]):
            for S in range(d0, d1, w):
                E = min(S + w, d1)
                members = list(range(S // L, (E - 1) // L + 1))
                if len(members) == 1 or rank % size not in members:
                    continue
                peers |= {first_rank + m for m in members} - {rank}

                def block(m: int, S: int = S, E: int = E, r: int = r, uses=uses) -> int:
                    tokens = range(max(S, m * L), min(E, (m + 1) * L))
                    count = sum(1 for o, _ in uses for p in tokens if (p - S) % r == o)
                    return 2 * count * 8 * item  # K and V, D = 8, B = 1

                g, pos = len(members), members.index(rank % size)
                if case.is_causal:
                    kv = [block(members[o]) for o in range(pos + 1)] if pos < g - 1 else []
                    grads = [block(members[o]) for o in range(pos)]
                else:
                    kv = [block(members[(pos - t) % g]) for t in range(g - 1)]
                    grads = [block(members[(pos - t) % g]) for t in range(1, g)]
                forward += sum(kv)
                backward += sum(kv) + sum(grads)
    return forward, backward, peers


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def results(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world_size = request.param
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh inputs on every run
    names = [c.name for c in CASES[world_size]]
    return world_size, spawn(_worker, world_size, (names, seed))


def test_spanning_documents_match_the_oracle_and_send_only_their_segments(
    results: tuple[int, list[dict[str, Any]]],
) -> None:
    world_size, per_rank = results
    for case in CASES[world_size]:
        for rank, res in enumerate(per_rank):
            record = res[case.name]
            for got, want in record["pairs"]:
                torch.testing.assert_close(
                    got, want, **FLOAT64_RING_TOL, msg=lambda m, n=case.name: f"{n}: {m}"
                )
            want_fwd, want_bwd, peers = _expected_sends(case, rank, world_size)
            sent = [sum(n for _, n in record[p]) for p in ("forward", "backward")]
            assert sent == [want_fwd, want_bwd], f"{case.name}, rank {rank}"
            to = {p for phase in ("forward", "backward") for p, _ in record[phase]}
            assert to <= peers, f"{case.name}, rank {rank} sent to {to - peers}"
    if world_size == 4:
        # The design's promise: a rank whose documents all lie inside its shard is silent.
        for name in ("neighbours", "neighbours-causal"):
            record = per_rank[0][name]
            assert not record["forward"] and not record["backward"], name


def _layer_worker(rank: int, world_size: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)  # the same weights and inputs on every rank
    N, L, cu = 32, 16, torch.tensor([0, 3, 21, 32])
    kwargs = dict(num_kv_heads=2, dtype=torch.float64)
    ring = RingMultiheadDilatedAttention(32, 4, [8, 16], [1, 2], **kwargs)
    single = MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], **kwargs)
    single.load_state_dict(ring.state_dict())
    x = torch.randn(1, N, 32, dtype=torch.float64)
    part = slice(rank * L, (rank + 1) * L)
    pairs = []
    for already_split in (False, True):
        mine = (x[:, part] if already_split else x).clone().requires_grad_()
        whole = x.clone().requires_grad_()
        # max_seqlen (the longest document) is accepted for drop-in use and checked.
        out = ring(mine, is_causal=True, cu_seqlens=cu, max_seqlen=18,
                   already_split=already_split)[0]  # fmt: skip
        ref = single(whole, is_causal=True, cu_seqlens=cu)[0]
        ref_part = ref[:, part] if already_split else ref
        dout = torch.randn_like(ref)
        out.backward(dout[:, part] if already_split else dout)
        ref.backward(dout)
        grad_ref = whole.grad[:, part] if already_split else whole.grad
        pairs += [(out.detach(), ref_part.detach()), (mine.grad, grad_ref)]
    try:  # too small on one rank: raised on every rank
        ring(x[:, part], cu_seqlens=cu, max_seqlen=18 if rank else 10, already_split=True)
        error = ""
    except ValueError as exc:
        error = str(exc)
    return pairs, error


def test_ring_layer_takes_packed_documents() -> None:
    # RingMultiheadDilatedAttention(x, cu_seqlens=...) passes the documents to its ring,
    # on the whole sequence and on shards; equal to the single-device layer.
    seed = int(torch.randint(0, 2**31, ()).item())
    for pairs, error in spawn(_layer_worker, 2, seed):
        for got, want in pairs:
            torch.testing.assert_close(got, want, **FLOAT64_RING_TOL)
        assert "invalid input on rank(s) [0]" in error and "max_seqlen" in error, error


def _calls_worker(rank: int, world_size: int, _: Any) -> dict[str, int]:
    # The block ops the ring calls, counted: whole documents of a shard must not add any
    # (they run as one packed call of the backend, like dilated_attention's).
    ring_module = importlib.import_module(
        "dilated_attention_pytorch.distributed.ring_dilated_attention"
    )
    calls = [0]
    original = ring_module.select_block_ops

    def counting(*args):
        ops = original(*args)

        def forward(*a, **kw):
            calls[0] += 1
            return ops.forward(*a, **kw)

        return BlockOps(ops.name, forward, ops.backward)

    ring_module.select_block_ops = counting
    counts = {}
    try:
        for name, inner in (("few", 2), ("many", 14)):
            # One document spans ranks 0-1 around token 32; the rest are short ones.
            step = 32 // inner
            cu = sorted({*range(0, 28, step), 28, 36, *range(36, 64, step), 64})
            q = torch.randn(1, 32, 4, 8, dtype=torch.float64)
            calls[0] = 0
            ring_dilated_attention(q, q, q, [4, 16], [1, 2], cu_seqlens=torch.tensor(cu))
            counts[name] = calls[0]
    finally:
        ring_module.select_block_ops = original
    return counts


def test_whole_documents_of_a_shard_run_as_one_packed_call() -> None:
    for counts in spawn(_calls_worker, 2):
        assert counts["few"] == counts["many"], counts
