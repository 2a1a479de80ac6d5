"""The ring's communication: its own process group, the one P2P helper (a batch of
isend/irecv posted together), bounded collectives, statistics.

A ring step posts its transfers (the next K/V block, or gradient accumulators)
with one :func:`torch.distributed.batch_isend_irecv` *before* the current block
is computed, and waits for them after, so transfer and compute overlap.

**The ring's own communicator.** The ring's P2P and its collectives (the input check)
never run on the caller's process group: they run on a process group of their own over
the same ranks, created once per group (:func:`ring_communicator`) at the group's first
ring call. Collectives that the caller runs on the group (its own ``all_gather`` of a
few int64, say) can then never be matched with the ring's. The group is created with
``torch.distributed.new_group(ranks=<the group's ranks>, use_local_synchronization=True)``:
only the group's ranks take part, so a ring over one dimension of a DeviceMesh needs
nothing from the other ranks; like every ``new_group`` it must happen in the same order
on every member, which a program whose ranks make the same ring calls does.

**Bounded waits.** Every wait (each batch of P2P transfers, each collective and the
creation of the ring's group) takes the call's ``timeout`` in seconds (``None``: the
caller's group's own timeout) and raises ``RuntimeError`` naming the rank that did not
answer and what was waited for (branch and ring step for K/V and gradients). Counters
in the group's store record which ranks reached each collective, so that its timeout
can name the ranks that did not. A failed wait leaves the ranks out of step (and a gloo
communicator closed), so the ring refuses to run on that group again.

**A failed communicator at exit.** The transfers and collectives a failed wait gave up on
stay referenced, so no buffer that gloo may still write into (or that its worker thread
still reads) is freed under it (they are kept until the process exits: a failed ring is
not run on its group again), and at interpreter exit (``atexit``, before Python tears
down its objects) the gloo private groups of rings are destroyed, failed ones first, and
every reference to them is dropped. Left to the end of the process instead, they would
be destroyed among C++ static destructors (with their connections in an error state,
for a failed ring), which can abort the process after its work was done.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import itertools
import pickle
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..validation import check_positive_float


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
    # Names this object to the custom operators that run the ring under torch.compile
    # (they take plain values): see stats_by_key. A string, so that the compiler never
    # turns it into a symbolic integer when a second RingStats reaches the same code.
    key: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        self._register()

    def __setstate__(self, state: dict) -> None:
        # copy.copy, copy.deepcopy and unpickling: a counter of its own, with its own key.
        self.__dict__.update(state)
        self._register()

    def _register(self) -> None:
        self.key = f"ring-stats-{next(_STATS_KEYS)}"
        _STATS[self.key] = self

    def reset(self) -> None:
        """Zero every counter in place (the key stays, so compiled graphs that count into
        this object need no recompilation)."""
        self.bytes_sent = self.bytes_received = self.ring_steps = self.calls = 0
        self.comm_wait, self.compute = Stopwatch(), Stopwatch()

    def as_dict(self) -> dict[str, float | int]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "ring_steps": self.ring_steps,
            "calls": self.calls,
            "comm_wait_seconds": self.comm_wait.seconds(),
            "compute_seconds": self.compute.seconds(),
        }


_STATS: weakref.WeakValueDictionary[str, RingStats] = weakref.WeakValueDictionary()
_STATS_KEYS = itertools.count(1)


def stats_by_key(key: str) -> RingStats | None:
    """The live :class:`RingStats` whose ``key`` is ``key`` (``""``: none)."""
    return _STATS.get(key) if key else None


# --------------------------------------------------------------------------- groups


def distributed_not_ready() -> str | None:
    """Why ring attention cannot run in this process yet, or ``None`` when it can."""
    if not dist.is_available() or not dist.is_initialized():
        return (
            "ring attention needs torch.distributed: call torch.distributed.init_process_group "
            "(e.g. launch with torchrun) first, or use dilated_attention on one device"
        )
    return None


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group`` or WORLD; raises a clear error when torch.distributed is not set up."""
    reason = distributed_not_ready()
    if reason is not None:
        raise ValueError(reason + ".")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process "
            f"group passed as group=; call ring attention only on the group's ranks."
        )
    return group


