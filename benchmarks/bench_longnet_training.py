"""LongNetLM training: dilated vs dense attention under one budget, and the longest context.

    python benchmarks/bench_longnet_training.py --out benchmarks/results            # GPU
    python benchmarks/bench_longnet_training.py --cpu --budget 20 --out /tmp/bench  # tiny

``compare``: the same model (same parameters), trained by ``examples/train_longnet.py``
on the standard library's source for the same wall-clock budget and the same tokens per
step, with

- dilated attention at a long context (``--long``, LongNet branches ``w = 2048 * 2**i``),
- dense attention (PyTorch SDPA, causal) at the same long context,
- dense attention at a short context (``--short``) with proportionally more sequences.

Each run is evaluated on the same validation bytes (about ``--eval-bytes``, in windows of
its own context) in bits per byte; throughput is the median of the last steps.

``scale``: one training step (forward + backward + AdamW) of a 12-layer 768/12 LongNetLM
with activation checkpointing at doubling contexts, until one runs out of memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from measure import result_path, stamp, sync, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_longnet  # noqa: E402


def _fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def compare(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    tokens = args.long  # tokens per step, the same for every run
    runs = [
        ("dilated", args.long, 1),
        ("dense", args.long, 1),
        ("dense", args.short, args.long // args.short),
    ]
    rows = []
    for attention, seq_len, batch in runs:
        _fresh(device)
        with tempfile.TemporaryDirectory() as out:
            argv = [
                "--out", out, "--attention", attention, "--seq-len", str(seq_len),
                "--batch-size", str(batch), "--steps", "100000", "--time-budget",
                str(args.budget), "--eval-every", "100000", "--checkpoint-every", "100000",
                "--eval-windows", str(max(1, args.eval_bytes // seq_len)), "--no-plot",
                "--embed-dim", str(args.embed_dim), "--num-heads", str(args.num_heads),
                "--num-layers", str(args.num_layers), "--warmup", "20", "--lr", str(args.lr),
            ]  # fmt: skip
            if args.cpu:
                argv += ["--cpu", "--base-segment", "64"]
            summary = train_longnet.train(train_longnet.parse_args(argv))
            log = train_longnet.read_log(Path(out) / "log.jsonl")
        steps = [r for r in log if "loss" in r]
        tail = [r["tokens_per_s"] for r in steps[len(steps) // 2 :]] or [float("nan")]
        row = {
            "attention": attention,
            "seq_len": seq_len,
            "batch": batch,
            "tokens_per_step": tokens,
            "steps": summary["steps"],
            "tokens": summary["tokens"],
            "train_seconds": summary["train_seconds"],
            "tokens_per_s": statistics.median(tail),
            "final_train_loss_nats": summary["final_loss"],
            "val_bpb": summary["val_bpb"],
            "peak_memory_gib": summary["peak_memory_gib"],
            "parameters": summary["parameters"],
            "segment_lengths": summary["config"]["segment_lengths"] if attention == "dilated"
            else None,
        }  # fmt: skip
        rows.append(row)
        print(f"{attention:>8} {seq_len:>9,} x{batch:<3} {row['steps']:>6} steps "
              f"{row['tokens_per_s']:>12,.0f} tok/s  val {row['val_bpb']:.3f} bpb  "
              f"{row['peak_memory_gib']:6.1f} GiB", flush=True)  # fmt: skip
    return rows


def _one_step(model: train_longnet.LongNetLM, opt: torch.optim.Optimizer, n: int,
              device: torch.device) -> float:  # fmt: skip
    ids = torch.randint(0, 256, (1, n + 1), device=device)
    sync(device)
    t0 = time.perf_counter()
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def scale(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    n = args.scale_start
    while n <= args.scale_max:
        _fresh(device)
        ws, rs = train_longnet.branches(n, 64 if args.cpu else 2048)
        model = train_longnet.LongNetLM(
            256, args.scale_embed, args.scale_heads, args.scale_layers, ws, rs, device=device,
            dtype=torch.float32 if args.cpu else torch.bfloat16,
        )  # fmt: skip
        train_longnet.parallelize_longnet(model, None, activation_checkpointing=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        row: dict[str, Any] = {"seq_len": n, "layers": args.scale_layers,
                               "embed_dim": args.scale_embed, "num_heads": args.scale_heads,
                               "parameters": model.num_parameters()}  # fmt: skip
        try:
            _one_step(model, opt, n, device)  # warm-up (kernels, cuDNN plans)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row["step_seconds"] = _one_step(model, opt, n, device)
            row["tokens_per_s"] = n / row["step_seconds"]
            row["peak_memory_gib"] = (
                torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            )
            print(f"scale: {n:>10,} tokens  {row['step_seconds']:7.2f} s/step  "
                  f"{row['tokens_per_s']:>10,.0f} tok/s  {row['peak_memory_gib'] or 0:6.1f} GiB",
                  flush=True)  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            print(f"scale: {n:>10,} tokens  out of memory", flush=True)
        rows.append(row)
        del model, opt
        if "error" in row:
            break
        n *= 2
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_longnet_training.py",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--sections", nargs="+", default=["compare", "scale"])
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per run")
    p.add_argument("--long", type=int, default=None, help="long context (tokens per step)")
    p.add_argument("--short", type=int, default=None, help="dense's short context")
    p.add_argument("--eval-bytes", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--scale-start", type=int, default=None)
    p.add_argument("--scale-max", type=int, default=None)
    p.add_argument("--scale-embed", type=int, default=768)
    p.add_argument("--scale-heads", type=int, default=12)
    p.add_argument("--scale-layers", type=int, default=12)
    p.add_argument("--out", default=None, help="folder for the JSON")
    args = p.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    sizes = (dict(long=1024, short=256, eval_bytes=8192, embed_dim=32, num_heads=4, num_layers=2,
                  lr=3e-3, scale_start=1024, scale_max=4096) if cpu else
             dict(long=262144, short=16384, eval_bytes=1 << 20, embed_dim=512, num_heads=8,
                  num_layers=6, lr=1e-3, scale_start=1 << 19, scale_max=1 << 24))  # fmt: skip
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cpu:
        args.cpu = True
        args.scale_embed, args.scale_heads, args.scale_layers = 32, 4, 2
    device = torch.device("cpu" if cpu else "cuda")
    report: dict[str, Any] = {
        **stamp(device, argv=argv, script=None if argv is None else os.path.relpath(__file__)),
        "corpus": "Python standard library source (*.py), bytes; validation: 1 file in 20",
        "compare": {"budget_seconds": args.budget, "tokens_per_step": args.long,
                    "eval_bytes": args.eval_bytes, "rows": []},
        "scale": {"activation_checkpointing": True, "rows": []},
    }  # fmt: skip
    path = None if args.out is None else result_path(args.out, "longnet_training", device)
    print(f"device: {report['device']}, torch {torch.__version__}", flush=True)
    if "compare" in args.sections:
        print(f"compare: {args.budget:.0f} s per run, {args.long:,} tokens per step, "
              f"E={args.embed_dim} H={args.num_heads} L={args.num_layers}", flush=True)  # fmt: skip
        report["compare"]["rows"] = compare(args, device)
        if path:
            write_json(path, report)
    if "scale" in args.sections:
        report["scale"]["rows"] = scale(args, device)
    if path:
        write_json(path, report)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
