"""``EnterpriseDistributedDilatedAttention``: the multi-head layer for data-parallel training.

Every rank holds the whole sequence (``O(N)`` memory per GPU): data parallelism
shards the batch, not the sequence. The layer is numerically
:class:`~dilated_attention_pytorch.MultiheadDilatedAttention` and adds the
operations features of the ring family: monitoring and activation checkpointing of
the attention. For a sequence split over GPUs use
:class:`~dilated_attention_pytorch.ring.RingMultiheadDilatedAttention`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ...modules import DilatedAttention, MultiheadDilatedAttention
from ...validation import check_bool, check_ring_size

__all__ = ["EnterpriseDistributedDilatedAttention", "OperatedAttention"]


class OperatedAttention(nn.Module):
    """An inner attention with monitoring and activation checkpointing around it.

    ``forward`` has the inner module's signature. With ``use_checkpointing`` the inner
    attention keeps no activations and runs again in the backward; with
    ``enable_monitoring`` :meth:`stats` returns ``calls`` and ``compute_seconds``
    (wall clock around each call; on CUDA after a synchronisation) and CUDA's peak memory.
    """

    def __init__(self, attention: nn.Module, *, use_checkpointing: bool, enable_monitoring: bool):
        super().__init__()
        self.attention = attention
        self.use_checkpointing = check_bool("use_checkpointing", use_checkpointing)
        self.enable_monitoring = check_bool("enable_monitoring", enable_monitoring)
        self.reset_stats()

    def reset_stats(self) -> None:
        self._calls, self._seconds, self._device = 0, 0.0, None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def stats(self) -> dict[str, Any]:
        on_cuda = self._device is not None and self._device.type == "cuda"
        return {
            "calls": self._calls,
            "compute_seconds": self._seconds,
            "bytes_sent": 0,  # the whole sequence is on every rank: attention sends nothing
            "bytes_received": 0,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self._device) if on_cuda else None,
        }

    def get_memory_estimate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The inner attention's :meth:`~dilated_attention_pytorch.DilatedAttention.get_memory_estimate`.
        With ``use_checkpointing`` the forward keeps less, but the backward's rerun holds
        what the plain attention's forward+backward holds, which bounds the peak."""
        estimate = getattr(self.attention, "get_memory_estimate", None)
        if estimate is None:
            raise TypeError(
                f"the inner attention {type(self.attention).__name__} has no "
                f"get_memory_estimate; use a DilatedAttention or ring attention module."
            )
        return estimate(*args, **kwargs)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        start = time.perf_counter() if self.enable_monitoring else None
        if self.use_checkpointing and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(
                self.attention, q, k, v, use_reentrant=False, **kwargs
            )
        else:
            out = self.attention(q, k, v, **kwargs)
        if start is not None:
            self._device = q.device
            if q.device.type == "cuda":
                torch.cuda.synchronize(q.device)
            self._seconds += time.perf_counter() - start
            self._calls += 1
        return out


class EnterpriseDistributedDilatedAttention(MultiheadDilatedAttention):
    """:class:`~dilated_attention_pytorch.MultiheadDilatedAttention` for data-parallel
    training, with monitoring and activation checkpointing.

    The whole ``(B, N, E)`` sequence is on every rank; wrap the model in DDP or FSDP
    for data parallelism. ``ring_size`` is accepted for code written against earlier
    APIs and warns: it does not shard the sequence (use
    :class:`~dilated_attention_pytorch.ring.RingMultiheadDilatedAttention` for that).

    Args:
        embed_dim, num_heads, segment_lengths, dilation_rates, num_kv_heads, dropout,
            bias, branch_mixing, layer_norm, gamma_init, scale, backend, device, dtype: as
            in ``MultiheadDilatedAttention``.
        ring_size: ignored but for a ``UserWarning`` (see above).
        use_checkpointing: recompute the attention in the backward instead of keeping
            its activations.
        enable_monitoring: count calls and compute time (:meth:`get_communication_stats`).
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
        dropout: float = 0.0,
        use_checkpointing: bool = False,
        enable_monitoring: bool = False,
        bias: bool = True,
        branch_mixing: str = "softmax",
        layer_norm: bool = True,
        gamma_init: float = 1.0,
        scale: float | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if check_ring_size(ring_size) is not None:
            warnings.warn(
                f"EnterpriseDistributedDilatedAttention(ring_size={ring_size}): ring_size does "
                f"not shard the sequence here, every rank holds all of it (data parallel); use "
                f"RingMultiheadDilatedAttention(ring_size=...) to split the sequence over ranks.",
                UserWarning,
                stacklevel=2,
            )
        self.ring_size = ring_size
        inner = DilatedAttention(
            segment_lengths,
            dilation_rates,
            branch_mixing=branch_mixing,
            dropout=dropout,
            scale=scale,
            backend=backend,
        )
        super().__init__(
            embed_dim,
            num_heads,
            num_kv_heads=num_kv_heads,
            attention=OperatedAttention(
                inner, use_checkpointing=use_checkpointing, enable_monitoring=enable_monitoring
            ),
            bias=bias,
            layer_norm=layer_norm,
            gamma_init=gamma_init,
            device=device,
            dtype=dtype,
        )
        inner.plan(num_heads, num_kv_heads)  # warns now if a position would get no head

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """As ``MultiheadDilatedAttention.forward`` (``nn.MultiheadAttention``'s positional
        order); ``attn_mask`` must be ``None``.

        Dilated attention has its own sparsity pattern, so an arbitrary ``(N, N)`` mask
        cannot be applied; use ``is_causal=True`` or ``key_padding_mask`` instead.
        """
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported: dilated attention has its own sparsity pattern "
                "and never builds an (N, N) mask; use is_causal=True for causal masking or "
                "key_padding_mask=(B, N) bool for padding."
            )
        return super().forward(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )

    def get_communication_stats(self) -> dict[str, Any]:
        """Calls, compute seconds, bytes (always 0 here) and CUDA peak memory."""
        if not self.attention.enable_monitoring:
            raise ValueError(
                "monitoring is off for this module; construct it with enable_monitoring=True "
                "to collect statistics."
            )
        return self.attention.stats()

    def reset_communication_stats(self) -> None:
        self.attention.reset_stats()
