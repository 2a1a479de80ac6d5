"""Cut a full sequence into the shards the ring expects, and put shards back together."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..validation import check_choice
from .comm import RingComm, RingStats, stats_by_key
from .validation import LAYOUTS, resolve_group

# Tag of the P2P all-gather within a ring (the ring's K/V and gradients use 0 and 1).
_GATHER_TAG = 2


def shard_runs(
    layout: str, local_len: int, num_ranks: int, rank: int
) -> tuple[tuple[int, int], ...]:
    """The tokens ring member ``rank`` holds, as ``(first token, count)`` runs in storage
    order: one run with ``"contiguous"``, chunks ``rank`` and ``2k-1-rank`` of ``L/2``
    tokens with ``"zigzag"``."""
    if layout == "zigzag":
        C = local_len // 2
        return ((rank * C, C), ((2 * num_ranks - 1 - rank) * C, C))
    return ((rank * local_len, local_len),)


def zigzag_order(seq_len: int, num_ranks: int, device: torch.device | str | None = None) -> Tensor:
    """The positions of a sequence in the zigzag layout, shard after shard.

    The sequence is cut into ``2k`` chunks of ``N/(2k)`` positions; rank ``i`` of ``k``
    holds chunk ``i`` and then chunk ``2k-1-i``, so that under a causal mask every rank
    holds as much work as any other. ``x.index_select(dim, zigzag_order(N, k))`` cut into
    ``k`` contiguous shards gives every rank its zigzag shard; ``seq_len`` must be a
    multiple of ``2k``.

    Returns:
        int64 ``(N,)``: entry ``j`` is the position stored at place ``j``.
    """
    if seq_len % (2 * num_ranks):
        raise ValueError(
            f"the zigzag layout cuts the sequence into 2k = {2 * num_ranks} equal chunks, so "
            f"its length must be a multiple of {2 * num_ranks}, got {seq_len}; pad the "
            f"sequence or use layout='contiguous'."
        )
    L = seq_len // num_ranks
    runs = [run for i in range(num_ranks) for run in shard_runs("zigzag", L, num_ranks, i)]
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in runs])


def shard_sequence(
    x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str = "contiguous"
) -> Tensor:
    """This rank's shard of ``x`` along ``dim``.

    ``layout="contiguous"``: rank ``j`` of the ``k`` ranks of ``group`` gets positions
    ``[j*N/k, (j+1)*N/k)``. ``layout="zigzag"``: rank ``j`` gets chunks ``j`` and
    ``2k-1-j`` of ``2k`` equal chunks (:func:`zigzag_order`), which balances causal work;
    pass the same ``layout`` to :func:`ring_dilated_attention`. Differentiable.

    Args:
        x: the full tensor, e.g. ``(B, N, E)`` or ``(B, N, H, D)``, the same on every rank.
        group: process group (default: WORLD).
        dim: the sequence dimension.
        layout: ``"contiguous"`` or ``"zigzag"``.

    Returns:
        ``N/k`` positions of ``x`` along ``dim``, contiguous in memory.
    """
    group = resolve_group(group)
    layout = check_choice("layout", layout, LAYOUTS)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    length = x.shape[dim]
    if length % world_size != 0:
        raise ValueError(
            f"cannot shard a sequence of {length} positions (dim {dim} of shape "
            f"{tuple(x.shape)}) over {world_size} ranks: the length must be a multiple of the "
            f"group size; pad or trim it to a multiple of {world_size}."
        )
    shard = length // world_size
    if layout == "zigzag":
        order = zigzag_order(length, world_size, x.device)
        return x.index_select(dim, order[rank * shard : (rank + 1) * shard])
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


def gather_sequence(
    x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str = "contiguous"
) -> Tensor:
    """Put every rank's shard back in sequence order along ``dim`` (the inverse of
    :func:`shard_sequence` with the same ``layout``).

    The full sequence then lives on every rank: O(N) memory, meant for checks and for
    outputs that are needed whole, never inside the ring. Collective; every rank's
    shard must have the same shape. Differentiable (the backward all-reduces).

    Args:
        x: this rank's shard, e.g. ``(B, N/k, E)``.
        group: process group (default: WORLD).
        dim: the sequence dimension.
        layout: the layout of the shards, ``"contiguous"`` or ``"zigzag"``.

    Returns:
        The full tensor, ``N`` positions along ``dim``, on every rank.
    """
    group = resolve_group(group)
    layout = check_choice("layout", layout, LAYOUTS)
    whole = _GatherSequence.apply(x, group, dim)
    if layout == "zigzag":
        order = zigzag_order(whole.shape[dim], dist.get_world_size(group), whole.device)
        return whole.index_select(dim, torch.argsort(order))
    return whole


def ring_all_gather(
    x: Tensor,
    group: dist.ProcessGroup,
    ring: Sequence[int],
    dim: int = 1,
    *,
    stats: RingStats | None = None,
    timeout: float | None = None,
    context: str = "the shards gathered over the ring",
) -> Tensor:
    """Concatenate along ``dim`` the shards of the group ranks ``ring`` (this rank among them).

    P2P only between the ring's members (on the ring's own communicator), so rings side
    by side in one group (data parallel across rings) never exchange data. Every member
    must call it. ``timeout``: seconds the transfers may take (``None``: the group's own
    timeout) before a ``RuntimeError`` that names ``context`` and the rank that did not
    answer.
    """
    x = x.contiguous()
    rank = dist.get_rank(group)
    parts = {rank: x}
    comm = RingComm(group, _GATHER_TAG, stats=stats, timeout=timeout, context=context)
    for peer in ring:
        if peer != rank:
            comm.send(x, peer)
            parts[peer] = comm.recv(torch.empty_like(x), peer)
    comm.commit()
    comm.wait()
    return torch.cat([parts[peer] for peer in ring], dim=dim)


class _ShardReplicated(torch.autograd.Function):
    """The whole tensor (the same on every ring member) -> this member's shard.

    Backward: the shards' gradients gathered over the ring, so every member gets the
    gradient of the whole input, exactly once (not summed over members).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, ring: tuple[int, ...], dim: int, opts):
        ctx.group, ctx.ring, ctx.dim, ctx.opts = group, ring, dim, opts
        position = ring.index(dist.get_rank(group))
        length = x.shape[dim] // len(ring)
        return x.narrow(dim, position * length, length)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gathered = ring_all_gather(grad, ctx.group, ctx.ring, ctx.dim, context=_SHARD_GRAD,
                                   **ctx.opts)  # fmt: skip
        return gathered, None, None, None, None