def collective_device(group: dist.ProcessGroup) -> torch.device:
    """The device a small metadata tensor must live on for ``group``'s backend."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or "cpu:" in backend or backend == "ucc":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def group_timeout(group: dist.ProcessGroup) -> float:
    """Seconds of ``group``'s own timeout: what ``timeout=None`` stands for."""
    try:
        options = group._get_backend(collective_device(group)).options
        return float(options._timeout.total_seconds())
    except Exception:  # a backend without options (MPI, a custom one): torch's default
        return float(dist.default_pg_timeout.total_seconds())


def rank_name(group: dist.ProcessGroup, rank: int) -> str:
    """``"rank 1"``, or ``"rank 1 (global rank 3)"`` where the group and global ranks differ."""
    global_rank = dist.get_global_rank(group, rank)
    return f"rank {rank}" if global_rank == rank else f"rank {rank} (global rank {global_rank})"


def ranks_name(group: dist.ProcessGroup, ranks: list[int]) -> str:
    """``"rank 1"`` or ``"ranks 1, 3"`` (with global ranks where they differ)."""
    if len(ranks) == 1:
        return rank_name(group, ranks[0])
    return "ranks " + ", ".join(rank_name(group, r).removeprefix("rank ") for r in ranks)


# What a rank that does not answer may be doing, for every timeout message.
NO_ANSWER = (
    "it died, is stuck, or skipped this ring call (every rank of the group must make the "
    "same ring calls, forward and backward, with the same settings); its own error or log "
    "says which"
)
_KEY = "dilated_attention_pytorch/ring"  # prefix of the ring's counters in a group's store
# new_group's keywords: older torch versions lack some (group_desc, sort_ranks).
_NEW_GROUP_KEYWORDS = set(inspect.signature(dist.new_group).parameters)


_BACKSTOP = 1.0  # seconds a collective's wait outlasts the collective's own timeout


def _seconds(seconds: float) -> str:
    return f"{seconds:g} s"


