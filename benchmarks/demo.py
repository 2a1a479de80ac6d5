"""``python benchmarks/demo.py``: dilated vs dense attention at growing N.

Runs one ``MultiheadDilatedAttention`` layer (LongNet-style geometric schedule,
sized to the device) forward and backward at doubling sequence lengths and prints
time and peak memory, next to the same layer with dense attention (a plain
``torch.nn.functional.scaled_dot_product_attention`` call) where that fits.
With ``--out DIR`` it also writes every row to ``DIR/demo_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from measure import GiB, MiB, PeakMemory, peak_memory, result_path, stamp, time_ms, write_json
from torch import Tensor

from dilated_attention_pytorch import (
    DilatedAttentionConfig,
    MultiheadDilatedAttention,
    explain_backend,
)
from dilated_attention_pytorch.models import DenseAttention


@dataclass(frozen=True)
class DemoSetup:
    config: DilatedAttentionConfig
    dtype: torch.dtype
    seq_lens: tuple[int, ...]
    dense_seconds_budget: float  # dense is skipped where its predicted time exceeds this


def _setup(device: torch.device, max_seq_len: int | None) -> DemoSetup:
    if device.type == "cuda":
        # LongNet's shape: w = 2048 * 2**i, r = 2**i, so each branch attends over
        # 2048 tokens per segment and head.
        config = DilatedAttentionConfig.geometric(
            base_segment_length=2048, num_branches=5, embed_dim=1024, num_heads=16
        )
        seq_lens = tuple(2**i for i in range(13, 21))
        setup = DemoSetup(config, torch.bfloat16, seq_lens, dense_seconds_budget=10.0)
    else:
        # The same shape scaled down so that the demo takes seconds on a laptop CPU.
        config = DilatedAttentionConfig.geometric(
            base_segment_length=256, num_branches=4, embed_dim=64, num_heads=4
        )
        seq_lens = tuple(2**i for i in range(10, 16))
        setup = DemoSetup(config, torch.float32, seq_lens, dense_seconds_budget=5.0)
    if max_seq_len is not None:
        kept = tuple(n for n in setup.seq_lens if n <= max_seq_len) or (max_seq_len,)
        setup = dataclasses.replace(setup, seq_lens=kept)
    return setup


def _forward_backward(layer: MultiheadDilatedAttention, x: Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = layer(x, is_causal=True)
    out.sum().backward()


def _step(layer: MultiheadDilatedAttention, x: Tensor) -> dict[str, Any]:
    """Forward + backward: ``{"seconds", "peak_bytes"}``, or ``{"error"}`` out of memory."""
    run = partial(_forward_backward, layer, x)
    try:
        peak = peak_memory(run, x.device)
        # Time a second run. On CUDA the first call at a new N also builds the cuDNN
        # plans (and compiles kernels) for the new shapes; on CPU the memory probe handed
        # freed memory back to the OS, so the first run page-faulted it in again. A step
        # in steady state pays neither.
        seconds = time_ms(run, x.device, reps=1, warmup=0) / 1e3
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    return {"seconds": seconds, "peak_bytes": peak}


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _cell(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['seconds']:7.2f} s {_fmt_bytes(result['peak_bytes']):>10}"


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """The lines printed under the table: where dilated overtakes dense, and memory."""
    both = [r for r in rows if r["dilated_seconds"] is not None and r["dense_seconds"] is not None]
    lines = []
    faster = [r["dilated_seconds"] < r["dense_seconds"] for r in both]
    # The crossover: the first N from which dilated is faster at every larger N measured.
    tail = next((i for i in range(len(both)) if all(faster[i:])), None) if faster else None
    if tail is not None:
        first = both[tail]["N"]
        last = both[-1]
        lines.append(
            f"time: dilated is faster than dense from N = {first} on "
            f"({last['dense_seconds'] / last['dilated_seconds']:.1f}x at N = {last['N']}, "
            f"the largest N dense ran); its time grows as N, dense's as N^2."
        )
    elif any(faster):
        at = ", ".join(str(r["N"]) for r, f in zip(both, faster) if f)
        lines.append(
            f"time: dilated was faster at N = {at}, but not at N = {both[-1]['N']}, the "
            f"largest N dense ran."
        )
    elif both:
        # Extrapolate: dilated ~ a * N, dense ~ b * N^2, from the largest N both ran.
        last = both[-1]
        a = last["dilated_seconds"] / last["N"]
        b = last["dense_seconds"] / last["N"] ** 2
        lines.append(
            f"time: dense was faster at every N it ran; with dilated growing as N and dense "
            f"as N^2 they would cross near N = {a / b:,.0f}."
        )
    skipped = [r["N"] for r in rows if r["dense_seconds"] is None]
    if skipped:
        lines.append(
            f"       dense was not run from N = {skipped[0]} on (too slow or out of memory); "
            f"dilated ran up to N = {rows[-1]['N']}."
        )
    mem = [r for r in both if r["dilated_peak_bytes"] and r["dense_peak_bytes"]]
    if mem:
        ratios = [r["dilated_peak_bytes"] / r["dense_peak_bytes"] for r in mem]
        spread = (
            f"{min(ratios):.1f}x"
            if f"{min(ratios):.1f}" == f"{max(ratios):.1f}"
            else (f"{min(ratios):.1f}-{max(ratios):.1f}x")
        )
        lines.append(
            f"memory: dilated used {spread} dense's peak. Both grow "
            f"as N: dense SDPA is a fused kernel that never stores the N x N scores (last "
            f"column: what attention that stores them would need)."
        )
    lines.append(
        "choice: where dense fits and is faster, dense is the simpler choice; past the "
        "crossover dilated saves time, and its ring form splits the memory over GPUs."
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/demo.py", description=__doc__)
    parser.add_argument("--max-seq-len", type=int, default=None, help="stop at this N")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="folder for the JSON of every row")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup = _setup(device, args.max_seq_len)
    cfg = setup.config
    torch.manual_seed(0)
    factory = {"device": device, "dtype": setup.dtype}
    dilated = MultiheadDilatedAttention(**cfg.multihead_kwargs(), **factory)
    dense = MultiheadDilatedAttention(
        cfg.embed_dim,
        cfg.num_heads,
        attention=DenseAttention(),
        bias=cfg.bias,
        layer_norm=cfg.layer_norm,
        gamma_init=cfg.gamma_init,
        **factory,
    )
    dense.load_state_dict(dilated.state_dict())
    memory_what = PeakMemory(device).what
    itemsize = torch.finfo(setup.dtype).bits // 8

    layer = f"MultiheadDilatedAttention(embed_dim={cfg.embed_dim}, num_heads={cfg.num_heads})"
    dense_what = (
        "the same layer with one plain scaled_dot_product_attention call (a fused kernel that "
        "does not store the scores, but whose time grows as N^2); skipped where its predicted "
        f"time exceeds {setup.dense_seconds_budget:.0f} s"
    )
    report: dict[str, Any] = {
        **stamp(device, argv=argv, script=None if argv is None else os.path.relpath(__file__)),
        "layer": f"{layer}, causal, batch 1, forward + backward",
        "embed_dim": cfg.embed_dim,
        "num_heads": cfg.num_heads,
        "segment_lengths": list(cfg.segment_lengths),
        "dilation_rates": list(cfg.dilation_rates),
        "dtype": str(setup.dtype).removeprefix("torch."),
        "causal": True,
        "batch": 1,
        "timing": "one warm step (the second at each N) of forward + backward",
        "memory": f"{memory_what}, in the first step at each N",
        "dense": dense_what,
        "scores": "scores_bytes: one materialised (H, N, N) score tensor at batch 1, in the dtype",
        "rows": [],
    }
    path = None if args.out is None else result_path(args.out, "demo", device)

    print(
        f"device: {device} ({report['device']}), torch {torch.__version__}, {setup.dtype}",
        flush=True,
    )
    print(
        f"layer: {layer}, causal, batch 1, forward + backward\n"
        f"branches: segment_lengths={list(cfg.segment_lengths)}, "
        f"dilation_rates={list(cfg.dilation_rates)}\n"
        f"dense: {dense_what}\n"
        f"N x N scores: what one materialised (H, N, N) attention matrix would need\n"
        f"memory: {memory_what}",
        flush=True,
    )
    probe = torch.empty(1, 1, cfg.num_heads, cfg.embed_dim // cfg.num_heads, **factory)
    choice = explain_backend(
        probe, cfg.segment_lengths, cfg.dilation_rates, is_causal=True, requires_grad=True
    )
    report["backend"] = choice.name
    report["backend_choice"] = str(choice)
    print(
        f"backend: backend='auto' runs {choice}\n"
        f"         (explain_backend() tells this for any call; dilated_attention logs it only "
        f"at DEBUG level)",
        flush=True,
    )
    # Warm-up at the smallest N so the first row does not time one-off start-up costs.
    x = torch.randn(1, setup.seq_lens[0], cfg.embed_dim, **factory, requires_grad=True)
    _step(dilated, x)
    _step(dense, x)

    print(f"\n{'N':>8}  {'dilated':>21}  {'dense SDPA':>21}  {'N x N scores':>12}", flush=True)
    last_dense: tuple[int, float] | None = None  # (N, seconds) of the last dense run
    dense_failed = False
    for n in setup.seq_lens:
        print(f"{n:>8}  ", end="", flush=True)
        x = torch.randn(1, n, cfg.embed_dim, **factory, requires_grad=True)
        dilated_result = _step(dilated, x)
        print(f"{_cell(dilated_result):>21}  ", end="", flush=True)
        predicted = None if last_dense is None else last_dense[1] * (n / last_dense[0]) ** 2
        if dense_failed:
            dense_result: dict[str, Any] = {"skipped": "out of memory"}
        elif predicted is not None and predicted > setup.dense_seconds_budget:
            dense_result = {"skipped": f"~{predicted:.0f} s"}
        else:
            dense_result = _step(dense, x)
            if "error" in dense_result:
                dense_failed = True
            else:
                last_dense = (n, dense_result["seconds"])
        dense_cell = (
            f"skipped ({dense_result['skipped']})"
            if "skipped" in dense_result
            else _cell(dense_result)
        )
        scores = cfg.num_heads * n * n * itemsize  # one (H, N, N) tensor at batch 1
        print(f"{dense_cell:>21}  {_fmt_bytes(scores):>12}", flush=True)
        report["rows"].append(
            {
                "N": n,
                "dilated_seconds": dilated_result.get("seconds"),
                "dilated_peak_bytes": dilated_result.get("peak_bytes"),
                "dilated_error": dilated_result.get("error"),
                "dense_seconds": dense_result.get("seconds"),
                "dense_peak_bytes": dense_result.get("peak_bytes"),
                "dense_error": dense_result.get("error"),
                "dense_skipped": dense_result.get("skipped"),
                "scores_bytes": scores,
            }
        )
        if path is not None:  # after every row, so a cut-off run keeps its data
            write_json(path, report)
    report["summary"] = summarize(report["rows"])
    print("\n" + "\n".join(report["summary"]), flush=True)
    if path is not None:
        write_json(path, report)
        print(f"\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
