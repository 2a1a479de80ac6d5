"""Grouped-query attention and packed documents, side by side with what users do without them.

    python benchmarks/bench_gqa_packed.py --out benchmarks/results     # GPU, bf16
    python benchmarks/bench_gqa_packed.py --cpu --out /tmp/bench       # small, float32

Forward + backward of causal ``dilated_attention`` (median of many runs, peak memory of
one call, the method's own inputs and gradients included):

- **GQA**: ``H`` query heads on ``H_kv`` K/V heads, against the same call after repeating
  K/V to ``H`` heads (``repeat_interleave``, as models without GQA support do; the repeat
  is timed and counted); on CUDA also dense SDPA with ``enable_gqa=True``.
- **Packed documents**: documents of a seeded log-uniform length distribution packed into
  one row with ``cu_seqlens``, against the same documents as a padded batch with a key
  padding mask; on CUDA also dense causal attention over the documents through PyTorch's
  jagged nested tensors (its varlen path). For reference, the same tokens as one sequence
  (documents then attend across boundaries: not an alternative, but what packing should
  cost).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from measure import measure, result_path, stamp, write_json

from dilated_attention_pytorch import dilated_attention


def _grad_step(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for t in inputs:
            t.grad = None
        fn().float().square().mean().backward()

    return step


def _leaf(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


def document_lengths(total: int, low: int, high: int, seed: int = 0) -> list[int]:
    """Lengths drawn log-uniformly in ``[low, high]`` until they fill ``total`` tokens (the
    last one cut to fit)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        u = float(torch.rand((), generator=gen))
        n = int(round(math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def gqa_rows(args: argparse.Namespace, device, dtype, ws, rs) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for N in args.seq_lens:
        rows += _gqa_case(N, args, device, dtype, ws, rs)
    return rows


def _gqa_case(N: int, args: argparse.Namespace, device, dtype, ws, rs) -> list[dict[str, Any]]:
    H, H_kv, D = args.heads, args.kv_heads, args.head_dim
    g = H // H_kv
    q = _leaf(1, N, H, D, device=device, dtype=dtype)
    k, v = (_leaf(1, N, H_kv, D, device=device, dtype=dtype) for _ in range(2))

    def repeated() -> torch.Tensor:
        kr, vr = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        return dilated_attention(q, kr, vr, ws, rs, is_causal=True)

    def dense() -> torch.Tensor:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "dilated, GQA": lambda: dilated_attention(q, k, v, ws, rs, is_causal=True),
        "dilated, K/V repeated": repeated,
    }
    if device.type == "cuda" and N <= args.dense_max:
        runs["dense SDPA, enable_gqa"] = dense
    rows = []
    for name, fn in runs.items():
        m = measure(_grad_step(fn, [q, k, v]), device)
        rows.append({"case": "gqa", "method": name, "N": N, "heads": H, "kv_heads": H_kv,
                     "ms": m.ms, "peak_bytes": m.peak_bytes, "reps": m.reps})  # fmt: skip
        _print(rows[-1], f"N={N}")
    return rows


def packed_rows(args: argparse.Namespace, device, dtype, ws, rs) -> list[dict[str, Any]]:
    lengths = document_lengths(args.packed_tokens, args.doc_min, args.doc_max)
    total, B, longest = sum(lengths), len(lengths), max(lengths)
    H, D = args.heads, args.head_dim
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    pad_mask = (
        torch.arange(longest, device=device)[None, :]
        >= torch.tensor(lengths, device=device)[:, None]
    )

    def packed() -> list[torch.Tensor]:
        return [_leaf(1, total, H, D, device=device, dtype=dtype) for _ in range(3)]

    def padded() -> list[torch.Tensor]:
        return [_leaf(B, longest, H, D, device=device, dtype=dtype) for _ in range(3)]

    def nested() -> list[torch.Tensor]:  # (B, H, j, D) jagged
        return [
            torch.nested.nested_tensor_from_jagged(t[0].detach(), offsets=cu)
            .transpose(1, 2)
            .requires_grad_()
            for t in packed()
        ]

    # name -> (inputs, attention of those inputs). Each method's inputs are made just
    # before it runs and freed after, so that its peak memory counts its own alone.
    runs: dict[str, tuple[Callable[[], list[torch.Tensor]], Callable[..., torch.Tensor]]] = {
        "dilated, packed (cu_seqlens)": (
            packed,
            lambda q, k, v: dilated_attention(q, k, v, ws, rs, is_causal=True, cu_seqlens=cu),
        ),
        "dilated, padded batch + mask": (
            padded,
            lambda q, k, v: dilated_attention(
                q, k, v, ws, rs, is_causal=True, key_padding_mask=pad_mask
            ),
        ),
        # Not an alternative (documents would attend across boundaries): the cost of the
        # same tokens as one sequence, what packing should match.
        "dilated, one sequence (reference)": (
            packed,
            lambda q, k, v: dilated_attention(q, k, v, ws, rs, is_causal=True),
        ),
    }
    if device.type == "cuda":
        # What backend="auto" avoids on a GPU: the pytorch backend, one call per document.
        runs["dilated, packed, pytorch backend"] = (
            packed,
            lambda q, k, v: dilated_attention(
                q, k, v, ws, rs, is_causal=True, cu_seqlens=cu, backend="pytorch"
            ),
        )
        runs["dense SDPA, nested varlen"] = (
            nested,
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).values(),
        )
    rows = []
    for name, (make, attend) in runs.items():
        inputs = make()
        step = _grad_step(partial(attend, *inputs), inputs)
        del inputs  # held by step alone
        try:
            m = measure(step, device)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no nested kernel here
            print(f"{name}: skipped ({str(exc).splitlines()[0][:120]})")
            continue
        finally:
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append({"case": "packed", "method": name, "tokens": total, "documents": B,
                     "longest": longest, "padded_tokens": B * longest, "ms": m.ms,
                     "peak_bytes": m.peak_bytes, "reps": m.reps})  # fmt: skip
        _print(rows[-1], f"{B} docs")
    return rows


