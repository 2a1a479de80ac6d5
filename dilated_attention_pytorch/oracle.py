"""The dense brute-force oracle of dilated attention.

O(N^2) memory and time: for tests and tiny inputs only. It is written straight
from the definition and deliberately does *not* use :mod:`.plan`, so that the
tests cross-check the plan too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .dropout import dropout_keep, token_ids

__all__ = ["dense_dilated_attention", "dilated_branch_masks", "dilated_count_mask"]


def _head_offsets(
    branch: int, num_branches: int, dilation_rate: int, num_heads: int, branch_mixing: str
) -> list[int | None]:
    """Offset of every head in one branch, ``None`` where the head does not run it."""
    if branch_mixing == "softmax":
        return [h % dilation_rate for h in range(num_heads)]
    if branch_mixing == "head_split":
        base, extra = divmod(num_heads, num_branches)
        sizes = [base + (1 if i < extra else 0) for i in range(num_branches)]
        start = sum(sizes[:branch])
        offsets: list[int | None] = [None] * num_heads
        for j in range(sizes[branch]):
            offsets[start + j] = j % dilation_rate
        return offsets
    raise ValueError(f"branch_mixing must be 'softmax' or 'head_split', got {branch_mixing!r}")


def dilated_branch_masks(
    seq_len: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    branch_mixing: str = "softmax",
    device: torch.device | str | None = None,
    cu_seqlens: Sequence[int] | None = None,
) -> list[Tensor]:
    """Per branch, ``M_i[h, p, p']``: whether branch ``i`` of head ``h`` contains the pair.

    ``cu_seqlens``: packed documents ``[0, n_0, n_0 + n_1, ..., seq_len]``: positions
    count from each document's first token and pairs never cross documents.
    Returns one bool tensor of shape ``(H, N, N)`` per branch.
    """
    index = torch.arange(seq_len, device=device)
    bounds = torch.tensor([0, seq_len] if cu_seqlens is None else list(cu_seqlens), device=device)
    doc = torch.searchsorted(bounds, index, right=True) - 1  # the document of each token
    pos = index - bounds[doc]  # position inside its document
    masks = []
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        seg = pos // w
        same_segment = (seg[:, None] == seg[None, :]) & (doc[:, None] == doc[None, :])
        if is_causal:
            same_segment = same_segment & (pos[None, :] <= pos[:, None])
        mask = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.bool, device=device)
        offsets = _head_offsets(i, len(segment_lengths), r, num_heads, branch_mixing)
        for h, o in enumerate(offsets):
            if o is None:
                continue
            selected = (pos % w) % r == o
            mask[h] = same_segment & selected[:, None] & selected[None, :]
        masks.append(mask)
    return masks


def dilated_count_mask(
    seq_len: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    branch_mixing: str = "softmax",
    device: torch.device | str | None = None,
    cu_seqlens: Sequence[int] | None = None,
) -> Tensor:
    """``M[h, p, p']``: how many branches of head ``h`` contain the pair (query p, key p').

    Returns an int64 tensor of shape ``(H, N, N)``.
    """
    masks = dilated_branch_masks(
        seq_len, num_heads, segment_lengths, dilation_rates,
        is_causal=is_causal, branch_mixing=branch_mixing, device=device, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    counts = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.int64, device=device)
    for mask in masks:
        counts += mask.long()
    return counts


def dense_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    branch_mixing: str = "softmax",
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: bool = False,
    upcast: bool = True,
    cu_seqlens: Sequence[int] | Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dilated attention on ``(B, N, H, D)`` tensors by the count-mask formula.

    ``out = softmax_with_counts(S, M) @ V``: weights ``M * exp(S - rowmax)``
    normalised per row; a row with no key gives 0 (and LSE ``-inf``).

    Args:
        q, k, v: ``(B, N, H, D)``; k and v may have ``H_kv`` heads dividing ``H``
            (grouped-query attention: query head ``h`` reads K/V head ``h // (H / H_kv)``).
        key_padding_mask: optional ``(B, N)`` bool, ``True`` marks padding keys.
        dropout_p, dropout_seed: drop the entries of the joint probabilities that
            :func:`~dilated_attention_pytorch.dropout.dropout_keep` drops for this seed
            (branch ``i``'s copy of a pair is its own entry), scaling the rest by
            ``1 / (1 - p)``; the LSE is that of the undropped scores.
        upcast: compute in float64 (the default) and cast the result back.
        cu_seqlens: packed documents in a ``(1, N, H, D)`` batch, offsets
            ``[0, n_0, n_0 + n_1, ..., N]``: every document is its own sequence (positions
            count from its first token, no pair crosses documents). Not with dropout.

    Returns:
        ``out`` of shape ``(B, N, H, D)`` in ``q.dtype``; with ``return_lse`` also
        ``lse = log(sum_p' M exp(S))`` of shape ``(B, N, H)`` (float64 if upcast).
    """
    B, N, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    compute_dtype = torch.float64 if upcast else q.dtype
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc, vc = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (kc, vc))
    if cu_seqlens is not None:
        cu_seqlens = [int(b) for b in cu_seqlens]
        if dropout_p > 0.0:
            raise ValueError("the oracle does not combine cu_seqlens with dropout.")
    counts = dilated_count_mask(
        N,
        H,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        branch_mixing=branch_mixing,
        device=q.device,
        cu_seqlens=cu_seqlens,
    ).to(compute_dtype)
    counts = counts.unsqueeze(0).expand(B, H, N, N)
    if key_padding_mask is not None:
        keep = (~key_padding_mask).to(compute_dtype)[:, None, None, :]
        counts = counts * keep
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    scores = scores.masked_fill(counts == 0, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = counts * torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    if dropout_p > 0.0:
        # Each branch's copy of a pair is dropped on its own: the kept count of a pair.
        ids = token_ids(B, N, 0, N, q.device)
        masks = dilated_branch_masks(
            N, H, segment_lengths, dilation_rates,
            is_causal=is_causal, branch_mixing=branch_mixing, device=q.device,
        )  # fmt: skip
        kept = torch.zeros_like(counts)
        for i, mask in enumerate(masks):
            streams = i * H + torch.arange(H, device=q.device)
            keep = dropout_keep(dropout_p, dropout_seed, streams, ids, ids)
            kept = kept + (mask[None] & keep).to(compute_dtype)
        if key_padding_mask is not None:
            kept = kept * (~key_padding_mask).to(compute_dtype)[:, None, None, :]
        weights = kept * torch.exp(scores - row_max) / (1.0 - dropout_p)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vc).to(q.dtype)
    if not return_lse:
        return out
    lse = (torch.log(denom) + row_max).squeeze(-1).transpose(1, 2)  # (B, N, H)
    return out, lse
