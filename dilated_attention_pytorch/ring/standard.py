"""``nn.Module`` forms of ring (sequence-parallel) dilated attention.

The ranks of a process group (or of each ring of ``ring_size`` consecutive ranks)
share one sequence: rank ``j`` of a ring of ``k`` holds tokens ``[j*N/k, (j+1)*N/k)``.
The modules take either the whole sequence on every rank (``already_split=False``,
the default: the module takes its shard and returns the whole output, exactly the
single-device result) or each rank's shard (``already_split=True``: the O(N/k) per
rank path). The maths lives in :mod:`dilated_attention_pytorch.distributed`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import (
    gather_replicated,
    ring_dilated_attention,
    shard_replicated,
    zigzag_order,
)
from ..distributed.comm import RingStats
from ..distributed.projected_ring import projected_ring_attention, qkv_like
from ..distributed.validation import (
    LAYOUTS,
    check_ring_call,
    check_ring_size_divides,
    distributed_not_ready,
    resolve_group,
    zigzag_problem,
)
from ..modules import DilatedAttention, MultiheadDilatedAttention
from ..validation import check_bool, check_choice, check_positive_float, check_ring_size

__all__ = [
    "ProcessGroupPickling",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "StandardRingAttention",
]


def ring_members(
    process_group: dist.ProcessGroup | None, ring_size: int | None
) -> tuple[dist.ProcessGroup, tuple[int, ...]] | None:
    """``(process group, group ranks of this rank's ring)`` for a ring module, or ``None``
    for a ring of one without ``torch.distributed`` (``ring_size > 1`` then raises)."""
    if distributed_not_ready() is not None:
        if ring_size not in (None, 1):
            raise ValueError(
                f"ring_size={ring_size} needs torch.distributed: call "
                f"torch.distributed.init_process_group (e.g. launch with torchrun) first, "
                f"or use ring_size=None / 1 to run on this device alone."
            )
        return None
    group = resolve_group(process_group)
    size = check_ring_size_divides(ring_size, dist.get_world_size(group))
    rank = dist.get_rank(group)
    first = rank - rank % size
    return group, tuple(range(first, first + size))


class ProcessGroupPickling(nn.Module):
    """Copying and pickling for a module whose ``process_group`` attribute holds a group.

    A ``ProcessGroup`` is a handle to this process's communicators and cannot be
    pickled. ``copy.copy`` and ``copy.deepcopy`` therefore share the group with the copy
    (both talk over the same communicator). Pickling (``pickle``, ``torch.save``) leaves the group out
    and records its global ranks; after unpickling, the first call re-resolves it: to
    the default group (WORLD) when the ranks are all of WORLD's, else it raises a
    ``ValueError`` asking for ``module.process_group = <group over those ranks>``.
    Without ``torch.distributed`` the unpickled module is a ring of one, as usual.
    """

    process_group: dist.ProcessGroup | None
    _validated: set[tuple]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        group = state.get("process_group")
        if group is not None:
            state["process_group"] = None
            state["_pickled_group_ranks"] = tuple(dist.get_process_group_ranks(group))
        state["_validated"] = set()  # input signatures are checked again, with the new group
        return state

    def __copy__(self) -> ProcessGroupPickling:
        copied = type(self).__new__(type(self))
        copied.__setstate__(nn.Module.__getstate__(self))  # shares everything, the group too
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> ProcessGroupPickling:
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group  # a communicator is shared, not copied
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        # The plain state (with the group), not the pickled one of __getstate__.
        copied.__setstate__(copy.deepcopy(nn.Module.__getstate__(self), memo))
        return copied

    def resolved_process_group(self) -> dist.ProcessGroup | None:
        """``process_group`` (``None``: WORLD), re-resolved after unpickling (see the class)."""
        ranks = self.__dict__.get("_pickled_group_ranks")
        if ranks is None or self.process_group is not None or distributed_not_ready():
            return self.process_group
        if ranks != tuple(range(dist.get_world_size())):
            raise ValueError(
                f"this {type(self).__name__} was unpickled without its process group (a "
                f"process group cannot be pickled), a group over global ranks {list(ranks)}; "
                f"set module.process_group = <that group> (e.g. from "
                f"torch.distributed.new_group({list(ranks)})) before calling it."
            )
        self._pickled_group_ranks = None  # the default group has exactly those ranks
        return None


class StandardRingAttention(ProcessGroupPickling, DilatedAttention):
    """Dilated attention on ``(B, N, H, D)`` tensors over a sequence shared by the ranks of a ring.

    On ``(B, N, H, D)`` q, k, v (batch, tokens, heads, head dim). Every rank of the
    process group calls it together. The group is one ring (``ring_size=None``) or is
    cut into consecutive rings of ``ring_size`` ranks, each with its own sequence
    (sequence parallel inside a ring, data parallel across rings). Branches whose
    segment fits in a rank's shard run locally; longer ones pass only the *dilated*
    K/V between the ranks holding a segment, by P2P.

    Without ``torch.distributed`` initialized the module is a ring of one: it computes
    :class:`~dilated_attention_pytorch.DilatedAttention` on the local device
    (``ring_size > 1`` then raises at ``forward``; construction works anywhere).

    Args:
        segment_lengths, dilation_rates, branch_mixing, scale, backend: as in
            :class:`~dilated_attention_pytorch.DilatedAttention`; segment lengths are
            global token counts. With ``L = N / ring_size`` tokens per rank, a segment
            length ``w <= L`` must divide ``L`` and a ``w > L`` must be a multiple of ``L``.
        dropout: drop probability of the joint attention probabilities, in training
            mode only. Over the ring the dropped entries are those the single-device
            module drops when every rank's default generator is seeded alike (each entry
            is dropped by a hash of its branch, head, positions and a seed drawn from that
            generator), and the backward replays them. Calls with dropout run the
            ``pytorch`` backend's matmul blocks.
        ring_size: ranks per ring; ``None`` for the whole process group, else a divisor
            of its size.
        process_group: the group holding the sequence (default: WORLD), e.g. one
            dimension of a DeviceMesh. ``copy.deepcopy`` shares it; pickling leaves it
            out (see :class:`ProcessGroupPickling`).
        validate: when the collective input check runs (one small ``all_gather`` and a
            host sync, so that a bad input on any rank raises on every rank):
            ``"once"`` (default) the first time the module sees an input signature
            (shapes, dtypes, device, ``is_causal``, mask, dropout, group), with this
            rank's own checks on every call; ``"always"`` on every call, for inputs
            whose shapes may change on some ranks but not others.
        timeout: seconds (a positive float) that each wait on other ranks may take: every
            batch of P2P transfers (K/V, gradients, the gathers of ``already_split=False``),
            the input check and, at the group's first ring call, the creation of the ring's
            own communicator. ``None`` (default): the process group's own timeout (gloo's
            default is 30 minutes). A peer that died, is stuck or skipped a call (or a
            backward) then gives a ``RuntimeError`` on the ranks waiting for it, naming the
            rank that did not answer and the ring step and branch(es) waited for, instead
            of a hang; the ring then refuses to run on that group again. The ring's
            transfers and checks run on a communicator of its own over the group's ranks
            (:func:`~dilated_attention_pytorch.distributed.ring_communicator`), so
            collectives you run on the group never mix with them.
        layout: which tokens each rank holds. ``"contiguous"``: rank ``j`` holds
            ``[j*L, (j+1)*L)``. ``"zigzag"``: rank ``j`` of ``k`` holds chunks ``j`` and
            ``2k-1-j`` of ``2k`` equal chunks, which balances causal work over the ranks
            (with contiguous shards the last rank of a segment does most of it).
            ``"auto"`` (default): zigzag for causal calls on the whole sequence
            (``already_split=False``: the module shards and gathers, so the layout is
            invisible) when the zigzag rules hold (``L`` even, every ``w <= L/2`` dividing
            ``L/2``, no ``cu_seqlens``) and balance the work (every ``w > L/2`` divides
            ``N`` or is at least ``N``), contiguous otherwise. With ``already_split=True`` the
            shards must be in the module's layout: ``"auto"`` then means contiguous, so
            pass ``layout="zigzag"`` and shard with
            ``shard_sequence(x, layout="zigzag")`` to balance causal work there.

    Shapes:
        ``already_split=False``: q, k, v ``(B, N, H, D)``, the same on every rank of a
        ring; output ``(B, N, H, D)``. ``already_split=True``: this rank's shards
        ``(B, N/k, H, D)`` in and out. Called as ``attn(q, k, v, is_causal=False,
        key_padding_mask=None, *, already_split=False)``, like ``DilatedAttention``.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        dropout: float = 0.0,
        ring_size: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        branch_mixing: str = "softmax",
        scale: float | None = None,
        backend: str = "auto",
        validate: str = "once",
        timeout: float | None = None,
        layout: str = "auto",
    ) -> None:
        super().__init__(
            segment_lengths,
            dilation_rates,
            branch_mixing=branch_mixing,
            dropout=dropout,
            scale=scale,
            backend=backend,
        )
        self.layout = check_choice("layout", layout, ("auto", *LAYOUTS))
        self.process_group = process_group
        self.ring_size = check_ring_size(ring_size)
        self.validate = check_choice("validate", validate, ("once", "always"))
        self.timeout = None if timeout is None else check_positive_float("timeout", timeout)
        self._stats: RingStats | None = None  # set by subclasses that monitor the ring
        self._validated: set[tuple] = set()  # input signatures that passed the collective check
        if dist.is_available() and dist.is_initialized():
            self.ring()  # fail early when the group is already known

    def new_cache(self, num_heads: int):
        """Decoding caches are single-device: use a ``DilatedAttention`` with the same
        branches for generation."""
        raise TypeError(
            f"{type(self).__name__} has no decoding cache (a ring splits the sequence over "
            f"ranks); decode with DilatedAttention({list(self.segment_lengths)}, "
            f"{list(self.dilation_rates)}) on one device."
        )

    def ring(self) -> tuple[dist.ProcessGroup, tuple[int, ...]] | None:
        """``(process group, group ranks of this rank's ring)``, or ``None`` for a ring
        of one without ``torch.distributed``."""
        return ring_members(self.resolved_process_group(), self.ring_size)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        *,
        already_split: bool = False,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | Tensor | None = None,
    ) -> Tensor:
        """Attend ``query`` to ``key``/``value`` over the ring.

        Args:
            query, key, value: ``(B, N, H, D)``, the whole sequence and the same on every
                rank of the ring; with ``already_split=True`` this rank's shard
                ``(B, N/k, H, D)``.
            is_causal: query ``p`` only sees keys ``p' <= p`` (global positions).
            key_padding_mask: ``(B, N)`` bool, ``True`` marks padding keys; with
                ``already_split=True`` this rank's shard ``(B, N/k)``. It travels around
                the ring with the keys.
            already_split: whether the inputs are already this rank's shards.
            cu_seqlens: packed documents (``B = 1``): the offsets of the documents in the
                ring's whole sequence, the same on every rank of the ring (with either
                ``already_split``); see :func:`~dilated_attention_pytorch.distributed.ring_dilated_attention`.
                Calls with ``cu_seqlens`` always run the collective check, since the
                documents usually change from batch to batch.
            max_seqlen: with ``cu_seqlens``, accepted for drop-in use and checked.

        Returns:
            ``(B, N, H, D)`` (``already_split=False``: the whole output, equal on every
            rank to the single-device result, with the single-device gradients of the
            whole inputs) or this rank's shard ``(B, N/k, H, D)``.
        """
        check_bool("already_split", already_split)
        ring = self.ring()
        if ring is None or len(ring[1]) == 1:
            # A ring of one: nothing to exchange, the single-device computation.
            return super().forward(
                query, key, value, is_causal=is_causal, key_padding_mask=key_padding_mask,
                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            )  # fmt: skip
        group, members = ring
        options = {"stats": self._stats, "timeout": self.timeout}
        q, k, v, mask = query, key, value, key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        layout = self.resolve_layout(
            query, len(members), is_causal, already_split, cu_seqlens is not None
        )
        settings = dict(
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            ring_size=len(members),
            is_causal=is_causal,
            branch_mixing=self.branch_mixing,
            scale=self.scale,
            backend=self.backend,
            dropout_p=dropout_p,
            timeout=self.timeout,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            layout=layout,
        )
        if not already_split:
            error = whole_input_error(query, key_padding_mask, len(members), layout)
            error = error or self._whole_input_error(query)
            if error is not None:
                # Raised inside the collective check, so that every rank raises with it
                # instead of waiting for this one.
                check_ring_call(
                    query, key, value, group=group, key_padding_mask=None, input_error=error,
                    **settings,
                )  # fmt: skip
            order = None
            tensors = all(isinstance(t, Tensor) for t in (query, key, value))
            if layout == "zigzag" and tensors:  # zigzag order, then contiguous shards
                order = zigzag_order(query.shape[1], len(members), query.device)
                query, key, value = (t.index_select(1, order) for t in (query, key, value))
                if isinstance(key_padding_mask, Tensor):
                    key_padding_mask = key_padding_mask.index_select(1, order)
            q, k, v = (
                shard_replicated(t, group, members, **options) if isinstance(t, Tensor) else t
                for t in (query, key, value)
            )
            if order is not None:  # copies of the shards, so the reordered wholes can go
                q, k, v = (t.clone() for t in (q, k, v))
            position = members.index(dist.get_rank(group))
            mask = _mask_shard(key_padding_mask, position, len(members))
        # Bad options are checked inside the collective validation, so that a bad mask or
        # dropout on one rank makes every rank raise instead of hanging the others.
        agreed = self._agreed_settings(None if already_split else query.shape[1])
        # With the module's own settings and the mode: after a switch (eval to training,
        # gradients on) every rank checks again, also one whose own settings stay the same.
        signature = (
            *self._signature(q, k, v, is_causal, mask, dropout_p, layout, group),
            agreed, self.training, torch.is_grad_enabled(),
        )  # fmt: skip
        validate = (
            self.validate == "always" or cu_seqlens is not None or signature not in self._validated
        )
        if validate and agreed and not torch.compiler.is_compiling():
            # The collective check, with this module's own settings compared too.
            check_ring_call(
                q, k, v, group=group, key_padding_mask=mask, module=agreed, **settings
            )  # fmt: skip
            validate = False
        out = ring_dilated_attention(
            q, k, v, group=group, key_padding_mask=mask, validate=validate, stats=self._stats,
            **settings,
        )  # fmt: skip
        if cu_seqlens is None and not (agreed and torch.compiler.is_compiling()):
            # (A traced call did not compare this module's own settings.)
            self._validated.add(signature)
        if already_split:
            return out
        out = gather_replicated(out, group, members, **options)
        # order is a permutation by construction: argsort inverts it without host reads.
        return out if order is None else out.index_select(1, torch.argsort(order))

    def _agreed_settings(self, seq_len: int | None) -> str:
        """Settings of this module beyond the ring call's own that every rank must share
        in a call on the whole sequence of ``seq_len`` tokens (``None``: on shards), as
        they take effect; compared by the collective input check. ``""``: none."""
        return ""

    def _whole_input_error(self, query: Tensor) -> str | None:
        """A problem of this module's own with the whole sequence ``query`` (reported on
        every rank by the collective check); ``None``: none."""
        return None

    @staticmethod
    def _signature(
        q: object, k: object, v: object, is_causal: object, mask: object, dropout_p: float,
        layout: str, group: dist.ProcessGroup,
    ) -> tuple:  # fmt: skip
        """What a call's collective check covers: once checked (``validate="once"``), a
        call with the same signature runs this rank's own checks only."""
        return (
            *(tuple(t.shape) if isinstance(t, Tensor) else type(t) for t in (q, k, v)),
            *(getattr(t, "dtype", None) for t in (q, k, v)),
            getattr(q, "device", None),
            is_causal,
            None
            if mask is None
            else (type(mask), getattr(mask, "dtype", None), getattr(mask, "shape", None),
                  getattr(mask, "device", None)),
            dropout_p,
            layout,
            id(group),
        )  # fmt: skip

    def _projected_call(
        self,
        x: Tensor,
        weights: tuple[Tensor, Tensor, Tensor],
        biases: tuple[Tensor | None, Tensor | None, Tensor | None],
        *,
        num_heads: int,
        num_kv_heads: int,
        is_causal: bool,
        key_padding_mask: Tensor | None,
        rotary: tuple[Tensor, Tensor] | None = None,
        already_split: bool = False,
        **kwargs: Any,
    ) -> Tensor | None:
        """The multi-head layer's recomputing node on this rank's shard ``x`` ``(B, N/k,
        E)`` (:func:`~dilated_attention_pytorch.distributed.projected_ring.projected_ring_attention`),
        as ``(B, N/k, H, D)``; a ring of one runs the single-device node. ``None`` (the
        layer then runs the separate nodes) for the whole sequence (``already_split=False``)
        and packed documents."""
        check_bool("already_split", already_split)
        ring = self.ring()
        if ring is None or len(ring[1]) == 1:
            return super()._projected_call(
                x, weights, biases, num_heads=num_heads, num_kv_heads=num_kv_heads,
                is_causal=is_causal, key_padding_mask=key_padding_mask, rotary=rotary,
                **kwargs,
            )  # fmt: skip
        if not already_split or kwargs:
            return None
        group, members = ring
        dropout_p = self.dropout if self.training else 0.0
        layout = self.resolve_layout(x, len(members), is_causal, True, False)
        q_like, kv_like = qkv_like(x, num_heads, num_kv_heads)
        signature = (
            *self._signature(
                q_like, kv_like, kv_like, is_causal, key_padding_mask, dropout_p, layout, group
            ),
            "recompute_qkv",  # a node's check does not stand for a plain call's
        )
        out = projected_ring_attention(
            x, weights, biases, num_heads=num_heads, num_kv_heads=num_kv_heads,
            segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            group=group, ring_size=len(members), is_causal=is_causal,
            branch_mixing=self.branch_mixing, scale=self.scale, backend=self.backend,
            dropout_p=dropout_p, key_padding_mask=key_padding_mask,
            validate=self.validate == "always" or signature not in self._validated,
            timeout=self.timeout, stats=self._stats, layout=layout, rotary=rotary,
        )  # fmt: skip
        self._validated.add(signature)
        return out

    def resolve_layout(
        self, query: object, size: int, is_causal: bool, already_split: bool, packed: bool
    ) -> str:
        """The layout of a call: ``self.layout``, with ``"auto"`` resolved (see the class)."""
        if self.layout != "auto":
            return self.layout
        if not is_causal or already_split or packed:
            return "contiguous"
        if not isinstance(query, Tensor) or query.dim() < 2 or query.shape[1] % size:
            return "contiguous"
        N = query.shape[1]
        half = N // (2 * size)
        fits = zigzag_problem(self.segment_lengths, self.dilation_rates, N // size) is None
        # Balanced only when the segments of every branch spanning chunks are mirrored
        # about the middle of the sequence (w divides N, or one segment holds it all);
        # otherwise zigzag moves more bytes for no gain (e.g. w = 2L on 3 ranks).
        mirrored = all(w <= half or N % w == 0 or w >= N for w in self.segment_lengths)
        return "zigzag" if fits and mirrored else "contiguous"

    def memory_ring_size(self) -> int:
        """Ranks per ring for :meth:`get_memory_estimate`: ``ring_size``, else the process
        group's size (1 without ``torch.distributed``: planning works anywhere)."""
        if self.ring_size is not None:
            return self.ring_size
        ring = self.ring()
        return 1 if ring is None else len(ring[1])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ring_size={self.ring_size}, validate={self.validate!r}, "
            f"layout={self.layout!r}"
        )


