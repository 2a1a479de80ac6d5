"""A peer that is alive but stuck, and the caller's own collectives on the ring's group.

Every ring entry point takes ``timeout=`` (seconds) and bounds each wait with it: the
ranks that wait for a stuck peer raise ``RuntimeError`` naming it (and the ring step and
branch, or the input check), within the timeout, instead of hanging for the process
group's timeout (30 minutes on gloo). The ring's P2P and collectives run on a
communicator of its own, so an ``all_gather`` of eight int64 that one rank runs on the
group while the others enter the ring never receives the ring's data.

Each world size is spawned once and runs every case in turn, each on a fresh process
group (a failed wait retires the ring's communicator of its group); the ranks meet on
WORLD between cases, which the ring never uses. The workers then exit as usual, which
must not hang or abort after those timeouts; the harness kills whatever is left after a
bound, so no stuck rank can hang the test run.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import re
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import free_port, start_ranks

from dilated_attention_pytorch import (
    RingBlockSparseAttention,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
    dilated_attention,
    ring_dilated_attention,
)
from dilated_attention_pytorch.distributed import comm as comm_module
from dilated_attention_pytorch.distributed import ring_communicator

pytestmark = pytest.mark.distributed

T = 1.5  # the ring's timeout in these tests, in seconds
STUCK = 1  # the rank that is alive but stuck
SLACK = 6.0  # how much longer than T a waiting rank may take to raise (a loaded CI machine)
L, H, D = 8, 2, 4  # tokens per rank, heads, head dim


# --------------------------------------------------------------------------- harness


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        result = (rank, "ok", pickle.dumps(fn(rank, world)))
    except BaseException:
        result = (rank, "error", traceback.format_exc())
    results.put(result)
    results.close()
    results.join_thread()
    # A plain exit, the process group left as it is: nothing the timeouts left behind may
    # hang or abort the interpreter's exit (the harness checks the exit codes).


def _spawn_hard(
    fn: Callable[[int, int], Any], world: int, limit: float = 150
) -> tuple[list[Any], list[int | None]]:
    """``fn(rank, world)`` on ``world`` gloo ranks: the results and the exit codes (``None``
    for a process that had not exited 20 s after reporting; it is killed). Raises after
    ``limit`` seconds without every result."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = start_ranks(ctx, world, lambda rank: (_entry, (fn, rank, world, port, results)))
    collected: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + limit
    try:
        while len(collected) < world:
            rank, status, value = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            collected[rank] = (status, value)
    except queue.Empty:
        missing = sorted(set(range(world)) - set(collected))
        raise RuntimeError(f"ranks {missing} of {world} did not finish within {limit} s") from None
    finally:
        exit_codes: list[int | None] = []
        exit_by = time.monotonic() + 20
        for p in procs:
            p.join(timeout=max(exit_by - time.monotonic(), 0.1))
            exit_codes.append(None if p.is_alive() else p.exitcode)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in collected.items() if s == "error"}
    if errors:
        raise RuntimeError("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(collected[r][1]) for r in range(world)], exit_codes


# --------------------------------------------------------------------------- cases
# Each case returns what this rank saw; a RuntimeError is recorded as ("raised", text).


def _qkv(requires_grad: bool = False) -> list[torch.Tensor]:
    return [
        torch.randn(1, L, H, D, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3)
    ]


def _schedule(world: int) -> tuple[list[int], list[int]]:
    # One branch over every rank: each rank needs the K/V of every other.
    return [L * world], [2]


def _ring(world: int, group: dist.ProcessGroup, **kwargs: Any) -> torch.Tensor:
    return ring_dilated_attention(*_qkv(), *_schedule(world), group=group, **kwargs)


def _never_first_call(rank: int, world: int, group: dist.ProcessGroup) -> Any:
    # The stuck peer never calls the ring; the others' call is the group's first.
    if rank != STUCK:
        _ring(world, group, timeout=T)
    return None


def _never_unchecked(rank: int, world: int, group: dist.ProcessGroup) -> Any:
    _ring(world, group, timeout=T)
    if rank != STUCK:  # no input check: the first wait is the K/V of forward step 0
        _ring(world, group, timeout=T, validate=False)
    return None


def _no_grad(rank: int, world: int, group: dist.ProcessGroup) -> Any:
    attn = RingDilatedAttention(*_schedule(world), process_group=group, timeout=T)
    q, k, v = _qkv(requires_grad=True)
    if rank == STUCK:  # the forward under no_grad, no backward, and on to the next forward
        with torch.no_grad():
            attn(q, k, v, already_split=True)
        attn(q, k, v, already_split=True)  # gradients on: a new signature, checked again
        return None
    attn(q, k, v, already_split=True).sum().backward()
    return None


def _stall(rank: int, world: int, group: dist.ProcessGroup) -> Any:
    layer = RingMultiheadDilatedAttention(
        H * D, H, *_schedule(world), process_group=group, timeout=T, dtype=torch.float64
    )
    x = torch.randn(1, L * world, H * D, dtype=torch.float64)
    layer(x)  # every rank: the input signature is validated, so no check runs below
    if rank != STUCK:
        layer(x)
        return None
    original = comm_module.RingComm.commit

    def stalled(self: comm_module.RingComm) -> None:  # sleeps before its first sends
        comm_module.RingComm.commit = original
        time.sleep(T + 1.0)
        original(self)

    comm_module.RingComm.commit = stalled
    try:
        layer(x)
    except RuntimeError as exc:  # the others gave up on it: its own sends now fail too
        return f"stalled rank raised: {exc}"
    finally:
        comm_module.RingComm.commit = original
    return "stalled rank finished"


def _hijack(rank: int, world: int, group: dist.ProcessGroup) -> Any:
    _ring(world, group, timeout=T)  # every rank: the group's ring communicator exists
    if rank != STUCK:
        _ring(world, group)  # timeout=None: the group's own (T, see _run)
        return None
    # An unrelated all_gather of eight int64 on the group, while the others enter the ring.
    parts = [torch.full((8,), -7, dtype=torch.int64) for _ in range(world)]
    work = dist.all_gather(parts, torch.full((8,), 100 + rank), group=group, async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=T + 1))
        status = "returned"
    except RuntimeError:
        status = "timed out"
    return {"status": status, "parts": [p.tolist() for p in parts]}


