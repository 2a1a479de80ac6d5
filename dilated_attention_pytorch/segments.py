"""Strided views of dilated segments, and the LSE merge rule.

A dilated segment is a strided view: for branch ``(w, r)`` and offset ``o``, the
positions ``s*w + o + r*t`` of segment ``s`` are, for a ``(B, N, H, D)`` tensor whose
batch stride is ``N`` token strides, the view ``(B*N/w, ceil((w-o)/r), H, D)`` with
segment stride ``w*H*D`` and token stride ``r*H*D``. No gather copy is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import num_dilated_positions


def has_token_major_layout(x: Tensor) -> bool:
    """True when ``x`` (B, N, ...) can be cut into segment views without a copy.

    That needs the batch stride to equal ``N`` token strides (so batch and segment
    indices merge into one stride) and, for the kernels, a unit stride on the last dim.
    """
    if x.dim() >= 3 and x.stride(-1) != 1:
        return False
    B, N = x.shape[0], x.shape[1]
    return B == 1 or N == 0 or x.stride(0) == N * x.stride(1)


def token_major(x: Tensor) -> Tensor:
    """``x`` itself when segment views can read it in place, else a contiguous copy."""
    return x if has_token_major_layout(x) else x.contiguous()


def segment_views(
    x: Tensor, segment_length: int, dilation_rate: int, offset: int, heads: slice | None = None
) -> list[Tensor]:
    """Views of ``x`` restricted to the dilated positions of every segment.

    Args:
        x: ``(B, N, *rest)`` with :func:`has_token_major_layout`; ``rest`` is e.g.
            ``(H, D)`` for q/k/v, ``(H,)`` for an LSE, ``()`` for a key mask.
        heads: if given, a slice of dim 2 (the head dim) taken first.

    Returns:
        Views ``(Bb, L, *rest')``: the full segments (batch and segment merged into
        ``Bb = B * (N // w)`` when the segments tile ``N``, else one view per batch
        element) and, when ``N % w != 0``, the shorter last segment of every batch
        element (``Bb = B``). The list depends only on ``(B, N)`` and the branch, so
        the lists of several tensors can be zipped.
    """
    if heads is not None:
        x = x[:, :, heads]
    B, N = x.shape[0], x.shape[1]
    w, r, o = segment_length, dilation_rate, offset
    s0, s1 = x.stride(0), x.stride(1)
    rest_shape, rest_strides = tuple(x.shape[2:]), tuple(x.stride()[2:])
    base = x.storage_offset()
    views = []
    num_full = N // w
    full_len = num_dilated_positions(w, r, o)
    if num_full and full_len:
        if B > 1 and s0 != N * s1:
            raise ValueError(
                "segment_views needs a token-major layout (batch stride == N * token stride), "
                f"got strides {tuple(x.stride())} for shape {tuple(x.shape)}; call .contiguous() first."
            )
        # Batch and segment indices merge into one stride when the segments tile N.
        merged = B == 1 or N == num_full * w
        for b in [0] if merged else range(B):
            views.append(
                x.as_strided(
                    ((B if merged else 1) * num_full, full_len, *rest_shape),
                    (w * s1, r * s1, *rest_strides),
                    base + b * s0 + o * s1,
                )
            )
    remainder = N - num_full * w
    rem_len = num_dilated_positions(remainder, r, o)
    if rem_len:
        views.append(
            x.as_strided(
                (B, rem_len, *rest_shape),
                (s0, r * s1, *rest_strides),
                base + (num_full * w + o) * s1,
            )
        )
    return views


def merge_lse_(out_acc: Tensor, lse_acc: Tensor, out_block: Tensor, lse_block: Tensor) -> None:
    """Merge a block's ``(out, lse)`` into accumulators in place (the rule that mixes branches).

    ``lse = logaddexp(lse_acc, lse_block)``;
    ``out = exp(lse_acc - lse) * out_acc + exp(lse_block - lse) * out_block``.
    Numerically stable, and rows that are ``-inf`` in both stay ``(0, -inf)``.

    Args:
        out_acc: ``(..., D)`` float accumulator (may be a strided view).
        lse_acc: ``(...)`` accumulator of the same leading shape.
        out_block, lse_block: the block's result, any float dtype.
    """
    lse_block = lse_block.to(lse_acc.dtype)
    new_lse = torch.logaddexp(lse_acc, lse_block)
    # exp(-inf - (-inf)) would be NaN: shift by 0 where the merged row is still empty.
    shift = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_acc = torch.exp(lse_acc - shift).unsqueeze(-1)
    w_block = torch.exp(lse_block - shift).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out_block.to(out_acc.dtype) * w_block)
    lse_acc.copy_(new_lse)
