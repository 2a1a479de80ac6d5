"""Block-sparse attention on one GPU: our backends side by side with dense cuDNN SDPA.

    python benchmarks/bench_block_sparse.py --out benchmarks/results
    python benchmarks/bench_block_sparse.py --cpu          # smoke test, tiny sizes
    python benchmarks/bench_block_sparse.py --tune         # tile sizes of the Triton kernels

For every pattern, sparsity ratio, sequence length and head dim (bf16, B=1, H=16;
``--kv-heads`` gives k, v fewer heads, grouped-query attention, dense with ``enable_gqa``):
forward and forward+backward time (median, CUDA events) and peak memory of

- ``triton``: ``block_sparse_attention(..., backend="triton")`` (our kernels walking
  per-query-block lists of kept key blocks, and the transposed lists for dK/dV),
- ``triton-in-order`` (only when asked for): the same kernels with every list walked
  from its first block (``triton_kernels.SWEEP["enabled"] = False``), the order before
  sweep starts, side by side,
- ``flex``: ``backend="flex"`` (PyTorch's compiled FlexAttention with the pattern as
  its ``BlockMask``, the same kept blocks),
- ``pytorch``: ``backend="pytorch"`` (kept blocks gathered, matmuls), only up to
  ``--pytorch-max-tokens`` (it is the portable path, not the fast one),
- ``dense``: ``F.scaled_dot_product_attention`` on the same tensors (cuDNN on Hopper),
  the whole ``N x N`` attention, once per (N, D, causal).

Columns: ms (median of calls timed one at a time, each synchronised: for calls of a
few milliseconds or less this includes the host work before the first kernel),
``ms_streamed`` (mean over the same number of calls queued back to back, the host
running ahead as in training), TFLOP/s over the kept pairs (``4 * D`` per pair forward, 3.5x that
forward+backward), peak memory (inputs included; each pattern's cached lists only)
next to ``block_sparse_memory_estimate``, speedup over dense, for ``triton`` its
speedup over ``flex`` on the same row (by ``ms``, and ``streamed_vs_flex`` by
``ms_streamed``), and ``swept``: the Triton kernels that started
their walks at sweep starts (``-``: none, the pattern's blocks fit in the L2 cache).
Prints a table, writes ``block_sparse_<device>_<date>.json`` (device, date, versions,
command) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from bench_ring import print_table
from measure import GiB, measure, result_path, stamp, time_ms_streamed, write_json

from dilated_attention_pytorch import block_sparse_attention, make_block_sparse_pattern
from dilated_attention_pytorch.sparse import PATTERN_TYPES, block_sparse_memory_estimate
from dilated_attention_pytorch.sparse.functional import clear_sparse_caches


def _step(fn, tensors, dout, backward: bool):
    def run() -> None:
        for t in tensors:
            t.grad = None
        out = fn(*tensors)
        if backward:
            out.backward(dout)

    return run


def _swept() -> list[str]:
    """The Triton kernels that ran with sweep starts for the cached patterns."""
    from dilated_attention_pytorch.sparse.functional import _SCHEDULES

    return sorted({key[0] for _, sweep in _SCHEDULES.values()
                   for key, table in sweep._tables.items() if table is not None})  # fmt: skip


def _tflops(pairs: int, D: int, H: int, ms: float, backward: bool) -> float:
    flop = 4 * D * pairs * H * (3.5 if backward else 1.0)
    return flop / (ms * 1e-3) / 1e12


def _versus_flex(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Set ``triton_vs_flex`` (flex ms / triton ms) on whichever of the pair comes second."""
    key = ("pattern", "seq_len", "head_dim", "backward", "sparsity")
    for other in rows:
        if all(other[c] == row[c] for c in key) and {other["method"], row["method"]} == {
            "triton",
            "flex",
        }:
            t, f = (row, other) if row["method"] == "triton" else (other, row)
            if "ms" in t and "ms" in f:
                t["triton_vs_flex"] = f["ms"] / t["ms"]
                t["streamed_vs_flex"] = f["ms_streamed"] / t["ms_streamed"]


_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 4),
            (128, 128, 8, 2), (64, 128, 4, 3), (128, 128, 8, 4)],
    "dkdv": [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (32, 64, 4, 3),
             (64, 128, 8, 2), (128, 64, 8, 3), (64, 128, 8, 4), (64, 128, 8, 5)],
    "dq": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 8, 3),
           (128, 64, 4, 3), (128, 64, 8, 4)],
}  # fmt: skip