def _block_sparse(rank: int, world: int, group: dist.ProcessGroup) -> Any:
    attn = RingBlockSparseAttention(
        sparsity_ratio=0.5, pattern_type="local_window", block_size=4, process_group=group,
        timeout=T, validate="always",
    )  # fmt: skip
    attn(*_qkv(), already_split=True)
    if rank != STUCK:
        attn(*_qkv(), already_split=True)
    return None


CASES: dict[str, Callable[[int, int, dist.ProcessGroup], Any]] = {
    "never-first-call": _never_first_call,
    "never-unchecked": _never_unchecked,
    "no-grad": _no_grad,
    "stall": _stall,
    "hijack": _hijack,
    "block-sparse": _block_sparse,
}


def _run(rank: int, world: int) -> dict[str, tuple[str, Any, float]]:
    report = {}
    # A process group that only some ranks use: its ring communicator needs nothing from
    # the others (here every rank pair builds its own, side by side).
    pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
    mine = pairs[rank // 2]
    torch.manual_seed(rank // 2)  # each pair its own sequence of 2L tokens
    full = [torch.randn(1, 2 * L, H, D, dtype=torch.float64) for _ in range(3)]
    part = slice(rank % 2 * L, (rank % 2 + 1) * L)
    out = ring_dilated_attention(*(t[:, part] for t in full), [2 * L], [2], group=mine, timeout=T)
    want = dilated_attention(*full, [2 * L], [2])[:, part]
    report["pair-group"] = ("ok", (out, want, ring_communicator(mine) is not mine), 0.0)
    for name, case in CASES.items():
        # On WORLD, which the ring never uses (so it still works after every failure):
        # every case starts together.
        dist.barrier()
        torch.manual_seed(rank)
        # The group's own timeout is gloo's 30 minutes: only the ring's timeout= can bound
        # the waits. The hijack case leaves timeout=None to the ring: the group's own, T.
        own = timedelta(seconds=T) if name == "hijack" else None
        group = dist.new_group(list(range(world)), timeout=own)
        start = time.perf_counter()
        try:
            outcome: tuple[str, Any] = ("ok", case(rank, world, group))
        except RuntimeError as exc:
            outcome = ("raised", str(exc))
        report[name] = (*outcome, time.perf_counter() - start)
    if rank == STUCK:  # still stuck while the others give up on the last case and exit
        time.sleep(T + 2)
    return report


@pytest.fixture(scope="module")
def spawned() -> dict[int, tuple[list[dict[str, tuple[str, Any, float]]], list[int | None]]]:
    return {world: _spawn_hard(_run, world) for world in (2, 4)}


@pytest.fixture(scope="module")
def faults(spawned) -> dict[int, list[dict[str, tuple[str, Any, float]]]]:
    return {world: results for world, (results, _) in spawned.items()}


# --------------------------------------------------------------------------- tests


def _waiting(faults: dict, world: int, name: str) -> dict[int, tuple[str, Any, float]]:
    """What each rank other than the stuck one saw in case ``name``."""
    return {r: res[name] for r, res in enumerate(faults[world]) if r != STUCK}


def _assert_raised_in_time(seen: dict[int, tuple[str, Any, float]]) -> None:
    for rank, (status, message, seconds) in seen.items():
        assert status == "raised", f"rank {rank} did not raise: {message}"
        assert message.startswith(f"ring attention: rank {rank}: "), message
        assert seconds < T + SLACK, f"rank {rank} took {seconds:.1f} s: {message}"


@pytest.mark.parametrize("world", [2, 4])
def test_a_peer_that_never_calls_the_ring(faults, world: int) -> None:
    # The group's first ring call: the ring's communicator is being created.
    seen = _waiting(faults, world, "never-first-call")
    _assert_raised_in_time(seen)
    for message in (m for _, m, _ in seen.values()):
        assert "creating the ring's own communicator for this process group" in message
        assert f"within {T:g} s. Rank {STUCK} did not reach it: it died, is stuck" in message


def _assert_names_the_stuck_peer(seen: dict, world: int, phase: str) -> None:
    """Every waiting rank names the ring step and branch it waited for and the rank that
    did not answer. The stuck peer's ring neighbours exchange with it at step 0 and name
    it; a rank further on names the neighbour that then could not pass anything on."""
    for _, message, _ in seen.values():
        assert re.search(rf"{phase} ring step \d, branch\(es\) 0 \(w={L * world}, r=2\)", message)
        assert re.search(r"Rank \d did not answer: it died, is stuck", message), message
    for rank in {(STUCK - 1) % world, (STUCK + 1) % world}:
        message = seen[rank][1]
        assert f"{phase} ring step 0, branch(es) 0 (w={L * world}, r=2)" in message, message
        assert f"within {T:g} s. Rank {STUCK} did not answer" in message, message


@pytest.mark.parametrize("world", [2, 4])
def test_a_peer_that_never_calls_an_unchecked_ring(faults, world: int) -> None:
    seen = _waiting(faults, world, "never-unchecked")
    _assert_raised_in_time(seen)
    _assert_names_the_stuck_peer(seen, world, "forward")


@pytest.mark.parametrize("world", [2, 4])
def test_a_peer_that_skips_the_backward(faults, world: int) -> None:
    seen = _waiting(faults, world, "no-grad")
    _assert_raised_in_time(seen)
    _assert_names_the_stuck_peer(seen, world, "backward")
    # Its next forward (gradients on: checked again) never takes the others' backward
    # transfers for its own: it waits in the collective check that its neighbours are not
    # running, and raises too.
    status, message, _ = faults[world][STUCK]["no-grad"]
    assert status == "raised" and "the collective input check of ring attention" in message


@pytest.mark.parametrize("world", [2, 4])
def test_a_peer_that_stalls_before_its_sends(faults, world: int) -> None:
    seen = _waiting(faults, world, "stall")
    _assert_raised_in_time(seen)
    _assert_names_the_stuck_peer(seen, world, "forward")
    # The stalled rank wakes up to closed connections and raises as well (no hang).
    status, message, _ = faults[world][STUCK]["stall"]
    assert status == "ok" and message.startswith("stalled rank raised: ring attention: rank 1")


@pytest.mark.parametrize("world", [2, 4])
def test_a_block_sparse_ring_with_a_peer_that_never_calls(faults, world: int) -> None:
    seen = _waiting(faults, world, "block-sparse")
    _assert_raised_in_time(seen)
    for message in (m for _, m, _ in seen.values()):
        assert "the collective input check of block-sparse ring attention" in message
        assert f"within {T:g} s. Rank {STUCK} did not reach it" in message, message


@pytest.mark.parametrize("world", [2, 4])
def test_a_user_all_gather_on_the_group_never_gets_the_rings_data(faults, world: int) -> None:
    seen = _waiting(faults, world, "hijack")
    _assert_raised_in_time(seen)
    for message in (m for _, m, _ in seen.values()):
        # timeout=None: the group's own timeout bounds the ring's input check.
        assert "the collective input check of ring attention" in message, message
        assert f"within the process group's timeout ({T:g} s). Rank {STUCK} did not" in message
    status, result, _ = faults[world][STUCK]["hijack"]
    assert status == "ok"
    # The ring's check ran on its own communicator: the user's all_gather on the group
    # got nobody's data (it timed out; its buffers are untouched).
    assert result["status"] == "timed out", result
    assert all(part == [-7] * 8 for part in result["parts"]), result


@pytest.mark.parametrize("world", [2, 4])
def test_rings_on_groups_of_some_ranks(faults, world: int) -> None:
    for res in faults[world]:
        _, (out, want, private), _ = res["pair-group"]
        assert private  # the ring's own communicator, not the pair's group
        torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)  # float64


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_exits_cleanly_after_the_timeouts(spawned, world: int) -> None:
    # Neither a hang (None: still alive 20 s after reporting) nor an abort (negative:
    # killed by a signal, e.g. SIGABRT from a backend thread still inside a collective).
    assert spawned[world][1] == [0] * world
