"""``get_memory_estimate`` against measured peak memory, and what checkpointing saves.

One GPU, several GPUs (torchrun, NCCL), a gloo smoke test, or offline on a ring
benchmark's JSON:

    python benchmarks/bench_memory.py --out benchmarks/results
    torchrun --nproc_per_node=4 benchmarks/bench_memory.py --out benchmarks/results
    torchrun --nproc_per_node=2 benchmarks/bench_memory.py --cpu
    python benchmarks/bench_memory.py --recorded benchmarks/results/ring_nvidia-h200_2gpu_20261121.json

Sections:

1. ``estimate_vs_measured``: for every ring size ``k`` (1, 2, 4, .. dividing the
   world; rings of ``k`` ranks side by side) and tokens per GPU ``T`` doubling from
   ``--min-tokens`` while the estimate fits in ``--fill`` of the GPU's memory (or up
   to ``--max-tokens``): one forward+backward of
   ``StandardRingAttention(..., ring_size=k)`` on ``(B, T, H, D)`` shards
   (``already_split=True``) and of ``RingMultiheadDilatedAttention`` (``E = H * D``,
   parameters in the input dtype) on ``(B, T, E)`` shards. Measured: the peak of
   ``torch.cuda.max_memory_allocated`` during the step, everything allocated
   included (inputs, parameters, gradients), max over ranks. Estimated: the module's
   ``get_memory_estimate(T * k, ...)``. ``error = estimate / measured - 1``.
2. ``checkpointing``: a residual stack of ``--layers`` multi-head layers whose
   attention is ``DistributedRingAttention`` (ring over the whole world),
   ``--checkpoint-tokens`` per GPU, three ways: nothing recomputed, the ring attention
   recomputed (``use_checkpointing=True``), each whole layer recomputed
   (``torch.utils.checkpoint``): peak memory and forward+backward time.

3. ``layer_vs_dense`` (one GPU): the demo's layer, ``MultiheadDilatedAttention``
   (``E = H * D``, LongNet branches ``w = base * 2**i``, ``r = 2**i``, i = 0..4, causal),
   with ``recompute_qkv=True`` (the default) and ``False``, next to the same layer with
   one dense ``scaled_dot_product_attention`` call, at doubling ``N`` from
   ``--min-tokens``: peak memory (input, parameters and gradients included; the output
   is reduced by ``.sum()`` as in the demo), the estimate and forward+backward time.
4. ``head_chunks`` (one GPU): section 3's layer (``recompute_qkv=True``) at each
   ``--chunk-tokens`` N, its backward recomputing q, k, v for ``H / c`` heads at a time
   for each ``c`` in ``--head-chunks`` (the library's ``projected.HEAD_CHUNKS``): peak
   memory, estimate and forward+backward time.
5. ``layer_estimate`` (any machine, no tensors): ``get_memory_estimate`` of section 3's
   layer, both ways, for the ``pytorch`` and ``triton`` backends, ``N`` doubling from
   ``--min-tokens`` to ``--max-tokens`` or the ``--seq-lens`` given (the caller holding
   the output's gradient, the estimate's convention). With ``--ring-size k``: the
   ``--heads``/``--head-dim`` layer as ``RingMultiheadDilatedAttention`` on the shards
   of a ring of ``k`` (``pytorch`` blocks, the LongNet schedule below), e.g.
   ``--heads 12 --ring-size 4 --seq-lens 25165824`` for a 768/12 layer at 24M tokens on
   4 GPUs.
6. ``scale``: the largest ``N`` (a multiple of ``--scale-step`` times the ranks) at which
   one ``--scale-embed``/``--scale-heads`` layer (default 768/12, ``recompute_qkv``
   either way) runs forward+backward. One GPU: section 3's layer, doubling, then
   bisection on out-of-memory errors. Under torchrun with ``k`` GPUs:
   ``RingMultiheadDilatedAttention`` over all of them on shards, with the LongNet
   schedule below; an out-of-memory error on one rank would leave the others waiting
   inside the ring, so the probe runs only ``N`` whose estimate fits in ``--fill`` of
   the GPU: the largest such ``N``, and each ``--scale-tokens`` (e.g. 25165824), measured.

``--recorded FILE`` skips the GPU work: it recomputes the estimate for every
non-causal row of a ``benchmarks/bench_ring.py`` JSON (whose peaks were measured the
same way) and prints the comparison.

LongNet schedule as in ``bench_ring.py``: segments ``base * 4**i`` below ``N`` and
``N`` itself, ``r = w / base``. bf16, non-causal (the estimate counts the
non-causal ring, an upper bound for causal calls). Prints tables and writes
``memory_<device>_<k>gpu_<date>.json`` (device, date, versions, command) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from bench_ring import longnet_schedule, max_over, print_table, ring_sizes
from demo import _forward_backward as _layer_step  # the demo's step: causal, .sum()
from measure import GiB, PeakMemory, result_path, stamp, time_ms, write_json

from dilated_attention_pytorch import (
    DilatedAttentionConfig,
    DistributedRingAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
    get_memory_estimate,
    projected,
)
from dilated_attention_pytorch.models import DenseAttention

Tensor = torch.Tensor

# The estimate must agree with the measured peak within this, from this many tokens
# per GPU up (below it, allocator rounding and cuDNN workspaces are a larger share).
AGREEMENT, AGREEMENT_FROM_TOKENS = 0.20, 262144


def _peak_of(step, device: torch.device) -> int | None:
    """Peak bytes allocated (everything live included) during one call of ``step``."""
    probe = PeakMemory(device, count_live=True)
    probe.start()
    step()
    return probe.stop()


def _point(
    args: argparse.Namespace, device: torch.device, tokens: int, k: int, layer: bool
) -> dict[str, Any]:
    """Estimate and measured peak of one forward+backward, attention or layer."""
    N = tokens * k
    segments, rates = longnet_schedule(N, args.base)
    B, H, D = args.batch, args.heads, args.head_dim
    E = H * D
    if layer:
        module = RingMultiheadDilatedAttention(
            E, H, segments, rates, ring_size=k, device=device, dtype=args.dtype
        )
        x = torch.randn(B, tokens, E, device=device, dtype=args.dtype, requires_grad=True)
        inputs, dout = [x], torch.randn(B, tokens, E, device=device, dtype=args.dtype)

        def run() -> Tensor:
            return module(x, already_split=True)[0]

        estimate = module.get_memory_estimate(N, B, already_split=True)
    else:
        module = StandardRingAttention(segments, rates, ring_size=k)
        shape = (B, tokens, H, D)
        inputs = [
            torch.randn(shape, device=device, dtype=args.dtype, requires_grad=True)
            for _ in range(3)
        ]
        dout = torch.randn(shape, device=device, dtype=args.dtype)

        def run() -> Tensor:
            return module(*inputs, already_split=True)

        estimate = module.get_memory_estimate(N, B, H, D, dtype=args.dtype, already_split=True)

    def step() -> None:
        for t in (*inputs, *module.parameters()):
            t.grad = None
        run().backward(dout)

    step()  # warm-up: kernels, cuDNN plans, the collective input check
    peak = _peak_of(step, device)
    # Off CUDA the probe reads resident memory, which the estimate does not model.
    measured = max_over(peak, device) if peak is not None and device.type == "cuda" else None
    est = estimate["bytes_per_device"]
    row = {
        "what": "layer" if layer else "attention",
        "ring_size": k,
        "seq_len": N,
        "tokens_per_gpu": tokens,
        "segment_lengths": segments,
        "dilation_rates": rates,
        "estimate_gib": est / GiB,
        "measured_gib": None if measured is None else measured / GiB,
        "error": None if not measured else est / measured - 1.0,
        "peak_phase": estimate["peak_phase"],
    }
    return row


def estimate_vs_measured(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    capacity = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    )
    for layer in (False, True):
        for k in ring_sizes(dist.get_world_size()):
            tokens = args.min_tokens
            while tokens <= args.max_tokens:
                N = tokens * k
                segments, rates = longnet_schedule(N, args.base)
                est = get_memory_estimate(
                    N, args.batch, args.heads, args.head_dim,
                    segment_lengths=segments, dilation_rates=rates, ring_size=k,
                    dtype=args.dtype, already_split=True,
                    embed_dim=args.heads * args.head_dim if layer else None,
                )["bytes_per_device"]  # fmt: skip
                if capacity is not None and est > args.fill * capacity:
                    break  # the largest N that fits was the previous one
                try:
                    rows.append(_point(args, device, tokens, k, layer))
                except torch.cuda.OutOfMemoryError:
                    rows.append({"what": "layer" if layer else "attention", "ring_size": k,
                                 "tokens_per_gpu": tokens, "error": "out of memory"})  # fmt: skip
                    break
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                tokens *= 2
    return rows


CHECKPOINT_MODES = {
    "none": "nothing recomputed",
    "attention": "DistributedRingAttention(use_checkpointing=True): the ring attention recomputed",
    "layer": "torch.utils.checkpoint around each whole layer (projections, attention, norm)",
}


def checkpointing(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """A residual stack of multi-head ring layers, three ways of checkpointing."""
    world = dist.get_world_size()
    B, H, D = args.batch, args.heads, args.head_dim
    E = H * D
    rows = []
    for tokens in args.checkpoint_tokens:
        N = tokens * world
        segments, rates = longnet_schedule(N, args.base)
        plain = None
        for mode in CHECKPOINT_MODES:
            layers = torch.nn.ModuleList(
                MultiheadDilatedAttention(
                    E,
                    H,
                    attention=DistributedRingAttention(
                        segments,
                        rates,
                        use_checkpointing=mode == "attention",
                        enable_monitoring=False,
                    ),
                    device=device,
                    dtype=args.dtype,
                )  # fmt: skip
                for _ in range(args.layers)
            )
            x = torch.randn(B, tokens, E, device=device, dtype=args.dtype, requires_grad=True)
            dout = torch.randn(B, tokens, E, device=device, dtype=args.dtype)

            def block(layer: torch.nn.Module, y: Tensor) -> Tensor:
                return layer(y, already_split=True)[0]

            def step(layers=layers, x=x, dout=dout, mode=mode) -> None:
                x.grad = None
                layers.zero_grad(set_to_none=True)
                y = x
                for layer in layers:
                    if mode == "layer":
                        y = y + torch.utils.checkpoint.checkpoint(
                            block, layer, y, use_reentrant=False
                        )
                    else:
                        y = y + block(layer, y)
                y.backward(dout)

            row: dict[str, Any] = {
                "tokens_per_gpu": tokens, "ring_size": world, "layers": args.layers,
                "checkpointing": mode,
            }  # fmt: skip
            try:
                step()
                peak = _peak_of(step, device)
                ms = time_ms(step, device, reps=args.iters, warmup=0)
                row["peak_gib"] = None if peak is None else max_over(peak, device) / GiB
                row["fwd_bwd_ms"] = max_over(ms, device)
                if plain is None:
                    plain = row
                elif row["peak_gib"] is not None and plain.get("peak_gib") is not None:
                    row["saved_gib"] = plain["peak_gib"] - row["peak_gib"]
                    row["time_vs_none"] = row["fwd_bwd_ms"] / plain["fwd_bwd_ms"]
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            rows.append(row)
            del layers, x, dout
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def recorded(path: str) -> list[dict[str, Any]]:
    """The estimate for the non-causal rows of a ``bench_ring.py`` JSON."""
    data = json.loads(open(path).read())
    cfg = data["config"]
    rows = []
    for row in data.get("weak_scaling", []) + data.get("memory_scaling", []):
        if row.get("causal") or row.get("peak_mib_per_gpu") is None:
            continue
        est = get_memory_estimate(
            row["seq_len"], cfg["batch"], cfg["heads"], cfg["head_dim"],
            segment_lengths=row["segment_lengths"], dilation_rates=row["dilation_rates"],
            ring_size=row["ring_size"], dtype=torch.bfloat16,
        )["bytes_per_device"]  # fmt: skip
        measured = row["peak_mib_per_gpu"] * 2**20
        rows.append({
            "what": "attention", "ring_size": row["ring_size"], "seq_len": row["seq_len"],
            "tokens_per_gpu": row["tokens_per_gpu"], "estimate_gib": est / GiB,
            "measured_gib": measured / GiB, "error": est / measured - 1.0,
        })  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    """One sentence computed from the rows: the worst error where the rule applies."""
    judged = [
        r for r in rows
        if isinstance(r.get("error"), float) and r["tokens_per_gpu"] >= AGREEMENT_FROM_TOKENS
    ]  # fmt: skip
    if not judged:
        return f"no row with at least {AGREEMENT_FROM_TOKENS} tokens per GPU was measured."
    worst = max(judged, key=lambda r: abs(r["error"]))
    verdict = "within" if abs(worst["error"]) <= AGREEMENT else "OUTSIDE"
    sizes = sorted({r["ring_size"] for r in judged})
    return (
        f"{len(judged)} rows with >= {AGREEMENT_FROM_TOKENS} tokens per GPU on ring sizes "
        f"{sizes}: the largest error is {worst['error']:+.1%} ({worst['what']}, ring of "
        f"{worst['ring_size']}, {worst['tokens_per_gpu']} tokens per GPU), {verdict} "
        f"+-{AGREEMENT:.0%}."
    )


def _demo_layers(
    args: argparse.Namespace, device: torch.device, embed_dim: int, num_heads: int
) -> dict[str, MultiheadDilatedAttention]:
    """The demo's layer with ``recompute_qkv`` on and off, and with dense SDPA."""
    cfg = DilatedAttentionConfig.geometric(
        base_segment_length=args.base, num_branches=5, embed_dim=embed_dim, num_heads=num_heads
    )
    factory = {"device": device, "dtype": args.dtype}
    torch.manual_seed(0)
    layers = {
        "recompute_qkv": MultiheadDilatedAttention(**cfg.multihead_kwargs(), **factory),
        "separate_nodes": MultiheadDilatedAttention(
            **cfg.multihead_kwargs(), recompute_qkv=False, **factory
        ),
        "dense_sdpa": MultiheadDilatedAttention(
            embed_dim, num_heads, attention=DenseAttention(), **factory
        ),
    }
    state = layers["recompute_qkv"].state_dict()
    for layer in layers.values():
        layer.load_state_dict(state)
    return layers


