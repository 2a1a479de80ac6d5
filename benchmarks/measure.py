"""What every benchmark here measures with: time, peak memory, FLOPs and the JSON stamp.

Used by ``demo.py``, ``bench_dilated.py`` and ``bench_ring.py`` (they import it as
``measure``: Python puts a script's own folder first on ``sys.path``).

- Time: :func:`time_ms` is the median of ``reps`` calls after ``warmup`` calls, each
  timed with CUDA events on CUDA and ``time.perf_counter`` elsewhere.
- Peak memory: :class:`PeakMemory` (and :func:`peak_memory` around one call). CUDA:
  ``torch.cuda.max_memory_allocated``. CPU (Linux): the process's peak resident set
  size (``VmHWM``, reset through ``/proc/self/clear_refs``) after handing freed heap
  memory back to the OS; it counts every page a call touches, allocator slack
  included, and reports ``None`` on other systems.
- :func:`measure` does both for one callable: warm-up, one call under the memory
  probe (which also sizes the number of timed runs), then the timed runs.
- FLOPs: :func:`dilated_flops` and :func:`dense_flops` build the plan and count with
  :func:`dilated_attention_pytorch.plan.attention_flops` (useful work only: ``4 * D``
  per attended pair, forward+backward ``3.5x`` the forward).
- JSON: :func:`stamp` (device, date, versions, GPU count, the command line, git
  commit) and :func:`write_json`.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dilated_attention_pytorch.plan import attention_flops, make_plan

GiB = 2**30
MiB = 2**20

FLOP_CONVENTION = (
    "useful work only: fwd = 4 * D * attended pairs (counted with multiplicity across "
    "branches); fwd+bwd = 3.5 * fwd (backward = 2.5x forward, flash-attention's convention)"
)


# --------------------------------------------------------------------------- time


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device | str, *, reps: int, warmup: int = 2
) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup`` untimed ones.

    Each run is timed on its own: with CUDA events on CUDA (the run's GPU time, the
    device synchronised after each), with ``time.perf_counter`` elsewhere.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms_streamed(fn: Callable[[], object], device: torch.device | str, *, reps: int) -> float:
    """Mean milliseconds per run of ``reps`` runs queued back to back, after one untimed
    run: CUDA events around the whole loop and one synchronisation at its end, so the
    host may run ahead of the GPU as in a training loop (:func:`time_ms` synchronises
    after each run, so a short run's time there includes the host work before its first
    kernel). ``time.perf_counter`` elsewhere."""
    device = torch.device(device)
    fn()
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps


def reps_for(ms_estimate: float, *, budget_ms: float = 700.0, lo: int = 5, hi: int = 50) -> int:
    """Runs that fit in about ``budget_ms`` of timing, between ``lo`` and ``hi``."""
    return int(min(hi, max(lo, budget_ms / max(ms_estimate, 1e-3))))


# --------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    # glibc keeps freed blocks mapped; without returning them first, a call that reuses
    # them would show no growth of the resident set and its memory would go unseen.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the work between :meth:`start` and :meth:`stop`, in bytes.

    With ``count_live=False`` (the default) the peak is counted above what was
    allocated at :meth:`start` (what the work adds); with ``count_live=True`` it is
    the whole peak, what was live before (inputs, parameters) included.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): the peak resident set size
    (``VmHWM``, reset through ``/proc/self/clear_refs``) after handing freed heap back
    to the OS; ``None`` where that is not available.
    """

    def __init__(self, device: torch.device | str, *, count_live: bool = False) -> None:
        self.device = torch.device(device)
        self.count_live = count_live
        if self.device.type == "cuda":
            self.what = "peak CUDA memory allocated by the call" + (
                ", what was allocated before it included" if count_live else ""
            )
        else:
            self.what = (
                "peak resident memory of the process (Linux VmHWM)"
                if count_live
                else "peak growth of the process's resident memory (Linux VmHWM)"
            )
        self._baseline: int | None = 0

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
            self._baseline = None
            return
        self._baseline = (_proc_status_kib("VmRSS") or 0) * 1024

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            kib = _proc_status_kib("VmHWM")
            if self._baseline is None or kib is None:
                return None
            peak = kib * 1024
        return peak if self.count_live else max(peak - (self._baseline or 0), 0)


