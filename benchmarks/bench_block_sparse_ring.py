"""Block-sparse ring attention: bytes each rank moves and time, against the dense ring.

Launched by torchrun, one process per rank (NCCL on GPUs, gloo with ``--cpu``):

    torchrun --nproc_per_node=4 benchmarks/bench_block_sparse_ring.py --out benchmarks/results
    torchrun --nproc_per_node=4 benchmarks/bench_block_sparse_ring.py --cpu --out benchmarks/results

Weak scaling: every rank holds ``--tokens-per-rank`` tokens, rings of ``k = 1, 2, 4, ..``
ranks up to the world run side by side (``N = k * tokens``). For each pattern at
``--sparsity`` a forward+backward of :class:`RingBlockSparseAttention` (shards passed,
``already_split=True``), and the dense ring (:class:`StandardRingAttention` with
``segment_lengths=[N]``) on the same shards. Columns: bytes sent and received per rank
in the step (the largest rank; from the modules' :class:`RingStats`), time (median,
maximum over ranks), and the block-sparse ring's speedup over the dense ring.

At a fixed sparsity the kept pairs grow like ``N^2``, so a pattern's bytes per rank
grow with ``k``; the extra row ``local_window(window=W)`` keeps ``W`` blocks each side
whatever ``N`` (linear work): it needs only its neighbours' blocks, so its bytes per
rank are bounded (``W`` blocks to each of at most two neighbours, and their gradients
back) however many ranks are added, while the dense ring's grow with ``N``. Prints a table and
writes ``block_sparse_ring_<device>_<W>rank_<date>.json`` (device, date, versions, command).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from bench_ring import max_over, print_table
from measure import measure, result_path, stamp, write_json

from dilated_attention_pytorch import RingBlockSparseAttention, StandardRingAttention
from dilated_attention_pytorch.distributed.comm import RingStats


def _step(module, tensors, dout):
    def run() -> None:
        for t in tensors:
            t.grad = None
        module(*tensors, already_split=True).backward(dout)

    return run


def _point(module, shape, dtype, device, reps: int) -> dict[str, Any]:
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=dtype)
    stats = RingStats()
    module._stats = stats
    step = _step(module, [q, k, v], dout)
    step()  # validation and compilation outside the counted step
    stats.bytes_sent = stats.bytes_received = 0
    step()
    sent, received = stats.bytes_sent, stats.bytes_received
    module._stats = None
    m = measure(step, device, reps=reps)  # reps fixed: every rank runs as often
    return {
        "ms": max_over(m.ms, device),
        "bytes_sent": int(max_over(float(sent), device)),
        "bytes_received": int(max_over(float(received), device)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU, small sizes")
    parser.add_argument("--tokens-per-rank", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument(
        "--patterns", nargs="+", default=["local_window", "dilated_sparse", "random"]
    )
    parser.add_argument(
        "--window",
        type=int,
        default=2,
        help="also a local_window of this many blocks each side, whatever N",
    )
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        sys.exit("launch with torchrun --nproc_per_node=K (add --cpu on a machine without GPUs)")
    use_cuda = torch.cuda.is_available() and not args.cpu
    if not use_cuda and not args.cpu:
        sys.exit("no GPU found: pass --cpu to run the gloo version with small sizes")
    if args.cpu:
        args.tokens_per_rank = min(args.tokens_per_rank, 1024)
        args.heads, args.head_dim, args.block_size = min(args.heads, 4), 32, 64
        args.reps = min(args.reps, 3)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=240))
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    world = dist.get_world_size()
    rank = dist.get_rank()
    report: dict[str, Any] = {**stamp(device), "config": {**vars(args), "dtype": str(dtype)}}
    path = result_path(args.out, "block_sparse_ring", device, f"{world}rank")
    rows: list[dict[str, Any]] = []
    sizes = [k for k in (1, 2, 4, 8, 16) if k <= world and world % k == 0]
    L, H, D = args.tokens_per_rank, args.heads, args.head_dim
    for k in sizes:
        N = L * k
        dense = _point(StandardRingAttention([N], [1], ring_size=k), (1, L, H, D), dtype,
                       device, args.reps)  # fmt: skip
        rows.append({"method": "dense ring", "pattern": "-", "ring_size": k, "seq_len": N,
                     **dense, "speedup_vs_dense_ring": 1.0})  # fmt: skip
        for pattern_type in [*args.patterns, "fixed_window"]:
            if pattern_type == "fixed_window":
                # A window of fixed width: linear work, bytes per rank flat in k.
                module = RingBlockSparseAttention(
                    pattern_type="local_window", sparsity_ratio=None,
                    pattern_knobs={"window": args.window},
                    block_size=args.block_size, ring_size=k,
                )  # fmt: skip
                pattern_type = f"local_window(window={args.window})"
            else:
                module = RingBlockSparseAttention(
                    pattern_type=pattern_type, sparsity_ratio=args.sparsity,
                    block_size=args.block_size, ring_size=k,
                    num_heads=H if pattern_type == "random" else None,
                )  # fmt: skip
            point = _point(module, (1, L, H, D), dtype, device, args.reps)
            rows.append({
                "method": "block-sparse ring", "pattern": pattern_type, "ring_size": k,
                "seq_len": N, "sparsity": module.pattern(N).sparsity_ratio, **point,
                "speedup_vs_dense_ring": dense["ms"] / point["ms"],
            })  # fmt: skip
        report["rows"] = rows
        if rank == 0:
            write_json(path, report)
    if rank == 0:
        cols = ["method", "pattern", "ring_size", "seq_len", "sparsity", "bytes_sent",
                "bytes_received", "ms", "speedup_vs_dense_ring"]  # fmt: skip
        print_table(f"block-sparse ring vs dense ring, {L} tokens per rank", rows, cols)
        print(f"\nwrote {write_json(path, report)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