def _tune(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Each kernel's candidate tiles in turn, the others at their best so far, on the first
    of ``--patterns`` (default ``local_window``), ``--tokens`` and ``--ratios``."""
    from dilated_attention_pytorch.sparse.triton_kernels import TILE_CONFIGS

    N, ratio, rows = args.tokens[0], args.ratios[0], []
    report: dict[str, Any] = {**stamp(device), "config": {**vars(args), "dtype": str(dtype)}}
    for D in args.head_dims:
        q, k, v, dout = (torch.randn(1, N, args.heads, D, device=device, dtype=dtype)
                         for _ in range(4))  # fmt: skip
        leaves = [t.requires_grad_() for t in (q, k, v)]
        pattern = make_block_sparse_pattern(args.patterns[0], N, block_size=args.block_size,
                                            sparsity_ratio=ratio, is_causal=args.causal)  # fmt: skip

        def fn(a, b, c, pattern=pattern):
            return block_sparse_attention(a, b, c, pattern, backend="triton")

        for kernel, candidates in _CANDIDATES.items():
            best = None
            for cand in candidates:
                TILE_CONFIGS[kernel][D] = cand
                row = {"pattern": args.patterns[0], "head_dim": D, "kernel": kernel,
                       "tiles": str(cand)}  # fmt: skip
                try:
                    m = measure(_step(fn, leaves, dout, kernel != "fwd"), device)
                    row["ms"] = m.ms
                    if best is None or m.ms < best[0]:
                        best = (m.ms, cand)
                except Exception:  # noqa: BLE001 (a candidate that does not compile)
                    row["error"] = traceback.format_exc(limit=1)[-200:]
                rows.append(row)
            if best is not None:
                TILE_CONFIGS[kernel][D] = best[1]
                rows.append({"pattern": args.patterns[0], "head_dim": D, "kernel": kernel,
                             "tiles": f"best {best[1]}", "ms": best[0]})  # fmt: skip
        del q, k, v, dout, leaves
    report["rows"] = rows
    print_table("Triton block-sparse kernels: tile candidates (fwd: forward ms; dkdv, dq: "
                "forward+backward ms)", rows, ["pattern", "head_dim", "kernel", "tiles", "ms"])  # fmt: skip
    print(f"\nwrote {write_json(result_path(args.out, 'block_sparse_tune', device), report)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cpu", action="store_true", help="smoke test on the CPU, tiny sizes")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.9, 0.97])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERN_TYPES))
    parser.add_argument("--causal", action="store_true", help="causal patterns and dense")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="K/V heads (grouped-query attention; default: --heads)")  # fmt: skip
    parser.add_argument("--pytorch-max-tokens", type=int, default=32768)
    parser.add_argument("--dense-max-tokens", type=int, default=None,
                        help="skip dense SDPA above this length (no speedup column there)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=["triton", "flex", "pytorch"])
    parser.add_argument("--tag", default=None, help="extra word in the JSON file's name")
    parser.add_argument("--tune", action="store_true",
                        help="time candidate tile sizes of each Triton kernel (the first "
                             "--patterns, --tokens and --ratios) and print the fastest")  # fmt: skip
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available() and not args.cpu
    if not use_cuda and not args.cpu:
        sys.exit("no GPU found: pass --cpu for the smoke test (tiny sizes)")
    if args.cpu:
        args.tokens, args.head_dims, args.ratios, args.block_size = [512], [16], [0.9], 32
        args.pytorch_max_tokens = 512
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    methods = args.methods if use_cuda else ["pytorch"]
    report: dict[str, Any] = {**stamp(device), "config": {**vars(args), "dtype": str(dtype)}}
    tags = [t for t in (args.tag, "causal" if args.causal else None) if t]
    path = result_path(args.out, "block_sparse", device, *tags)
    rows: list[dict[str, Any]] = []
    H, causal = args.heads, args.causal
    H_kv = H if args.kv_heads is None else args.kv_heads
    if H % H_kv:
        sys.exit(f"--kv-heads {H_kv} must divide --heads {H}")
    if H_kv != H:
        tags.append(f"kv{H_kv}")
        path = result_path(args.out, "block_sparse", device, *tags)
    if args.tune:
        return _tune(args, device, dtype)
    for N in args.tokens:
        for D in args.head_dims:
            q, dout = (torch.randn(1, N, H, D, device=device, dtype=dtype) for _ in range(2))
            k, v = (torch.randn(1, N, H_kv, D, device=device, dtype=dtype) for _ in range(2))
            leaves = [t.requires_grad_() for t in (q, k, v)]
            dense_ms = {}
            for backward in (False, True):
                if args.dense_max_tokens is not None and N > args.dense_max_tokens:
                    dense_ms[backward] = None
                    continue

                def dense(a, b, c):
                    return F.scaled_dot_product_attention(
                        a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2),
                        is_causal=causal, enable_gqa=H_kv != H,
                    ).transpose(1, 2)  # fmt: skip

                step = _step(dense, leaves, dout, backward)
                m = measure(step, device)
                pairs = N * (N + 1) // 2 if causal else N * N
                dense_ms[backward] = m.ms
                rows.append({
                    "method": "dense", "pattern": "-", "seq_len": N, "head_dim": D,
                    "backward": backward, "sparsity": 0.0, "ms": m.ms,
                    "ms_streamed": time_ms_streamed(step, device, reps=m.reps),
                    "tflops": _tflops(pairs, D, H, m.ms, backward),
                    "peak_gib": None if m.peak_bytes is None else m.peak_bytes / GiB,
                    "speedup_vs_dense": 1.0,
                })  # fmt: skip
            for pattern_type in args.patterns:
                for ratio in args.ratios:
                    pattern = make_block_sparse_pattern(
                        pattern_type, N, block_size=args.block_size, sparsity_ratio=ratio,
                        is_causal=causal,
                    )  # fmt: skip
                    pairs = pattern.kept_pairs()
                    for method in methods:
                        if method == "pytorch" and N > args.pytorch_max_tokens:
                            continue
                        backend = method.split("-")[0]  # triton-in-order: triton
                        for backward in (False, True):

                            def fn(a, b, c, pattern=pattern, method=method, backend=backend):
                                if backend == "triton":
                                    # The backward reads the flag too (it runs after fn).
                                    from dilated_attention_pytorch.sparse import triton_kernels

                                    triton_kernels.SWEEP["enabled"] = method == "triton"
                                return block_sparse_attention(a, b, c, pattern, backend=backend)

                            row = {
                                "method": method, "pattern": pattern_type, "seq_len": N,
                                "head_dim": D, "backward": backward,
                                "sparsity": pattern.sparsity_ratio,
                            }  # fmt: skip
                            try:
                                # Peaks of this pattern only, not of earlier patterns' lists.
                                clear_sparse_caches()
                                step = _step(fn, leaves, dout, backward)
                                m = measure(step, device)
                                row.update(
                                    ms=m.ms,
                                    ms_streamed=time_ms_streamed(step, device, reps=m.reps),
                                    tflops=_tflops(pairs, D, H, m.ms, backward),
                                    peak_gib=None if m.peak_bytes is None else m.peak_bytes / GiB,
                                    speedup_vs_dense=None
                                    if dense_ms[backward] is None
                                    else dense_ms[backward] / m.ms,
                                )
                                if backend == "triton":
                                    row["swept"] = ",".join(_swept()) or "-"
                                if method != "pytorch" and backward:
                                    # A training step, as the estimate counts it.
                                    est = block_sparse_memory_estimate(
                                        pattern, 1, H, D, dtype=dtype, backend=backend,
                                        num_kv_heads=H_kv,
                                    )  # fmt: skip
                                    row["estimate_gib"] = est["total_per_device_gb"]
                            except Exception:  # noqa: BLE001 (recorded, the sweep goes on)
                                row["error"] = traceback.format_exc(limit=2)[-300:]
                            _versus_flex(rows, row)
                            rows.append(row)
                            report["rows"] = rows
                            write_json(path, report)
            del q, k, v, dout, leaves
    cols = ["method", "pattern", "seq_len", "head_dim", "backward", "sparsity", "ms",
            "ms_streamed", "tflops", "peak_gib", "estimate_gib", "speedup_vs_dense",
            "triton_vs_flex", "streamed_vs_flex", "swept"]  # fmt: skip
    print_table("block-sparse attention", rows, cols)
    print(f"\nwrote {write_json(path, report)}")


if __name__ == "__main__":
    main()
