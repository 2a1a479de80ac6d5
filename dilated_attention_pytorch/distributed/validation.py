"""Checks of a ring call that raise on *every* rank instead of hanging.

A bad input on one rank (a shard of another length, another dtype, another head
count, a config that differs) would make that rank raise while the others wait
forever in the ring's P2P. So every rank first exchanges a small int64 metadata
vector (shapes, dtype and device codes, a fingerprint of the settings) with one
``all_gather``; K/V never move here. Every rank then runs the same checks on the
same table and raises the same ``ValueError``, which names the ranks involved.

The exchange runs on the ring's own communicator (:func:`.comm.ring_communicator`),
never on the caller's group, and is bounded by the call's ``timeout``: a rank that
does not arrive gives ``RuntimeError`` on the others, naming it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..plan import DilatedPlan, make_plan
from ..validation import (
    check_choice,
    check_cu_seqlens,
    check_key_padding_mask,
    check_positive_float,
    check_qkv,
    check_ring_size,
    check_scalars,
)
from .comm import collective_device, communicator, gather_objects
from .comm import distributed_not_ready as distributed_not_ready  # re-exported
from .comm import resolve_group as resolve_group  # re-exported

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPE_NAMES = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
_DEVICE_CODES = {"cpu": 1, "cuda": 2}
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "another device"}
# Layout of the metadata vector.
_OK, _B, _L, _H, _D, _HKV, _DTYPE, _DEVICE, _FINGERPRINT, _DOCUMENTS = range(10)
_META_LEN = 10


def _fingerprint(*settings: object) -> int:
    # A deterministic digest of the settings that every rank must share.
    return zlib.crc32(repr(settings).encode())


def _per_rank(table: list[list[int]], describe: Callable[[list[int]], str]) -> str:
    return ", ".join(f"rank {j} has {describe(row)}" for j, row in enumerate(table))


def _gather_texts(
    group: dist.ProcessGroup, text: str | None, timeout: float | None
) -> list[str | None]:
    # Only on error paths, which every rank reaches together (they share the table).
    what = "the exchange of error texts of the input check of ring attention"
    return gather_objects(group, text, timeout, what)  # type: ignore[return-value]


def check_shard_length(plan: DilatedPlan, local_len: int, world_size: int) -> None:
    """The shard rules of the ring: ``L % w == 0`` for ``w <= L`` and ``w % L == 0`` for ``w > L``."""
    N = local_len * world_size
    for i, (w, r) in enumerate(zip(plan.segment_lengths, plan.dilation_rates, strict=True)):
        if w <= local_len and local_len % w != 0:
            raise ValueError(
                f"branch {i} (segment length {w}, dilation {r}) does not tile the local shard: "
                f"each of the {world_size} ranks holds L = N/k = {N}/{world_size} = {local_len} "
                f"tokens, and a segment length w <= L must divide L (L % w == 0); choose a "
                f"sequence length N whose shard L = N/k is a multiple of {w}."
            )
        if w > local_len and w % local_len != 0:
            raise ValueError(
                f"branch {i} (segment length {w}, dilation {r}) spans several ranks but is not a "
                f"multiple of the local shard length L = N/k = {N}/{world_size} = {local_len}; a "
                f"segment length w > L must satisfy w % L == 0 so that each segment is held by "
                f"w/L whole shards; change N or the number of ranks so that L divides {w}."
            )


def ring_documents(cu_seqlens: object, q: Tensor, key_padding_mask: object, dropout_p: object,
                   ring_size: int, max_seqlen: object = None) -> tuple[int, ...]:  # fmt: skip
    """The document offsets of a packed ring call (``cu_seqlens`` over the ring's whole
    sequence of ``ring_size * L`` tokens), checked."""
    L = q.shape[1]
    # Only its shape is read: the ring's whole packed row.
    whole = torch.empty(1, ring_size * L, *q.shape[2:], device="meta") if q.shape[0] == 1 else q
    check_cu_seqlens(cu_seqlens, max_seqlen, whole, key_padding_mask)
    assert isinstance(cu_seqlens, Tensor)
    if float(dropout_p) > 0.0:  # type: ignore[arg-type]
        raise ValueError(
            "ring attention with cu_seqlens does not take dropout yet (one device draws each "
            "document's dropout from a seed and positions of its own, which the ring does not "
            "reproduce); pass dropout_p=0.0."
        )
    return tuple(int(b) for b in cu_seqlens.tolist())


LAYOUTS = ("contiguous", "zigzag")


def check_zigzag(plan: DilatedPlan, local_len: int, packed: bool) -> None:
    """The zigzag layout's rules (on top of the shard rules): each shard is two halves of
    ``C = L/2`` tokens, so ``L`` is even and a segment length ``w <= C`` divides ``C``."""
    if packed:
        raise ValueError(
            "layout='zigzag' does not take cu_seqlens: packed documents are laid out "
            "contiguously (their segments follow the documents); pass layout='contiguous'."
        )
    problem = zigzag_problem(plan.segment_lengths, plan.dilation_rates, local_len)
    if problem is not None:
        raise ValueError(problem)


def zigzag_problem(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], local_len: int
) -> str | None:
    """Why shards of ``local_len`` tokens cannot take the zigzag layout, or None."""
    if local_len % 2:
        return (
            f"layout='zigzag' holds two halves of the sequence on every rank, so the shard "
            f"length L = N/k must be even, got L = {local_len}; pad the sequence or use "
            f"layout='contiguous'."
        )
    half = local_len // 2
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates, strict=True)):
        if w <= half and half % w:
            return (
                f"branch {i} (segment length {w}, dilation {r}) does not tile half a shard: "
                f"with layout='zigzag' each rank holds two chunks of L/2 = {half} tokens, and "
                f"a segment length w <= L/2 must divide L/2; choose N so that {w} divides "
                f"N/(2k), or use layout='contiguous'."
            )
    return None


def check_ring_size_divides(ring_size: object, world_size: int) -> int:
    """``ring_size`` (``None`` = the whole group) must divide the group's size; returns it."""
    size = check_ring_size(ring_size)
    if size is None:
        return world_size
    if world_size % size != 0:
        raise ValueError(
            f"ring_size={size} does not divide the process group's {world_size} ranks; the "
            f"group is cut into consecutive rings of ring_size ranks, so pass a divisor of "
            f"{world_size} (or None for one ring over the whole group)."
        )
    return size


