"""``nn.Module`` forms of ring (sequence-parallel) dilated attention.

Each rank of a process group holds a contiguous shard of the sequence (DESIGN.md
section 3): :class:`RingDilatedAttention` takes local ``(B, N/k, H, D)`` q/k/v,
:class:`RingMultiheadDilatedAttention` the local shard ``(B, N/k, E)`` of the input,
so projections and activations are O(N/k) per rank as well. The maths lives in
:mod:`.distributed`; these modules only hold settings and the process group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor

from .distributed import ring_dilated_attention
from .distributed.validation import distributed_not_ready, resolve_group
from .factory import register_attention_kind
from .modules import DilatedAttention, MultiheadDilatedAttention

__all__ = ["RingDilatedAttention", "RingMultiheadDilatedAttention", "StandardRingAttention"]


def _check_ring_size(ring_size: object) -> int | None:
    if ring_size is None:
        return None
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size <= 0:
        raise ValueError(f"ring_size must be a positive int or None, got {ring_size!r}.")
    return ring_size


class RingDilatedAttention(DilatedAttention):
    """Dilated attention over a sequence sharded across the ranks of a process group.

    Rank ``j`` of ``k`` passes tokens ``[j*N/k, (j+1)*N/k)`` of q, k, v and gets the
    same shard of :class:`~dilated_attention_pytorch.DilatedAttention`'s output on the
    whole sequence. Every rank of the group must call it together.

    Args:
        segment_lengths, dilation_rates, branch_mixing, scale, backend: as in
            :class:`~dilated_attention_pytorch.DilatedAttention`; segment lengths are
            global token counts and must follow the shard rules of
            :func:`~dilated_attention_pytorch.ring_dilated_attention`.
        process_group: the group holding the sequence (default: WORLD), e.g. one
            dimension of a DeviceMesh.
        dropout: must be 0 for training: dropout over the ring is not supported
            (a forward in training mode with ``dropout > 0`` raises). It is ignored in
            eval mode, like in the single-device module.
        ring_size: optional check: when given it must equal the group's size.

    Shapes:
        q, k, v: ``(B, N/k, H, D)`` local shards; output ``(B, N/k, H, D)``.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        process_group: dist.ProcessGroup | None = None,
        branch_mixing: str = "softmax",
        dropout: float = 0.0,
        scale: float | None = None,
        ring_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            segment_lengths,
            dilation_rates,
            branch_mixing=branch_mixing,
            dropout=dropout,
            scale=scale,
            backend=backend,
        )
        self.process_group = process_group
        self.ring_size = _check_ring_size(ring_size)
        if dist.is_available() and dist.is_initialized():
            self.group()  # fail early when the group is already known

    def group(self) -> dist.ProcessGroup:
        """The process group, after checking ``ring_size`` against its size."""
        group = resolve_group(self.process_group)
        size = dist.get_world_size(group)
        if self.ring_size is not None and self.ring_size != size:
            raise ValueError(
                f"ring_size={self.ring_size} does not match the process group, which has {size} "
                f"ranks; the ring always spans the whole group: pass ring_size={size} or None, "
                f"or pass a process_group of {self.ring_size} ranks."
            )
        return group

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend this rank's ``q`` shard to the whole sequence's ``k``/``v``.

        Args:
            q, k, v: ``(B, N/k, H, D)`` local shards.
            is_causal: query ``p`` only sees keys ``p' <= p`` (global positions).
            key_padding_mask: must be ``None`` (not supported over the ring).

        Returns:
            ``(B, N/k, H, D)`` in ``q.dtype``.
        """
        # Unsupported options are checked inside the collective validation, so that a
        # mask or dropout on one rank makes every rank raise instead of hanging the others.
        return ring_dilated_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            group=self.group(),
            is_causal=is_causal,
            branch_mixing=self.branch_mixing,
            scale=self.scale,
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
            key_padding_mask=key_padding_mask,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ring_size={self.ring_size}"


StandardRingAttention = RingDilatedAttention
"""Alias of :class:`RingDilatedAttention` (same class)."""


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """Multi-head dilated attention on a sequence sharded across a process group.

    Takes the *local shard* ``(B, N/k, E)`` of the input; projections, norm and output
    projection run on the shard, and only the attention step talks to other ranks
    (through :class:`RingDilatedAttention`). With the same weights, rank ``j``'s output
    is shard ``j`` of :class:`~dilated_attention_pytorch.MultiheadDilatedAttention` on
    the full sequence. Parameter gradients are each rank's share: sum them over the
    group (as data parallelism over the sequence dimension would).

    Args:
        embed_dim, num_heads, segment_lengths, dilation_rates: as in
            :class:`~dilated_attention_pytorch.MultiheadDilatedAttention`.
        process_group: the group holding the sequence (default: WORLD).
        ring_size: optional check: when given it must equal the group's size.
        **kwargs: the other keyword arguments of ``MultiheadDilatedAttention``
            (``dropout`` must be 0 for training, see :class:`RingDilatedAttention`).

    Shapes:
        query/key/value: ``(B, N/k, E)``; output ``((B, N/k, E), None)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        process_group: dist.ProcessGroup | None = None,
        ring_size: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)  # type: ignore[arg-type]
        single = self.attention
        assert isinstance(single, DilatedAttention)
        self.attention = RingDilatedAttention(
            single.segment_lengths,
            single.dilation_rates,
            process_group=process_group,
            branch_mixing=single.branch_mixing,
            dropout=single.dropout,
            scale=single.scale,
            ring_size=ring_size,
            backend=single.backend,
        )

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        is_causal: bool,
        key_padding_mask: Tensor | None,
    ) -> Tensor:
        """Ring attention on local shards: ``(B, N/k, H, D)`` q, k, v -> ``(B, N/k, H, D)``."""
        return self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)


# Never chosen by kind="auto": a ring module takes the local shard of the sequence, which
# changes what the caller must pass, so it is only built when asked for by name.
register_attention_kind(
    "ring",
    RingDilatedAttention,
    multihead=False,
    why_not=distributed_not_ready,
    description="ring (sequence-parallel) dilated attention on local shards (RingDilatedAttention)",
)
register_attention_kind(
    "ring_multihead",
    RingMultiheadDilatedAttention,
    multihead=True,
    why_not=distributed_not_ready,
    description="ring multi-head dilated attention on the local shard of x (RingMultiheadDilatedAttention)",
)
