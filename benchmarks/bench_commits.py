"""The Triton backend of several source trees, timed side by side on one GPU.

    git archive ab1ef4e dilated_attention_pytorch | tar -x -C /tmp/old   # one tree per commit
    python benchmarks/bench_commits.py --out benchmarks/results --trees before=/tmp/old,now=.

Each tree is a folder holding a ``dilated_attention_pytorch`` package (the working tree is
``.``). For each tree, in order, a fresh Python process puts the tree first on
``sys.path`` and times ``dilated_attention(..., backend="triton")`` on LongNet's layer
(bf16, ``B = 1``, ``N = --seq-len``, ``H = --heads`` (16), ``D = --dim``, K/V with
``--kv-heads`` heads (default ``H``; fewer: grouped-query attention), segment lengths
2048..32768, rates 1..16, the same random inputs for every tree): each case is the median
of 10 runs (forward) or 5 (forward+backward) after 2 untimed ones, timed with CUDA events
(``measure.time_ms``). Cases (``--cases``): ``fwd`` (softmax mixing), ``fwd_hs``
(``head_split``), ``fwd_causal``, ``bwd`` (forward+backward, softmax), ``bwd_hs``,
``bwd_causal``. Give the
first tree again at the end (``--trees a=X,b=Y,a2=X``) to see the machine's drift.
With ``--profile`` each case also runs once under ``torch.profiler``: the GPU time of
every kernel of that call (ms, summed over its launches), to see which kernel a change
moved.

``--tiles NAME:KERNEL:D=BM,BN,WARPS,STAGES[,MAXNREG]`` (repeatable) sets one tile config
of tree ``NAME`` before it runs (``KERNEL``: ``fwd``, ``dkdv``, ``dq`` or ``dkdv_dq``, the
tables ``FWD_CONFIGS``, ``DKDV_CONFIGS``, ``DQ_CONFIGS``, ``DKDV_DQ_CONFIGS`` of
``backends/triton/launch.py``), so tile candidates run side by side without a copy of
the tree: ``--trees now=.,dq64=.,now2=. --tiles dq64:dq:64=64,64,4,3``.

Prints a table (ms per case and tree) and writes ``commits_<device>_<date>.json``
(stamp, setup, per tree its folder and times) to ``--out``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CASES = ("fwd", "fwd_hs", "fwd_causal", "bwd", "bwd_hs", "bwd_causal")
TILE_TABLES = {
    "fwd": "FWD_CONFIGS",
    "dkdv": "DKDV_CONFIGS",
    "dq": "DQ_CONFIGS",
    "dkdv_dq": "DKDV_DQ_CONFIGS",
}
SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]


def parse_tiles(specs: list[str], names: list[str]) -> dict[str, list[list]]:
    """``--tiles`` values -> ``{tree name: [[kernel, head dim, [BM, BN, warps, stages(,
    maxnreg)]], ...]}``; raises ``ValueError`` naming what is wrong."""
    tiles: dict[str, list[list]] = {}
    for spec in specs:
        try:
            name, kernel, rest = spec.split(":")
            dim, values = rest.split("=")
            config = [int(x) for x in values.split(",")]
            dim = int(dim)
        except ValueError:
            raise ValueError(
                f"--tiles wants NAME:KERNEL:D=BM,BN,WARPS,STAGES[,MAXNREG], got {spec!r}"
            ) from None
        if name not in names:
            raise ValueError(f"--tiles {spec!r}: no tree named {name!r} in --trees {names}")
        if kernel not in TILE_TABLES:
            raise ValueError(
                f"--tiles {spec!r}: kernel {kernel!r} is not one of {list(TILE_TABLES)}"
            )
        if len(config) not in (4, 5) or min(config) < 1:
            raise ValueError(
                f"--tiles {spec!r}: a config is 4 or 5 positive ints (BM, BN, warps, stages"
                f"[, maxnreg])"
            )
        tiles.setdefault(name, []).append([kernel, dim, config])
    return tiles


def apply_tiles(launch, tiles: list[list]) -> None:
    """Install ``tiles`` (one tree's part of :func:`parse_tiles`) in the ``launch`` module."""
    for kernel, dim, config in tiles:
        table = getattr(launch, TILE_TABLES[kernel])
        if dim not in table:
            raise ValueError(f"{TILE_TABLES[kernel]} has no head dim {dim}; it has {list(table)}")
        table[dim] = launch.KernelConfig(*config)


def kernel_ms(call) -> dict[str, float]:
    """GPU milliseconds per kernel name of one ``call()``, summed over its launches, largest
    first (``torch.profiler``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            totals[e.key[:100]] = totals.get(e.key[:100], 0.0) + us / 1000
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def run_tree(
    tree: str,
    cases: list[str],
    seq_len: int,
    dim: int,
    profile: bool = False,
    tiles: list[list] | None = None,
    heads: int = 16,
    kv_heads: int | None = None,
) -> dict[str, dict]:
    """Time ``cases`` with the package of ``tree`` (call in a fresh process) and its
    ``tiles`` (:func:`apply_tiles`): ``ms`` per case and, with ``profile``, ``kernels``
    per case (:func:`kernel_ms`)."""
    sys.path.insert(0, os.path.abspath(tree))
    import torch
    from measure import time_ms

    import dilated_attention_pytorch as dap

    if not dap.__file__.startswith(os.path.abspath(tree)):
        raise RuntimeError(f"imported {dap.__file__}, not the package of {tree}")
    if tiles:
        from dilated_attention_pytorch.backends.triton import launch

        apply_tiles(launch, tiles)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, seq_len, n, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        for n in (heads, kv_heads or heads, kv_heads or heads, heads)
    )
    times, kernels = {}, {}
    for case in cases:
        mixing = "head_split" if case.endswith("_hs") else "softmax"
        causal = case.endswith("_causal")
        backward = case.startswith("bwd")
        for t in (q, k, v):
            t.requires_grad_(backward)

        def call(mixing=mixing, causal=causal, backward=backward):
            out = dap.dilated_attention(
                q, k, v, SEGMENTS, RATES, branch_mixing=mixing, is_causal=causal, backend="triton"
            )
            if backward:
                torch.autograd.grad(out, (q, k, v), dout)

        times[case] = time_ms(call, "cuda", reps=5 if backward else 10, warmup=2)
        print(f"  {case}: {times[case]:.2f} ms", flush=True)
        if profile:
            kernels[case] = kernel_ms(call)
            for name, ms in list(kernels[case].items())[:6]:
                print(f"    {ms:8.2f} ms  {name}", flush=True)
    return dict(ms=times, kernels=kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON")
    parser.add_argument(
        "--trees", required=True, help="name=folder,... (folders holding the package)"
    )
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=None, help="K/V heads (default H)")
    parser.add_argument("--profile", action="store_true", help="GPU time per kernel too")
    parser.add_argument(
        "--tiles",
        action="append",
        default=[],
        help="NAME:KERNEL:D=BM,BN,WARPS,STAGES[,MAXNREG]: a tile config of one tree (repeatable)",
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("TREE", "NAME", "JSON"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    cases = args.cases.split(",")
    if unknown := sorted(set(cases) - set(CASES)):
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    trees = [item.split("=", 1) for item in args.trees.split(",")]
    try:
        tiles = parse_tiles(args.tiles, [t[0] for t in trees])
    except ValueError as exc:
        parser.error(str(exc))
    if args.worker:
        tree, name, path = args.worker
        with open(path, "w") as f:
            json.dump(
                run_tree(tree, cases, args.seq_len, args.dim, args.profile, tiles.get(name),
                         args.heads, args.kv_heads), f,
            )  # fmt: skip
        return

    from measure import result_path, stamp, write_json

    if any(len(t) != 2 or not os.path.isdir(os.path.join(t[1], "dilated_attention_pytorch"))
           for t in trees):  # fmt: skip
        parser.error(
            f"--trees wants name=folder pairs of folders holding the package, got {args.trees!r}"
        )
    result = {
        **stamp("cuda"),
        "setup": dict(B=1, N=args.seq_len, H=args.heads, H_kv=args.kv_heads or args.heads,
                      D=args.dim, dtype="bfloat16", segments=SEGMENTS,
                      rates=RATES, backend="triton", reps=dict(fwd=10, bwd=5), warmup=2),
        "trees": [],
    }  # fmt: skip
    path = result_path(args.out, "commits", "cuda")
    for name, folder in trees:
        print(f"{name} ({folder})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times.json")
            cmd = [sys.executable, __file__, "--out", args.out, "--trees", args.trees,
                   "--cases", args.cases, "--seq-len", str(args.seq_len), "--dim", str(args.dim),
                   "--heads", str(args.heads),
                   *(["--kv-heads", str(args.kv_heads)] if args.kv_heads else []),
                   *(["--profile"] if args.profile else []),
                   *(f"--tiles={t}" for t in args.tiles), "--worker", folder, name, out]  # fmt: skip
            subprocess.run(cmd, check=True)
            with open(out) as f:
                times = json.load(f)
        result["trees"].append(dict(name=name, folder=folder, tiles=tiles.get(name, []), **times))
        write_json(path, result)
    print("\n| tree | " + " | ".join(cases) + " |")
    print("| --- |" + " ---: |" * len(cases))
    for t in result["trees"]:
        print(f"| {t['name']} | " + " | ".join(f"{t['ms'][c]:.2f}" for c in cases) + " |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