class RingCommunicator:
    """The ring's own process group over the ranks of one caller's group.

    Made by :func:`ring_communicator`, once per group. ``group`` is the private process
    group (same ranks, same order); ``user`` the caller's. It also keeps the caller's
    group's store, whose counters name the ranks that did not reach a collective, and,
    after a failed wait, the error: the ranks are then out of step and the ring refuses
    to run on the group again.
    """

    def __init__(self, user: dist.ProcessGroup) -> None:
        self.user = user
        self.group: dist.ProcessGroup | None = None
        self.rank, self.size = dist.get_rank(user), dist.get_world_size(user)
        self.global_rank = dist.get_global_rank(user, self.rank)
        self.default_timeout = group_timeout(user)
        self.failure: str | None = None
        # Work a failed wait gave up on: kept alive with its buffers (see the module doc).
        self.abandoned: list[dist.Work] = []
        self._timeout: float | None = None  # the private group's current default
        try:
            self.store: dist.Store | None = user.get_group_store()
        except Exception:  # a backend without a store (MPI): timeouts name no rank
            self.store = None

    def seconds(self, timeout: float | None) -> float:
        """The bound of a wait in seconds: ``timeout``, else the caller's group's own."""
        return self.default_timeout if timeout is None else timeout

    def describe(self, timeout: float | None) -> str:
        if timeout is None:
            return f"the process group's timeout ({_seconds(self.default_timeout)})"
        return _seconds(timeout)

    def me(self) -> str:
        return rank_name(self.user, self.rank)

    def create(self, timeout: float | None) -> None:
        """Create the private group (collective over the caller's group's ranks)."""
        seconds = self.seconds(timeout)
        if str(dist.get_backend(self.user)).lower() == "mpi":  # MPI makes no local groups
            self.group, self._timeout = self.user, seconds
            return
        count = self.arrive("create")
        ranks = [dist.get_global_rank(self.user, j) for j in range(self.size)]
        optional = {"group_desc": "dilated_attention_pytorch ring", "sort_ranks": False}
        try:
            self.group = dist.new_group(
                ranks=ranks,
                timeout=timedelta(seconds=seconds),
                backend=dist.get_backend(self.user),
                use_local_synchronization=True,
                # Without sort_ranks, torch sorts every group's ranks: they are sorted here.
                **{key: value for key, value in optional.items() if key in _NEW_GROUP_KEYWORDS},
            )
        except Exception as exc:
            raise self.fail(
                f"ring attention: {self.me()}: creating the ring's own communicator for this "
                f"process group (at the group's first ring call, before ring step 0) did not "
                f"finish within {self.describe(timeout)}. {self.who('create', count)}. "
                f"Underlying error: {exc}"
            ) from exc
        self._timeout = seconds

    def use(self, timeout: float | None) -> float:
        """Bound the private group's own operations by ``timeout``; returns the seconds."""
        seconds = self.seconds(timeout)
        if seconds != self._timeout:
            assert self.group is not None
            set_timeout = getattr(self.group, "set_timeout", None)  # not in older torch
            if set_timeout is not None:  # else only the waits themselves are bounded
                set_timeout(timedelta(seconds=seconds))
            self._timeout = seconds
        return seconds

    def arrive(self, kind: str) -> int | None:
        """Count this rank's arrival at a collective of ``kind`` in the group's store."""
        if self.store is None:
            return None
        try:
            return int(self.store.add(f"{_KEY}/{kind}/{self.global_rank}", 1))
        except Exception:  # the store is gone too: the timeout message names no rank
            self.store = None
            return None

    def absent(self, kind: str, count: int | None) -> list[int] | None:
        """Group ranks that have not arrived at this rank's ``count``-th ``kind`` collective."""
        if self.store is None or count is None:
            return None
        try:
            counts = [
                int(self.store.add(f"{_KEY}/{kind}/{dist.get_global_rank(self.user, j)}", 0))
                for j in range(self.size)
            ]
        except Exception:
            return None
        return [j for j, c in enumerate(counts) if c < count]

    def who(self, kind: str, count: int | None) -> str:
        """Which ranks did not reach a collective that timed out, as a sentence."""
        absent = self.absent(kind, count)
        if absent is None:
            return f"A rank of the group did not answer: {NO_ANSWER}"
        if not absent:
            return "Every rank reached it, so one failed inside it; see the underlying error"
        return f"{ranks_name(self.user, absent).capitalize()} did not reach it: {NO_ANSWER}"

    def fail(self, message: str, abandoned: Sequence[dist.Work] = ()) -> RuntimeError:
        """Remember that the ring's communication failed (and the ``abandoned`` work it
        gave up on); returns the error to raise."""
        if self.failure is None:
            _FAILED.append(self)
        self.failure = message
        self.abandoned.extend(abandoned)
        return RuntimeError(message)

    def check_usable(self) -> None:
        if self.failure is not None:
            raise RuntimeError(
                f"ring attention: {self.me()}: the ring's communication on this process group "
                f"failed in an earlier call, so its ranks are out of step and the ring cannot "
                f"run on this group again; fix the cause and restart the job (or destroy the "
                f"process group and create a new one). The earlier error: {self.failure}"
            )

    def all_gather(self, tensor: Tensor, timeout: float | None, what: str) -> list[Tensor]:
        """``all_gather`` of ``tensor`` on the private group, bounded by ``timeout``."""
        assert self.group is not None
        seconds = self.use(timeout)
        count = self.arrive("collective")
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        work = None
        try:
            work = dist.all_gather(parts, tensor, group=self.group, async_op=True)
            # The collective's own timeout (use() above) ends it first, freeing the backend's
            # worker: a wait that gave up while it still ran would leave it blocked behind
            # (gloo then aborts at interpreter exit). The wait's bound is only a backstop.
            _wait(work, seconds + _BACKSTOP)
        except Exception as exc:
            raise self.fail(
                f"ring attention: {self.me()}: {what} did not finish within "
                f"{self.describe(timeout)}. {self.who('collective', count)}. "
                f"Underlying error: {exc}",
                [] if work is None else [work],
            ) from exc
        return parts


# One per caller's group, created at its first ring call; the private groups map to
# their own communicator too, so passing one where a group is expected is harmless.
_COMMUNICATORS: dict[dist.ProcessGroup, RingCommunicator] = {}
# The communicators whose communication failed, in order.
_FAILED: list[RingCommunicator] = []
# Communicators the exit handler leaves alone (not gloo), kept referenced to the end.
_KEPT: list[RingCommunicator] = []


