"""Parallelism for the LongNet models, applied from outside the model (torchtitan's manner).

:func:`parallelize_longnet` takes a :class:`~dilated_attention_pytorch.models.LongNetLM`
or :class:`~dilated_attention_pytorch.models.LongNet` and a ``DeviceMesh``:

- **sequence parallelism** on the mesh dimension ``sequence_dim``: every block's
  attention becomes its ring form over that dimension's process group, and each rank
  runs the model on its contiguous shard of the tokens (:func:`shard_batch`);
- **data parallelism** on every rank of the mesh (DDP, or FSDP2's ``fully_shard``):
  gradients are averaged over the data *and* sequence ranks. With each rank's loss from
  :func:`mesh_mean_loss` that is exactly the gradient of the mean loss over all target
  tokens, however the ignored (``-100``) targets are spread (a plain per-rank mean is
  exact only when every rank holds as many targets);
- **activation checkpointing** per block, on request.

The model object is changed in place (and, for DDP, wrapped); its parameters and
``state_dict`` keys are those of the single-device model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

try:  # FSDP2 (torch >= 2.6)
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - older torch
    fully_shard = None

from ..distributed import shard_sequence
from ..modules import DilatedAttention
from ..ring import StandardRingAttention
from ..validation import check_bool, check_choice
from .longnet import DenseAttention, LongNet, LongNetLM, RotaryAttention

__all__ = [
    "LocalShardRing",
    "mesh_group",
    "mesh_mean_loss",
    "parallelize_longnet",
    "sequence_group",
    "shard_batch",
]

DATA_PARALLEL = ("ddp", "fsdp", "none")


class LocalShardRing(nn.Module):
    """A :class:`~dilated_attention_pytorch.StandardRingAttention` fed this rank's shards.

    ``forward(q, k, v, is_causal, key_padding_mask)`` takes ``(B, N/k, H, D)`` shards
    (global positions ``[j N/k, (j+1) N/k)`` on rank ``j``) and returns this rank's shard
    of the output: the call signature of :class:`~dilated_attention_pytorch.DilatedAttention`,
    so a block cannot tell the two apart.
    """

    def __init__(self, ring: StandardRingAttention) -> None:
        super().__init__()
        self.ring = ring

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        return self.ring(
            q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, already_split=True
        )

    def _projected_call(
        self, x: Tensor, weights: tuple, biases: tuple, **kwargs: Any
    ) -> Tensor | None:
        """The multi-head layer's recomputing node on this rank's shard (the ring's own,
        :meth:`StandardRingAttention._projected_call` with ``already_split=True``), when the
        ring's own class defines it (``StandardRingAttention``, ``DistributedRingAttention``)."""
        if "_projected_call" not in type(self.ring).__dict__:  # a class that defines it
            return None
        return self.ring._projected_call(x, weights, biases, already_split=True, **kwargs)


def sequence_group(mesh: DeviceMesh | None, sequence_dim: str = "sp") -> dist.ProcessGroup | None:
    """The process group of ``mesh``'s sequence dimension, or ``None`` without one."""
    if mesh is None or mesh.mesh_dim_names is None or sequence_dim not in mesh.mesh_dim_names:
        return None
    return mesh.get_group(sequence_dim)


def mesh_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """A process group over every rank of ``mesh`` (``None``: the default group, when the
    mesh covers the world)."""
    ranks = sorted(mesh.mesh.flatten().tolist())
    if len(ranks) == dist.get_world_size():
        return None
    key = tuple(ranks)
    if key not in _MESH_GROUPS:  # only the mesh's ranks take part in creating it
        _MESH_GROUPS[key] = dist.new_group(ranks, use_local_synchronization=True)
    return _MESH_GROUPS[key]


_MESH_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def mesh_mean_loss(loss_sum: Tensor, targets: Tensor, mesh: DeviceMesh | None) -> Tensor:
    """The loss to call ``backward`` on when every rank of ``mesh`` holds part of the batch.

    ``loss_sum``: this rank's summed cross-entropy (``model(ids, targets, positions=...,
    reduction="sum")``), ``targets`` its targets (``-100`` ignored). Returns ``loss_sum``
    scaled by ``R / T`` (``R`` ranks of the mesh, ``T`` target tokens over all of them):
    data parallelism averages the gradients over the ``R`` ranks, which then gives exactly
    the gradient of the mean over all ``T`` targets, however they are spread. Its value
    averaged over the ranks is that mean. Without a mesh: ``loss_sum / T``.
    """
    count = (targets != -100).sum().to(loss_sum.dtype)
    ranks = 1
    if mesh is not None:
        group = mesh_group(mesh)
        ranks = mesh.size()
        dist.all_reduce(count, group=group)
    if count.item() == 0:
        raise ValueError("no target token on any rank (every target is -100).")
    return loss_sum * ranks / count


def shard_batch(
    input_ids: Tensor,
    targets: Tensor | None,
    mesh: DeviceMesh | None,
    *,
    sequence_dim: str = "sp",
) -> tuple[Tensor, Tensor | None, Tensor]:
    """This rank's shard of a batch: ``(input_ids, targets, positions)``.

    ``input_ids`` and ``targets`` are the whole ``(B, N)`` batch, the same on every rank
    of the sequence dimension; rank ``j`` of its ``k`` ranks gets tokens
    ``[j N/k, (j+1) N/k)`` and their global ``positions`` ``(N/k,)``, ready for
    ``model(input_ids, targets, positions=positions)``. Without a sequence dimension the
    batch is returned whole with ``positions = arange(N)``.
    """
    group = sequence_group(mesh, sequence_dim)
    n = input_ids.shape[1]
    positions = torch.arange(n, device=input_ids.device)
    if group is None or dist.get_world_size(group) == 1:
        return input_ids, targets, positions
    shard = (
        shard_sequence(input_ids, group),
        None if targets is None else shard_sequence(targets, group),
        shard_sequence(positions, group, dim=0),
    )
    return shard


