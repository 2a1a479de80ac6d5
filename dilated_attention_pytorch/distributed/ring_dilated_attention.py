"""Ring dilated attention: dilated attention over a sequence sharded across ranks.

Rank ``j`` of a process group of ``k`` ranks holds tokens
``[j*L, (j+1)*L)`` (``L = N/k``) of q, k and v. For each branch ``(w, r)``:

- ``w <= L``: the shard holds whole segments; the branch runs locally, no transfer.
- ``w > L``: the ``g = w/L`` ranks holding one segment form a ring. Each packs its
  *dilated* K/V (only the positions its heads use, about ``L/r`` tokens per head)
  into one buffer that travels around the ring by P2P. Every rank attends its own
  dilated queries to each block as it arrives and merges the partial ``(out, lse)``
  with the LSE rule; the next transfer is posted before the current block is
  computed. With ``is_causal`` a block only travels to the later ranks of its
  segment, the ones that attend to it.

With ``layout="zigzag"`` rank ``j`` holds chunks ``j`` and ``2k-1-j`` of ``2k``, which
balances causal work (:func:`zigzag_ring_layout`).

With packed documents (``cu_seqlens``) segments restart at each document's first
token: a segment held by several ranks rings over exactly those ranks (pieces of
unequal length, :func:`document_ring_layout`); the rest is local.

The backward sends K/V around the ring again; the gradient of a block's K/V is
accumulated (in fp32, fp64 for fp64 inputs) in a buffer that travels behind the
block through the ranks that attended to it and finally returns to its owner.

Layers, as in ring-flash-attention: :func:`ring_dilated_forward` and
:func:`ring_dilated_backward` hold the ring loops, :class:`RingDilatedAttentionFunction`
is the ``autograd.Function``, :func:`ring_dilated_attention` the public function.
"""

from __future__ import annotations

import ast
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..autograd import first_order_only
from ..backends import (
    AttentionCall,
    Backend,
    BlockOps,
    ForwardContext,
    available_backends,
    get_backend,
    select_backend,
)
from ..backends.blocks import compute_dtype
from ..backends.pytorch import head_streams
from ..dropout import DropoutKeys, draw_seed, seed_tensor, token_ids
from ..functional import _call as _attention_call
from ..functional import _max_seqlen_tensor, dilated_attention
from ..ops import _backward as attention_backward_op
from ..ops import _forward as attention_forward_op
from ..ops import (
    _fresh,
    _resolve,
    _run_backward,
    _run_forward,
    backend_key,
    float_arguments,
    register_attention_autograd,
)
from ..plan import Branch, DilatedPlan, HeadGroup, num_dilated_positions
from ..segments import (
    merge_lse_,
    merges_blocks,
    scale_dout_by_lse_lo,
    segment_views,
    token_major,
)
from .comm import RingComm, RingStats, stats_by_key
from .sequence import shard_runs
from .validation import (
    check_ring_call,
    check_ring_call_locally,
    check_timeout,
    resolve_group,
    ring_documents,
)

__all__ = [
    "BlockOps",
    "RingBranch",
    "RingDilatedAttentionFunction",
    "document_ring_layout",
    "inner_documents",
    "ring_dilated_attention",
    "ring_dilated_backward",
    "ring_dilated_forward",
    "ring_layout",
    "select_block_ops",
    "zigzag_ring_layout",
]

logger = logging.getLogger("dilated_attention_pytorch")

# Gradient accumulators travel with their own tag so that, on gloo, they can never
# be matched with a K/V transfer between the same two ranks; the backward's K/V too, so
# that a peer that skipped a backward and runs the next forward is an error, not a mix.
_KV_TAG, _GRAD_TAG, _BACKWARD_KV_TAG = 0, 1, 5


# --------------------------------------------------------------------------- block ops


def select_block_ops(backend: str | Backend, call: AttentionCall) -> BlockOps:
    """The block primitive for ``backend``; the one place the ring chooses its kernel.

    ``"auto"`` takes the ``pytorch`` backend's blocks (cuDNN or flash on CUDA
    fp16/bf16, chunked matmuls otherwise), the configuration tested with NCCL and
    measured on 2 GPUs. A named backend (or a :class:`Backend` instance) must declare
    block ops and support the call, else ``ValueError``.
    """
    chosen = get_backend("pytorch" if backend == "auto" else backend)
    ops = chosen.block_ops() if chosen.capabilities.block_ops else None
    if ops is None:
        with_ops = [n for n in available_backends() if get_backend(n).capabilities.block_ops]
        raise ValueError(
            f"backend {chosen.name!r} has no block operations the ring can call; use "
            f"backend='auto' or one of {with_ops}."
        )
    why = chosen.why_not(call)
    if why:
        raise ValueError(f"backend {chosen.name!r} cannot run this call: {'; '.join(why)}.")
    logger.debug("ring backend=%r runs the block ops of %r", backend, chosen)
    return ops


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class PieceGroup:
    """One head group of a branch, as seen by every rank of the branch's ring.

    ``offsets[c]`` is the first dilated position inside the shard (or local segment)
    of the ``c``-th rank of the ring, ``counts[c]`` how many dilated positions that
    piece has. Both depend on ``c`` when ``L % r != 0``.
    """

    heads: HeadGroup
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    # (offset, count) of this rank's dilated queries when they are not its K/V piece
    # (the unit's ``query_span``); None: the queries are the K/V piece's positions.
    query: tuple[int, int] | None = None


@dataclass(frozen=True)
class RingBranch:
    """How one branch runs on this rank; a local branch has a ring of one rank."""

    segment_length: int
    dilation_rate: int
    # w for a local branch, L (the shard) for a branch across ranks; for a unit of packed
    # documents or of the zigzag layout, this rank's piece (any length; see ``span``).
    piece_length: int
    ring: tuple[int, ...]  # group ranks holding this rank's segment, in token order
    position: int  # this rank's index in ``ring``
    head_groups: tuple[PieceGroup, ...]
    piece_starts: tuple[int, ...]  # first token (in the ring's sequence) of each member's piece
    # Packed documents and zigzag: the tokens [a, b) of the shard this unit's K/V cover
    # (its piece, or a run of whole local segments of length piece_length); None: the
    # whole shard.
    span: tuple[int, int] | None = None
    # Zigzag: the tokens [a, b) of the shard whose queries attend to the unit's K/V when
    # they are not the K/V piece itself (one piece; see PieceGroup.query).
    query_span: tuple[int, int] | None = None
    # Whether the unit's blocks are causal: None: as the call (pieces in token order);
    # False: every query of the unit comes after every key (or the call is not causal).
    causal: bool | None = None
    index: int = 0  # the plan branch the unit belongs to (dropout streams are per branch)

    @property
    def size(self) -> int:
        return len(self.ring)

    def packed_numel(self, origin: int, batch: int, head_dim: int, masked: bool = False) -> int:
        """Elements of the packed K+V buffer of ring member ``origin`` (and, when
        ``masked``, of its dilated key keep mask, one element per key and head group)."""
        kv = 2 * sum(
            batch * g.counts[origin] * g.heads.num_kv_heads * head_dim for g in self.head_groups
        )
        return kv + (sum(batch * g.counts[origin] for g in self.head_groups) if masked else 0)


def ring_merges_blocks(branches: tuple[RingBranch, ...]) -> bool:
    """Whether some head merges several blocks (branches, or ring steps of one branch)."""
    return merges_blocks((g.heads.heads, b.size) for b in branches for g in b.head_groups)