@atexit.register
def _release_ring_groups() -> None:
    """Destroy the rings' private gloo groups at interpreter exit, failed ones first, and
    drop every reference to them (see the module doc).

    Registered after torch's own exit handlers, so it runs before them. Destroying a gloo
    group waits for its worker threads, which a collective's own timeout frees. Groups
    the program already destroyed (``destroy_process_group()``) are only let go of here,
    so that their C++ objects are freed while Python is still whole, not among static
    destructors at the very end of the process.
    """
    failed = list(reversed(_FAILED))
    _FAILED.clear()
    healthy = [c for c in dict.fromkeys(_COMMUNICATORS.values()) if c not in failed]
    for comm in failed + healthy:
        group = comm.group
        if group is None or group is comm.user:
            continue
        try:
            if not dist.is_initialized() or str(dist.get_backend(group)).lower() != "gloo":
                # NCCL's shutdown waits for kernels that a dead peer may never finish;
                # its watchdog ends those, so the group (and what a failed ring gave up
                # on) stays referenced, untouched.
                _KEPT.append(comm)
                continue
            dist.destroy_process_group(group)
        except Exception:  # already destroyed by the program, or torch is shutting down
            pass
        comm.group = None
        comm.abandoned.clear()  # the buffers outlived the group's connections
        del group
    _COMMUNICATORS.clear()
    gc.collect()


def communicator(group: dist.ProcessGroup, timeout: float | None = None) -> RingCommunicator:
    """The :class:`RingCommunicator` of ``group`` (already resolved), created on first use.

    Collective at creation over ``group``'s ranks, bounded by ``timeout``. Raises
    ``RuntimeError`` when the creation times out, naming the ranks that did not join,
    and on every later call once a ring communication on ``group`` has failed.
    """
    if timeout is not None:
        check_positive_float("timeout", timeout)
    comm = _COMMUNICATORS.get(group)
    if comm is None:
        comm = _COMMUNICATORS[group] = RingCommunicator(group)
        comm.create(timeout)
        assert comm.group is not None
        _COMMUNICATORS[comm.group] = comm
    comm.check_usable()
    return comm


def ring_communicator(
    group: dist.ProcessGroup | None = None, *, timeout: float | None = None
) -> dist.ProcessGroup:
    """The ring's own process group over the ranks of ``group`` (default: WORLD).

    Ring attention runs its P2P transfers and its input check on this group, never on
    ``group`` itself, so collectives that the caller runs on ``group`` can never be
    matched with the ring's. It is created once, at the first ring call on ``group``, by
    ``torch.distributed.new_group(ranks=<group's ranks in group order>,
    use_local_synchronization=True)``: collective over ``group``'s ranks only (the other
    ranks of WORLD take no part, so rings over the groups of one DeviceMesh dimension
    each make their own), bounded by ``timeout`` seconds (``None``: the group's own
    timeout). Like every ``new_group`` it must come in the same order on all of
    ``group``'s ranks, which it does when they make the same ring calls. Torch names such
    a group after the number of groups this process already has, so when only some ranks
    run a ring and your program later makes ``use_local_synchronization`` groups of its
    own across both kinds of rank, create the ring's first: call this function on every
    rank of ``group`` at a point of your choosing (e.g. right after your own
    ``new_group`` calls). With MPI, which makes no local groups, this is ``group``.

    Raises:
        RuntimeError: creating it timed out (the message names the ranks that did not
            join), or a ring call on ``group`` failed before.
    """
    group = resolve_group(group)
    comm = communicator(group, timeout)
    assert comm.group is not None
    return comm.group


def _wait(work: dist.Work, seconds: float) -> None:
    """``work.wait`` bounded by ``seconds``; raises when it fails or times out."""
    done = work.wait(timeout=timedelta(seconds=max(seconds, 1e-3)))
    if done is False:
        raise RuntimeError(f"the operation did not finish within {_seconds(seconds)}")


