"""Ring dilated attention on several GPUs: correctness, scaling, and dense ring vs context parallel.

One run per machine, launched by torchrun (NCCL, one GPU per rank):

    torchrun --nproc_per_node=2 benchmarks/bench_ring.py --out benchmarks/results

Sections (each rank of the world takes part; sub-groups of size k < world run side
by side, as a data-parallel dimension would):

1. ``correctness``: ring in bf16 on the whole world vs single-GPU ``dilated_attention``
   in bf16, both against a float32 single-GPU reference, for the output and dq/dk/dv.
   Rule (flash-attention's): ring error <= 2 x single-GPU bf16 error + 1e-5.
2. ``weak_scaling``: fixed tokens per GPU, ``N = T * k`` for ring sizes k = 1, 2, 4, ..;
   LongNet schedule whose largest segment is the whole sequence; forward+backward time
   and peak memory per GPU. ``--backend triton`` runs the ring's blocks on the Triton
   kernels here and in sections 1 and 3 (default ``auto``: the pytorch backend's
   cuDNN/flash blocks).
3. ``memory_scaling``: fixed global N on k = 1, 2, 4, .. GPUs: peak memory per GPU.
4. ``dense_vs_context_parallel``: dense ring (``segment_lengths=[N]``) vs PyTorch's
   ``context_parallel`` (SDPA flash, allgather and alltoall rotation) at the same shapes.
5. ``validation_cost``: the ring module's collective input check (one ``all_gather``
   and a host sync) on every call (``validate="always"``) vs once per input signature
   (``validate="once"``, the default), forward+backward over the whole world, and the
   check alone.
6. ``error_vs_ring_size``: the error of out/dq/dk/dv against a higher-precision
   single-device reference for ring sizes 1, 2, 4, .. (bf16 vs float32 on GPUs, float32
   vs float64 on gloo): it must not grow with the ring size. On the CPU, e.g.
   ``torchrun --nproc_per_node=16 benchmarks/bench_ring.py --cpu --sections
   error_vs_ring_size`` simulates rings of up to 16 ranks.

FLOPs: the attention pairs the plan actually computes (per branch, head group and
segment) times ``4 * D`` for the forward; forward+backward counts ``3.5x`` that
(the backward does 5 of the forward's 2 matmuls per pair, as flash-attention counts):
``dilated_attention_pytorch.plan.attention_flops``. Time (median of ``--iters`` runs
after ``--warmup``, CUDA events), peak memory (on CUDA everything allocated, inputs
included; on the CPU what a step adds to the resident memory) and the JSON stamp come from ``benchmarks/measure.py``; time and memory are the
maximum over ranks.

Prints a table and writes ``ring_<device>_<N>gpu_<date>.json`` (device, date,
versions, command, results) into ``--out``; the file is rewritten after each section.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from measure import (
    FLOP_CONVENTION,
    Measurement,
    MiB,
    PeakMemory,
    dense_flops,
    dilated_flops,
    measure,
    result_path,
    stamp,
    tflops,
    write_json,
)

from dilated_attention_pytorch import (
    RingDilatedAttention,
    dilated_attention,
    ring_dilated_attention,
)
from dilated_attention_pytorch.distributed.validation import check_ring_call

Tensor = torch.Tensor


# --------------------------------------------------------------------------- helpers


def longnet_schedule(seq_len: int, base: int, ring_size: int = 1) -> tuple[list[int], list[int]]:
    """Segments ``base * 4**i`` below ``seq_len`` plus ``seq_len`` itself, ``r = w / base``.

    ``w / r = base`` for every branch (LongNet keeps it bounded), so the cost per
    token stays constant as the sequence grows. With ``ring_size = k > 1`` only the
    segments a ring of ``k`` can shard are kept (with ``L = seq_len / k``: ``w <= L``
    dividing ``L``, or ``w > L`` a multiple of ``L``); for powers of two that is all of
    them, for e.g. 24M tokens on 4 ranks the 8M segment goes.
    """
    L = seq_len // ring_size
    segments = []
    w = base
    while w < seq_len:
        if ring_size == 1 or (L % w == 0 if w <= L else w % L == 0):
            segments.append(w)
        w *= 4
    segments.append(seq_len)
    return segments, [max(1, s // base) for s in segments]


def max_over(value: float, device: torch.device, group: dist.ProcessGroup | None = None) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def count_live(device: torch.device) -> bool:
    # CUDA: all that is allocated, inputs included. CPU (the gloo smoke test): what the
    # step adds to the process's resident memory, which would otherwise be mostly libraries.
    return device.type == "cuda"


def timed(step: Callable[[], None], device: torch.device, args: argparse.Namespace) -> Measurement:
    """``measure`` with the same number of runs on every rank (the steps are collective)."""
    return measure(step, device, reps=args.iters, warmup=args.warmup, count_live=count_live(device))


def fwd_bwd_step(
    fn: Callable[..., Tensor], tensors: list[Tensor], dout: Tensor
) -> Callable[[], None]:
    def step() -> None:
        for t in tensors:
            t.grad = None
        fn(*tensors).backward(dout)

    return step


def output_and_grads(
    fn: Callable[..., Tensor],
    inputs: list[Tensor],
    grad_out: Tensor,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """``[out, *grads of inputs]`` of ``fn`` on fresh leaves, in ``dtype``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach().to(dtype), *(t.grad.to(dtype) for t in leaves)]


