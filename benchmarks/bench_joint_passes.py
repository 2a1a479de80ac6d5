"""The Triton backend's joint passes against per-branch ones, interleaved in one process.

    python benchmarks/bench_joint_passes.py --out benchmarks/results [--ways joint,per_branch]

For each head dim, ways of running LongNet's plan (segments 2048..32768, rates 1..16,
softmax mixing, not causal) on ``(1, N, H, D)`` bf16 inputs, forward+backward, each a set
of the launcher's settings (``backends/triton/launch.py``):

- ``joint``: every pass joint (the forward, dQ and dK/dV kernels of all branches,
  ``launch.JOINT_DKDV_MAX_HEAD_DIM = None``), the dK/dV kernel reading each query row's
  LSE pair and delta as one packed word (``launch.PACKED_ROW_TERMS = True``);
- ``joint_unpacked``: the same, the row terms read as three separate values
  (``PACKED_ROW_TERMS = False``);
- ``joint_fwd_dq``: the forward and dQ joint, dK/dV per branch
  (``JOINT_DKDV_MAX_HEAD_DIM = 0``);
- ``per_branch``: every pass per branch (``launch.BRANCH_MODE = "per_branch"``).

Each round runs every way once, in turn, and ``--rounds`` rounds are timed (CUDA events,
median): interleaving in one process keeps the GPU's clocks and temperature and the
allocator's state alike for all of them, which separate processes (``bench_commits.py``)
do not. Also the peak memory of a call (``torch.cuda.max_memory_allocated``, inputs and
the output gradient included). ``default`` in the JSON names the way the library's
settings take at that head dim. ``--profile`` also runs each way once more under
``torch.profiler`` and records the GPU time of each kernel of that call (``kernels``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch
from bench_commits import kernel_ms
from measure import GiB, result_path, stamp, write_json

import dilated_attention_pytorch as dap
from dilated_attention_pytorch.backends.triton import launch
from dilated_attention_pytorch.plan import make_plan

SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]
WAYS = {
    # name: the launcher's settings
    "joint": dict(BRANCH_MODE="joint", JOINT_DKDV_MAX_HEAD_DIM=None, PACKED_ROW_TERMS=True),
    "joint_unpacked": dict(
        BRANCH_MODE="joint", JOINT_DKDV_MAX_HEAD_DIM=None, PACKED_ROW_TERMS=False
    ),
    "joint_fwd_dq": dict(BRANCH_MODE="joint", JOINT_DKDV_MAX_HEAD_DIM=0, PACKED_ROW_TERMS=True),
    "per_branch": dict(
        BRANCH_MODE="per_branch", JOINT_DKDV_MAX_HEAD_DIM=None, PACKED_ROW_TERMS=True
    ),
}
# The passes each way runs jointly.
JOINT_PASSES = {
    "joint": frozenset({"forward", "dq", "dkdv"}),
    "joint_unpacked": frozenset({"forward", "dq", "dkdv"}),
    "joint_fwd_dq": frozenset({"forward", "dq"}),
    "per_branch": frozenset(),
}


def apply(settings: dict) -> None:
    """Set the launcher's settings of a way."""
    for name, value in settings.items():
        setattr(launch, name, value)


def joint_passes(D: int, H: int, N: int) -> frozenset[str]:
    """The passes the launcher, with its current settings, runs jointly for this plan."""
    sched = launch._schedule(make_plan(SEGMENTS, RATES, H))
    return frozenset(
        p
        for p in ("forward", "dq", "dkdv")
        if launch._joint_pass(p, sched, H, N, D, 1, causal=False, documents=None) is not None
    )


def default_way(D: int, H: int = 16, N: int = 1 << 20) -> str:
    """The way the library's current settings run head dim ``D`` (by the launcher's own
    decisions, and its ``PACKED_ROW_TERMS`` where the dK/dV pass runs jointly)."""
    found = joint_passes(D, H, N)
    ways = [w for w, passes in JOINT_PASSES.items() if passes == found]
    return next(
        (w for w in ways if WAYS[w]["PACKED_ROW_TERMS"] == launch.PACKED_ROW_TERMS), ways[0]
    )


def run_dim(
    D: int, N: int, H: int, rounds: int, ways: Sequence[str] = tuple(WAYS), profile: bool = False
) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_(True)

    def step() -> None:
        out = dap.dilated_attention(q, k, v, SEGMENTS, RATES, backend="triton")
        torch.autograd.grad(out, (q, k, v), dout)

    saved = {name: getattr(launch, name) for name in WAYS["joint"]}
    times: dict[str, list[float]] = {w: [] for w in ways}
    peaks: dict[str, float] = {}
    try:
        for way in ways:  # compile and warm up
            apply(WAYS[way])
            step()
            step()
        torch.cuda.synchronize()
        for _ in range(rounds):
            for way in ways:
                apply(WAYS[way])
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times[way].append(start.elapsed_time(end))
                peaks[way] = torch.cuda.max_memory_allocated() / GiB
        kernels = {}
        for way in ways if profile else ():  # one more call of each way, profiled
            apply(WAYS[way])
            kernels[way] = kernel_ms(step)
    finally:
        apply(saved)
    ways = {
        w: dict(
            ms=statistics.median(t),
            reps=[round(x, 2) for x in t],
            peak_gib=peaks[w],
            settings=WAYS[w],
            **({"kernels": kernels[w]} if profile else {}),
        )
        for w, t in times.items()
    }
    return dict(D=D, N=N, H=H, default=default_way(D, H, N), ways=ways)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--ways", default=",".join(WAYS), help="the ways to time, in turn")
    parser.add_argument(
        "--profile", action="store_true", help="GPU time per kernel of one more call per way"
    )
    args = parser.parse_args()
    ways = args.ways.split(",")
    unknown = sorted(set(ways) - set(WAYS))
    if unknown or not ways:
        parser.error(f"--ways takes names from {list(WAYS)}, got {unknown or ways}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_joint_passes.py times the Triton kernels: it needs a CUDA GPU")
    result = stamp("cuda")
    result.update(segments=SEGMENTS, rates=RATES, dtype="bfloat16", rows=[])
    path = result_path(args.out, "joint_passes", "cuda")
    print(
        f"| D | way | fwd+bwd ms | vs {ways[-1]} | peak GiB |\n| ---: | --- | ---: | ---: | ---: |"
    )
    for D in (int(d) for d in args.dims.split(",")):
        row = run_dim(D, args.seq_len, args.heads, args.rounds, ways, args.profile)
        result["rows"].append(row)
        write_json(path, result)
        base = row["ways"][ways[-1]]["ms"]
        for way, r in row["ways"].items():
            mark = " (default)" if way == row["default"] else ""
            print(
                f"| {D} | {way}{mark} | {r['ms']:.1f} | {r['ms'] / base:.3f} | {r['peak_gib']:.2f} |"
            )
        for way, r in row["ways"].items():
            for name, ms in list(r.get("kernels", {}).items())[:4]:
                print(f"    D={D} {way}: {ms:8.2f} ms  {name}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