def check_timeout(timeout: object) -> float | None:
    """``timeout`` of a ring call: seconds (a positive finite float) or ``None``."""
    return None if timeout is None else check_positive_float("timeout", timeout)


class _Reported(Exception):
    """A problem the caller found, carried through :func:`check_ring_call` as it is."""


def check_ring_call_locally(
    q: object,
    k: object,
    v: object,
    *,
    ring_size: object = None,
    world_size: int = 1,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    branch_mixing: str,
    is_causal: object,
    scale: object,
    dropout_p: object = 0.0,
    key_padding_mask: object = None,
    cu_seqlens: object = None,
    layout: object = "contiguous",
    max_seqlen: object = None,
) -> DilatedPlan:
    """The checks of a ring call that need no other rank; returns the plan.

    Raises ``ValueError``/``TypeError`` on this rank only. :func:`check_ring_call`
    runs them inside its collective so that every rank raises together.
    """
    check_qkv(q, k, v, grouped_query=True)
    check_scalars(scale=scale, dropout_p=dropout_p, is_causal=is_causal)
    assert isinstance(q, Tensor)
    check_key_padding_mask(key_padding_mask, q, what="this rank's shard (B, N/k)")
    if q.shape[1] == 0:
        raise ValueError(
            f"the local shard is empty (q has shape {tuple(q.shape)}); every rank must hold "
            f"N/k >= 1 tokens."
        )
    assert isinstance(k, Tensor)
    plan = make_plan(segment_lengths, dilation_rates, q.shape[2], branch_mixing, k.shape[2])
    size = check_ring_size_divides(ring_size, world_size)
    layout = check_choice("layout", layout, LAYOUTS)
    if layout == "zigzag":
        check_zigzag(plan, q.shape[1], cu_seqlens is not None)
    if cu_seqlens is not None:  # segments restart at each document: no shard rule applies
        ring_documents(cu_seqlens, q, key_padding_mask, dropout_p, size, max_seqlen)
    else:
        if max_seqlen is not None:
            raise ValueError(
                "max_seqlen was given without cu_seqlens; it describes packed documents, so "
                "pass both or neither."
            )
        check_shard_length(plan, q.shape[1], size)
    return plan