def _piece_groups(
    branch: Branch, pieces: Sequence[tuple[int, int]], query: tuple[int, int] | None = None
) -> tuple[PieceGroup, ...]:
    """Per head group of ``branch``: the offsets and counts of the members' pieces, each
    ``(first token in the segment, length)``; ``query``: this rank's query piece, when it
    is not its K/V piece. Position ``p`` of a segment is dilated for offset ``o`` iff
    ``p mod r == o``, so a piece starting at ``t`` has its first at ``(o - t) mod r``."""
    r = branch.dilation_rate

    def count(hg: HeadGroup, piece: tuple[int, int]) -> int:
        return num_dilated_positions(piece[1], r, (hg.offset - piece[0]) % r)

    return tuple(
        PieceGroup(
            hg,
            offsets=tuple((hg.offset - t) % r for t, _ in pieces),
            counts=tuple(count(hg, p) for p in pieces),
            query=None if query is None else ((hg.offset - query[0]) % r, count(hg, query)),
        )
        for hg in branch.head_groups
    )


@functools.lru_cache(maxsize=256)
def ring_layout(
    plan: DilatedPlan, local_len: int, world_size: int, rank: int, base: int = 0
) -> tuple[RingBranch, ...]:
    """Per branch of ``plan``: the ring, this rank's place in it and every piece's offsets.

    ``world_size`` ranks hold the sequence, this one is number ``rank`` among them;
    they are group ranks ``base .. base + world_size - 1`` (``base > 0`` when the group
    is cut into several rings). Assumes the shard rules of :func:`ring_dilated_attention`
    hold (checked before). A branch with ``w > L`` groups ranks ``[s*g, (s+1)*g)`` with
    ``g = w/L``; when ``k % g != 0`` the last segment is shorter and its ring has fewer
    ranks.
    """
    branches = []
    for branch in plan.branches:
        w, r = branch.segment_length, branch.dilation_rate
        if w <= local_len:
            ring, position, piece, starts = (base + rank,), 0, w, (0,)
            piece_starts = (rank * local_len,)
        else:
            g = w // local_len
            first = (rank // g) * g
            ring = tuple(range(base + first, base + min(first + g, world_size)))
            position, piece = rank - first, local_len
            starts = tuple(c * local_len for c in range(len(ring)))  # piece c starts at c*L
            piece_starts = tuple((first + c) * local_len for c in range(len(ring)))
        groups = _piece_groups(branch, [(s, piece) for s in starts])
        branches.append(
            RingBranch(w, r, piece, ring, position, groups, piece_starts, index=len(branches))
        )
    return tuple(branches)


def inner_documents(
    bounds: tuple[int, ...], local_len: int, rank: int
) -> tuple[int, int, tuple[int, ...]] | None:
    """``(a, b, lengths)``: the tokens ``[a, b)`` of the shard of ring member ``rank`` that
    hold whole documents (those of neither the document crossing its start nor the one
    crossing its end) and those documents' lengths; None when there are none. Their
    attention needs nothing from other ranks: one packed call of the backend runs them
    (a backend without packed documents then runs them one by one, as on one device)."""
    lo, hi = rank * local_len, (rank + 1) * local_len
    inside = [b for b in bounds if lo <= b <= hi]
    if len(inside) < 2:
        return None  # one document covers the whole shard
    a, b = inside[0], inside[-1]
    lengths = tuple(y - x for x, y in zip(inside, inside[1:]) if y > x)
    return (a - lo, b - lo, lengths) if lengths else None


@functools.lru_cache(maxsize=64)
def document_ring_layout(
    plan: DilatedPlan,
    bounds: tuple[int, ...],
    local_len: int,
    world_size: int,
    rank: int,
    base: int = 0,
) -> tuple[RingBranch, ...]:
    """The units of a packed-documents ring call on this rank (:func:`ring_layout`'s
    counterpart when every document is its own sequence).

    ``bounds``: the document offsets in the ring's whole sequence of
    ``world_size * local_len`` tokens. Segments restart at each document's first token,
    so they no longer line up with the shards; per branch and per document on this
    shard, the units are:

    - a segment of the document that extends beyond this shard: a ring over exactly
      the ranks holding a part of it (pieces of unequal length, dilated positions counted
      from the segment's first token);
    - the run of whole segments inside the shard: one local unit, segments batched;
    - a shorter last segment inside the shard: one local unit.

    Units are ordered by (branch, first token), the same on every rank, so that the
    transfers between two ranks are posted in the same order on both sides. The
    documents of :func:`inner_documents` get no unit: they run as one packed call.
    """
    L = local_len
    lo, hi = rank * L, (rank + 1) * L
    inner = inner_documents(bounds, L, rank)
    skip = (lo, lo) if inner is None else (lo + inner[0], lo + inner[1])
    units = []
    for index, branch in enumerate(plan.branches):
        w, r = branch.segment_length, branch.dilation_rate

        def local(start: int, length: int, count: int, w: int = w, r: int = r, branch=branch,
                  index: int = index):  # fmt: skip
            groups = _piece_groups(branch, [(0, length)])
            span = (start - lo, start - lo + length * count)
            return RingBranch(w, r, length, (base + rank,), 0, groups, (start,), span, index=index)

        def across(first: int, last: int, w: int = w, r: int = r, branch=branch,
                   index: int = index):  # fmt: skip
            members = range(first // L, (last - 1) // L + 1)  # the ranks holding [first, last)
            starts = [max(first, c * L) for c in members]
            lengths = [min(last, (c + 1) * L) - s for c, s in zip(members, starts, strict=True)]
            groups = _piece_groups(
                branch, [(s - first, n) for s, n in zip(starts, lengths, strict=True)]
            )
            position = rank - members[0]
            span = (starts[position] - lo, starts[position] - lo + lengths[position])
            ring = tuple(base + c for c in members)
            return RingBranch(
                w, r, lengths[position], ring, position, groups, tuple(starts), span, index=index
            )

        for d0, d1 in zip(bounds, bounds[1:]):
            if d1 <= lo or d0 >= hi or d0 == d1 or skip[0] <= d0 < d1 <= skip[1]:
                continue  # not on this shard, empty, or one of the inner documents
            # Segments m of the document with a token on this shard: [m_first, m_last].
            m_first, m_last = (max(d0, lo) - d0) // w, (min(d1, hi) - 1 - d0) // w
            for m in sorted({m_first, m_last}):
                first, last = d0 + m * w, min(d0 + (m + 1) * w, d1)
                if first < lo or last > hi:
                    units.append((first, across(first, last)))
                else:
                    units.append((first, local(first, last - first, 1)))
                if m == m_first and m_last - m_first > 1:  # whole segments in between
                    start = d0 + (m + 1) * w
                    units.append((start, local(start, w, m_last - m_first - 1)))
    return tuple(unit for _, unit in units)  # per branch, in token order already


@functools.lru_cache(maxsize=256)
def zigzag_ring_layout(
    plan: DilatedPlan,
    local_len: int,
    world_size: int,
    rank: int,
    base: int = 0,
    is_causal: bool = True,
) -> tuple[RingBranch, ...]:
    """The units of a ring call in the zigzag layout (:func:`ring_layout`'s counterpart).

    The ring's sequence is cut into ``2k`` chunks of ``C = L/2`` tokens (``k`` ranks);
    rank ``i`` holds chunk ``i`` (the first half of its shard) and chunk ``2k-1-i``
    (the second half). Causal work is then balanced: every rank holds an early and a
    late chunk. A branch with ``w <= C`` is local. A longer segment is a run of whole
    chunks: those before the middle of the sequence (chunks ``< k``, one per rank, in
    rank order) and those after it (in reverse rank order). Per segment and per rank:

    - the early chunks form a ring in token order (causal when the call is), and so do
      the late chunks;
    - when the segment has both, the late chunks' queries attend the early chunks'
      keys in full (every such key comes first): a ring over the union of their ranks
      (without causality the early queries attend the late keys too).

    Units are ordered by (branch, segment, kind), the same on every rank.
    """
    L, k = local_len, world_size
    C = L // 2
    N = k * L

    def holder(chunk: int) -> tuple[int, int]:
        """(rank, first token in that rank's shard) of a chunk."""
        return (chunk, 0) if chunk < k else (2 * k - 1 - chunk, C)

    units = []
    for index, branch in enumerate(plan.branches):
        w, r = branch.segment_length, branch.dilation_rate
        if w <= C:  # segments inside chunks, and the chunks tile the shard: all local
            units.append(ring_layout(plan, L, 1, 0, base + rank)[index])
            continue
        mine = (rank, 2 * k - 1 - rank)
        for S in range(0, N, w):
            E = min(S + w, N)
            chunks = range(S // C, -(-E // C))
            if not any(c in chunks for c in mine):
                continue
            early = [c for c in chunks if c < k]
            late = [c for c in chunks if c >= k]

            def unit(kv_chunks, query_chunks, causal, S=S, E=E, w=w, r=r, branch=branch,
                     index=index):  # fmt: skip
                """A ring over the holders of ``kv_chunks`` and ``query_chunks`` (sorted by
                token order when they are the same chunks, else by rank)."""
                kv_of = {holder(c)[0]: c for c in kv_chunks}
                q_of = {holder(c)[0]: c for c in query_chunks}
                if kv_chunks == query_chunks:
                    ring = [holder(c)[0] for c in kv_chunks]
                else:
                    ring = sorted(set(kv_of) | set(q_of))
                if rank not in ring:
                    return None

                def piece(chunk: int | None) -> tuple[int, int, int]:
                    """(first token in the segment, length, first token in the shard)."""
                    if chunk is None:
                        return 0, 0, 0
                    first, last = max(S, chunk * C), min(E, (chunk + 1) * C)
                    return first - S, last - first, holder(chunk)[1] + first - chunk * C

                kv = [piece(kv_of.get(m)) for m in ring]
                position = ring.index(rank)
                _, n, a = kv[position]
                query_span, qp = None, None
                if kv_chunks != query_chunks:
                    qp = piece(q_of.get(rank))
                    query_span = (qp[2], qp[2] + qp[1])
                groups = _piece_groups(
                    branch, [(t, n_m) for t, n_m, _ in kv], None if qp is None else qp[:2]
                )
                starts = tuple(S + t for t, _, _ in kv)
                return RingBranch(
                    w, r, max(n, 1), tuple(base + m for m in ring), position, groups, starts,
                    span=(a, a + n), query_span=query_span, causal=causal, index=index,
                )  # fmt: skip

            kinds = [(early, early, None), (late, late, None)]
            if early and late:
                kinds.append((early, late, False))  # late queries, early keys
                if not is_causal:
                    kinds.append((late, early, False))  # early queries, late keys
            for kv_chunks, query_chunks, causal in kinds:
                if kv_chunks:
                    u = unit(kv_chunks, query_chunks, causal)
                    if u is not None:
                        units.append(u)
    return tuple(units)


def _view(x: Tensor, branch: RingBranch, group: PieceGroup, kv: bool = False) -> Tensor | None:
    """This rank's dilated view of ``x`` (B, L, H, ...) for one head group, None if empty;
    with ``kv``, ``x`` is a K/V tensor (B, L, H_kv, ...) and the group's K/V heads are taken.

    A local branch (``L % w == 0``) gives one view ``(B*L/w, n, Hs, ...)`` of all its
    segments; a branch across ranks gives ``(B, n, Hs, ...)`` for the shard; a unit with a
    ``span`` (packed documents, zigzag) the same for the tokens of its span (its queries'
    span with ``query_span``).
    """
    heads = group.heads.kv_slice if kv else group.heads.head_slice
    views = _views(x, branch, group, kv, heads)
    return views[0] if views else None


def _token_view(x: Tensor, branch: RingBranch, group: PieceGroup, kv: bool = True) -> Tensor:
    """:func:`_view` of a ``(B, L)`` token tensor (a key mask, token ids): of the unit's
    keys, or with ``kv=False`` of its queries."""
    return _views(x, branch, group, kv)[0]


def _views(
    x: Tensor, branch: RingBranch, group: PieceGroup, kv: bool, heads: slice | None = None
) -> list[Tensor]:
    r = branch.dilation_rate
    if not kv and branch.query_span is not None:
        assert group.query is not None
        (a, b), (offset, count) = branch.query_span, group.query
        return segment_views(x[:, a:b], b - a, r, offset, heads) if count else []
    if group.counts[branch.position] == 0:  # also a member without a K/V piece
        return []
    x = x if branch.span is None else x[:, branch.span[0] : branch.span[1]]
    return segment_views(x, branch.piece_length, r, group.offsets[branch.position], heads)


def _query_count(branch: RingBranch, group: PieceGroup) -> int:
    """Dilated query positions of this rank in one piece of the unit (0: nothing to do)."""
    return group.counts[branch.position] if group.query is None else group.query[1]


def _causal(setup: RingSetup, branch: RingBranch) -> bool:
    """Whether ``branch``'s blocks are causal (then they travel only to later members)."""
    return setup.is_causal if branch.causal is None else branch.causal


# Per head group: (k, v) or (dk, dv), and the dilated key keep mask when one travels.
Piece = tuple[Tensor, Tensor, Tensor | None]


def _unpack(
    buf: Tensor, branch: RingBranch, origin: int, batch: int, head_dim: int, masked: bool = False
) -> list[Piece | None]:
    """Per head group, views ``(B, n, Hk, D)`` of K and V (and ``(B, n)`` of the key mask
    when ``masked``) into a packed buffer; None for an empty group.

    Layout: K then V of every group in order, then (``masked``) every group's mask.
    """
    pieces: list[Piece | None] = []
    start = 0
    for g in branch.head_groups:
        shape = (batch, g.counts[origin], g.heads.num_kv_heads, head_dim)
        numel = math.prod(shape)
        if numel == 0:
            pieces.append(None)
            continue
        k_part = buf[start : start + numel].view(shape)
        v_part = buf[start + numel : start + 2 * numel].view(shape)
        pieces.append((k_part, v_part, None))
        start += 2 * numel
    if masked:
        for i, g in enumerate(branch.head_groups):
            piece = pieces[i]
            if piece is not None:
                numel = batch * g.counts[origin]
                pieces[i] = (piece[0], piece[1], buf[start : start + numel].view(batch, -1))
                start += numel
    return pieces


def _own_pieces(
    k: Tensor, v: Tensor, keep: Tensor | None, branch: RingBranch
) -> list[Piece | None]:
    """Per head group, this rank's dilated K/V (and key keep mask) as strided views."""
    pieces: list[Piece | None] = []
    for g in branch.head_groups:
        k_view, v_view = _view(k, branch, g, kv=True), _view(v, branch, g, kv=True)
        if k_view is None or v_view is None:
            pieces.append(None)
        else:
            mask = None if keep is None else _token_view(keep, branch, g)
            pieces.append((k_view, v_view, mask))
    return pieces


def _pack(
    pieces: list[Piece | None],
    branch: RingBranch,
    origin: int,
    *,
    like: Tensor,
    dtype: torch.dtype,
    masked: bool = False,
) -> Tensor:
    """Copy per-group ``(k, v[, keep])`` (or ``(dk, dv)``) pieces of ring member ``origin``
    into one flat buffer of ``dtype``, laid out as :func:`_unpack` reads it; missing groups
    are zeros. A key mask travels as 0/1 values of ``dtype``.
    """
    batch, head_dim = like.shape[0], like.shape[-1]
    numel = branch.packed_numel(origin, batch, head_dim, masked)
    buf = torch.zeros(numel, dtype=dtype, device=like.device)
    dsts = _unpack(buf, branch, origin, batch, head_dim, masked)
    for dst, src in zip(dsts, pieces, strict=True):
        if dst is not None and src is not None:
            dst[0].copy_(src[0])
            dst[1].copy_(src[1])
            if masked:
                assert dst[2] is not None and src[2] is not None
                dst[2].copy_(src[2])
    return buf


# --------------------------------------------------------------------------- schedule
# Ring indices c in [0, size). Block "origin" starts on rank origin; ``_visitors``
# lists the ranks that attend to it after its owner, in the order it reaches them.


@functools.lru_cache(maxsize=1024)
def _visitors(origin: int, size: int, causal: bool) -> tuple[int, ...]:
    if causal:  # only later ranks of the segment attend to this block
        return tuple(range(origin + 1, size))
    return tuple((origin + i) % size for i in range(1, size))


def _kv_messages(size: int, causal: bool, step: int) -> list[tuple[int, int, int]]:
    """``(origin, src, dst)`` of the K/V transfers posted at ``step`` (used at ``step + 1``)."""
    messages = []
    for origin in range(size):
        path = _visitors(origin, size, causal)
        if step < len(path):
            messages.append((origin, origin if step == 0 else path[step - 1], path[step]))
    return messages


def _grad_messages(size: int, causal: bool, step: int) -> list[tuple[int, int, int]]:
    """``(origin, src, dst)`` of the dK/dV accumulators sent at the end of ``step`` (>= 1).

    The accumulator of a block starts at its first visitor, follows the block and, from
    the last visitor, goes home to ``origin``.
    """
    messages = []
    for origin in range(size):
        path = _visitors(origin, size, causal)
        if 1 <= step <= len(path):
            dst = path[step] if step < len(path) else origin
            messages.append((origin, path[step - 1], dst))
    return messages


def _held_origin(branch: RingBranch, causal: bool, step: int) -> int | None:
    """The ring member whose K/V this rank attends to at ``step`` (None: nothing to do)."""
    if step >= branch.size:
        return None
    origin = branch.position - step
    if origin < 0:
        if causal:
            return None
        origin += branch.size
    return origin


# --------------------------------------------------------------------------- ring pieces
# Shared by the forward and backward loops (and by any ring over other block patterns):
# the K/V rotation, the blocks a rank computes at each step, and the routing of the
# dK/dV accumulators back to the ranks that own the K/V.


@dataclass(frozen=True)
class RingSetup:
    """Everything a ring forward/backward needs besides the tensors."""

    branches: tuple[RingBranch, ...]
    scale: float
    is_causal: bool
    group: dist.ProcessGroup
    ops: BlockOps
    stats: RingStats | None = None  # counts bytes, steps and time when given
    timeout: float | None = None  # bound on every wait, in seconds
    phase: str = "forward"  # or "backward": names the loop in errors, picks the K/V tag
    dropout_p: float = 0.0  # drop probability of the joint attention probabilities
    seed: int = 0  # dropout seed of the call (forward and backward share it)
    seq_len: int = 0  # N: tokens of the ring's whole sequence (dropout token ids)
    # Dropout streams count in the call's H heads; a plan of some heads (heads_plan) runs
    # its head 0 as head first_head of them.
    num_heads: int = 0
    first_head: int = 0
    # Packed documents: the tokens [a, b) of the shard that hold whole documents (their
    # lengths third), run as one packed call of ``inner_backend`` with ``inner_context``
    # (one call per document on a backend without packed documents, as on one device).
    inner: tuple[int, int, tuple[int, ...]] | None = None
    inner_backend: Backend | None = None
    inner_context: ForwardContext | None = None
    # The shard's tokens in storage order, as (first token in the sequence, count) runs.
    positions: tuple[tuple[int, int], ...] = ()

    @property
    def num_steps(self) -> int:
        return max((b.size for b in self.branches), default=0)

    def comm(self, tag: int, context: str) -> RingComm:
        return RingComm(self.group, tag, stats=self.stats, timeout=self.timeout, context=context)

    def branches_at(self, step: int) -> str:
        """The branches whose ring is still turning at ``step``, for error messages."""
        names = [
            f"{i} (w={b.segment_length}, r={b.dilation_rate})"
            for i, b in enumerate(self.branches)
            if step < b.size
        ]
        return ", ".join(names)


@dataclass(frozen=True)
class BlockTask:
    """One block a rank computes at a ring step: its queries of one (branch, head
    group) against the K/V of ring member ``origin``."""

    branch_index: int
    group_index: int
    branch: RingBranch
    group: PieceGroup
    origin: int
    causal: bool  # the block is on the diagonal of a causal call
    k: Tensor  # (Bb, Lk, Hk, D): the group's K/V heads
    v: Tensor
    key_keep: Tensor | None = None  # (Bb, Lk) bool, True where a key may be attended
    dropout: DropoutKeys | None = None  # the entries of the block that dropout drops

    @property
    def own(self) -> bool:
        return self.origin == self.branch.position

    def view(self, x: Tensor, kv: bool = False) -> Tensor:
        """This rank's dilated view of a local ``(B, L, H, ...)`` tensor for the block (of
        a ``(B, L, H_kv, ...)`` K/V tensor with ``kv``)."""
        view = _view(x, self.branch, self.group, kv)
        assert view is not None  # tasks exist only where this rank has positions
        return view


class KVRotation:
    """The packed dilated K/V of every cross-rank branch, passed around its ring.

    Each step's transfers are posted (:meth:`post`) before that step's blocks are
    computed and waited for (:meth:`advance`) after, so transfer and compute overlap.
    """

    def __init__(
        self, setup: RingSetup, k: Tensor, v: Tensor, key_keep: Tensor | None = None
    ) -> None:
        self.setup, self.k, self.v, self.key_keep = setup, k, v, key_keep
        self.masked = key_keep is not None
        self.held = {
            i: _pack(
                _own_pieces(k, v, key_keep, b),
                b,
                b.position,
                like=k,
                dtype=k.dtype,
                masked=self.masked,
            )  # fmt: skip
            for i, b in enumerate(setup.branches)
            if b.size > 1
        }
        self._comm: RingComm | None = None
        self._incoming: dict[int, Tensor] = {}
        # Global token ids of the local shard, for dropout keyed by position.
        self.ids: Tensor | None = None
        if setup.dropout_p > 0.0:
            B = k.shape[0]
            self.ids = torch.cat(
                [token_ids(B, setup.seq_len, s, n, k.device) for s, n in setup.positions], dim=1
            )

    def post(self, step: int) -> None:
        """Queue and start the K/V transfers of ``step`` for every branch."""
        batch, head_dim = self.k.shape[0], self.k.shape[-1]
        setup = self.setup
        tag = _KV_TAG if setup.phase == "forward" else _BACKWARD_KV_TAG
        where = f"{setup.phase} ring step {step}, branch(es) {setup.branches_at(step)}"
        comm = setup.comm(tag, f"the K/V of {where}")
        self._incoming = {}
        for i, b in enumerate(self.setup.branches):
            for origin, src, dst in _kv_messages(b.size, _causal(setup, b), step):
                numel = b.packed_numel(origin, batch, head_dim, self.masked)
                if numel == 0:  # nobody has positions for this piece: both sides skip it
                    continue
                if src == b.position:
                    comm.send(self.held[i], b.ring[dst])
                if dst == b.position:
                    buf = torch.empty(numel, dtype=self.k.dtype, device=self.k.device)
                    self._incoming[i] = comm.recv(buf, b.ring[src])
        comm.commit()
        self._comm = comm

    def advance(self) -> None:
        """Wait for the posted transfers; their blocks are held from now on."""
        assert self._comm is not None
        self._comm.wait()
        self.held = self._incoming

    def tasks(self, step: int) -> list[BlockTask]:
        """The blocks this rank computes at ``step`` (those with positions on both sides)."""
        tasks = []
        batch, head_dim = self.k.shape[0], self.k.shape[-1]
        for i, b in enumerate(self.setup.branches):
            origin = _held_origin(b, _causal(self.setup, b), step)
            if origin is None:
                continue
            if origin == b.position:
                pieces = _own_pieces(self.k, self.v, self.key_keep, b)
            elif i in self.held:
                pieces = _unpack(self.held[i], b, origin, batch, head_dim, self.masked)
            else:  # an empty piece, never sent
                pieces = [None] * len(b.head_groups)
            causal = _causal(self.setup, b) and origin == b.position
            for j, (g, piece) in enumerate(zip(b.head_groups, pieces, strict=True)):
                if piece is None or _query_count(b, g) == 0:
                    continue
                keep = piece[2]
                if keep is not None and keep.dtype != torch.bool:
                    keep = keep != 0  # a mask that travelled as 0/1 values
                tasks.append(
                    BlockTask(
                        i,
                        j,
                        b,
                        g,
                        origin,
                        causal,
                        piece[0],
                        piece[1],
                        key_keep=keep,
                        dropout=self._dropout(b.index, b, g, origin),
                    )  # fmt: skip
                )
        return tasks

    def _dropout(
        self, index: int, branch: RingBranch, group: PieceGroup, origin: int
    ) -> DropoutKeys | None:
        """Dropout keys of a block: global ids of its queries and keys, its heads' streams."""
        if self.ids is None:
            return None
        q_ids = _token_view(self.ids, branch, group, kv=False)
        if origin == branch.position:
            k_ids = _token_view(self.ids, branch, group)
        else:  # the keys of member ``origin``'s piece: b*N + start + offset + r*t
            r, device = branch.dilation_rate, self.ids.device
            first = branch.piece_starts[origin] + group.offsets[origin]
            pos = first + r * torch.arange(group.counts[origin], device=device)
            rows = torch.arange(self.k.shape[0], device=device)[:, None] * self.setup.seq_len
            k_ids = rows + pos[None, :]
        setup = self.setup
        streams = head_streams(index, group.heads, setup.num_heads, q_ids.device)
        return DropoutKeys(setup.dropout_p, setup.seed, q_ids, k_ids, streams + setup.first_head)


def ring_steps(
    setup: RingSetup, k: Tensor, v: Tensor, key_keep: Tensor | None = None
) -> Iterator[tuple[int, list[BlockTask]]]:
    """``(step, blocks)`` of every ring step, K/V transfers of the step in flight.

    The next step's K/V (and key keep mask) travel while the caller computes
    ``blocks``; the loop waits for them when the caller asks for the next step.
    """
    rotation = KVRotation(setup, k, v, key_keep)
    stats = setup.stats
    for step in range(setup.num_steps):
        rotation.post(step)
        token = None if stats is None else stats.compute.start(k.device)
        yield step, rotation.tasks(step)
        if stats is not None:
            stats.compute.stop(token)
            stats.ring_steps += 1
        rotation.advance()


class GradRouter:
    """Routes the dK/dV of visiting K/V blocks back to the ranks that own them.

    The accumulator (compute dtype) of a block starts at the block's first visitor,
    follows the block through every rank that attends to it, adding each rank's
    contribution, and finally travels home, where :meth:`finish` adds it to the
    owner's dK/dV. Transfers of one step overlap the next step's compute.
    """

    def __init__(self, setup: RingSetup, like: Tensor, acc_dtype: torch.dtype) -> None:
        self.setup, self.like, self.acc_dtype = setup, like, acc_dtype
        self.batch, self.head_dim, self.device = like.shape[0], like.shape[-1], like.device
        self._comm: RingComm | None = None
        self._travelling: dict[tuple[int, int], Tensor] = {}  # (branch, origin) -> received
        self._home: dict[int, list[Tensor]] = {}  # branch -> accumulators of own K/V

    def route(self, step: int, visiting: dict[int, list[Piece | None]]) -> None:
        """Send this step's contributions on; ``visiting[branch][group]`` is the
        ``(dk, dv)`` this rank computed for the visiting block of that branch."""
        if self._comm is not None:  # sent at the previous step; arrived while we computed
            self._comm.wait()
        setup = self.setup
        comm = setup.comm(
            _GRAD_TAG,
            f"the dK/dV after backward ring step {step}, branch(es) {setup.branches_at(step)}",
        )
        received: dict[tuple[int, int], Tensor] = {}
        for i, b in enumerate(self.setup.branches):
            if step == 0 or step >= b.size:
                continue
            for origin, src, dst in _grad_messages(b.size, _causal(setup, b), step):
                numel = b.packed_numel(origin, self.batch, self.head_dim)
                if numel == 0:
                    continue
                if src == b.position:
                    grads = visiting.get(i, [None] * len(b.head_groups))
                    acc = _pack(grads, b, origin, like=self.like, dtype=self.acc_dtype)
                    if (i, origin) in self._travelling:
                        acc.add_(self._travelling.pop((i, origin)))
                    comm.send(acc, b.ring[dst])
                if dst == b.position:
                    buf = torch.empty(numel, dtype=self.acc_dtype, device=self.device)
                    comm.recv(buf, b.ring[src])
                    if origin == b.position:
                        self._home.setdefault(i, []).append(buf)
                    else:
                        received[(i, origin)] = buf
        comm.commit()
        self._comm = comm
        self._travelling = received

    def finish(self, dk: Tensor, dv: Tensor) -> None:
        """Wait for the last transfers and add the accumulators that came home."""
        if self._comm is not None:
            self._comm.wait()
        for i, bufs in self._home.items():
            b = self.setup.branches[i]
            for buf in bufs:
                unpacked = _unpack(buf, b, b.position, self.batch, self.head_dim)
                for g, grad in zip(b.head_groups, unpacked, strict=True):
                    if grad is not None:
                        _view(dk, b, g, kv=True).add_(grad[0])
                        _view(dv, b, g, kv=True).add_(grad[1])


# --------------------------------------------------------------------------- ring loops


def ring_dilated_forward(
    q: Tensor, k: Tensor, v: Tensor, setup: RingSetup, key_keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Forward ring loop on local shards.

    Args:
        q, k, v: ``(B, L, H, D)`` local shards, token-major.
        key_keep: ``(B, L)`` bool shard, ``True`` where a key may be attended; it
            travels with the keys.

    Returns:
        ``out (B, L, H, D)`` in ``q.dtype`` and the LSE as a pair ``(2, B, L, H)`` in the
        compute dtype (float32, float64 for float64 inputs): ``lse = pair[0] + pair[1]``
        (see :func:`~dilated_attention_pytorch.segments.merge_lse_`), ``(-inf, 0)`` where
        a query has no key.
    """
    B, L, H, _ = q.shape
    acc_dtype = compute_dtype(q.dtype)
    out = torch.zeros(B, L, H, v.shape[-1], dtype=acc_dtype, device=q.device)
    lse = torch.empty((2, B, L, H), dtype=acc_dtype, device=q.device)
    lse[0].fill_(-math.inf)
    lse[1].zero_()
    hi, lo = lse[0], lse[1]
    for _, tasks in ring_steps(setup, k, v, key_keep):
        for t in tasks:
            out_blk, lse_blk = setup.ops.forward(
                t.view(q), t.k, t.v, scale=setup.scale, causal=t.causal,
                key_keep=t.key_keep, dropout=t.dropout,
            )  # fmt: skip
            merge_lse_(t.view(out), t.view(hi), t.view(lo), out_blk, lse_blk)
    if setup.inner is not None:  # whole documents of this shard: no block touched them
        a, b, _ = setup.inner
        assert setup.inner_backend is not None and setup.inner_context is not None
        out_in, lse_in = _run_forward(
            setup.inner_backend, q[:, a:b], k[:, a:b], v[:, a:b], setup.inner_context
        )
        out[:, a:b] = out_in
        lse[:, :, a:b] = lse_in
    return out.to(q.dtype), lse


def ring_dilated_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    setup: RingSetup,
    key_keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward ring loop: gradients of the local shards.

    K/V travel the ring as in the forward; :class:`GradRouter` carries the dK/dV of
    every visiting block back to its owner.

    Args:
        dout, q, k, v, out: ``(B, L, H, D)`` local shards; ``out`` is the forward output.
        lse: ``(2, B, L, H)`` the forward's final LSE pair; the blocks get its high part
            and ``dout * exp(-lo)``, which gives the exact gradients.
        key_keep: the forward's key keep mask; dropout is replayed from ``setup``.

    Returns:
        ``(dq, dk, dv)``, each ``(B, L, H, D)`` in the input dtype.
    """
    # The loop's buffers (the last blocks' gradients, the visiting K/V, the router's
    # accumulators, the scaled dout) are gone when the helper returns, before the casts.
    dq, dk, dv = _ring_backward_accumulate(dout, q, k, v, out, lse, setup, key_keep)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _ring_backward_accumulate(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    setup: RingSetup,
    key_keep: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`ring_dilated_backward`'s gradients in the compute dtype."""
    acc_dtype = compute_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc_dtype, device=q.device) for t in (q, k, v))
    if setup.inner is not None:  # whole documents of this shard, as in the forward
        a, b, _ = setup.inner
        assert setup.inner_backend is not None and setup.inner_context is not None
        grads = _run_backward(
            setup.inner_backend, dout[:, a:b], q[:, a:b], k[:, a:b], v[:, a:b], out[:, a:b],
            lse[:, :, a:b], setup.inner_context,
        )  # fmt: skip
        for acc, grad in zip((dq, dk, dv), grads, strict=True):
            acc[:, a:b] = grad
    if ring_merges_blocks(setup.branches):
        dout = scale_dout_by_lse_lo(dout, lse[1])
    lse = lse[0]
    router = GradRouter(setup, k, acc_dtype)
    for step, tasks in ring_steps(setup, k, v, key_keep):
        visiting: dict[int, list[Piece | None]] = {}
        for t in tasks:
            dq_blk, dk_blk, dv_blk = setup.ops.backward(
                t.view(dout), t.view(q), t.k, t.v, t.view(out), t.view(lse),
                scale=setup.scale, causal=t.causal, key_keep=t.key_keep, dropout=t.dropout,
            )  # fmt: skip
            t.view(dq).add_(dq_blk)
            if t.own:
                t.view(dk, kv=True).add_(dk_blk)
                t.view(dv, kv=True).add_(dv_blk)
            else:
                groups = visiting.setdefault(t.branch_index, [None] * len(t.branch.head_groups))
                groups[t.group_index] = (dk_blk, dv_blk, None)
        router.route(step, visiting)
    router.finish(dk, dv)
    return dq, dk, dv


# --------------------------------------------------------------------------- autograd + API


class RingDilatedAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the backward runs :func:`ring_dilated_backward`."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None, setup: RingSetup
    ) -> Tensor:
        out, lse = ring_dilated_forward(q, k, v, setup, key_keep)
        ctx.save_for_backward(q, k, v, out, lse, key_keep)
        ctx.setup = setup
        return out

    @staticmethod
    @first_order_only("ring dilated attention")
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, key_keep = ctx.saved_tensors
        setup = replace(ctx.setup, phase="backward")
        dq, dk, dv = ring_dilated_backward(token_major(dout), q, k, v, out, lse, setup, key_keep)
        return dq, dk, dv, None, None


def ring_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    branch_mixing: str = "softmax",
    scale: float | None = None,
    backend: str | Backend = "auto",
    dropout_p: float = 0.0,
    key_padding_mask: Tensor | None = None,
    validate: bool = True,
    ring_size: int | None = None,
    timeout: float | None = None,
    stats: RingStats | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | Tensor | None = None,
    layout: str = "contiguous",
) -> Tensor:
    """Dilated attention on ``(B, N/k, H, D)`` shards of a sequence split over the ranks of ``group``.

    Rank ``j`` of the ``k`` ranks of ``group`` passes its shard: tokens
    ``[j*N/k, (j+1)*N/k)`` of the global ``(B, N, H, D)`` q, k, v. The result (and
    every gradient) is rank ``j``'s shard of :func:`~dilated_attention_pytorch.dilated_attention`
    on the whole sequence. Collective: every rank of ``group`` must call it with the
    same settings. Dense ring attention is ``segment_lengths=[N], dilation_rates=[1]``.

    Shard rules, with ``L = N/k``: a segment length ``w <= L``
    must divide ``L`` (the branch is then local); a ``w > L`` must be a multiple of
    ``L`` (the ``w/L`` ranks of a segment form a ring; only dilated K/V move). They do
    not apply with ``cu_seqlens`` (segments follow the documents, see below).

    Args:
        q, k, v: ``(B, N/k, H, D)`` local shards, one dtype and device on every rank;
            k and v may have ``H_kv`` heads dividing ``H`` (grouped-query attention, as
            in ``dilated_attention``): only those ``H_kv`` heads travel the ring.
        segment_lengths: segment length ``w`` of each branch (global token counts).
        dilation_rates: dilation rate ``r`` of each branch, ``1 <= r <= w``.
        group: the process group holding the sequence (default: WORLD); any group,
            e.g. one dimension of a DeviceMesh.
        is_causal: query ``p`` only sees keys ``p' <= p`` (global positions).
        branch_mixing: ``"softmax"`` or ``"head_split"``, as in ``dilated_attention``.
        scale: score scale, default ``D ** -0.5``.
        backend: block kernel: ``"auto"`` (the pytorch backend's blocks: cuDNN or flash on CUDA
            fp16/bf16, chunked matmuls otherwise) or a backend exposing block ops
            (``"pytorch"``, ``"triton"``), or a ``Backend`` instance.
        dropout_p: drop probability of the joint attention probabilities, as in
            ``dilated_attention``: an entry is dropped according to a hash of its branch,
            head and global query/key positions and a seed drawn from this rank's default
            generator, so with the generator seeded alike on every rank the ring drops
            exactly the entries the single-device call drops, and the backward replays
            them. Blocks with dropout run on the matmul path of the ``pytorch`` backend.
        key_padding_mask: ``(B, N/k)`` bool, this rank's shard of the ``(B, N)`` mask
            (``True`` marks padding keys); it travels around the ring with the keys.
        ring_size: ranks per ring: ``None`` for the whole group, or ``k`` dividing the
            group size to cut the group into consecutive rings of ``k`` ranks (sequence
            parallel inside a ring, data parallel across rings). Ring ``i`` holds group
            ranks ``[i*k, (i+1)*k)`` and its own sequence; ``N = k * L``.
        timeout: seconds (a positive float) that each wait on other ranks may take: every
            batch of P2P transfers, the input check's collective and, at the group's first
            ring call, the creation of the ring's own communicator. ``None`` (default): the
            process group's own timeout (gloo's default is 30 minutes). A peer that died,
            is stuck or skipped the call then gives a ``RuntimeError`` on the ranks waiting
            for it, naming this rank, the rank that did not answer and what was waited for
            (the forward or backward ring step and its branch(es), or the input check);
            after such an error the ring refuses to run on ``group`` again (its ranks are
            out of step). The ring's P2P and collectives run on a communicator of its own
            over ``group``'s ranks (:func:`~dilated_attention_pytorch.distributed.ring_communicator`),
            so collectives you run on ``group`` never mix with the ring's.
        stats: a :class:`RingStats` that counts this call's bytes, steps and time.
        cu_seqlens: packed documents (``B = 1``), as in ``dilated_attention``: the offsets
            of the documents in the ring's whole sequence of ``N`` tokens, the same on
            every rank (rings cut by ``ring_size`` may each have their own). Each document
            is its own sequence: segments restart at its first token, so no shard rule
            applies (any ``L``). A segment inside one shard needs nothing from other
            ranks (when every shard boundary is a document boundary, the call is one
            local packed ``dilated_attention`` and nothing travels); a segment held by
            several ranks rings over exactly those ranks, only its dilated K/V moving.
            Dropout and a key padding mask with ``cu_seqlens`` raise ``ValueError``.
        max_seqlen: with ``cu_seqlens``, accepted for drop-in use and checked (an int at
            least the longest document, as in ``dilated_attention``).
        layout: which tokens each rank holds. ``"contiguous"`` (default): rank ``j``
            holds ``[j*L, (j+1)*L)``. ``"zigzag"``: rank ``j`` of ``k`` holds chunks ``j``
            and ``2k-1-j`` of ``2k`` chunks of ``L/2`` tokens (cut them with
            ``shard_sequence(x, layout="zigzag")``), so that a causal call gives every rank
            the same work; ``L`` must be even and every ``w <= L/2`` must divide ``L/2``;
            not with ``cu_seqlens``.
        validate: run the collective check (one small ``all_gather`` and a host sync)
            that makes every rank raise when any rank's input is bad or the ranks
            disagree. With ``False`` only this rank's own checks run: use it for calls
            whose signature (shapes, dtype, device, settings) was already validated,
            as the ring modules do; a mismatch between ranks then goes undetected.

    Returns:
        ``(B, N/k, H, D)`` in ``q.dtype``: this rank's shard of the output.

    Raises:
        ValueError: on *every* rank when any rank's input is invalid, the ranks'
            shapes, dtypes or settings differ, or the shard length breaks the rules above.
        RuntimeError: a wait on another rank failed or timed out (see ``timeout``).

    Notes:
        A key padding mask adds one element per dilated key and head group to each K/V
        transfer (``1 / (2 * H_group * D)`` of its size, ``H_group`` the group's K/V heads).

        Under ``torch.compile`` the call runs as the custom operators
        ``dilated_attention_pytorch::ring_forward`` / ``::ring_backward`` (the collective
        check, the P2P loop and the host reads inside them; ``stats`` still counts;
        ``cu_seqlens`` enters them as a tensor, read inside), so ``fullgraph=True`` works.
    """
    group = resolve_group(group)
    if torch.compiler.is_compiling():
        return _compiled_ring_call(
            q, k, v, segment_lengths, dilation_rates, group=group, is_causal=is_causal,
            branch_mixing=branch_mixing, scale=scale, backend=backend, dropout_p=dropout_p,
            key_padding_mask=key_padding_mask, validate=validate, ring_size=ring_size,
            timeout=timeout, stats=stats, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            layout=layout,
        )  # fmt: skip
    settings = dict(
        ring_size=ring_size,
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        branch_mixing=branch_mixing,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        key_padding_mask=key_padding_mask,
        cu_seqlens=cu_seqlens,
        layout=layout,
        max_seqlen=max_seqlen,
    )
    if validate:
        plan = check_ring_call(q, k, v, group=group, backend=backend, timeout=timeout, **settings)
    else:
        plan = check_ring_call_locally(q, k, v, world_size=dist.get_world_size(group), **settings)
    timeout = check_timeout(timeout)  # with validate, a bad one raised on every rank above
    size = dist.get_world_size(group) if ring_size is None else ring_size
    rank = dist.get_rank(group)
    L = q.shape[1]
    bounds = None
    if cu_seqlens is not None:
        bounds = ring_documents(cu_seqlens, q, None, dropout_p, size)
        local = _local_documents(bounds, L, size, rank)
        if local is not None:
            # Every document inside one shard: a local packed call, nothing travels.
            if stats is not None:
                stats.calls += 1
            return dilated_attention(
                q, k, v, segment_lengths, dilation_rates, is_causal=is_causal,
                branch_mixing=branch_mixing, scale=scale, backend=backend, cu_seqlens=local,
            )  # fmt: skip
    # Drawn like dilated_attention's, so equally seeded generators give its masks.
    seed = draw_seed(dropout_p)
    setup = _ring_setup(
        q, plan, group, size, is_causal=is_causal, scale=scale, backend=backend,
        dropout_p=dropout_p, key_padding_mask=key_padding_mask, timeout=timeout, stats=stats,
        seed=seed, bounds=bounds, layout=layout,
    )  # fmt: skip
    if stats is not None:
        stats.calls += 1
    keep = None if key_padding_mask is None else ~key_padding_mask.contiguous()
    return RingDilatedAttentionFunction.apply(
        token_major(q), token_major(k), token_major(v), keep, setup
    )


def _packed_backend(q: Tensor, plan: DilatedPlan, is_causal: bool, backend: str | Backend):
    """The backend ``dilated_attention`` picks for a packed training call of ``q``'s shard."""
    call = _attention_call(q, plan, is_causal, 0.0, False, True, packed=True)
    return select_backend(backend, call)


def _local_documents(bounds: tuple[int, ...], L: int, size: int, rank: int) -> Tensor | None:
    """This shard's document offsets when every shard boundary is a document boundary
    (each rank then runs its documents alone), else None."""
    if not all(j * L in bounds for j in range(1, size)):
        return None
    first = (rank % size) * L
    return torch.tensor([b - first for b in bounds if first <= b <= first + L], dtype=torch.int64)


def _ring_setup(
    q: Tensor,
    plan: DilatedPlan,
    group: dist.ProcessGroup,
    size: int,
    *,
    is_causal: bool,
    scale: float | None,
    backend: str | Backend,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    timeout: float | None,
    stats: RingStats | None,
    seed: int,
    bounds: tuple[int, ...] | None = None,
    layout: str = "contiguous",
) -> RingSetup:
    """The :class:`RingSetup` of a checked call on this rank's shard ``q``; ``bounds``:
    the checked document offsets of a packed call."""
    rank = dist.get_rank(group)
    _, L, _, D = q.shape
    base, position = rank - rank % size, rank % size
    inner = inner_backend = inner_context = None
    if bounds is not None:
        branches = document_ring_layout(plan, bounds, L, size, position, base=base)
        inner = inner_documents(bounds, L, position)
    elif layout == "zigzag":
        branches = zigzag_ring_layout(plan, L, size, position, base=base, is_causal=is_causal)
    else:
        branches = ring_layout(plan, L, size, position, base=base)
    scale = D**-0.5 if scale is None else float(scale)
    if inner is not None:  # the shard's whole documents: one packed call, as on one device
        inner_backend = _packed_backend(q, plan, is_causal, backend)
        inner_context = ForwardContext(
            plan=plan, scale=scale, is_causal=is_causal, documents=inner[2]
        )
    call = AttentionCall(
        device_type=q.device.type,
        dtype=q.dtype,
        head_dim=D,
        is_causal=is_causal,
        dropout=dropout_p > 0.0,
        key_padding_mask=key_padding_mask is not None,
        plan=plan,
    )
    return RingSetup(
        branches=branches,
        scale=scale,
        is_causal=is_causal,
        group=group,
        ops=select_block_ops(backend, call),
        stats=stats,
        timeout=timeout,
        dropout_p=float(dropout_p),
        seed=seed,
        seq_len=size * L,
        num_heads=plan.parent_heads,
        first_head=plan.first_head,
        inner=inner,
        inner_backend=inner_backend,
        inner_context=inner_context,
        positions=shard_runs(layout if bounds is None else "contiguous", L, size, position),
    )


# --------------------------------------------------------------------------- torch.compile
#
# While torch.compile traces, the ring runs as two custom operators (as dilated_attention
# does, see ops.py): the collective input check, the P2P loop and the host reads all
# happen inside them, out of the graph's sight. The call's settings travel as a string
# of Python literals, the process group by its name.


def _compiled_ring_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: dist.ProcessGroup,
    is_causal: bool,
    branch_mixing: str,
    scale: float | None,
    backend: str | Backend,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    validate: bool,
    ring_size: int | None,
    timeout: float | None,
    stats: RingStats | None,
    cu_seqlens: Tensor | None,
    max_seqlen: int | Tensor | None,
    layout: str,
) -> Tensor:
    if not isinstance(backend, str | Backend):
        raise TypeError(f"backend must be a name or a Backend, got {type(backend).__name__}.")
    spec = spec_text(
        backend=backend, group=group, stats=stats,
        segment_lengths=tuple(segment_lengths),  # checked inside, with eager's messages
        dilation_rates=tuple(dilation_rates),
        is_causal=is_causal, branch_mixing=branch_mixing, ring_size=ring_size,
        validate=validate, layout=layout,
    )  # fmt: skip
    seed = seed_tensor(dropout_p)
    max_len = _max_seqlen_tensor(max_seqlen)
    out, _ = _ring_forward_op(
        q, k, v, key_padding_mask, spec, seed, cu_seqlens, max_len, *float_arguments(
            dropout_p, scale, timeout
        ),
    )  # fmt: skip
    return out


