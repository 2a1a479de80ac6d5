"""``python -m dilated_attention_pytorch``: dilated vs dense attention at growing N.

Runs one ``MultiheadDilatedAttention`` layer (LongNet-style geometric schedule,
sized to the device) forward and backward at doubling sequence lengths and prints
time and peak memory, next to the same layer with dense attention (a plain
``torch.nn.functional.scaled_dot_product_attention`` call) where that fits.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DilatedAttentionConfig
from .modules import MultiheadDilatedAttention

GiB = 2**30


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


class _DenseSDPA(MultiheadDilatedAttention):
    """The same layer with dense attention: overrides only ``_attend``."""

    def _attend(self, q, k, v, *, is_causal, key_padding_mask):
        # (B, N, H, D) -> (B, H, N, D) for SDPA and back.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal
        )
        return out.transpose(1, 2)


def _read_proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    # glibc keeps freed blocks mapped; without returning them first, a step that reuses
    # them would show no growth of the resident set and its memory would go unseen.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory a step adds on top of what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at the start.
    CPU (Linux): the process's peak resident set size (``VmHWM``, reset through
    ``/proc/self/clear_refs``) minus its resident size at the start, after handing
    freed heap memory back to the OS. It counts every page the step touches,
    allocator slack included; on other systems it reports nothing.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.what = (
            "peak CUDA memory allocated by the step"
            if device.type == "cuda"
            else "peak growth of the process's resident memory (Linux VmHWM)"
        )
        self._baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size to the current one
        except OSError:
            self._baseline = -1
            return
        self._baseline = (_read_proc_status_kib("VmRSS") or 0) * 1024

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._baseline
        peak = _read_proc_status_kib("VmHWM")
        if self._baseline < 0 or peak is None:
            return None
        return max(peak * 1024 - self._baseline, 0)


def _forward_backward(layer: MultiheadDilatedAttention, x: Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = layer(x, is_causal=True)
    out.sum().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _step(
    layer: MultiheadDilatedAttention, x: Tensor, memory: PeakMemory
) -> tuple[float, int | None]:
    """Forward + backward; returns ``(seconds, peak bytes)``."""
    memory.start()
    _forward_backward(layer, x)
    peak = memory.stop()
    # Time a second run. On CUDA the first call at a new N also builds the cuDNN plans
    # (and compiles kernels) for the new shapes; on CPU the memory probe handed freed
    # memory back to the OS, so the first run page-faulted it in again. A step in
    # steady state pays neither.
    t0 = time.perf_counter()
    _forward_backward(layer, x)
    seconds = time.perf_counter() - t0
    return seconds, peak


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _timed_cell(
    layer: MultiheadDilatedAttention, x: Tensor, memory: PeakMemory
) -> tuple[str, float | None]:
    """``(table cell, seconds)`` of one step; seconds is ``None`` when it ran out of memory."""
    try:
        seconds, peak = _step(layer, x, memory)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory", None
    return f"{seconds:7.2f} s {_fmt_bytes(peak):>10}", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dilated_attention_pytorch", description=__doc__
    )
    parser.add_argument("--max-seq-len", type=int, default=None, help="stop at this N")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup = _setup(device, args.max_seq_len)
    cfg = setup.config
    torch.manual_seed(0)
    factory = {"device": device, "dtype": setup.dtype}
    dilated = MultiheadDilatedAttention(**cfg.multihead_kwargs(), **factory)
    dense = _DenseSDPA(**cfg.multihead_kwargs(), **factory)
    dense.load_state_dict(dilated.state_dict())
    memory = PeakMemory(device)
    itemsize = torch.finfo(setup.dtype).bits // 8

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(f"device: {device} ({name}), torch {torch.__version__}, {setup.dtype}", flush=True)
    print(
        f"layer: MultiheadDilatedAttention(embed_dim={cfg.embed_dim}, num_heads={cfg.num_heads}), "
        f"causal, batch 1, forward + backward\n"
        f"branches: segment_lengths={list(cfg.segment_lengths)}, "
        f"dilation_rates={list(cfg.dilation_rates)}\n"
        f"dense: the same layer with one plain scaled_dot_product_attention call (a fused kernel "
        f"that does not store the scores, but whose time grows as N^2); skipped where its "
        f"predicted time exceeds {setup.dense_seconds_budget:.0f} s\n"
        f"N x N scores: what one materialised (H, N, N) attention matrix would need\n"
        f"memory: {memory.what}",
        flush=True,
    )
    # Warm-up at the smallest N so the first row does not time one-off start-up costs.
    x = torch.randn(1, setup.seq_lens[0], cfg.embed_dim, **factory, requires_grad=True)
    _step(dilated, x, memory)
    _step(dense, x, memory)

    print(f"\n{'N':>8}  {'dilated':>21}  {'dense SDPA':>21}  {'N x N scores':>12}", flush=True)
    last_dense: tuple[int, float] | None = None  # (N, seconds) of the last dense run
    dense_failed = False
    for n in setup.seq_lens:
        print(f"{n:>8}  ", end="", flush=True)
        x = torch.randn(1, n, cfg.embed_dim, **factory, requires_grad=True)
        print(f"{_timed_cell(dilated, x, memory)[0]:>21}  ", end="", flush=True)
        predicted = None if last_dense is None else last_dense[1] * (n / last_dense[0]) ** 2
        if dense_failed:
            dense_cell = "skipped (out of memory)"
        elif predicted is not None and predicted > setup.dense_seconds_budget:
            dense_cell = f"skipped (~{predicted:.0f} s)"
        else:
            dense_cell, seconds = _timed_cell(dense, x, memory)
            if seconds is None:
                dense_failed = True
            else:
                last_dense = (n, seconds)
        scores = cfg.num_heads * n * n * itemsize  # one (H, N, N) tensor at batch 1
        print(f"{dense_cell:>21}  {_fmt_bytes(scores):>12}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