def _print(row: dict[str, Any], what: str) -> None:
    mem = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f} MiB"
    print(f"{row['case']:>7} {what:>10} {row['method']:>30} {row['ms']:>10.2f} ms {mem:>12}",
          flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_gqa_packed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    if cpu:
        dtype, base, branches = torch.float32, 256, 3
        args.heads, args.kv_heads, args.head_dim = 8, 2, 32
        args.seq_lens = args.seq_lens or [4096]
        args.packed_tokens, args.doc_min, args.doc_max, args.dense_max = 8192, 64, 2048, 0
    else:
        dtype, base, branches = torch.bfloat16, 2048, 5
        args.heads, args.kv_heads, args.head_dim = 32, 8, 128
        args.seq_lens = args.seq_lens or [65536, 262144]
        args.packed_tokens, args.doc_min, args.doc_max = 262144, 1024, 65536
        args.dense_max = 65536
    ws = [base * 2**i for i in range(branches)]
    rs = [2**i for i in range(branches)]
    report: dict[str, Any] = {
        **stamp(device, argv=argv, script=None if argv is None else os.path.relpath(__file__)),
        "dtype": str(dtype).removeprefix("torch."),
        "segment_lengths": ws,
        "dilation_rates": rs,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "timing": "median forward+backward ms of causal attention; peak bytes of one call",
        "rows": [],
    }
    print(f"device: {report['device']}, torch {torch.__version__}, {dtype}, H={args.heads}, "
          f"H_kv={args.kv_heads}, D={args.head_dim}")  # fmt: skip
    report["rows"] += gqa_rows(args, device, dtype, ws, rs)
    report["rows"] += packed_rows(args, device, dtype, ws, rs)
    if args.out is not None:
        print("wrote", write_json(result_path(args.out, "gqa_packed", device), report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
