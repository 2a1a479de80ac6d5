"""Run a function in spawned gloo processes on CPU (one process group per spawn).

Spawning costs seconds on a small CI machine, so a test module spawns once per world
size and runs many cases inside; the worker returns plain data and the tests assert.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# A float64 ring against the float64 dense oracle: the ring merges a few blocks per query,
# so its error stays within a few units in the last place (1e-15 seen); 1e-10 leaves room
# and still catches any wrong or missing pair, which moves the result by O(1e-2).
FLOAT64_RING_TOL = dict(atol=1e-10, rtol=1e-10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, payload: Any, results: Any
) -> None:
    try:
        torch.set_num_threads(1)  # world_size processes share the CI machine's few cores
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        try:
            # Plain pickle copies tensors by value; the queue's own pickler would share them
            # through file descriptors that die with this process.
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, payload))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report anything, including assertion errors, to the parent
        results.put((rank, "error", traceback.format_exc()))


def start_ranks(ctx, world: int, target_of: Callable[[int], tuple[Callable, tuple]]) -> list:
    """Start one process per rank, ``target_of(rank) -> (target, args)``, with one
    OpenMP thread each (the CI machine has two cores); returns the started processes."""
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = []
        for rank in range(world):
            target, args = target_of(rank)
            procs.append(ctx.Process(target=target, args=args))
            procs[-1].start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return procs


def spawn(
    fn: Callable[[int, int, Any], Any], world_size: int, payload: Any = None, timeout: float = 300
) -> list[Any]:
    """Run ``fn(rank, world_size, payload)`` on ``world_size`` gloo ranks; per-rank results.

    ``fn`` must be a module-level function. Raises ``RuntimeError`` with the rank's
    traceback if any rank fails, or if the ranks do not finish within ``timeout``
    seconds (a hang in the code under test fails the test instead of blocking CI).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = start_ranks(
        ctx, world_size, lambda rank: (_entry, (fn, rank, world_size, port, payload, results))
    )
    collected: dict[int, tuple[str, Any]] = {}
    try:
        while len(collected) < world_size:
            rank, status, value = results.get(timeout=timeout)
            collected[rank] = (status, value)
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(collected))
        raise RuntimeError(
            f"ranks {missing} of {world_size} did not finish within {timeout} s (a hang?)"
        ) from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in collected.items() if s == "error"}
    if errors:
        raise RuntimeError("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(collected[r][1]) for r in range(world_size)]


def value_errors(calls: dict[str, Callable[[], Any]]) -> dict[str, str | None]:
    """Run each call (in a rank's worker): its ``ValueError`` text, or ``None`` if it
    raised none. Any other exception propagates (a test expecting a ValueError fails)."""
    errors: dict[str, str | None] = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return errors
