"""Block-sparse Triton kernels under the interpreter (``TRITON_INTERPRET=1``, CPU).

Against a dense softmax masked by the pattern's token mask, written from the
definition in float64. The kernels run in float32 with 16x16 tiles, so blocks of 32
span several tiles and the shorter last block, the causal diagonal and per-head lists
are all exercised. Tolerance as in ``test_triton_backend.py``: float32 roundoff with
fp32 accumulation over <= 100 keys per row stays well under 2e-5.

Skipped when Triton is not installed; in a plain ``pytest`` process the file re-runs
itself in a subprocess with the variable set (it must be set before Triton is imported).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from test_block_sparse import masked_dense  # noqa: E402

from dilated_attention_pytorch import (  # noqa: E402
    BlockSparseAttention,
    RingBlockSparseAttention,
    block_sparse_attention,
    make_block_sparse_pattern,
)
from dilated_attention_pytorch.sparse import PATTERN_TYPES, block_sparse_memory_estimate  # noqa: E402

TOL = {"atol": 2e-5, "rtol": 2e-5}
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess"
)


@pytest.mark.skipif(INTERPRETING, reason="already interpreting")
def test_interpreted_suite_in_subprocess() -> None:
    from conftest import run_file_interpreted

    run_file_interpreted(__file__)


def _check(out, leaves, ref, ref_leaves, dout) -> None:
    torch.testing.assert_close(out.double(), ref, **TOL)
    grads = torch.autograd.grad(out, leaves, dout.float())
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), rg, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


@interpreted
@pytest.mark.parametrize("pattern_type", PATTERN_TYPES)
@pytest.mark.parametrize(
    ("is_causal", "N", "block_size", "D"),
    [(False, 96, 32, 16), (True, 70, 16, 32)],  # tiles inside blocks; a shorter last block
)
def test_matches_masked_dense_attention(pattern_type, is_causal, N, block_size, D) -> None:
    H = 3
    q, k, v, dout = (torch.randn(2, N, H, D, dtype=torch.float64) for _ in range(4))
    pattern = make_block_sparse_pattern(
        pattern_type, N, block_size=block_size, sparsity_ratio=0.5, is_causal=is_causal,
        num_heads=H if pattern_type == "random" else None,
    )  # fmt: skip
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out, lse = block_sparse_attention(*leaves, pattern, backend="triton", return_lse=True)
    _, ref_lse = block_sparse_attention(q, k, v, pattern, backend="pytorch", return_lse=True)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = masked_dense(*ref_leaves, pattern.token_mask())
    _check(out, leaves, ref, ref_leaves, dout)
    torch.testing.assert_close(lse.double(), ref_lse.double(), **TOL)


@interpreted
@pytest.mark.parametrize(
    ("pattern_type", "is_causal", "N", "block_size", "H_kv"),
    # global_local: its global blocks' long lists reorder the programs (a schedule over
    # the K/V heads for the dK/dV pass).
    [
        ("random", True, 70, 16, 2),
        ("local_window", False, 96, 32, 1),
        ("global_local", False, 144, 16, 2),
    ],
)
def test_grouped_query_matches_masked_dense_attention(
    pattern_type, is_causal, N, block_size, H_kv
) -> None:
    # k, v with fewer heads: the kernels read K/V head h // (H / H_kv); a dK/dV program
    # per K/V head adds up its query heads' shares. Per-head patterns are per query head.
    _check_grouped(pattern_type, is_causal, N, block_size, H_kv, batch=2)


def _check_grouped(pattern_type, is_causal, N, block_size, H_kv, batch) -> None:
    # 4 query heads of dim 16 on H_kv K/V heads, sparsity 0.5 (random: per head), the
    # Triton kernels in float32 against float64 masked dense attention.
    H, D = 4, 16
    q, dout = (torch.randn(batch, N, H, D, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(batch, N, H_kv, D, dtype=torch.float64) for _ in range(2))
    pattern = make_block_sparse_pattern(
        pattern_type, N, block_size=block_size, sparsity_ratio=0.5, is_causal=is_causal,
        num_heads=H if pattern_type == "random" else None,
    )  # fmt: skip
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, pattern, backend="triton")
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = masked_dense(*ref_leaves, pattern.token_mask())
    _check(out, leaves, ref, ref_leaves, dout)


@pytest.fixture
def sweeps_on(monkeypatch: pytest.MonkeyPatch):
    # The interpreter has no occupancy: say 3 programs are resident and rotate every
    # pattern's lists (on a GPU only where the cache model prefers it).
    from dilated_attention_pytorch.sparse import functional, triton_kernels

    monkeypatch.setitem(triton_kernels.SWEEP, "resident", 3)
    monkeypatch.setitem(triton_kernels.SWEEP, "force", True)
    functional.clear_sparse_caches()
    yield triton_kernels
    functional.clear_sparse_caches()


@interpreted
@pytest.mark.parametrize(
    ("pattern_type", "is_causal", "N", "block_size", "H_kv"),
    [
        ("random", True, 70, 16, 4),  # per-head lists, a shorter last block, causal
        ("dilated_sparse", False, 192, 32, 4),  # two tiles per block in every kernel
        ("random", False, 64, 16, 2),  # grouped: a dK/dV program walks 2 heads' lists
        ("global_local", False, 144, 16, 2),  # long lists reorder the programs
    ],
)
def test_rotated_walks_match_masked_dense_attention(
    sweeps_on, pattern_type, is_causal, N, block_size, H_kv
) -> None:
    # Every kernel walks each list from its sweep start, wrapping around: the same
    # attention and gradients, to float32 roundoff (the sum runs in another order).
    calls = []
    real = sweeps_on._rotation

    def spy(sweep, name, *args):
        table, rot = real(sweep, name, *args)
        calls.append((name, rot, int((table > 0).sum())))
        return table, rot

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweeps_on, "_rotation", spy)
        _check_grouped(pattern_type, is_causal, N, block_size, H_kv, batch=1)
    # Forward, dK/dV, dQ: each rotated, each with lists that do not start at their start.
    assert [c[:2] for c in calls] == [("fwd", True), ("dkdv", True), ("dq", True)], calls
    assert all(c[2] > 0 for c in calls), calls


def test_sweep_starts_follow_the_simulated_dispatch() -> None:
    from dilated_attention_pytorch.sparse.triton_kernels import sweep_starts, working_set_blocks

    # 4 query blocks keeping every one of 8 key blocks, 2 resident programs, 1 step per
    # block: programs 0, 1 start at t = 2 (the prologue), 2, 3 at t = 2 + 8 + 1 + 2 = 13.
    # The mean walk is 8 steps: 2 / 8 -> key 2; 13 / 8 -> 5/8 of 8 keys -> key 5.
    mask = torch.ones(4, 8, dtype=torch.bool)
    assert sweep_starts(mask, 1, None, 2, 1, 1).tolist() == [[2, 2, 5, 5]]
    # Past the last kept block the walk starts at the first; a list keeps its own
    # positions (block 0 keeps keys 4..7 only: key 2 is its position 0).
    mask[0, :4] = False
    assert sweep_starts(mask, 1, None, 2, 1, 1).tolist()[0][0] == 0
    # Launch order: slot 3 first, then 2, 1, 0 (heads x blocks = 1 x 4).
    order = torch.tensor([3, 2, 1, 0])
    assert sweep_starts(torch.ones(4, 8, dtype=torch.bool), 1, order, 2, 1, 1).tolist() == [
        [5, 5, 2, 2]
    ]
    # A grouped program walks its heads' lists one after the other: head 1 of the group
    # starts 8 steps after head 0, a whole walk later (same phase).
    two = torch.ones(2, 4, 8, dtype=torch.bool)
    starts = sweep_starts(two, 2, None, 4, 1, 1, group=2)
    assert starts.tolist() == [[2, 2, 2, 2], [2, 2, 2, 2]]
    # Working set: 2 consecutive rows of a diagonal mask keep 2 distinct columns.
    assert working_set_blocks(torch.eye(8, dtype=torch.bool), 2) == 2.0
    assert working_set_blocks(torch.ones(8, 8, dtype=torch.bool), 2) == 8.0


@pytest.mark.parametrize(
    ("pattern_type", "swept"),
    [("random", True), ("local_window", False), ("dilated_sparse", False), ("global_local", False)],
)
def test_cache_model_takes_sweep_starts_for_scattered_lists(pattern_type, swept) -> None:
    # 512 query blocks at 0.9, 64 programs resident, a cache of 96 blocks: the resident
    # programs read more blocks than it holds for every pattern. Lists scattered
    # independently of the query (random) hit far more often with sweep starts; lists
    # that follow the query keep the launch order's locality and start at their start.
    from dilated_attention_pytorch.sparse import triton_kernels as tk

    mask = make_block_sparse_pattern(
        pattern_type, 32768, block_size=64, sparsity_ratio=0.9
    ).block_mask
    assert tk.working_set_blocks(mask, 64) > 96
    starts, walks = tk._starts_and_walks(mask, 2, None, 64, 1, 1, 1)
    gain = tk.cache_hit_rate(mask, walks, starts, 64, 1, 96) - tk.cache_hit_rate(
        mask, walks, None, 64, 1, 96
    )
    assert (gain >= 0.2) if swept else (gain < 0.05), gain
    table = tk.Sweep(mask, 2, 1, (None, None)).table("fwd", 64, 1, 1, 1, 96, torch.device("cpu"))
    assert (table is not None) == swept
    if swept:
        assert torch.equal(table, starts)


@pytest.mark.parametrize(
    ("pattern_type", "N", "block_size", "resident", "capacity", "swept"),
    [
        # dilated_sparse at N = 512K (4096 blocks): the model gains 13 points with sweep
        # starts, but walking in order already hits 68% of the time and the starts leave
        # 58% of the misses. On an H100 (N = 512K, D = 128) such starts ran 2% slower.
        ("dilated_sparse", 524288, 128, 132, 100, False),
        # random with a cache that holds more of its blocks: 74% hits in order, and the
        # starts leave 37% of the misses (random at D = 64 and N = 128K, where the model
        # gives 76-78% in order, gained on an H200).
        ("random", 32768, 64, 128, 256, True),
    ],
)
def test_cache_model_needs_most_reads_missing_or_most_misses_gone(
    pattern_type, N, block_size, resident, capacity, swept
) -> None:
    # Sweep starts gaining at least 5 points are taken only where most in-order reads
    # miss, or where the starts at least halve the misses.
    from dilated_attention_pytorch.sparse import triton_kernels as tk

    mask = make_block_sparse_pattern(
        pattern_type, N, block_size=block_size, sparsity_ratio=0.9
    ).block_mask
    starts, walks = tk._starts_and_walks(mask, 1, None, resident, 1, 1, 1)
    in_order = tk.cache_hit_rate(mask, walks, None, resident, 1, capacity)
    rate = tk.cache_hit_rate(mask, walks, starts, resident, 1, capacity)
    misses_left = (1 - rate) / (1 - in_order)
    assert in_order > tk._MODEL_IN_ORDER and rate - in_order >= tk._MODEL_GAIN, (in_order, rate)
    assert (misses_left <= tk._MODEL_MISSES) == swept, misses_left
    sweep = tk.Sweep(mask, 1, 1, (None, None))
    table = sweep.table("fwd", resident, 1, 1, 1, capacity, torch.device("cpu"))
    assert (table is not None) == swept
    forced = sweep.table("fwd", resident, 1, 1, 1, capacity, torch.device("cpu"), force=True)
    assert torch.equal(forced, starts)


def test_sweep_start_decision_rule() -> None:
    from dilated_attention_pytorch.sparse.triton_kernels import _takes_starts

    assert _takes_starts(0.38, 0.93)  # most reads miss in order
    assert _takes_starts(0.78, 0.95)  # the starts leave 23% of the misses
    assert not _takes_starts(0.63, 0.78)  # 59% of the misses left
    assert not _takes_starts(0.95, 0.99)  # a 4-point gain
    assert not _takes_starts(0.30, 0.33)


@interpreted
def test_kernels_with_no_held_key_blocks() -> None:
    # A ring step may hold no key blocks at all: empty tables, empty lists. The kernels
    # must not read them (rows without keys: output 0, LSE -inf, no gradient).
    from dilated_attention_pytorch.sparse import triton_kernels

    q, dout = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    k = v = torch.empty(1, 0, 2, 16)
    lists = (torch.zeros(2, dtype=torch.int32), torch.zeros(2, 0, dtype=torch.int32))
    t_lists = (torch.zeros(0, dtype=torch.int32), torch.zeros(0, 0, dtype=torch.int32))
    none = torch.empty(0, dtype=torch.int32)
    kw = dict(block_size=16, q_start=16, seq_len=64, scale=0.25, is_causal=True,
              interpreting=True)  # fmt: skip
    out, lse = triton_kernels.sparse_forward_triton(q, k, v, lists, none, none, **kw)
    assert torch.equal(out, torch.zeros_like(q)) and bool((lse == -math.inf).all())
    dq, dk, dv = triton_kernels.sparse_backward_triton(
        dout, q, k, v, out, lse, lists, t_lists, none, none, grad_dtype=torch.float32, **kw
    )
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == dv.shape == k.shape


@interpreted
def test_dropped_blocks_are_never_read() -> None:
    N, bs = 64, 16
    q, k, v = (torch.randn(1, N, 2, 16) for _ in range(3))
    pattern = make_block_sparse_pattern("local_window", N, block_size=bs, window=0)
    k[:, 16:32] = math.nan  # block 1: kept only by query block 1
    v[:, 16:32] = math.inf
    out = block_sparse_attention(q, k, v, pattern, backend="triton")
    assert torch.isfinite(out[:, :16]).all() and torch.isfinite(out[:, 32:]).all()


@interpreted
@pytest.mark.parametrize(
    ("pattern_type", "is_causal", "H_kv"),
    [("local_window", False, 4), ("random", True, 4), ("random", False, 2)],
)
def test_memory_estimate_matches_live_tensor_bytes(pattern_type, is_causal, H_kv) -> None:
    from test_memory_estimate import LiveStorageBytes

    N, bs, B, H, D = 256, 32, 2, 4, 16
    pattern = make_block_sparse_pattern(
        pattern_type, N, block_size=bs, sparsity_ratio=0.6, is_causal=is_causal,
        num_heads=H if pattern_type == "random" else None,
    )  # fmt: skip

    def step() -> None:
        q = torch.randn(B, N, H, D, requires_grad=True)
        k, v = (torch.randn(B, N, H_kv, D, requires_grad=True) for _ in range(2))
        block_sparse_attention(q, k, v, pattern, backend="triton").backward(torch.randn(B, N, H, D))

    step()  # builds the cached index lists, which the estimate counts as held
    with LiveStorageBytes() as tracker:
        step()
    est = block_sparse_memory_estimate(pattern, B, H, D, dtype=torch.float32, num_kv_heads=H_kv)
    lists = est["parts"]["index_lists"]
    # Everything but the lists is allocated inside the tracker (the estimate also counts
    # the int64 lists the cached int32 ones are cast from, < 1% here).
    assert est["bytes_per_device"] - lists <= tracker.peak <= est["bytes_per_device"] * 1.01


def _ring_worker(rank: int, world: int, _: object) -> list[float]:
    # A spawned gloo process: TRITON_INTERPRET=1 is inherited, conftest's patch is not.
    from conftest import patch_triton_interpreter

    patch_triton_interpreter()
    errors = []
    # K/V heads: 2 (as many as query heads) or 1 (grouped-query attention).
    for pattern_type, is_causal, H_kv in [("dilated_sparse", True, 2), ("random", False, 2),
                                          ("random", True, 1)]:  # fmt: skip
        torch.manual_seed(0)  # the same whole tensors on every rank
        q, dout = (torch.randn(2, 128, 2, 16) for _ in range(2))
        k, v = (torch.randn(2, 128, H_kv, 16) for _ in range(2))
        kw = dict(pattern_type=pattern_type, block_size=16, sparsity_ratio=0.6,
                  num_heads=2 if pattern_type == "random" else None)  # fmt: skip
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = BlockSparseAttention(**kw, backend="pytorch")(*leaves, is_causal=is_causal)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        ring = RingBlockSparseAttention(**kw, backend="triton")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ring(*leaves, is_causal=is_causal)
        grads = torch.autograd.grad(out, leaves, dout)
        errors.append(max((a - b).abs().max().item()
                          for a, b in zip([out, *grads], [ref, *ref_grads], strict=True)))  # fmt: skip
    return errors


def _ring_memory_worker(rank: int, world: int, _: object) -> list[tuple[int, int]]:
    from conftest import patch_triton_interpreter
    from test_memory_estimate import LiveStorageBytes

    patch_triton_interpreter()
    peaks = []
    # K/V heads: 2 (as many as query heads) or 1 (grouped-query attention).
    for pattern_type, H_kv in [("local_window", 2), ("random", 2), ("random", 1)]:
        module = RingBlockSparseAttention(pattern_type=pattern_type, block_size=16,
                                          sparsity_ratio=0.6, backend="triton")  # fmt: skip
        B, L, H, D = 2, 64, 2, 16

        def step(module=module, B=B, L=L, H=H, H_kv=H_kv, D=D) -> None:
            q = torch.randn(B, L, H, D, requires_grad=True)
            k, v = (torch.randn(B, L, H_kv, D, requires_grad=True) for _ in range(2))
            module(q, k, v, already_split=True).backward(torch.randn(B, L, H, D))

        step()
        with LiveStorageBytes() as tracker:
            step()
        est = module.get_memory_estimate(L * world, B, H, D, dtype=torch.float32,
                                         num_kv_heads=H_kv)  # fmt: skip
        peaks.append((tracker.peak, est["bytes_per_device"]))
    return peaks


@interpreted
def test_ring_memory_estimate_matches_the_largest_rank() -> None:
    from distributed_utils import spawn

    per_rank = spawn(_ring_memory_worker, 2)
    for i in range(len(per_rank[0])):
        measured = max(rank[i][0] for rank in per_rank)
        estimate = per_rank[0][i][1]
        assert estimate == pytest.approx(measured, rel=0.01), (i, estimate, measured)


@interpreted
def test_ring_runs_the_triton_kernels_on_held_blocks() -> None:
    from distributed_utils import spawn

    for rank_errors in spawn(_ring_worker, 2):
        assert max(rank_errors) < 2e-5, rank_errors


def test_triton_backend_says_why_it_cannot_run() -> None:
    q = torch.randn(1, 64, 2, 16)
    pattern = make_block_sparse_pattern("local_window", 64, block_size=16, window=1)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*no dropout"):
        block_sparse_attention(q, q, q, pattern, backend="triton", dropout_p=0.1)
    odd = make_block_sparse_pattern("local_window", 60, block_size=12, window=1)
    q = torch.randn(1, 60, 2, 24)
    with pytest.raises(ValueError, match=r"power-of-two block size >= 16, got 12.*head dim"):
        block_sparse_attention(q, q, q, odd, backend="triton")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        RingBlockSparseAttention(pattern_type="local_window", backend="flex")
    if INTERPRETING:  # Triton 3.6's interpreter mis-computes bfloat16 dots: refused
        q = torch.randn(1, 64, 2, 16, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"cannot run bfloat16 .*use float32 or float16"):
            block_sparse_attention(q, q, q, pattern, backend="triton")
        out = block_sparse_attention(q, q, q, pattern)  # auto: the pytorch path
        assert out.dtype == torch.bfloat16


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_operators_on_the_triton_kernels(dtype) -> None:
    # The operators' fakes must give the real dtypes on the Triton path too (its kernels
    # return q.dtype; the operator returns the compute dtype, as on the pytorch path).
    from dilated_attention_pytorch.sparse.ops import _backward, _forward, pattern_spec

    spec = pattern_spec("local_window", block_size=16, sparsity_ratio=0.5)
    q, k, v = (torch.randn(1, 64, 2, 16).to(dtype) for _ in range(3))
    args = (spec, True, 0.3, 0.0, torch.zeros(1, dtype=torch.long), "triton")
    torch.library.opcheck(_forward, (q, k, v, *args))
    out, lse = _forward(q, k, v, *args)
    torch.library.opcheck(_backward, (torch.randn_like(out), q, k, v, out, lse, *args))