def spec_text(
    *, backend: str | Backend, group: dist.ProcessGroup, stats: RingStats | None,
    **settings: object,
) -> str:  # fmt: skip
    """A ring operator's settings as ``"name=repr;..."`` (read back by :func:`_parse_spec`),
    built with what the compiler can trace (json cannot be): the backend by its key, the
    group and the monitor by their names. The float settings (dropout, scale, timeout)
    travel as the operators' own arguments instead: the compiler may make them symbolic
    (e.g. when two modules with different dropout run through the same compiled code),
    and a string cannot hold that."""
    named = dict(
        settings, backend=backend if isinstance(backend, str) else backend_key(backend),
        group=group.group_name, stats="" if stats is None else stats.key,
    )  # fmt: skip
    return ";".join(f"{name}={value!r}" for name, value in named.items())


def _parse_spec(spec: str) -> dict[str, Any]:
    s = {}
    for name, value in (item.split("=", 1) for item in spec.split(";")):
        try:
            s[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise TypeError(
                f"ring_dilated_attention under torch.compile takes plain Python values for "
                f"its settings (int, float, bool, str, None and tuples of them), got "
                f"{name}={value}; convert it (e.g. int(...), float(...)) before the call."
            ) from None
    return s


def _spec_settings(s: dict[str, Any], key_padding_mask: Tensor | None) -> dict[str, Any]:
    return dict(
        ring_size=s["ring_size"], segment_lengths=s["segment_lengths"],
        dilation_rates=s["dilation_rates"], branch_mixing=s["branch_mixing"],
        is_causal=s["is_causal"], scale=s["scale"], dropout_p=s["dropout_p"],
        key_padding_mask=key_padding_mask, layout=s["layout"],
    )  # fmt: skip


def _spec_backend(s: dict[str, Any]) -> str | Backend:
    return s["backend"] if s["backend"] == "auto" else _resolve(s["backend"])


@dataclass(frozen=True)
class _OpCall:
    """A compiled ring call, unpacked: its settings (the parsed spec), monitoring and scale,
    and either the ring's setup and key keep mask or, when every document lies inside a
    shard, this shard's offsets and the backend of its packed call (no block ops needed,
    as in eager)."""

    settings: dict[str, Any]
    stats: RingStats | None
    scale: float
    setup: RingSetup | None = None
    keep: Tensor | None = None
    local: Tensor | None = None
    backend: str = ""  # with ``local``: the key of the backend the packed call runs on


def _op_setup(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, spec: str, seed: Tensor,
    cu_seqlens: Tensor | None, max_seqlen: Tensor | None, dropout_p: float,
    scale: float | None, timeout: float | None, phase: str,
) -> _OpCall:  # fmt: skip
    s = _parse_spec(spec)
    s.update(dropout_p=dropout_p, scale=scale, timeout=timeout)
    group = dist.distributed_c10d._resolve_process_group(s["group"])
    backend = _spec_backend(s)
    settings = _spec_settings(s, key_padding_mask)
    if s["validate"] and phase == "forward":
        plan = check_ring_call(
            q, k, v, group=group, backend=backend, timeout=s["timeout"], cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, **settings,
        )  # fmt: skip
    else:
        plan = check_ring_call_locally(q, k, v, world_size=dist.get_world_size(group),
                                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                       **settings)  # fmt: skip
    size = dist.get_world_size(group) if s["ring_size"] is None else s["ring_size"]
    bounds = local = None
    if cu_seqlens is not None:
        bounds = ring_documents(cu_seqlens, q, None, s["dropout_p"], size)
        local = _local_documents(bounds, q.shape[1], size, dist.get_rank(group))
    stats = stats_by_key(s["stats"])
    scale = q.shape[-1] ** -0.5 if s["scale"] is None else float(s["scale"])
    if local is not None:
        key = backend_key(_packed_backend(q, plan, s["is_causal"], backend))
        return _OpCall(s, stats, scale, local=local, backend=key)
    setup = _ring_setup(
        q, plan, group, size, is_causal=s["is_causal"], scale=s["scale"], backend=backend,
        dropout_p=s["dropout_p"], key_padding_mask=key_padding_mask,
        timeout=check_timeout(s["timeout"]), stats=stats, seed=int(seed.item()),
        bounds=bounds, layout=s["layout"],
    )  # fmt: skip
    keep = None if key_padding_mask is None else ~key_padding_mask.contiguous()
    return _OpCall(s, stats, scale, setup=replace(setup, phase=phase), keep=keep)


def _local_settings(call: _OpCall, seed: Tensor) -> tuple:
    """The single-device operators' settings (after q, k, v) of a packed call whose
    documents all lie inside shards: the same packed call eager makes, on the shard."""
    s = call.settings
    return (
        list(s["segment_lengths"]), list(s["dilation_rates"]), s["branch_mixing"],
        call.scale, s["is_causal"], 0.0, None, seed, call.backend, call.local, None,
    )  # fmt: skip


@torch.library.custom_op("dilated_attention_pytorch::ring_forward", mutates_args=())
def _ring_forward_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, spec: str, seed: Tensor,
    cu_seqlens: Tensor | None, max_seqlen: Tensor | None, dropout_p: float,
    scale: float | None, timeout: float | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    call = _op_setup(q, k, v, key_padding_mask, spec, seed, cu_seqlens, max_seqlen, dropout_p,
                     scale, timeout, "forward")  # fmt: skip
    if call.stats is not None:
        call.stats.calls += 1
    if call.local is not None:  # as eager: the shard's documents in one packed call
        return attention_forward_op(q, k, v, *_local_settings(call, seed))
    setup = call.setup
    assert setup is not None
    out, lse = ring_dilated_forward(
        token_major(q), token_major(k), token_major(v), setup, call.keep
    )
    return _fresh(out), lse


@_ring_forward_op.register_fake
def _(q, k, v, *settings):
    B, L, H, _ = q.shape
    lse = q.new_empty(2, B, L, H, dtype=compute_dtype(q.dtype))
    return q.new_empty(B, L, H, v.shape[-1]), lse


@torch.library.custom_op("dilated_attention_pytorch::ring_backward", mutates_args=())
def _ring_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Tensor | None, spec: str, seed: Tensor, cu_seqlens: Tensor | None,
    max_seqlen: Tensor | None, dropout_p: float, scale: float | None, timeout: float | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    call = _op_setup(q, k, v, key_padding_mask, spec, seed, cu_seqlens, max_seqlen, dropout_p,
                     scale, timeout, "backward")  # fmt: skip
    if call.local is not None:
        return attention_backward_op(dout, q, k, v, out, lse, *_local_settings(call, seed))
    assert call.setup is not None
    grads = ring_dilated_backward(
        token_major(dout), token_major(q), token_major(k), token_major(v), out, lse,
        call.setup, call.keep,
    )  # fmt: skip
    return tuple(_fresh(g) for g in grads)


@_ring_backward_op.register_fake
def _(dout, q, k, v, out, lse, *settings):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_attention_autograd(_ring_forward_op, _ring_backward_op)
