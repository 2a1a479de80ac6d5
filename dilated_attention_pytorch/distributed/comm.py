"""The one P2P helper of the ring: a batch of isend/irecv posted together.

A ring step posts its transfers (the next K/V block, or gradient accumulators)
with one :func:`torch.distributed.batch_isend_irecv` *before* the current block
is computed, and waits for them after, so transfer and compute overlap.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


class RingComm:
    """Collects the sends and receives of one ring step, then posts them as one batch.

    Peers are *group* ranks; they are translated to global ranks for the P2P ops, so
    the same code runs on WORLD and on any sub-group (e.g. one dimension of a
    DeviceMesh). Both sides of every pair must add their ops in the same order.
    ``tag`` keeps two kinds of transfer apart on backends that match by tag (gloo);
    NCCL matches by order and ignores it.
    """

    def __init__(self, group: dist.ProcessGroup, tag: int = 0) -> None:
        self.group = group
        self.tag = tag
        self._ops: list[dist.P2POp] = []
        self._works: list[dist.Work] = []

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def send(self, tensor: Tensor, peer: int) -> None:
        """Queue sending ``tensor`` (contiguous) to group rank ``peer``."""
        self._ops.append(dist.P2POp(dist.isend, tensor, self._global(peer), self.group, self.tag))

    def recv(self, tensor: Tensor, peer: int) -> Tensor:
        """Queue receiving into ``tensor`` from group rank ``peer``; returns ``tensor``."""
        self._ops.append(dist.P2POp(dist.irecv, tensor, self._global(peer), self.group, self.tag))
        return tensor

    def commit(self) -> None:
        """Post every queued op as one ``batch_isend_irecv`` (no-op when nothing is queued)."""
        if self._works:
            raise RuntimeError("RingComm.commit called twice without wait()")
        if self._ops:
            self._works = dist.batch_isend_irecv(self._ops)

    def wait(self) -> None:
        """Wait for the committed ops; the received tensors are then ready."""
        for work in self._works:
            work.wait()
        self._works = []
        self._ops = []
