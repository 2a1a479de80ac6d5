"""Cut a full sequence into the shards the ring expects, and put shards back together."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .validation import resolve_group


def shard_sequence(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> Tensor:
    """This rank's contiguous shard of ``x`` along ``dim``.

    Rank ``j`` of the ``k`` ranks of ``group`` gets positions ``[j*N/k, (j+1)*N/k)``,
    the layout :func:`ring_dilated_attention` expects. Differentiable (a slice).

    Args:
        x: the full tensor, e.g. ``(B, N, E)`` or ``(B, N, H, D)``, the same on every rank.
        group: process group (default: WORLD).
        dim: the sequence dimension.

    Returns:
        ``x`` narrowed to ``N/k`` positions along ``dim``, made contiguous.
    """
    group = resolve_group(group)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    length = x.shape[dim]
    if length % world_size != 0:
        raise ValueError(
            f"cannot shard a sequence of {length} positions (dim {dim} of shape "
            f"{tuple(x.shape)}) over {world_size} ranks: the length must be a multiple of the "
            f"group size; pad or trim it to a multiple of {world_size}."
        )
    shard = length // world_size
    return x.narrow(dim, rank * shard, shard).contiguous()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank may use the whole gathered tensor: a shard's gradient is the sum of
        # all ranks' gradients for its slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        world_size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        shard = grad.shape[ctx.dim] // world_size
        return grad.narrow(ctx.dim, rank * shard, shard), None, None


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> Tensor:
    """Concatenate every rank's shard along ``dim`` (the inverse of :func:`shard_sequence`).

    The full sequence then lives on every rank: O(N) memory, meant for checks and for
    outputs that are needed whole, never inside the ring. Collective; every rank's
    shard must have the same shape. Differentiable (the backward all-reduces).

    Args:
        x: this rank's shard, e.g. ``(B, N/k, E)``.
        group: process group (default: WORLD).
        dim: the sequence dimension.

    Returns:
        The full tensor, ``N`` positions along ``dim``, on every rank.
    """
    group = resolve_group(group)
    return _GatherSequence.apply(x, group, dim)
