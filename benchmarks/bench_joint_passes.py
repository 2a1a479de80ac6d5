"""The Triton backend's joint passes against per-branch ones, interleaved in one process.

    python benchmarks/bench_joint_passes.py --out benchmarks/results

For each head dim, three ways of running LongNet's plan (segments 2048..32768, rates
1..16, softmax mixing, not causal) on ``(1, N, H, D)`` bf16 inputs, forward+backward:

- ``joint``: every pass joint (the forward, dQ and dK/dV kernels of all branches,
  ``launch.JOINT_DKDV_MAX_HEAD_DIM = None``);
- ``joint_fwd_dq``: the forward and dQ joint, dK/dV per branch
  (``JOINT_DKDV_MAX_HEAD_DIM = 0``);
- ``per_branch``: every pass per branch (``launch.BRANCH_MODE = "per_branch"``).

Each round runs every way once, in turn, and ``--rounds`` rounds are timed (CUDA events,
median): interleaving in one process keeps the GPU's clocks and temperature and the
allocator's state alike for all of them, which separate processes (``bench_commits.py``)
do not. Also the peak memory of a call (``torch.cuda.max_memory_allocated``, inputs and
the output gradient included). ``default`` in the JSON names the way the library's
settings take at that head dim.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from measure import GiB, result_path, stamp, write_json

import dilated_attention_pytorch as dap
from dilated_attention_pytorch.backends.triton import launch
from dilated_attention_pytorch.plan import make_plan

SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]
WAYS = {
    # name: (BRANCH_MODE, JOINT_DKDV_MAX_HEAD_DIM)
    "joint": ("joint", None),
    "joint_fwd_dq": ("joint", 0),
    "per_branch": ("per_branch", None),
}
# The passes each way runs jointly.
JOINT_PASSES = {
    "joint": frozenset({"forward", "dq", "dkdv"}),
    "joint_fwd_dq": frozenset({"forward", "dq"}),
    "per_branch": frozenset(),
}


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
    decisions)."""
    found = joint_passes(D, H, N)
    return next(way for way, passes in JOINT_PASSES.items() if passes == found)


def run_dim(D: int, N: int, H: int, rounds: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_(True)

    def step() -> None:
        out = dap.dilated_attention(q, k, v, SEGMENTS, RATES, backend="triton")
        torch.autograd.grad(out, (q, k, v), dout)

    saved = launch.BRANCH_MODE, launch.JOINT_DKDV_MAX_HEAD_DIM
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    peaks: dict[str, float] = {}
    try:
        for settings in WAYS.values():  # compile and warm up
            launch.BRANCH_MODE, launch.JOINT_DKDV_MAX_HEAD_DIM = settings
            step()
            step()
        torch.cuda.synchronize()
        for _ in range(rounds):
            for way, settings in WAYS.items():
                launch.BRANCH_MODE, launch.JOINT_DKDV_MAX_HEAD_DIM = settings
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times[way].append(start.elapsed_time(end))
                peaks[way] = torch.cuda.max_memory_allocated() / GiB
    finally:
        launch.BRANCH_MODE, launch.JOINT_DKDV_MAX_HEAD_DIM = saved
    ways = {
        w: dict(ms=statistics.median(t), reps=[round(x, 2) for x in t], peak_gib=peaks[w])
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_joint_passes.py times the Triton kernels: it needs a CUDA GPU")
    result = stamp("cuda")
    result.update(segments=SEGMENTS, rates=RATES, dtype="bfloat16", rows=[])
    path = result_path(args.out, "joint_passes", "cuda")
    print(
        "| D | way | fwd+bwd ms | vs per_branch | peak GiB |\n| ---: | --- | ---: | ---: | ---: |"
    )
    for D in (int(d) for d in args.dims.split(",")):
        row = run_dim(D, args.seq_len, args.heads, args.rounds)
        result["rows"].append(row)
        write_json(path, result)
        base = row["ways"]["per_branch"]["ms"]
        for way, r in row["ways"].items():
            mark = " (default)" if way == row["default"] else ""
            print(
                f"| {D} | {way}{mark} | {r['ms']:.1f} | {r['ms'] / base:.3f} | {r['peak_gib']:.2f} |"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