def whole_input_error(
    query: object, mask: object, size: int, layout: str = "contiguous"
) -> str | None:
    """What is wrong with a whole-sequence input for a ring of ``size`` ranks, or ``None``.

    The whole sequence must cut into ``size`` equal shards, and a key padding mask must
    cover it ``(B, N)``. Returned, not raised: the ring modules raise it inside their
    collective check, so that every rank raises together even when only one rank's
    input is wrong. Anything that is not a tensor is left to that check.
    """
    if not (isinstance(query, Tensor) and query.dim() >= 2):
        return None
    B, N = query.shape[0], query.shape[1]
    if N % size != 0:
        return (
            f"ValueError: the whole sequence has {N} tokens (dim 1 of query "
            f"{tuple(query.shape)}), which does not cut into {size} equal shards for a ring "
            f"of {size} ranks; pad it to a multiple of {size}."
        )
    if layout == "zigzag" and N % (2 * size) != 0:
        return (
            f"ValueError: layout='zigzag' cuts the whole sequence of {N} tokens into 2k = "
            f"{2 * size} equal chunks for a ring of {size} ranks; pad it to a multiple of "
            f"{2 * size} or use layout='contiguous'."
        )
    if isinstance(mask, Tensor) and tuple(mask.shape) != (B, N):
        return (
            f"ValueError: key_padding_mask must have shape (B, N) = ({B}, {N}), the whole "
            f"sequence like query, got {tuple(mask.shape)}; pass this rank's shard only "
            f"together with already_split=True."
        )
    return None


