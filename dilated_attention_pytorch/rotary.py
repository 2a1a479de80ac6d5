"""Rotary position embeddings (RoPE, GPT-NeoX's layout) for ``(B, N, H, D)`` q and k."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RotaryAttention", "apply_rotary", "check_rotary_tables", "rotary_tables"]


def rotary_tables(
    positions: Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``(N, 1, head_dim // 2)`` in ``dtype``, for token ``positions`` ``(N,)``."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    # float64 angles: position * frequency stays exact to ~1e-16 relative even at 2**24
    # tokens, where float32 would already be off by a whole radian.
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, N, H, D)`` by the angles of ``cos``/``sin`` ``(N, 1, D/2)``
    (pairs ``(i, i + D/2)``, GPT-NeoX's layout), in the tables' dtype, back in ``x.dtype``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class RotaryAttention(nn.Module):
    """Rotary position embedding on q and k, then an inner ``(B, N, H, D)`` attention.

    Called as ``attention(q, k, v, *, is_causal, key_padding_mask, rotary=(cos, sin),
    **kwargs)``: ``cos``/``sin`` ``(N, 1, D/2)`` come from :func:`rotary_tables` for the
    tokens' (global) positions; the other keywords go to ``inner``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        *,
        rotary: tuple[Tensor, Tensor],
        **kwargs: Any,
    ) -> Tensor:
        cos, sin = check_rotary_tables(rotary, q)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.inner(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, **kwargs)


def check_rotary_tables(rotary: tuple[Tensor, Tensor], q: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of :func:`rotary_tables`, checked to hold one position per token of
    ``q`` ``(B, N, H, D)``."""
    cos, sin = rotary
    if cos.shape[0] != q.shape[1]:
        raise ValueError(
            f"rotary tables for {cos.shape[0]} positions, but q has {q.shape[1]} tokens "
            f"(q is (B, N, H, D) = {tuple(q.shape)}); pass one position per token."
        )
    return cos, sin