def gather_objects(
    group: dist.ProcessGroup, obj: object, timeout: float | None, what: str
) -> list[object]:
    """Every rank's picklable ``obj`` (``all_gather_object`` on the ring's communicator,
    bounded by ``timeout``); collective over ``group``."""
    comm = communicator(group, timeout)
    device = collective_device(group)
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [int(s.item()) for s in comm.all_gather(size, timeout, what)]
    buf = torch.zeros(max(sizes), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = comm.all_gather(buf.to(device), timeout, what)
    return [pickle.loads(p[:n].cpu().numpy().tobytes()) for p, n in zip(parts, sizes, strict=True)]


# --------------------------------------------------------------------------- P2P


class RingComm:
    """Collects the sends and receives of one ring step, then posts them as one batch.

    Peers are *group* ranks of ``group`` (the caller's group, or its ring communicator);
    the transfers run on the ring's own communicator (:func:`ring_communicator`), and
    peers are translated to global ranks for the P2P ops, so the same code runs on WORLD
    and on any sub-group (e.g. one dimension of a DeviceMesh). Both sides of every pair
    must add their ops in the same order. ``tag`` keeps two kinds of transfer apart on
    backends that match by tag (gloo); NCCL matches by order and ignores it. ``stats``
    (optional) counts bytes and wait time; ``timeout`` bounds :meth:`wait` (seconds,
    ``None``: the group's own timeout) and ``context`` names the transfer in its error.
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
        self.comm = communicator(group, timeout)
        assert self.comm.group is not None
        self.group = self.comm.group
        self.tag = tag
        self.stats, self.timeout, self.context = stats, timeout, context
        self._ops: list[dist.P2POp] = []
        self._peers: list[tuple[bool, int]] = []  # per op: (is a receive, group rank)
        self._works: list[dist.Work] = []
        self._device: torch.device | None = None

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def send(self, tensor: Tensor, peer: int) -> None:
        """Queue sending ``tensor`` (contiguous) to group rank ``peer``."""
        self._ops.append(dist.P2POp(dist.isend, tensor, self._global(peer), self.group, self.tag))
        self._peers.append((False, peer))
        self._device = tensor.device
        if self.stats is not None:
            self.stats.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, tensor: Tensor, peer: int) -> Tensor:
        """Queue receiving into ``tensor`` from group rank ``peer``; returns ``tensor``."""
        self._ops.append(dist.P2POp(dist.irecv, tensor, self._global(peer), self.group, self.tag))
        self._peers.append((True, peer))
        self._device = tensor.device
        if self.stats is not None:
            self.stats.bytes_received += tensor.numel() * tensor.element_size()
        return tensor

    def commit(self) -> None:
        """Post every queued op as one ``batch_isend_irecv`` (no-op when nothing is queued)."""
        if self._works:
            raise RuntimeError("RingComm.commit called twice without wait()")
        if self._ops:
            self.comm.use(self.timeout)
            try:
                self._works = dist.batch_isend_irecv(self._ops)
            except Exception as exc:  # e.g. a peer gave up on this rank and closed its side
                raise self._failed(self._peers, exc, []) from exc

    def wait(self) -> None:
        """Wait for the committed ops (all within ``timeout``); the received tensors are
        then ready. Raises ``RuntimeError`` naming the peer that did not answer."""
        token = None
        if self.stats is not None and self._works and self._device is not None:
            token = self.stats.comm_wait.start(self._device)
        if len(self._works) == len(self._peers):  # one work per op (gloo): name the peer
            waits = [(work, [peer]) for work, peer in zip(self._works, self._peers, strict=True)]
        else:  # one work for the whole batch (NCCL): name every peer of the batch
            waits = [(work, self._peers) for work in self._works]
        seconds = self.comm.seconds(self.timeout)
        deadline = time.monotonic() + seconds
        for work, peers in waits:
            try:
                _wait(work, deadline - time.monotonic())
            except Exception as exc:
                raise self._failed(peers, exc, self._works) from exc
        if token is not None:
            self.stats.comm_wait.stop(token)  # type: ignore[union-attr]
        self._works, self._ops, self._peers = [], [], []

    def _failed(
        self, peers: list[tuple[bool, int]], exc: Exception, works: list[dist.Work]
    ) -> RuntimeError:
        user, what = self.comm.user, self.context or "a P2P transfer"
        ranks = sorted({p for _, p in peers})
        if len(peers) == 1:
            receive, peer = peers[0]
            action = f"{'receiving' if receive else 'sending'} {what} {'from' if receive else 'to'}"
            answer = f"{rank_name(user, peer).capitalize()} did not answer"
        else:
            action = f"exchanging {what} with"
            answer = "One of them did not answer" if len(ranks) > 1 else "It did not answer"
        return self.comm.fail(
            f"ring attention: {self.comm.me()}: {action} {ranks_name(user, ranks)} failed or "
            f"did not finish within {self.comm.describe(self.timeout)}. {answer}: {NO_ANSWER}. "
            f"Underlying error: {exc}",
            works,
        )
