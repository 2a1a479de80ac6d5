"""One ``MultiheadDilatedAttention`` layer, eager vs ``torch.compile(fullgraph=True)``.

    python benchmarks/bench_compile.py --out benchmarks/results         # GPU, bf16
    python benchmarks/bench_compile.py --cpu --out /tmp/bench           # small, float32

Forward + backward of the layer (the demo's shape: ``embed_dim=1024``, 16 heads, causal,
LongNet branches ``w = 2048 * 2**i``, ``r = 2**i``) for each backend, median of many runs,
and the largest difference between the compiled and eager outputs and input gradients.
The attention runs as one custom operator in the compiled graph; what compiling can
change is the code around it (projections, norm, casts).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

import torch
from measure import reps_for, result_path, stamp, time_ms, write_json

from dilated_attention_pytorch import (
    DilatedAttentionConfig,
    MultiheadDilatedAttention,
    available_backends,
    explain_backend,
)


def _step(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward; the output and the input's gradient."""
    x.grad = None
    out, _ = module(x, is_causal=True)
    out.float().square().mean().backward()
    return out.detach(), x.grad.detach()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_compile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    if cpu:
        cfg = DilatedAttentionConfig.geometric(base_segment_length=256, num_branches=3,
                                               embed_dim=64, num_heads=4)  # fmt: skip
        dtype, seq_lens = torch.float32, args.seq_lens or [4096]
    else:
        cfg = DilatedAttentionConfig.geometric(base_segment_length=2048, num_branches=5,
                                               embed_dim=1024, num_heads=16)  # fmt: skip
        dtype, seq_lens = torch.bfloat16, args.seq_lens or [16384, 65536, 262144]
    report: dict[str, Any] = {
        **stamp(device, argv=argv, script=None if argv is None else os.path.relpath(__file__)),
        "layer": f"MultiheadDilatedAttention({cfg.embed_dim}, {cfg.num_heads}), causal, batch 1",
        "segment_lengths": list(cfg.segment_lengths),
        "dilation_rates": list(cfg.dilation_rates),
        "dtype": str(dtype).removeprefix("torch."),
        "timing": "median forward+backward ms (CUDA events on CUDA)",
        "rows": [],
    }
    path = None if args.out is None else result_path(args.out, "compile", device)
    print(f"device: {report['device']}, torch {torch.__version__}, {dtype}\n"
          f"{'backend':>8} {'N':>8} {'eager ms':>10} {'compiled ms':>12} {'speed-up':>9} "
          f"{'max |diff|':>11}", flush=True)  # fmt: skip
    probe = torch.empty(1, 1, cfg.num_heads, cfg.embed_dim // cfg.num_heads, device=device,
                        dtype=dtype)  # fmt: skip
    backends = []
    for name in available_backends():
        try:
            explain_backend(probe, cfg.segment_lengths, cfg.dilation_rates, is_causal=True,
                            backend=name)  # fmt: skip
            backends.append(name)
        except ValueError as e:
            print(f"{name}: skipped ({e})")
    for backend in backends:
        for n in seq_lens:
            torch.manual_seed(0)
            kwargs = cfg.multihead_kwargs()
            kwargs["backend"] = backend
            layer = MultiheadDilatedAttention(**kwargs, device=device, dtype=dtype)
            compiled = torch.compile(layer, fullgraph=True)
            x = torch.randn(1, n, cfg.embed_dim, device=device, dtype=dtype, requires_grad=True)

            eager_out, eager_grad = _step(layer, x)
            comp_out, comp_grad = _step(compiled, x)  # compiles
            diff = max((eager_out - comp_out).abs().max().item(),
                       (eager_grad - comp_grad).abs().max().item())  # fmt: skip
            run_eager = functools.partial(_step, layer, x)
            run_compiled = functools.partial(_step, compiled, x)
            reps = reps_for(time_ms(run_eager, device, reps=3, warmup=1))
            ms_eager = time_ms(run_eager, device, reps=reps)
            ms_comp = time_ms(run_compiled, device, reps=reps)
            row = {"backend": backend, "N": n, "eager_ms": ms_eager, "compiled_ms": ms_comp,
                   "speedup": ms_eager / ms_comp, "max_abs_diff": diff, "reps": reps}  # fmt: skip
            report["rows"].append(row)
            print(f"{backend:>8} {n:>8} {ms_eager:>10.2f} {ms_comp:>12.2f} "
                  f"{row['speedup']:>8.2f}x {diff:>11.2e}", flush=True)  # fmt: skip
            if path:
                write_json(path, report)
            torch._dynamo.reset()
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