def _mask_shard(mask: object, position: int, size: int) -> object:
    """Ring member ``position``'s shard of a whole-sequence ``(B, N)`` key padding mask
    (already checked by :func:`whole_input_error`); anything that is not a tensor is
    returned as is, for the collective check to reject on every rank."""
    if not isinstance(mask, Tensor):
        return mask
    L = mask.shape[1] // size
    return mask.narrow(1, position * L, L)


RingDilatedAttention = StandardRingAttention
"""Another name of :class:`StandardRingAttention` (the same class)."""


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """Multi-head dilated attention on ``(B, N, E)`` inputs whose attention runs over a ring of ranks.

    A :class:`~dilated_attention_pytorch.MultiheadDilatedAttention` whose inner
    attention is :class:`StandardRingAttention`. ``forward(query, key=None, value=None,
    *, is_causal=False, key_padding_mask=None, already_split=False)``:

    - ``already_split=False`` (default): every rank of a ring passes the whole
      ``(B, N, E)`` input and gets the whole output, exactly the single-device layer's
      (and the single-device gradients, parameters included); only the attention is
      split over the ring.
    - ``already_split=True``: every rank passes its shard ``(B, N/k, E)``; projections,
      norm and output projection run on the shard (O(N/k) per rank), and rank ``j``'s
      output is shard ``j`` of the single-device output. Parameter gradients are then
      each rank's share: sum them over the ring (as data parallelism over the sequence
      dimension would).

    Args:
        embed_dim, num_heads, segment_lengths, dilation_rates, num_kv_heads, bias,
            layer_norm, gamma_init, device, dtype: as in ``MultiheadDilatedAttention``
            (with ``num_kv_heads < num_heads`` only the K/V heads travel the ring).
        ring_size, process_group, branch_mixing, dropout, scale, backend, validate, timeout,
            layout: the keywords of the inner :class:`StandardRingAttention`.
        recompute_qkv: as in ``MultiheadDilatedAttention`` (default ``True``), for calls
            on shards (``already_split=True``): the projections of the shard and the ring
            run as one node that keeps only the shard's input, output and LSE; its
            backward recomputes q, k, v a few heads at a time, each chunk of heads a ring
            pass of its own (the same bytes as one pass, in as many smaller transfers);
            under ``torch.compile`` as two custom operators. Whole-sequence calls and
            packed documents run the projections and the ring as separate nodes.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        ring_size: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        branch_mixing: str = "softmax",
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str = "auto",
        validate: str = "once",
        timeout: float | None = None,
        layout: str = "auto",
        bias: bool = True,
        layer_norm: bool = True,
        gamma_init: float = 1.0,
        recompute_qkv: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        attention: nn.Module = StandardRingAttention(
            segment_lengths,
            dilation_rates,
            process_group=process_group,
            branch_mixing=branch_mixing,
            dropout=dropout,
            scale=scale,
            ring_size=ring_size,
            backend=backend,
            validate=validate,
            timeout=timeout,
            layout=layout,
        )
        super().__init__(
            embed_dim,
            num_heads,
            num_kv_heads=num_kv_heads,
            attention=attention,
            bias=bias,
            layer_norm=layer_norm,
            gamma_init=gamma_init,
            recompute_qkv=recompute_qkv,
            device=device,
            dtype=dtype,
        )