def _check_ring_form(attention: nn.Module) -> None:
    if isinstance(attention, DenseAttention):
        raise ValueError(
            "a model built with attention='dense' has no ring form here; for dense attention "
            "over the ring build it with attention='dilated', segment_lengths=[N], "
            "dilation_rates=[1] (N: the whole sequence length)."
        )
    if not isinstance(attention, DilatedAttention):
        raise TypeError(
            f"cannot make a ring form of {type(attention).__name__}; parallelize_longnet "
            f"handles the DilatedAttention that the LongNet models build."
        )


def _ring_form(attention: DilatedAttention, group: dist.ProcessGroup,
               timeout: float | None) -> nn.Module:  # fmt: skip
    ring = StandardRingAttention(
        attention.segment_lengths,
        attention.dilation_rates,
        dropout=attention.dropout,
        process_group=group,
        branch_mixing=attention.branch_mixing,
        scale=attention.scale,
        backend=attention.backend,
        timeout=timeout,
    )
    return LocalShardRing(ring)


def _data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A 1-D mesh over every rank of ``mesh`` (its dimensions flattened)."""
    if mesh.ndim == 1:
        return mesh
    return mesh._flatten()  # the same ranks, one dimension (as torchtitan's dp_shard_cp)


def parallelize_longnet(
    model: LongNetLM | LongNet,
    mesh: DeviceMesh | None = None,
    *,
    sequence_dim: str = "sp",
    data_parallel: str = "ddp",
    activation_checkpointing: bool = False,
    ring_timeout: float | None = None,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Apply sequence parallelism, data parallelism and activation checkpointing to ``model``.

    Args:
        model: a :class:`LongNetLM` or :class:`LongNet` (changed in place).
        mesh: a ``DeviceMesh``. Its dimension named ``sequence_dim`` (if any, and of size
            > 1) splits each sequence over its ranks: attention runs as a ring there, and
            the model must be called on :func:`shard_batch`'s shards. Gradients are
            averaged over all of the mesh's ranks. ``None``: no distribution (only
            checkpointing is applied).
        sequence_dim: the name of the sequence-parallel mesh dimension.
        data_parallel: ``"ddp"`` (wrap in ``DistributedDataParallel``), ``"fsdp"`` (FSDP2
            ``fully_shard`` per block and on the root) or ``"none"`` (you average the
            gradients yourself; only allowed without sequence parallelism).
        activation_checkpointing: recompute each block in the backward instead of keeping
            its activations (the ring's transfers then run again too).
        ring_timeout: seconds each ring wait may take before a ``RuntimeError`` names the
            silent rank (default: the process group's timeout).
        **ddp_kwargs: passed to ``DistributedDataParallel``.

    Returns:
        The module to train: ``model`` itself, or its DDP wrapper (``.module`` is
        ``model``). Call it like the model.
    """
    if not isinstance(model, (LongNetLM, LongNet)):
        raise TypeError(
            f"parallelize_longnet takes a LongNetLM or LongNet, got {type(model).__name__}."
        )
    data_parallel = check_choice("data_parallel", data_parallel, DATA_PARALLEL)
    check_bool("activation_checkpointing", activation_checkpointing)
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"mesh must be a torch.distributed.device_mesh.DeviceMesh (init_device_mesh(...)), "
            f"got {type(mesh).__name__}."
        )
    if data_parallel == "fsdp" and fully_shard is None:
        raise ValueError(
            f"data_parallel='fsdp' needs FSDP2 (torch >= 2.6), this is torch "
            f"{torch.__version__}; use data_parallel='ddp'."
        )
    group = sequence_group(mesh, sequence_dim)
    sequence_parallel = group is not None and dist.get_world_size(group) > 1
    if sequence_parallel:
        # Every check before the first change: a refused model is left as it was.
        if isinstance(model, LongNet) and model.hilbert_grid is not None:
            raise ValueError(
                "a LongNet with hilbert_grid reorders the whole sequence, which a shard does "
                "not hold; put the patches in Hilbert order before sharding "
                "(x[:, hilbert_permutation(rows, cols)]) and build the model without "
                "hilbert_grid."
            )
        if data_parallel == "none":
            raise ValueError(
                "sequence parallelism needs the gradients averaged over the sequence ranks: "
                "pass data_parallel='ddp' or 'fsdp'."
            )
        holders = [block.attn.attention for block in model.blocks]
        inners = [h.inner if isinstance(h, RotaryAttention) else h for h in holders]
        for inner in inners:
            _check_ring_form(inner)
        for block, holder, inner in zip(model.blocks, holders, inners):
            ring = _ring_form(inner, group, ring_timeout)
            if isinstance(holder, RotaryAttention):
                holder.inner = ring
            else:
                block.attn.attention = ring
        if isinstance(model, LongNetLM):
            model.positions_required = True
    if activation_checkpointing:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if mesh is None or data_parallel == "none":
        return model
    if data_parallel == "fsdp":
        dp_mesh = _data_parallel_mesh(mesh)
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model
    dp_group = mesh_group(mesh)
    device_ids = None
    if next(model.parameters()).device.type == "cuda":
        device_ids = [next(model.parameters()).device.index]
    return DistributedDataParallel(
        model, process_group=dp_group, device_ids=device_ids, **ddp_kwargs
    )
