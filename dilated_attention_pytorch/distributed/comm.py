"""The one P2P helper of the ring (a batch of isend/irecv posted together), its
statistics, and bounded waits.

A ring step posts its transfers (the next K/V block, or gradient accumulators)
with one :func:`torch.distributed.batch_isend_irecv` *before* the current block
is computed, and waits for them after, so transfer and compute overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


class Stopwatch:
    """Sums the durations of intervals: CUDA events on a GPU, wall clock on the CPU.

    On CUDA the events are read (one synchronisation) only when :meth:`seconds` is
    called, so timing does not stall the ring.
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, device: torch.device) -> object:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, token: object) -> None:
        if isinstance(token, torch.cuda.Event):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((token, end))
        else:
            assert isinstance(token, float)
            self._seconds += time.perf_counter() - token

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events = []
        return self._seconds


@dataclass
class RingStats:
    """What the ring did on this rank since the last reset.

    ``bytes_sent`` / ``bytes_received``: payload of every P2P transfer (K/V blocks,
    gradient accumulators, and the gathers of ``already_split=False``); ``ring_steps``:
    steps of the forward and backward loops; ``calls``: ring attention calls;
    ``comm_wait`` / ``compute``: time spent waiting for transfers and computing blocks.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    ring_steps: int = 0
    calls: int = 0
    comm_wait: Stopwatch = field(default_factory=Stopwatch)
    compute: Stopwatch = field(default_factory=Stopwatch)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "ring_steps": self.ring_steps,
            "calls": self.calls,
            "comm_wait_seconds": self.comm_wait.seconds(),
            "compute_seconds": self.compute.seconds(),
        }


def wait_bounded(work: dist.Work, timeout: float | None, what: str) -> None:
    """``work.wait()``, raising ``RuntimeError`` naming ``what`` when it fails or takes
    longer than ``timeout`` seconds (``None``: the process group's own timeout)."""
    try:
        done = work.wait() if timeout is None else work.wait(timeout=timedelta(seconds=timeout))
    except Exception as exc:  # the backends raise RuntimeError, DistBackendError, ...
        raise RuntimeError(
            f"ring attention: {what} failed or did not finish within "
            f"{'the process group timeout' if timeout is None else f'{timeout:g} s'} "
            f"(a peer died, hangs or called with other arguments): {exc}"
        ) from exc
    if done is False:
        raise RuntimeError(f"ring attention: {what} did not finish within {timeout:g} s.")


class RingComm:
    """Collects the sends and receives of one ring step, then posts them as one batch.

    Peers are *group* ranks; they are translated to global ranks for the P2P ops, so
    the same code runs on WORLD and on any sub-group (e.g. one dimension of a
    DeviceMesh). Both sides of every pair must add their ops in the same order.
    ``tag`` keeps two kinds of transfer apart on backends that match by tag (gloo);
    NCCL matches by order and ignores it. ``stats`` (optional) counts bytes and wait
    time; ``timeout`` bounds :meth:`wait` and ``context`` names the transfer in its error.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        tag: int = 0,
        *,
        stats: RingStats | None = None,
        timeout: float | None = None,
        context: str = "",
    ) -> None:
        self.group = group
        self.tag = tag
        self.stats, self.timeout, self.context = stats, timeout, context
        self._ops: list[dist.P2POp] = []
        self._works: list[dist.Work] = []
        self._device: torch.device | None = None

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def send(self, tensor: Tensor, peer: int) -> None:
        """Queue sending ``tensor`` (contiguous) to group rank ``peer``."""
        self._ops.append(dist.P2POp(dist.isend, tensor, self._global(peer), self.group, self.tag))
        self._device = tensor.device
        if self.stats is not None:
            self.stats.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, tensor: Tensor, peer: int) -> Tensor:
        """Queue receiving into ``tensor`` from group rank ``peer``; returns ``tensor``."""
        self._ops.append(dist.P2POp(dist.irecv, tensor, self._global(peer), self.group, self.tag))
        self._device = tensor.device
        if self.stats is not None:
            self.stats.bytes_received += tensor.numel() * tensor.element_size()
        return tensor

    def commit(self) -> None:
        """Post every queued op as one ``batch_isend_irecv`` (no-op when nothing is queued)."""
        if self._works:
            raise RuntimeError("RingComm.commit called twice without wait()")
        if self._ops:
            self._works = dist.batch_isend_irecv(self._ops)

    def wait(self) -> None:
        """Wait for the committed ops; the received tensors are then ready."""
        token = None
        if self.stats is not None and self._works and self._device is not None:
            token = self.stats.comm_wait.start(self._device)
        what = f"rank {dist.get_rank(self.group)}: {self.context or 'a P2P transfer'}"
        for work in self._works:
            wait_bounded(work, self.timeout, what)
        if token is not None:
            self.stats.comm_wait.stop(token)  # type: ignore[union-attr]
        self._works = []
        self._ops = []
