"""DistributedRingAttention on gloo: monitoring counts, checkpointing, and a dead peer."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import free_port, spawn, value_errors

from dilated_attention_pytorch import (
    DilatedAttention,
    DistributedRingAttention,
    StandardRingAttention,
)

pytestmark = pytest.mark.distributed

TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64; the ring only reorders sums


def _operations(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    torch.manual_seed(3)
    B, N, H, D, r = 2, 64, 4, 8, 4
    L = N // world_size
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, N, H, D, dtype=torch.float64)
    local = [t.detach()[:, rank * L : (rank + 1) * L].clone().requires_grad_() for t in (q, k, v)]
    # One global branch with L % r == 0: every K/V block is L/r tokens per head.
    monitored = DistributedRingAttention([N], [r], enable_monitoring=True)
    out = monitored(*local, already_split=True)
    out.backward(dout[:, rank * L : (rank + 1) * L])
    stats = monitored.get_communication_stats()
    monitored.reset_communication_stats()
    after_reset = monitored.get_communication_stats()
    # Checkpointing recomputes the ring forward in the backward: same output and gradients.
    want = DilatedAttention([16, N], [1, r])(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    ckpt = DistributedRingAttention([16, N], [1, r], use_checkpointing=True, enable_monitoring=True)
    got = ckpt(q, k, v, is_causal=True)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    return {
        "stats": stats,
        "after_reset": after_reset,
        "ckpt": [(got.detach(), want.detach())] + list(zip(got_grads, want_grads, strict=True)),
        "ckpt_calls": ckpt.get_communication_stats()["calls"],
        "shape": (B, L, H, D, r),
    }


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return spawn(_operations, 2)


def test_monitoring_counts_the_design_bytes(results: list[dict[str, Any]]) -> None:
    for res in results:
        B, L, H, D, r = res["shape"]
        g = 2  # ranks per segment
        # One K/V block: 2 tensors x B x (L / r) dilated tokens x H heads x D x 8 bytes.
        block = 2 * B * (L // r) * H * D * 8
        # Forward: (g - 1) K/V blocks; backward: (g - 1) K/V blocks again and (g - 1)
        # dK/dV accumulators (float64 for float64 inputs, so the same size).
        expected = 3 * (g - 1) * block
        stats = res["stats"]
        assert stats["bytes_sent"] == expected and stats["bytes_received"] == expected, stats
        assert stats["calls"] == 1 and stats["ring_steps"] == 2 * g
        assert stats["comm_wait_seconds"] >= 0 and stats["compute_seconds"] > 0
        assert stats["peak_memory_bytes"] is None  # CPU
        assert res["after_reset"]["bytes_sent"] == 0 and res["after_reset"]["calls"] == 0


def test_checkpointing_gives_the_same_result(results: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(results):
        for i, (got, want) in enumerate(res["ckpt"]):
            torch.testing.assert_close(
                got, want, **TOL, msg=lambda m, i=i, rank=rank: f"rank {rank} #{i}: {m}"
            )
        assert res["ckpt_calls"] == 2  # the forward, and its recomputation in the backward


def test_monitoring_off_and_deepspeed_missing() -> None:
    with pytest.raises(ValueError, match="construct it with enable_monitoring=True"):
        DistributedRingAttention([8], [1], enable_monitoring=False).get_communication_stats()
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install deepspeed"):
            DistributedRingAttention([8], [1], use_deepspeed=True)
    with pytest.raises(ValueError, match="timeout must be a positive finite float"):
        StandardRingAttention([8], [1], timeout=0)


# --------------------------------------------------------------------------- dead peer


def _dead_peer_entry(rank: int, port: int, when: str, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    module = DistributedRingAttention([32], [2], timeout=5.0)
    q, k, v = (torch.randn(1, 16, 4, 8, requires_grad=True) for _ in range(3))
    if rank == 1:
        if when == "forward":
            os._exit(0)  # dies before the ring starts
        out = module(q, k, v, already_split=True)
        os._exit(0)  # dies between the forward and the backward
    start = time.perf_counter()
    try:
        out = module(q, k, v, already_split=True)
        out.sum().backward()
        results.put(("no error", time.perf_counter() - start))
    except RuntimeError as exc:
        results.put((str(exc), time.perf_counter() - start))
    results.close()
    results.join_thread()  # flush the queue before leaving without cleanup
    os._exit(0)  # the process group cannot be shut down cleanly without its peer


@pytest.mark.parametrize("when", ["forward", "backward"])
def test_a_dead_peer_is_an_error_not_a_hang(when: str) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dead_peer_entry, args=(r, port, when, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        message, seconds = results.get(timeout=120)
    except queue.Empty:
        pytest.fail("rank 0 neither finished nor raised within 120 s: the ring hangs")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert message.startswith("ring attention: rank 0:"), message
    assert "within 5 s" in message
    if when == "backward":
        assert "ring step" in message and "branch(es) 0 (w=32, r=2)" in message, message
    assert seconds < 60, seconds


def test_ring_stats_copies_count_on_their_own_and_reset_keeps_the_key() -> None:
    import copy
    import pickle

    from dilated_attention_pytorch.distributed.comm import RingStats, stats_by_key

    stats = RingStats(bytes_sent=5, calls=2)
    key = stats.key
    assert stats_by_key(key) is stats and stats_by_key(0) is None
    for clone in (copy.copy(stats), copy.deepcopy(stats), pickle.loads(pickle.dumps(stats))):
        assert clone.key != key and stats_by_key(clone.key) is clone
        assert (clone.bytes_sent, clone.calls) == (5, 2)
    stats.reset()  # in place: compiled graphs keep counting into the same object
    assert stats.key == key and stats_by_key(key) is stats
    assert stats.as_dict()["bytes_sent"] == 0 and stats.calls == 0


def _checkpointing_differs(rank: int, world_size: int, _: Any) -> str | None:
    # Checkpointing runs the ring again in the backward: a rank without it would leave the
    # other waiting for that second pass. The collective check compares it up front.
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    module = DistributedRingAttention([16], [1], use_checkpointing=bool(rank), timeout=60.0)
    with torch.no_grad():  # checkpointing takes no effect: the ranks run the same call
        module(q, k, v, already_split=True)

    def training_step() -> None:
        module(q, k, v, already_split=True).sum().backward()

    return value_errors({"step": training_step})["step"]


def test_checkpointing_differing_between_ranks_raises_on_every_rank() -> None:
    for rank, error in enumerate(spawn(_checkpointing_differs, 2)):
        assert error is not None, f"rank {rank} did not raise"
        assert "the settings differ between ranks" in error, error
        assert "use_checkpointing=False" in error and "use_checkpointing=True" in error, error