def check_ring_call(
    q: object,
    k: object,
    v: object,
    *,
    group: dist.ProcessGroup,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    branch_mixing: str,
    is_causal: object,
    scale: object,
    backend: object,
    dropout_p: object = 0.0,
    key_padding_mask: object = None,
    ring_size: object = None,
    timeout: object = None,
    input_error: str | None = None,
    cu_seqlens: object = None,
    layout: object = "contiguous",
    max_seqlen: object = None,
    backward: str = "one ring pass",
    module: str = "",
) -> DilatedPlan:
    """Validate a ring call on every rank of ``group`` together; returns the plan.

    Collective: every rank of ``group`` must call it. Raises the same ``ValueError``
    on every rank when any rank's input is bad or the ranks disagree. Costs one small
    ``all_gather`` (on the ring's own communicator), an increment of a counter in the
    group's store and a host synchronisation. ``input_error`` is a problem the caller
    already found on this rank (e.g. in the whole sequence before sharding), reported
    like a failed local check. ``timeout``: seconds the exchange may take (``None``: the
    group's own timeout) before ``RuntimeError`` naming the ranks that did not arrive.
    ``backward``: how the backward will run its ring (one pass of every head, or the
    multi-head layer's pass per chunk of heads): ranks that would run different passes
    raise here instead of exchanging mismatched buffers later. ``module``: settings of
    the calling module that the ranks must share too (e.g. a Hilbert ring's grid), as
    text; compared like the others.
    """
    local_error: str | None = None
    plan: DilatedPlan | None = None
    meta = [0] * _META_LEN
    try:
        timeout = check_timeout(timeout)
    except (TypeError, ValueError) as exc:  # reported like any bad input; wait by default
        input_error, timeout = input_error or f"{type(exc).__name__}: {exc}", None
    try:
        if input_error is not None:
            raise _Reported(input_error)
        plan = check_ring_call_locally(
            q, k, v,
            ring_size=ring_size,
            world_size=dist.get_world_size(group),
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
        )  # fmt: skip
        assert isinstance(q, Tensor) and isinstance(k, Tensor)
        meta = [
            1,
            *q.shape,
            k.shape[2],
            _DTYPE_CODES[q.dtype],
            _DEVICE_CODES.get(q.device.type, 3),
            _fingerprint(
                tuple(segment_lengths), tuple(dilation_rates), branch_mixing, is_causal,
                None if scale is None else float(scale),  # scale=1 and scale=1.0 agree
                backend if isinstance(backend, str) else repr(backend),
                ring_size,
                float(dropout_p),  # type: ignore[arg-type]
                key_padding_mask is not None,
                cu_seqlens is not None,
                layout,
                backward,
                module,
            ),
            # The documents: each ring holds its own sequence, so compared within a ring.
            0 if cu_seqlens is None else _fingerprint(tuple(cu_seqlens.tolist())),  # type: ignore[attr-defined]
        ]  # fmt: skip
    except _Reported as exc:
        local_error = str(exc)
    except (TypeError, ValueError) as exc:
        local_error = f"{type(exc).__name__}: {exc}"

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    mine = torch.tensor(meta, dtype=torch.int64, device=collective_device(group))
    what = "the collective input check of ring attention (before ring step 0 of every branch)"
    gathered = communicator(group, timeout).all_gather(mine, timeout, what)
    table = [row.tolist() for row in gathered]

    bad = [j for j, row in enumerate(table) if row[_OK] != 1]
    if bad:
        # Error path only: fetch the texts so every rank can say what went wrong where.
        messages = _gather_texts(group, local_error, timeout)
        details = "; ".join(f"rank {j}: {messages[j]}" for j in bad)
        raise ValueError(
            f"ring attention: invalid input on rank(s) {bad} of {world_size} (this is rank "
            f"{rank}; every rank raises this error): {details}"
        )

    shapes = {tuple(row[_B : _HKV + 1]) for row in table}
    if len(shapes) > 1:
        raise ValueError(
            "ring attention: the local shards differ between ranks; every rank must pass q of "
            "one shape (B, N/k, H, D) and k, v of one shape (B, N/k, H_kv, D) (same batch, "
            "shard length, head counts and head dim): "
            + _per_rank(
                table,
                lambda row: f"q shape {tuple(row[_B : _D + 1])} with {row[_HKV]} K/V heads",
            )
            + "."
        )
    if len({row[_DTYPE] for row in table}) > 1:
        raise ValueError(
            "ring attention: the dtype differs between ranks; cast every rank's q, k, v to one "
            "dtype: " + _per_rank(table, lambda row: _DTYPE_NAMES[row[_DTYPE]]) + "."
        )
    if len({row[_DEVICE] for row in table}) > 1:
        raise ValueError(
            "ring attention: the device type differs between ranks; put every rank's tensors on "
            "the same kind of device: "
            + _per_rank(table, lambda row: _DEVICE_NAMES[row[_DEVICE]])
            + "."
        )
    if len({row[_FINGERPRINT] for row in table}) > 1:
        settings = (
            f"segment_lengths={list(segment_lengths)}, dilation_rates={list(dilation_rates)}, "
            f"branch_mixing={branch_mixing!r}, is_causal={is_causal}, scale={scale}, "
            f"backend={backend!r}, ring_size={ring_size}, dropout_p={dropout_p}, "
            f"key_padding_mask={'given' if key_padding_mask is not None else 'None'}, "
            f"cu_seqlens={'given' if cu_seqlens is not None else 'None'}, layout={layout!r}, "
            f"backward={backward!r}" + (f", {module}" if module else "")
        )
        texts = _gather_texts(group, settings, timeout)
        raise ValueError(
            "ring attention: the settings differ between ranks; pass the same segment_lengths, "
            "dilation_rates, branch_mixing, is_causal, scale, backend, ring_size, dropout_p and "
            "layout, and a key_padding_mask and cu_seqlens on every rank or on none (and, for "
            "a multi-head ring layer, the same recompute_qkv and no module hooks on one rank "
            "only, so that every rank runs the same backward; for a ring module, the same "
            "module settings): " + "; ".join(f"rank {j} has {t}" for j, t in enumerate(texts)) + "."
        )
    size = world_size if ring_size is None else int(ring_size)  # type: ignore[call-overload]
    rings = [table[i : i + size] for i in range(0, world_size, size)]
    differ = [i for i, rows in enumerate(rings) if len({row[_DOCUMENTS] for row in rows}) > 1]
    if differ:
        i = differ[0]
        mine_text = None if cu_seqlens is None else str(cu_seqlens.tolist())  # type: ignore[attr-defined]
        texts = _gather_texts(group, mine_text, timeout)
        raise ValueError(
            f"ring attention: the packed documents (cu_seqlens) differ between the ranks of "
            f"ring {i}; every rank of a ring must pass the offsets of that ring's whole "
            f"sequence: "
            + "; ".join(f"rank {j} has {texts[j]}" for j in range(i * size, (i + 1) * size))
            + "."
        )
    assert plan is not None
    return plan
