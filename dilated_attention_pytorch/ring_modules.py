"""``nn.Module`` forms of ring (sequence-parallel) dilated attention.

Each rank of a process group holds a contiguous shard of the sequence:
:class:`RingDilatedAttention` takes local ``(B, N/k, H, D)`` q/k/v,
:class:`RingMultiheadDilatedAttention` the local shard ``(B, N/k, E)`` of the input,
so projections and activations are O(N/k) per rank as well. The maths lives in
:mod:`.distributed`; these modules only hold settings and the process group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import ring_dilated_attention
from .distributed.validation import resolve_group
from .modules import DilatedAttention, MultiheadDilatedAttention
from .validation import check_choice, check_ring_size

__all__ = ["RingDilatedAttention", "RingMultiheadDilatedAttention", "StandardRingAttention"]


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
        validate: when the collective input check runs (one small ``all_gather`` and a
            host sync, so that a bad input on any rank raises on every rank):
            ``"once"`` (default) the first time the module sees an input signature
            (shapes, dtypes, device, ``is_causal``, mask, dropout, group), with this
            rank's own checks on every call; ``"always"`` on every call, for inputs
            whose shapes may change on some ranks but not others.

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
        validate: str = "once",
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
        self.ring_size = check_ring_size(ring_size)
        self.validate = check_choice("validate", validate, ("once", "always"))
        self._validated: set[tuple] = set()  # input signatures that passed the collective check
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
        group = self.group()
        dropout_p = self.dropout if self.training else 0.0
        signature = (
            *(tuple(t.shape) if isinstance(t, Tensor) else type(t) for t in (q, k, v)),
            *(getattr(t, "dtype", None) for t in (q, k, v)),
            getattr(q, "device", None),
            is_causal,
            key_padding_mask is None,
            dropout_p,
            id(group),
        )
        validate = self.validate == "always" or signature not in self._validated
        out = ring_dilated_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            group=group,
            is_causal=is_causal,
            branch_mixing=self.branch_mixing,
            scale=self.scale,
            backend=self.backend,
            dropout_p=dropout_p,
            key_padding_mask=key_padding_mask,
            validate=validate,
        )
        self._validated.add(signature)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ring_size={self.ring_size}, validate={self.validate!r}"


StandardRingAttention = RingDilatedAttention
"""Alias of :class:`RingDilatedAttention` (same class)."""


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """Multi-head dilated attention on a sequence sharded across a process group.

    A :class:`~dilated_attention_pytorch.MultiheadDilatedAttention` whose inner
    attention is :class:`RingDilatedAttention`. It takes the *local shard*
    ``(B, N/k, E)`` of the input; projections, norm and output projection run on the
    shard, and only the attention step talks to other ranks. With the same weights,
    rank ``j``'s output is shard ``j`` of ``MultiheadDilatedAttention`` on the full
    sequence. Parameter gradients are each rank's share: sum them over the group (as
    data parallelism over the sequence dimension would).

    Args:
        embed_dim, num_heads, segment_lengths, dilation_rates, bias, layer_norm,
            gamma_init, device, dtype: as in ``MultiheadDilatedAttention``.
        process_group, ring_size, branch_mixing, dropout, scale, backend: the
            keywords of the inner :class:`RingDilatedAttention`.

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
        branch_mixing: str = "softmax",
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str = "auto",
        bias: bool = True,
        layer_norm: bool = True,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        attention: nn.Module = RingDilatedAttention(
            segment_lengths,
            dilation_rates,
            process_group=process_group,
            branch_mixing=branch_mixing,
            dropout=dropout,
            scale=scale,
            ring_size=ring_size,
            backend=backend,
        )
        super().__init__(
            embed_dim,
            num_heads,
            attention=attention,
            bias=bias,
            layer_norm=layer_norm,
            gamma_init=gamma_init,
            device=device,
            dtype=dtype,
        )