class _GatherReplicated(torch.autograd.Function):
    """This member's shard -> the whole tensor on every ring member.

    Backward: the slice of this member's shard from the whole tensor's gradient,
    which is the same on every member (every member computes the same loss from the
    same whole output), so nothing is summed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, ring: tuple[int, ...], dim: int, opts):
        ctx.group, ctx.ring, ctx.dim = group, ring, dim
        ctx.position, ctx.length = ring.index(dist.get_rank(group)), x.shape[dim]
        return ring_all_gather(x, group, ring, dim, context=_GATHER_OUT, **opts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shard = grad.narrow(ctx.dim, ctx.position * ctx.length, ctx.length)
        return shard.contiguous(), None, None, None, None


# Under torch.compile the two functions above run as custom operators (dynamo does not
# trace P2P): the ring's members and group travel as plain values, the group by its name.
_SHARD_GRAD = "the gradient shards gathered over the ring (backward of already_split=False)"
_GATHER_OUT = "the output shards gathered over the ring (forward of already_split=False)"


@torch.library.custom_op("dilated_attention_pytorch::ring_all_gather", mutates_args=())
def _all_gather_op(
    x: Tensor, group: str, ring: list[int], dim: int, timeout: float | None, context: str,
    stats: str,
) -> Tensor:  # fmt: skip
    pg = dist.distributed_c10d._resolve_process_group(group)
    return ring_all_gather(
        x, pg, tuple(ring), dim, context=context, timeout=timeout, stats=stats_by_key(stats)
    )


@_all_gather_op.register_fake
def _(x, group, ring, dim, timeout, context, stats):
    shape = list(x.shape)
    shape[dim] *= len(ring)
    return x.new_empty(shape)


def _own_slice(x: Tensor, group: str, ring: list[int], dim: int, parts: int) -> Tensor:
    position = ring.index(dist.get_rank(dist.distributed_c10d._resolve_process_group(group)))
    length = x.shape[dim] // parts
    return x.narrow(dim, position * length, length)


def _gather_backward(ctx, grad: Tensor):
    return _own_slice(grad, ctx.group, ctx.ring, ctx.dim, len(ctx.ring)).contiguous(), *[None] * 6


def _keep_settings(ctx, inputs, output) -> None:
    _, ctx.group, ctx.ring, ctx.dim, ctx.timeout, _, ctx.stats = inputs


_all_gather_op.register_autograd(_gather_backward, setup_context=_keep_settings)


@torch.library.custom_op("dilated_attention_pytorch::ring_shard", mutates_args=())
def _shard_op(
    x: Tensor, group: str, ring: list[int], dim: int, timeout: float | None, stats: str
) -> Tensor:
    return _own_slice(x, group, ring, dim, len(ring)).clone(memory_format=torch.contiguous_format)


@_shard_op.register_fake
def _(x, group, ring, dim, timeout, stats):
    shape = list(x.shape)
    shape[dim] //= len(ring)
    return x.new_empty(shape)


def _shard_backward(ctx, grad: Tensor):
    gathered = _all_gather_op(grad.contiguous(), ctx.group, ctx.ring, ctx.dim, ctx.timeout,
                              _SHARD_GRAD, ctx.stats)  # fmt: skip
    return gathered, None, None, None, None, None


def _keep_shard_settings(ctx, inputs, output) -> None:
    _, ctx.group, ctx.ring, ctx.dim, ctx.timeout, ctx.stats = inputs


_shard_op.register_autograd(_shard_backward, setup_context=_keep_shard_settings)


def shard_replicated(
    x: Tensor,
    group: dist.ProcessGroup,
    ring: Sequence[int],
    dim: int = 1,
    *,
    stats: RingStats | None = None,
    timeout: float | None = None,
) -> Tensor:
    """This rank's shard of ``x``, which every member of ``ring`` holds whole (a view).

    Differentiable: the backward gives every member the gradient of the whole ``x``
    (the members' shard gradients, gathered). ``x.shape[dim]`` must be a multiple of
    ``len(ring)``.
    """
    if torch.compiler.is_compiling():
        key = "" if stats is None else stats.key
        return _shard_op(x, group.group_name, list(ring), dim, timeout, key)
    opts = {"stats": stats, "timeout": timeout}
    return _ShardReplicated.apply(x, group, tuple(ring), dim, opts)


def gather_replicated(
    x: Tensor,
    group: dist.ProcessGroup,
    ring: Sequence[int],
    dim: int = 1,
    *,
    stats: RingStats | None = None,
    timeout: float | None = None,
) -> Tensor:
    """The whole tensor from the shards of ``ring``'s members, on every member.

    The inverse of :func:`shard_replicated`. Its backward assumes that every member
    back-propagates the same gradient of the whole tensor (the same loss on the same
    output), and keeps its own slice of it.
    """
    if torch.compiler.is_compiling():
        key = "" if stats is None else stats.key
        return _all_gather_op(x.contiguous(), group.group_name, list(ring), dim, timeout,
                              _GATHER_OUT, key)  # fmt: skip
    opts = {"stats": stats, "timeout": timeout}
    return _GatherReplicated.apply(x, group, tuple(ring), dim, opts)
