"""Strided views of dilated segments, and the LSE merge rule.

A dilated segment is a strided view: for branch ``(w, r)`` and offset ``o``, the
positions ``s*w + o + r*t`` of segment ``s`` are, for a ``(B, N, H, D)`` tensor whose
batch stride is ``N`` token strides, the view ``(B*N/w, ceil((w-o)/r), H, D)`` with
segment stride ``w*H*D`` and token stride ``r*H*D``. No gather copy is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import DilatedPlan, num_dilated_positions


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
        x: ``(B, N, *rest)`` with :func:`has_token_major_layout` (any batch stride when
            ``N <= w``: e.g. a slice of the tokens of a batch); ``rest`` is e.g.
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
    if num_full == 1 and full_len:  # one segment per batch element: any batch stride
        views.append(
            x.as_strided((B, full_len, *rest_shape), (s0, r * s1, *rest_strides), base + o * s1)
        )
    elif num_full and full_len:
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


def merge_lse_(
    out_acc: Tensor, hi_acc: Tensor, lo_acc: Tensor, out_block: Tensor, lse_block: Tensor
) -> None:
    """Merge a block's ``(out, lse)`` into accumulators in place (the rule that mixes branches).

    The accumulated log-sum-exp is kept as a pair ``lse = hi + lo``: ``hi`` is the largest
    block LSE merged so far and ``lo = log(sum_b exp(lse_b - hi))``, in
    ``[0, log(#blocks)]``. Weights come from differences of LSEs against ``hi``, never
    from a sum of two LSEs: a float32 LSE of magnitude 1e7 cannot hold ``log 2``, so with
    a single LSE two branches that share their best key would be summed instead of
    averaged. With the pair, the merge is as accurate as one block at every scale, and the
    backward's probabilities ``exp((S - hi) - lo)`` (see :func:`scale_dout_by_lse_lo`) too.

    ``new_hi = max(hi, lse_block)``; with ``a = exp((hi - new_hi) + lo)`` and
    ``b = exp(lse_block - new_hi)``: ``out = (a * out + b * out_block) / (a + b)``,
    ``lo = log(a + b)``. Rows that are empty in both stay ``(0, -inf, 0)``.

    Args:
        out_acc: ``(..., D)`` float accumulator (may be a strided view).
        hi_acc, lo_acc: ``(...)`` accumulators of the same leading shape (start at
            ``-inf`` and ``0``).
        out_block, lse_block: the block's result, any float dtype.
    """
    lse_block = lse_block.to(hi_acc.dtype)
    new_hi = torch.maximum(hi_acc, lse_block)
    # Rows still empty: shift by 0 so both weights are exp(-inf) = 0, not NaN.
    shift = torch.where(torch.isinf(new_hi), torch.zeros_like(new_hi), new_hi)
    w_acc = torch.exp((hi_acc - shift) + lo_acc)
    w_block = torch.exp(lse_block - shift)
    total = w_acc + w_block
    total = torch.where(total > 0, total, torch.ones_like(total))
    out_acc.mul_((w_acc / total).unsqueeze(-1))
    # One fused multiply-add in the accumulator's dtype: no copy of the block output in
    # it, nor of the weighted block (on CUDA the mixed dtypes are cast inside the kernel;
    # the CPU casts a low-precision block first).
    out_acc.addcmul_(out_block, (w_block / total).unsqueeze(-1))
    lo_acc.copy_(torch.log(total))
    hi_acc.copy_(new_hi)


def merges_blocks(blocks_of_heads) -> bool:
    """Whether some head's result merges several blocks, so that the low part of its LSE
    pair can be non-zero (it is 0 everywhere otherwise). ``blocks_of_heads``: pairs
    ``(heads, blocks)``, each head of ``heads`` running ``blocks`` blocks."""
    count: dict[int, int] = {}
    for heads, blocks in blocks_of_heads:
        for h in heads:
            count[h] = count.get(h, 0) + blocks
    return max(count.values(), default=0) > 1


def heads_merge_branches(plan: DilatedPlan) -> bool:
    """True when some head runs several branches of ``plan`` (:func:`merges_blocks`)."""
    return merges_blocks((g.heads, 1) for b in plan.branches for g in b.head_groups)


def scale_dout_by_lse_lo(dout: Tensor, lse_lo: Tensor) -> Tensor:
    """``dout * exp(-lo)`` per row: what lets a block backward run on ``hi`` alone.

    A block backward rebuilds ``P = exp(S - lse)`` from the one LSE it is given. Given
    ``hi`` and this ``dout``, every product it forms is the exact one: ``exp(S - hi)`` is
    ``P * exp(lo)`` and each gradient term is linear in ``dout`` (``delta = rowsum(dout *
    out)`` scales with it), so the ``exp(lo)`` cancels. ``dout``: ``(B, N, H, D)``;
    ``lse_lo``: ``(B, N, H)``. Returns a new tensor in ``dout.dtype``.
    """
    factor = torch.exp(-lse_lo).unsqueeze(-1)
    if dout.dtype in (torch.float16, torch.bfloat16):
        return dout * factor.to(dout.dtype)  # no float32 copy of dout
    return (dout.to(factor.dtype) * factor).to(dout.dtype)
