"""Ring dilated attention over tokens in Hilbert-curve order (image patches).

Tokens are the row-major cells of a ``(height, width)`` grid. The module permutes
them into Hilbert-curve order, runs ring dilated attention there (so that every
segment covers a compact 2-D region instead of a strip of rows) and permutes the
output back: ``out = inverse(dilated_attention(q[:, perm], k[:, perm], v[:, perm]))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..hilbert import hilbert_permutation
from ..modules import MultiheadDilatedAttention
from ..validation import check_optional_positive_int
from .standard import StandardRingAttention

__all__ = ["HilbertRingAttention", "HilbertRingMultiheadAttention"]


def _check_grid(grid_size: object) -> tuple[int, int] | None:
    if grid_size is None:
        return None
    if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
        raise TypeError(
            f"grid_size must be a (height, width) pair of ints or None, got {grid_size!r}."
        )
    height = check_optional_positive_int("grid_size[0]", grid_size[0])
    width = check_optional_positive_int("grid_size[1]", grid_size[1])
    assert height is not None and width is not None
    return height, width


class HilbertRingAttention(StandardRingAttention):
    """:class:`StandardRingAttention` on ``(B, N, H, D)`` tensors, tokens in Hilbert-curve order.

    On ``(B, N, H, D)`` q, k, v whose ``N`` tokens are the row-major cells of a grid.
    Causal means causal in curve order.

    Args:
        grid_size: ``(height, width)`` of the grid, ``height * width == N``. When
            ``None`` the grid is square: of side ``2**hilbert_level`` when that is given
            (then ``N`` must be ``4**hilbert_level``), else ``sqrt(N)`` (``N`` must be a
            perfect square; pass ``grid_size`` otherwise).
        hilbert_level: see ``grid_size``.
        Other arguments: as in :class:`StandardRingAttention`.

    ``forward(..., already_split=False)`` permutes the whole sequence, runs the ring and
    permutes the output back. With ``already_split=True`` the shards must already be
    in curve order (the caller's data pipeline applies
    :func:`~dilated_attention_pytorch.hilbert_permutation` before sharding) and come
    back in curve order.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        grid_size: tuple[int, int] | None = None,
        hilbert_level: int | None = None,
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
            dropout=dropout,
            ring_size=ring_size,
            process_group=process_group,
            branch_mixing=branch_mixing,
            scale=scale,
            backend=backend,
            validate=validate,
            timeout=timeout,
            layout=layout,
        )
        self.grid_size = _check_grid(grid_size)
        self.hilbert_level = check_optional_positive_int("hilbert_level", hilbert_level)

    def grid(self, seq_len: int) -> tuple[int, int]:
        """The ``(height, width)`` grid of a sequence of ``seq_len`` tokens."""
        if self.grid_size is not None:
            height, width = self.grid_size
            if height * width != seq_len:
                raise ValueError(
                    f"grid_size={self.grid_size} has {height * width} cells but the sequence "
                    f"has {seq_len} tokens; pass the grid of your patches."
                )
            return height, width
        if self.hilbert_level is not None:
            side = 2**self.hilbert_level
            if side * side != seq_len:
                raise ValueError(
                    f"hilbert_level={self.hilbert_level} means a {side} x {side} grid of "
                    f"{side * side} tokens, but the sequence has {seq_len}; pass "
                    f"grid_size=(height, width) instead."
                )
            return side, side
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            raise ValueError(
                f"a sequence of {seq_len} tokens is not a square grid; pass "
                f"grid_size=(height, width) with height * width = {seq_len}."
            )
        return side, side

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        *,
        already_split: bool = False,
    ) -> Tensor:
        """As :meth:`StandardRingAttention.forward`, in Hilbert-curve order."""
        if already_split or not isinstance(query, Tensor):
            return super().forward(
                query, key, value, is_causal=is_causal, key_padding_mask=key_padding_mask,
                already_split=already_split,
            )  # fmt: skip
        ring = self.ring()
        if self._whole_input_error(query) is not None and ring is not None and len(ring[1]) > 1:
            # A grid that does not fit: the ring's collective check raises it on every rank.
            return super().forward(
                query, key, value, is_causal=is_causal, key_padding_mask=key_padding_mask
            )
        perm = hilbert_permutation(*self.grid(query.shape[1]), device=query.device)
        q, k, v = (t[:, perm] if isinstance(t, Tensor) else t for t in (query, key, value))
        mask = None if key_padding_mask is None else key_padding_mask[:, perm]
        out = super().forward(q, k, v, is_causal=is_causal, key_padding_mask=mask)
        # perm is a permutation by construction: its inverse needs no checks (which would
        # read it on the host and break a compiled graph).
        return out[:, torch.argsort(perm)]

    def _agreed_settings(self, seq_len: int | None) -> str:
        # The grid orders the whole sequence before it is split: ranks with different
        # grids would hold shards of different orders. (Shards: no grid is used.)
        return "" if seq_len is None else f"Hilbert grid {self.grid(seq_len)}"

    def _whole_input_error(self, query: Tensor) -> str | None:
        if not isinstance(query, Tensor) or query.dim() < 2:
            return None  # the ring's own checks report it
        try:
            self.grid(query.shape[1])
        except ValueError as exc:
            return f"ValueError: {exc}"
        return None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, grid_size={self.grid_size}, "
            f"hilbert_level={self.hilbert_level}"
        )


class HilbertRingMultiheadAttention(MultiheadDilatedAttention):
    """Multi-head layer for image-patch models whose attention is :class:`HilbertRingAttention`.

    ``(B, N, E)`` patch embeddings in row-major grid order in and out; the projections
    run in that order and only the attention sees the curve order.

    Args:
        embed_dim, num_heads, segment_lengths, dilation_rates, num_kv_heads, bias,
            layer_norm, gamma_init, device, dtype: as in ``MultiheadDilatedAttention``.
        grid_size, hilbert_level, ring_size, process_group, branch_mixing, dropout,
            scale, backend, validate, timeout, layout: of the inner :class:`HilbertRingAttention`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        grid_size: tuple[int, int] | None = None,
        hilbert_level: int | None = None,
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        attention: nn.Module = HilbertRingAttention(
            segment_lengths,
            dilation_rates,
            grid_size=grid_size,
            hilbert_level=hilbert_level,
            ring_size=ring_size,
            process_group=process_group,
            branch_mixing=branch_mixing,
            dropout=dropout,
            scale=scale,
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
            device=device,
            dtype=dtype,
        )