def peak_memory(
    fn: Callable[[], object], device: torch.device | str, *, count_live: bool = False
) -> int | None:
    """Peak bytes of one call of ``fn`` (see :class:`PeakMemory`)."""
    memory = PeakMemory(device, count_live=count_live)
    memory.start()
    fn()
    return memory.stop()


@dataclass(frozen=True)
class Measurement:
    ms: float  # median milliseconds of one call
    peak_bytes: int | None  # peak memory of one call (see PeakMemory)
    reps: int  # timed runs behind the median


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    reps: int | None = None,
    warmup: int = 1,
    count_live: bool = True,
    budget_ms: float = 700.0,
) -> Measurement:
    """Time and peak memory of ``fn``.

    ``warmup`` untimed calls (compilation, caches), one call under the memory probe,
    then ``reps`` timed calls (:func:`time_ms`). ``reps=None`` picks it from the
    probed call's duration so that timing takes about ``budget_ms`` (5 to 50 runs);
    pass ``reps`` when ``fn`` is collective, so that every rank runs it as often.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    memory = PeakMemory(device, count_live=count_live)
    memory.start()
    t0 = time.perf_counter()
    fn()
    sync(device)
    estimate_ms = (time.perf_counter() - t0) * 1e3
    peak = memory.stop()
    reps = reps_for(estimate_ms, budget_ms=budget_ms) if reps is None else reps
    return Measurement(time_ms(fn, device, reps=reps, warmup=0), peak, reps)


# --------------------------------------------------------------------------- FLOPs


def dilated_flops(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    branch_mixing: str = "softmax",
    batch: int = 1,
    is_causal: bool = False,
    backward: bool = False,
) -> float:
    """Useful FLOPs of one dilated attention call (``plan.attention_flops`` of its plan)."""
    plan = make_plan(segment_lengths, dilation_rates, num_heads, branch_mixing)
    return attention_flops(
        plan, seq_len, head_dim, batch=batch, is_causal=is_causal, backward=backward
    )


def dense_flops(
    seq_len: int,
    num_heads: int,
    head_dim: int,
    *,
    batch: int = 1,
    is_causal: bool = False,
    backward: bool = False,
) -> float:
    """Useful FLOPs of dense attention: the one-branch plan ``w = N, r = 1``."""
    return dilated_flops(
        [seq_len], [1], num_heads, seq_len, head_dim,
        batch=batch, is_causal=is_causal, backward=backward,
    )  # fmt: skip


def tflops(flop: float, ms: float) -> float:
    """TFLOP/s of ``flop`` done in ``ms`` milliseconds."""
    return flop / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- JSON


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def command_line(argv: Sequence[str] | None = None, *, script: str | None = None) -> str:
    """The command that ran this process: ``torchrun ...`` under torchrun, else ``python ...``.

    ``script`` and ``argv`` default to ``sys.argv[0]`` and ``sys.argv[1:]``; pass them
    when ``main(argv)`` is called from Python rather than from the shell.
    """
    script = sys.argv[0] if script is None else script
    args = list(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}"
    else:
        launcher = "python"
    return f"{launcher} {shlex.join([script, *args])}"


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def stamp(
    device: torch.device | str,
    *,
    argv: Sequence[str] | None = None,
    script: str | None = None,
) -> dict[str, Any]:
    """Where, when and how a result was measured: the first keys of every JSON written here."""
    device = torch.device(device)
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "command": command_line(argv, script=script),
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_dirty": None if status is None else bool(status),
    }


def result_path(out_dir: str, prefix: str, device: torch.device | str, *tags: str) -> str:
    """``out_dir/<prefix>_<device>[_<tag>...]_<yyyymmdd>.json``, e.g. ``ring_nvidia-h200_2gpu_...``.

    The device part is the GPU's name in lower case with dashes, ``cpu`` off CUDA.
    """
    device = torch.device(device)
    name = device_name(device) if device.type == "cuda" else device.type
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    date = datetime.datetime.now(datetime.timezone.utc)
    return os.path.join(out_dir, "_".join([prefix, slug, *tags, f"{date:%Y%m%d}"]) + ".json")


def write_json(path: str, data: dict[str, Any]) -> str:
    """Write ``data`` to ``path`` (folders made as needed), replacing it in one step.

    Scripts call it after every row or section, so a cut-off run keeps what it measured.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