def partition_groups(world_size: int, k: int) -> tuple[dist.ProcessGroup, list[list[int]]]:
    """Split the world into ``world_size / k`` groups of ``k`` consecutive ranks; return mine."""
    rank = dist.get_rank()
    mine = None
    parts = [list(range(i, i + k)) for i in range(0, world_size, k)]
    for ranks in parts:  # every rank must create every group, in the same order
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    assert mine is not None
    return mine, parts


# --------------------------------------------------------------------------- sections


def correctness(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    N = args.check_tokens
    L = N // world_size
    segments, rates = longnet_schedule(N, args.base)
    shape = (args.batch, N, args.heads, args.head_dim)
    rows = []
    for causal in (False, True):
        gen = torch.Generator(device=device).manual_seed(1234 + causal)
        q, k, v, dout = (torch.randn(shape, generator=gen, device=device) for _ in range(4))
        kw = {"is_causal": causal}

        grads = output_and_grads

        ref = grads(
            lambda a, b, c, kw=kw: dilated_attention(a, b, c, segments, rates, **kw),
            [q, k, v],
            dout,
        )
        bf = [t.to(torch.bfloat16) for t in (q, k, v, dout)]
        single = grads(
            lambda a, b, c, kw=kw: dilated_attention(a, b, c, segments, rates, **kw), bf[:3], bf[3]
        )
        local = slice(rank * L, (rank + 1) * L)
        ring = grads(
            lambda a, b, c, kw=kw: ring_dilated_attention(
                a, b, c, segments, rates, backend=args.backend, **kw
            ),
            [t[:, local] for t in bf[:3]],
            bf[3][:, local].contiguous(),
        )
        for name, r_ring, r_single, r_ref in zip(
            ("out", "dq", "dk", "dv"), ring, single, ref, strict=True
        ):
            err_ring = max_over((r_ring - r_ref[:, local]).abs().max().item(), device)
            err_single = (r_single - r_ref).abs().max().item()
            rows.append(
                {
                    "causal": causal,
                    "tensor": name,
                    "seq_len": N,
                    "world_size": world_size,
                    "segment_lengths": segments,
                    "dilation_rates": rates,
                    "max_err_ring_bf16": err_ring,
                    "max_err_single_gpu_bf16": err_single,
                    "max_abs_reference": r_ref.abs().max().item(),
                    "ok": err_ring <= 2 * err_single + 1e-5,
                }
            )
        del q, k, v, dout, ref, single, ring, bf
    return rows


def ring_point(
    args: argparse.Namespace,
    device: torch.device,
    seq_len: int,
    k: int,
    causal: bool,
    layout: str = "contiguous",
) -> dict[str, Any]:
    """Forward+backward of ring dilated attention over groups of ``k`` ranks (shards in
    ``layout``; the inputs are random, so which tokens a shard holds does not matter)."""
    world_size = dist.get_world_size()
    group, parts = partition_groups(world_size, k)
    L = seq_len // k
    segments, rates = longnet_schedule(seq_len, args.base)
    shape = (args.batch, L, args.heads, args.head_dim)
    q, kk, v = (
        torch.randn(shape, device=device, dtype=args.dtype, requires_grad=True) for _ in range(3)
    )
    dout = torch.randn(shape, device=device, dtype=args.dtype)

    def fn(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return ring_dilated_attention(
            a, b, c, segments, rates, group=group, is_causal=causal, layout=layout,
            backend=args.backend,
        )  # fmt: skip

    m = timed(fwd_bwd_step(fn, [q, kk, v], dout), device, args)
    ms = max_over(m.ms, device)
    peak = None if m.peak_bytes is None else max_over(m.peak_bytes / MiB, device)
    flops = dilated_flops(
        segments, rates, args.heads, seq_len, args.head_dim,
        batch=args.batch, is_causal=causal, backward=True,
    )  # fmt: skip
    del q, kk, v, dout
    return {
        "ring_size": k,
        "backend": args.backend,
        "groups": parts,
        "seq_len": seq_len,
        "tokens_per_gpu": L,
        "causal": causal,
        "layout": layout,
        "segment_lengths": segments,
        "dilation_rates": rates,
        "fwd_bwd_ms": ms,
        "peak_mib_per_gpu": peak,
        "tflops_per_gpu": tflops(flops / k, ms),
    }


def ring_sizes(world_size: int) -> list[int]:
    sizes, k = [], 1
    while k <= world_size:
        if world_size % k == 0:
            sizes.append(k)
        k *= 2
    return sizes


def weak_scaling(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for tokens in args.tokens_per_gpu:
        # Causal calls in both layouts: zigzag balances their work over the ranks.
        for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
            base_ms = None
            for k in ring_sizes(dist.get_world_size()):
                row = ring_point(args, device, tokens * k, k, causal, layout)
                base_ms = row["fwd_bwd_ms"] if base_ms is None else base_ms
                row["time_vs_1gpu"] = row["fwd_bwd_ms"] / base_ms
                rows.append(row)
    return rows


def memory_scaling(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    N = max(args.tokens_per_gpu) * dist.get_world_size()
    base_peak = None
    for k in ring_sizes(dist.get_world_size()):
        row = ring_point(args, device, N, k, causal=False)
        if row["peak_mib_per_gpu"] is not None:
            base_peak = base_peak or row["peak_mib_per_gpu"]
            row["memory_reduction_vs_1gpu"] = base_peak / row["peak_mib_per_gpu"]
        rows.append(row)
    return rows


def dense_vs_context_parallel(
    args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Dense ring vs ``context_parallel`` (allgather / alltoall) vs SDPA flash on one GPU.

    Causal runs let ``context_parallel`` use its head-tail load balancing (tokens are
    reordered); the ring runs causal calls in both of its layouts (contiguous shards,
    unbalanced, and zigzag, balanced).
    """
    world_size = dist.get_world_size()
    if device.type != "cuda":
        return [{"error": "skipped: context_parallel needs CUDA SDPA kernels"}]
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method
    except ImportError:  # older layout
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _cp_options,
            set_rotate_method,
        )

    mesh = init_device_mesh("cuda", (world_size,))
    B, H, D = args.batch, args.heads, args.head_dim
    rows: list[dict[str, Any]] = []

    def record(method: str, N: int, causal: bool, gpus: int, m: Measurement) -> None:
        ms = max_over(m.ms, device)
        flops = dense_flops(N, H, D, batch=B, is_causal=causal, backward=True)
        rows.append(
            {
                "method": method,
                "seq_len": N,
                "causal": causal,
                "world_size": gpus,
                "fwd_bwd_ms": ms,
                "peak_mib_per_gpu": max_over((m.peak_bytes or 0) / MiB, device),
                "tflops_per_gpu": tflops(flops / gpus, ms),
            }
        )

    def sdpa(a: Tensor, b: Tensor, c: Tensor, causal: bool) -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=causal)

    for N in args.dense_tokens:
        L = N // world_size
        for causal in (False, True):
            shape = (B, L, H, D)
            q, k, v = (
                torch.randn(shape, device=device, dtype=args.dtype, requires_grad=True)
                for _ in range(3)
            )
            dout = torch.randn(shape, device=device, dtype=args.dtype)

            for layout in ("contiguous", "zigzag") if causal else ("contiguous",):

                def ring_fn(a: Tensor, b: Tensor, c: Tensor, n: int = N, cz: bool = causal,
                            lay: str = layout) -> Tensor:  # fmt: skip
                    return ring_dilated_attention(a, b, c, [n], [1], is_causal=cz, layout=lay)

                step = fwd_bwd_step(ring_fn, [q, k, v], dout)
                method = f"dense ring (this library, {layout})"
                record(method, N, causal, world_size, timed(step, device, args))
                del step
            del q, k, v, dout

            for rotate in ("allgather", "alltoall"):
                method = f"torch context_parallel ({rotate})"
                try:
                    set_rotate_method(rotate)
                    _cp_options.enable_load_balance = causal  # it refuses non-causal balancing
                    # context_parallel shards full (B, H, N, D) buffers in place; we keep
                    # compact copies of the shards and free the full tensors, so that both
                    # methods start from the same resident memory (the local shards).
                    full = [
                        torch.randn(B, H, N, D, device=device, dtype=args.dtype) for _ in range(4)
                    ]
                    with context_parallel(
                        mesh,
                        buffers=full,
                        buffer_seq_dims=[2, 2, 2, 2],
                        no_restore_buffers=set(full),
                    ):
                        local = [t.clone().requires_grad_() for t in full[:3]]
                        dl = full[3].clone()
                        for t in full:
                            t.set_()
                        torch.cuda.empty_cache()
                        step = fwd_bwd_step(lambda a, b, c, cz=causal: sdpa(a, b, c, cz), local, dl)
                        result = timed(step, device, args)
                    del local, dl, full, step
                    record(method, N, causal, world_size, result)
                except Exception as exc:  # report, keep benchmarking the rest
                    rows.append(
                        {"method": method, "seq_len": N, "causal": causal, "error": repr(exc)}
                    )
            set_rotate_method("allgather")
            _cp_options.enable_load_balance = True

            # Reference point: the whole sequence on one GPU (every rank runs it alone).
            full_shape = (B, H, N, D)
            q, k, v = (
                torch.randn(full_shape, device=device, dtype=args.dtype, requires_grad=True)
                for _ in range(3)
            )
            dout = torch.randn(full_shape, device=device, dtype=args.dtype)
            step = fwd_bwd_step(lambda a, b, c, cz=causal: sdpa(a, b, c, cz), [q, k, v], dout)
            record("torch SDPA flash, 1 GPU", N, causal, 1, timed(step, device, args))
            del q, k, v, dout, step
    return rows


def validation_cost(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    world_size = dist.get_world_size()
    for tokens in args.validate_tokens:
        N = tokens * world_size
        segments, rates = longnet_schedule(N, args.base)
        shape = (args.batch, tokens, args.heads, args.head_dim)
        q, k, v = (
            torch.randn(shape, device=device, dtype=args.dtype, requires_grad=True)
            for _ in range(3)
        )
        dout = torch.randn(shape, device=device, dtype=args.dtype)
        row: dict[str, Any] = {"seq_len": N, "tokens_per_gpu": tokens, "world_size": world_size}
        for validate in ("always", "once"):
            module = RingDilatedAttention(segments, rates, validate=validate)
            m = timed(fwd_bwd_step(module, [q, k, v], dout), device, args)
            row[f"fwd_bwd_ms_{validate}"] = max_over(m.ms, device)

        def check(a: Tensor = q, segments: list[int] = segments, rates: list[int] = rates) -> None:
            check_ring_call(
                a, a, a, group=dist.group.WORLD, segment_lengths=segments,
                dilation_rates=rates, branch_mixing="softmax", is_causal=False, scale=None,
                backend="auto",
            )  # fmt: skip

        row["check_alone_ms"] = max_over(timed(check, device, args).ms, device)
        row["saved_ms_per_call"] = row["fwd_bwd_ms_always"] - row["fwd_bwd_ms_once"]
        rows.append(row)
        del q, k, v, dout
    return rows


def error_vs_ring_size(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Error of the ring against a higher-precision single-device reference, per ring size.

    One sequence of ``N = args.error_tokens`` tokens (the same inputs on every rank), the
    LongNet schedule up to ``w = N``; rings of ``k = 1, 2, 4, ..`` ranks (side by side in
    the world) each compute it, so a larger ring merges more blocks per query. On GPUs the
    ring runs in bf16 against float32; on the CPU in float32 against float64; the inputs
    are representable in the low precision, so the error is that of the arithmetic.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    N = args.error_tokens
    low, high = (torch.bfloat16, torch.float32) if device.type == "cuda" else (
        torch.float32, torch.float64)  # fmt: skip
    segments, rates = longnet_schedule(N, args.base)
    shape = (args.batch, N, args.heads, args.head_dim)
    rows = []
    for causal in (False, True):
        gen = torch.Generator(device=device).manual_seed(4321 + causal)
        # Inputs exactly representable in the low precision: the error is the arithmetic's.
        full = [
            torch.randn(shape, generator=gen, device=device, dtype=high).to(low).to(high)
            for _ in range(4)
        ]

        grads = functools.partial(output_and_grads, dtype=high)

        ref = grads(
            lambda a, b, c, cz=causal: dilated_attention(a, b, c, segments, rates, is_causal=cz),
            full[:3], full[3],
        )  # fmt: skip
        base: dict[str, float] = {}
        for k in ring_sizes(world_size):
            group, _ = partition_groups(world_size, k)
            L, position = N // k, rank % k
            local = slice(position * L, (position + 1) * L)
            shards = [t[:, local].to(low) for t in full]
            ring = grads(
                lambda a, b, c, g=group, cz=causal: ring_dilated_attention(
                    a, b, c, segments, rates, group=g, is_causal=cz
                ),
                shards[:3], shards[3].contiguous(),
            )  # fmt: skip
            for name, got, want in zip(("out", "dq", "dk", "dv"), ring, ref, strict=True):
                diff = (got - want[:, local]).abs()
                worst = max_over(diff.max().item(), device)
                total = torch.tensor([diff.sum().item()], dtype=torch.float64, device=device)
                dist.all_reduce(total)
                mean = total.item() / (diff.numel() * world_size)
                base.setdefault(name, mean)
                rows.append({
                    "ring_size": k, "causal": causal, "tensor": name, "seq_len": N,
                    "segment_lengths": segments, "dilation_rates": rates,
                    "dtype": str(low).removeprefix("torch."),
                    "reference_dtype": str(high).removeprefix("torch."),
                    "max_abs_err": worst, "mean_abs_err": mean,
                    "mean_err_vs_ring_1": mean / base[name] if base[name] > 0 else None,
                    "max_abs_reference": want.abs().max().item(),
                })  # fmt: skip
    return rows


# --------------------------------------------------------------------------- main


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n## {title}")
    print(" | ".join(columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        print(" | ".join(cells))
    sys.stdout.flush()


TABLE_COLUMNS = {
    "correctness": ["causal", "tensor", "seq_len", "max_err_ring_bf16", "max_err_single_gpu_bf16", "ok"],
    "weak_scaling": ["ring_size", "seq_len", "tokens_per_gpu", "causal", "layout", "fwd_bwd_ms", "time_vs_1gpu", "peak_mib_per_gpu", "tflops_per_gpu"],
    "memory_scaling": ["ring_size", "seq_len", "tokens_per_gpu", "fwd_bwd_ms", "peak_mib_per_gpu", "memory_reduction_vs_1gpu"],
    "dense_vs_context_parallel": ["method", "seq_len", "causal", "world_size", "fwd_bwd_ms", "peak_mib_per_gpu", "tflops_per_gpu", "error"],
    "validation_cost": ["seq_len", "tokens_per_gpu", "world_size", "fwd_bwd_ms_always", "fwd_bwd_ms_once", "saved_ms_per_call", "check_alone_ms"],
    "error_vs_ring_size": ["ring_size", "causal", "tensor", "dtype", "max_abs_err", "mean_abs_err", "mean_err_vs_ring_1"],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON file")
    parser.add_argument("--cpu", action="store_true", help="gloo smoke test with tiny sizes")
    parser.add_argument("--tokens-per-gpu", type=int, nargs="+", default=[262144, 1048576])
    parser.add_argument("--check-tokens", type=int, default=262144, help="global N of the check")
    parser.add_argument("--dense-tokens", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--validate-tokens", type=int, nargs="+", default=[16384, 262144])
    parser.add_argument(
        "--error-tokens", type=int, default=262144, help="global N of the error table"
    )
    parser.add_argument("--base", type=int, default=2048, help="LongNet w/r of every branch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--backend",
        default="auto",
        help="block kernel of the rings in correctness, weak_scaling and memory_scaling "
        "(auto, pytorch, triton)",
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--sections", nargs="+", default=list(TABLE_COLUMNS), choices=list(TABLE_COLUMNS)
    )
    args = parser.parse_args()
    args.dtype = torch.bfloat16
    if args.cpu:
        args.tokens_per_gpu, args.check_tokens, args.dense_tokens = [256], 512, [256]
        args.validate_tokens, args.error_tokens = [256], 1024
        args.base, args.heads, args.head_dim, args.iters, args.warmup = 16, 4, 16, 2, 1

    use_cuda = torch.cuda.is_available() and not args.cpu
    if not use_cuda and not args.cpu:
        # GPU sizes on CPU processes would run for hours: refuse on every rank.
        sys.exit("bench_ring.py: no GPU found; add --cpu for the gloo run with small sizes")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
        torch.backends.cudnn.allow_tf32 = False
    # A hang (e.g. one rank out of memory) then fails within minutes instead of never.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=240))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    report: dict[str, Any] = {
        **stamp(device),
        "world_size": world_size,
        "flop_formula": FLOP_CONVENTION,
        "memory": PeakMemory(device, count_live=count_live(device)).what + ", max over ranks",
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()},
        "notes": (
            f"{world_size} {'GPUs' if use_cuda else 'gloo processes on the CPU'}, ring sizes "
            f"{ring_sizes(world_size)}"
            + ("" if use_cuda else "; the *_per_gpu columns are per rank (CPU process)")
        ),
    }
    path = result_path(args.out, "ring", device, f"{world_size}{'gpu' if use_cuda else 'rank'}")
    sections = {
        "correctness": correctness,
        "weak_scaling": weak_scaling,
        "memory_scaling": memory_scaling,
        "dense_vs_context_parallel": dense_vs_context_parallel,
        "validation_cost": validation_cost,
        "error_vs_ring_size": error_vs_ring_size,
    }
    for section in args.sections:
        start = time.perf_counter()
        try:
            rows = sections[section](args, device)
        except Exception:
            rows = [{"error": traceback.format_exc(limit=4)}]
            if use_cuda:
                torch.cuda.empty_cache()
        report[section] = rows
        if rank == 0:
            print_table(
                f"{section} ({time.perf_counter() - start:.0f} s)", rows, TABLE_COLUMNS[section]
            )
            write_json(path, report)
    if rank == 0:
        print(f"\nwrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