def layer_vs_dense(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Peak memory and time of the single-GPU layer, both ways, and of dense SDPA."""
    if dist.get_world_size() > 1:
        return [{"error": "one GPU only: run without torchrun"}]
    E, H = args.heads * args.head_dim, args.heads
    layers = _demo_layers(args, device, E, H)
    capacity = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    )
    rows, N, skip = [], args.min_tokens, set()
    while N <= args.max_tokens:
        x = torch.randn(args.batch, N, E, device=device, dtype=args.dtype, requires_grad=True)
        row: dict[str, Any] = {"seq_len": N}
        for name, layer in layers.items():
            if name in skip:
                continue
            if name != "dense_sdpa":
                est = layer.get_memory_estimate(N, args.batch)["bytes_per_device"]
                row[f"{name}_estimate_gib"] = est / GiB
                if capacity is not None and est > args.fill * capacity:
                    skip.add(name)
                    continue
            elif N > args.dense_max_tokens:
                continue
            try:
                _layer_step(layer, x)  # warm-up: kernels, cuDNN plans
                row[f"{name}_gib"] = _peak_of(partial(_layer_step, layer, x), device) / GiB
                row[f"{name}_ms"] = time_ms(partial(_layer_step, layer, x), device, reps=args.iters)
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_gib"] = "out of memory"
                skip.add(name)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        dense = row.get("dense_sdpa_gib")
        if isinstance(dense, float) and isinstance(row.get("recompute_qkv_gib"), float):
            row["recompute_vs_dense"] = row["recompute_qkv_gib"] / dense
        rows.append(row)
        if len(skip) == len(layers):
            break
        N *= 2
    return rows


def head_chunk_sweep(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section 3's layer with ``recompute_qkv`` at each ``--chunk-tokens`` N, its backward
    recomputing q, k, v for ``H / c`` heads at a time for each ``c`` in ``--head-chunks``
    (:data:`dilated_attention_pytorch.projected.HEAD_CHUNKS`): peak memory, estimate and
    forward+backward time, the trade-off behind the library's default."""
    if dist.get_world_size() > 1:
        return [{"error": "one GPU only: run without torchrun"}]
    E, H = args.heads * args.head_dim, args.heads
    layer = _demo_layers(args, device, E, H)["recompute_qkv"]
    default, rows = projected.HEAD_CHUNKS, []
    try:
        for N in args.chunk_tokens:
            x = torch.randn(args.batch, N, E, device=device, dtype=args.dtype, requires_grad=True)
            for c in args.head_chunks:
                projected.HEAD_CHUNKS = c
                est = layer.get_memory_estimate(N, args.batch)["bytes_per_device"]
                row = {"seq_len": N, "head_chunks": c, "heads_per_chunk":
                       projected.head_chunks(H, 1)[0][1], "estimate_gib": est / GiB}  # fmt: skip
                try:
                    _layer_step(layer, x)  # warm-up
                    row["peak_gib"] = _peak_of(partial(_layer_step, layer, x), device) / GiB
                    row["ms"] = time_ms(partial(_layer_step, layer, x), device, reps=args.iters)
                    row["default"] = c == default
                except torch.cuda.OutOfMemoryError:
                    row["peak_gib"] = "out of memory"
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
    finally:
        projected.HEAD_CHUNKS = default
    return rows


def layer_estimate(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """``get_memory_estimate`` of the demo's layer, ``recompute_qkv`` on and off, per
    backend, at doubling ``N`` (or ``--seq-lens``): arithmetic only, so it runs without a
    GPU. With ``--ring-size k > 1``: the ``--heads``/``--head-dim`` layer as
    ``RingMultiheadDilatedAttention`` on shards of a ring of ``k``, with the ring
    benchmark's LongNet schedule (``w / r = --base`` up to ``w = N``)."""
    E, H, k = args.heads * args.head_dim, args.heads, args.ring_size
    layer = _demo_layers(args, torch.device("meta"), E, H)["recompute_qkv"]
    lengths, N = list(args.seq_lens or []), args.min_tokens
    while not args.seq_lens and N <= args.max_tokens:
        lengths.append(N)
        N *= 2
    rows = []
    for N in lengths:
        if k > 1:
            layer = _ring_layer(args, N, k, True, torch.device("meta"), E, H)
        for backend in ("pytorch",) if k > 1 else ("pytorch", "triton"):
            est = {
                recompute: layer.get_memory_estimate(
                    N, args.batch, backend=backend, recompute_qkv=recompute
                )["bytes_per_device"]
                for recompute in (True, False)
            }
            rows.append({"seq_len": N, "ring_size": k, "tokens_per_gpu": N // k,
                         "backend": backend, "recompute_qkv_gib": est[True] / GiB,
                         "separate_nodes_gib": est[False] / GiB,
                         "ratio": est[True] / est[False]})  # fmt: skip
    return rows


def scale(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The largest N whose forward+backward fits, per ``recompute_qkv`` setting."""
    if device.type != "cuda":
        return [{"error": "GPUs only (CUDA)"}]
    if dist.get_world_size() > 1:
        return _ring_scale(args, device)
    layers = _demo_layers(args, device, args.scale_embed, args.scale_heads)
    rows = []
    for name in ("recompute_qkv", "separate_nodes"):
        layer = layers[name]

        def fits(N: int, layer=layer) -> float | None:
            try:
                x = torch.randn(1, N, args.scale_embed, device=device, dtype=args.dtype,
                                requires_grad=True)  # fmt: skip
                return _peak_of(partial(_layer_step, layer, x), device) / GiB
            except torch.cuda.OutOfMemoryError:
                return None
            finally:
                x = None
                torch.cuda.empty_cache()

        step, lo, hi, peak = args.scale_step, 0, None, None
        N = step
        while hi is None:  # doubling until out of memory
            got = fits(N)
            if got is None:
                hi = N
            else:
                lo, peak, N = N, got, N * 2
        while hi - lo > step:  # bisection on multiples of step
            mid = (lo + hi) // 2 // step * step
            got = fits(mid)
            if got is None:
                hi = mid
            else:
                lo, peak = mid, got
        rows.append({"layer": f"{args.scale_embed}/{args.scale_heads}", "mode": name,
                     "ring_size": 1, "largest_seq_len": lo, "peak_gib": peak,
                     "first_out_of_memory": hi})  # fmt: skip
    return rows


def _ring_layer(
    args: argparse.Namespace, N: int, k: int, recompute: bool, device, embed: int, heads: int
) -> Any:
    """An ``embed``/``heads`` ``RingMultiheadDilatedAttention`` on a ring of ``k`` with the
    LongNet schedule of ``N`` tokens (``meta``: for its estimate only)."""
    segments, rates = longnet_schedule(N, args.base, k)
    return RingMultiheadDilatedAttention(
        embed, heads, segments, rates, ring_size=k, recompute_qkv=recompute, timeout=300.0,
        device=device, dtype=args.dtype,
    )  # fmt: skip


def _ring_scale(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section 5 on a ring of every rank: the largest ``N`` whose estimate fits in
    ``--fill`` of the GPU, and each ``--scale-tokens``, run on shards and measured."""
    k = dist.get_world_size()
    capacity = torch.cuda.get_device_properties(device).total_memory
    step = args.scale_step * k
    meta = torch.device("meta")
    shape = (args.scale_embed, args.scale_heads)
    rows = []
    for recompute in (True, False):

        def estimate(N: int, recompute=recompute) -> int:
            layer = _ring_layer(args, N, k, recompute, meta, *shape)
            return layer.get_memory_estimate(N, 1)["bytes_per_device"]

        N = step
        while estimate(2 * N) <= args.fill * capacity:  # doubling, then bisection
            N *= 2
        lo, hi = N, 2 * N
        while hi - lo > step:
            mid = (lo + hi) // 2 // step * step
            lo, hi = (mid, hi) if estimate(mid) <= args.fill * capacity else (lo, mid)
        for N, what in ((lo, "largest_by_estimate"), *((n, "asked") for n in args.scale_tokens)):
            estimated = estimate(N)
            row: dict[str, Any] = {
                "layer": f"{args.scale_embed}/{args.scale_heads}",
                "mode": "recompute_qkv" if recompute else "separate_nodes",
                "ring_size": k, "seq_len": N, "which": what,
                "estimate_gib": estimated / GiB,
            }  # fmt: skip
            if estimated > capacity:
                row["peak_gib"] = "does not fit by the estimate"
                rows.append(row)
                continue
            layer = _ring_layer(args, N, k, recompute, device, *shape)
            try:
                x = torch.randn(1, N // k, args.scale_embed, device=device, dtype=args.dtype,
                                requires_grad=True)  # fmt: skip
                step_fn = partial(_ring_layer_step, layer, x)
                row["peak_gib"] = max_over(_peak_of(step_fn, device) / GiB, device)
                row["error"] = row["estimate_gib"] / row["peak_gib"] - 1
            except torch.cuda.OutOfMemoryError:
                row["peak_gib"] = "out of memory"
            finally:
                x = layer = None
                torch.cuda.empty_cache()
            rows.append(row)
    return rows


def _ring_layer_step(layer: torch.nn.Module, x: Tensor) -> None:
    """Forward and backward of a ring layer on this rank's shard (the demo's ``.sum()``)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y, _ = layer(x, already_split=True)
    y.sum().backward()


COLUMNS = {
    "estimate_vs_measured": ["what", "ring_size", "tokens_per_gpu", "seq_len", "estimate_gib", "measured_gib", "error", "peak_phase"],
    "checkpointing": ["tokens_per_gpu", "ring_size", "layers", "checkpointing", "peak_gib", "saved_gib", "fwd_bwd_ms", "time_vs_none", "error"],
    "layer_vs_dense": ["seq_len", "recompute_qkv_gib", "recompute_qkv_estimate_gib", "recompute_qkv_ms", "separate_nodes_gib", "separate_nodes_estimate_gib", "separate_nodes_ms", "dense_sdpa_gib", "dense_sdpa_ms", "recompute_vs_dense"],
    "scale": ["layer", "mode", "ring_size", "largest_seq_len", "seq_len", "which", "estimate_gib", "peak_gib", "first_out_of_memory", "error"],
    "head_chunks": ["seq_len", "head_chunks", "heads_per_chunk", "estimate_gib", "peak_gib", "ms", "default"],
    "layer_estimate": ["seq_len", "ring_size", "tokens_per_gpu", "backend", "recompute_qkv_gib", "separate_nodes_gib", "ratio"],
}  # fmt: skip
DEFAULT_SECTIONS = ["estimate_vs_measured", "checkpointing"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON file")
    parser.add_argument("--cpu", action="store_true", help="gloo smoke test with tiny sizes")
    parser.add_argument("--recorded", help="a bench_ring.py JSON to compare offline")
    parser.add_argument("--min-tokens", type=int, default=65536, help="first tokens per GPU")
    parser.add_argument("--max-tokens", type=int, default=1 << 24, help="last tokens per GPU")
    parser.add_argument(
        "--fill",
        type=float,
        default=0.85,
        help="stop when the estimate exceeds this share of the GPU",
    )
    parser.add_argument("--checkpoint-tokens", type=int, nargs="+", default=[262144, 1048576])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--base", type=int, default=2048, help="LongNet w/r of every branch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sections", nargs="+", default=DEFAULT_SECTIONS, choices=list(COLUMNS))
    parser.add_argument(
        "--dense-max-tokens", type=int, default=1 << 19, help="layer_vs_dense: last N of dense"
    )
    parser.add_argument("--scale-embed", type=int, default=768)
    parser.add_argument("--scale-heads", type=int, default=12)
    parser.add_argument("--scale-step", type=int, default=1 << 19, help="scale: N granularity")
    parser.add_argument(
        "--scale-tokens", type=int, nargs="*", default=[], help="scale on k GPUs: also these N"
    )
    parser.add_argument(
        "--chunk-tokens", type=int, nargs="+", default=[1 << 20], help="head_chunks: these N"
    )
    parser.add_argument(
        "--head-chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="head_chunks: c"
    )
    parser.add_argument(
        "--ring-size", type=int, default=1, help="layer_estimate: the ring layer on k ranks"
    )
    parser.add_argument(
        "--seq-lens", type=int, nargs="+", help="layer_estimate: these N instead of doubling"
    )
    args = parser.parse_args()
    args.dtype = torch.bfloat16

    if args.recorded:
        rows = recorded(args.recorded)
        print_table(f"estimate vs peaks recorded in {args.recorded}", rows,
                    ["what", "ring_size", "tokens_per_gpu", "seq_len", "estimate_gib",
                     "measured_gib", "error"])  # fmt: skip
        print("\n" + summary(rows))
        return

    if args.cpu:
        args.min_tokens, args.max_tokens, args.checkpoint_tokens = 256, 512, [256]
        args.base, args.heads, args.head_dim, args.layers, args.iters = 16, 4, 16, 2, 1
    use_cuda = torch.cuda.is_available() and not args.cpu
    estimate_only = set(args.sections) == {"layer_estimate"}  # arithmetic: any machine
    if not use_cuda and not args.cpu and not estimate_only:
        sys.exit(
            "bench_memory.py measures CUDA memory and found no GPU; pass --cpu for the gloo "
            "smoke test (tiny sizes, resident memory: not comparable to the estimate)."
        )
    if not estimate_only:  # the estimates are arithmetic: no process group needed
        if "RANK" not in os.environ:  # one process without torchrun: a world of one
            os.environ.update(
                RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533"
            )
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=240))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    rank, world_size = (0, 1) if estimate_only else (dist.get_rank(), dist.get_world_size())
    report: dict[str, Any] = {
        **stamp(device),
        "world_size": world_size,
        "memory": PeakMemory(device, count_live=True).what + ", max over ranks",
        "checkpoint_modes": CHECKPOINT_MODES,
        "rule": f"|estimate / measured - 1| <= {AGREEMENT} from {AGREEMENT_FROM_TOKENS} tokens per GPU",
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()},
    }
    path = (
        result_path(
            args.out,
            "memory_estimate",
            "cpu",
            f"layer{args.heads * args.head_dim}"
            + (f"_ring{args.ring_size}" if args.ring_size > 1 else ""),
        )  # fmt: skip
        if estimate_only
        else result_path(args.out, "memory", device, f"{world_size}gpu")
    )
    sections = {
        "estimate_vs_measured": estimate_vs_measured,
        "checkpointing": checkpointing,
        "layer_vs_dense": layer_vs_dense,
        "scale": scale,
        "layer_estimate": layer_estimate,
        "head_chunks": head_chunk_sweep,
    }
    for section in args.sections:
        start = time.perf_counter()
        try:
            rows = sections[section](args, device)
        except Exception:
            rows = [{"error": traceback.format_exc(limit=4)}]
        report[section] = rows
        if rank == 0:
            print_table(f"{section} ({time.perf_counter() - start:.0f} s)", rows, COLUMNS[section])
    if rank == 0:
        if "estimate_vs_measured" in report:
            report["summary"] = summary(report["estimate_vs_measured"])
            print("\n" + report["summary"])
        print(f"\nwrote {write_json(path, report)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
