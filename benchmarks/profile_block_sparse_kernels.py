"""Where the time of the block-sparse Triton kernels goes, next to FlexAttention's kernels.

    python benchmarks/profile_block_sparse_kernels.py --out DIR [--tokens 131072]

For each head dim: forward+backward of ``block_sparse_attention(..., backend="triton")``
and ``backend="flex"`` under ``torch.profiler``, CUDA time per kernel (mean per call),
then the Triton kernels with other tile sizes (``--sweep``). Bf16, B=1, H=16, blocks of
128, ``local_window`` at sparsity 0.9 unless ``--patterns`` says otherwise (``name:ratio``
each; the sweep runs on the first), not causal unless ``--causal``. ``--orig`` adds the
kernels of an earlier commit, side by side in the same process: copy that commit's file
next to the current one first,

    git show <commit>:dilated_attention_pytorch/sparse/triton_kernels.py \
        > dilated_attention_pytorch/sparse/_orig_kernels.py

(and delete the copy afterwards). Prints each row as a JSON line and writes them all to
``profile.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from dilated_attention_pytorch import block_sparse_attention, make_block_sparse_pattern
from dilated_attention_pytorch.sparse import functional, triton_kernels
from dilated_attention_pytorch.sparse.functional import clear_sparse_caches


class _Orig:
    """The kernels of ``_orig_kernels.py`` (a copy of an earlier ``triton_kernels.py``
    with the same call signature, when present) in place of the current ones."""

    @staticmethod
    def sparse_forward_triton(*a, **k):
        from dilated_attention_pytorch.sparse import _orig_kernels

        return _orig_kernels.sparse_forward_triton(*a, **k)

    @staticmethod
    def sparse_backward_triton(*a, **k):
        from dilated_attention_pytorch.sparse import _orig_kernels

        return _orig_kernels.sparse_backward_triton(*a, **k)

    schedules = staticmethod(triton_kernels.schedules)


# Tile sizes tried by --sweep, per kernel and head dim; row i of the sweep sets entry i
# of every kernel's list (a kernel whose list is shorter keeps its default).
SWEEP = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)]},
    "dkdv": {64: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 4)],
             128: [(32, 128, 8, 3), (32, 128, 8, 4), (64, 128, 8, 2)]},
    "dq": {64: [(128, 64, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)],
           128: [(128, 64, 8, 3), (64, 64, 4, 2), (64, 128, 8, 3)]},
}  # fmt: skip


def per_kernel(step, reps: int = 5) -> dict[str, float]:
    """Mean CUDA ms per call of each kernel that ``step`` launches."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name[:60]] += ev.device_time_total / 1e3 / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def median_ms(step, reps: int = 10) -> float:
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--patterns",
        nargs="+",
        default=["local_window:0.9"],
        help="pattern:ratio; the sweep runs on the first",
    )
    parser.add_argument(
        "--orig",
        action="store_true",
        help="also the kernels of sparse/_orig_kernels.py (an earlier triton_kernels.py)",
    )
    parser.add_argument("--causal", action="store_true", help="causal patterns")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    args = parser.parse_args()
    N, H, rows = args.tokens, 16, []
    patterns = []
    for spec in args.patterns:
        name, ratio = spec.split(":")
        patterns.append(
            (
                spec,
                make_block_sparse_pattern(
                    name, N, block_size=128, sparsity_ratio=float(ratio), is_causal=args.causal
                ),
            )
        )
    methods = ["triton"] + (["orig"] if args.orig else []) + ([] if args.no_flex else ["flex"])
    for D in args.head_dims:
        q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))  # fmt: skip
        leaves = [t.requires_grad_() for t in (q, k, v)]

        def step(method, backward=True, leaves=leaves, dout=dout, pattern=patterns[0][1]):
            def run():
                for t in leaves:
                    t.grad = None
                out = block_sparse_attention(*leaves, pattern, backend=method)
                if backward:
                    out.backward(dout)

            return run

        for spec, pattern in patterns:
            for method in methods:
                t0 = time.time()
                shim = method == "orig"
                if shim:
                    functional.triton_kernels = _Orig
                name = "triton" if shim else method
                try:
                    fwd = median_ms(step(name, False, pattern=pattern))
                    both = median_ms(step(name, True, pattern=pattern))
                    kernels = per_kernel(step(name, True, pattern=pattern))
                finally:
                    functional.triton_kernels = triton_kernels
                rows.append({"D": D, "pattern": spec, "method": method, "tiles": "default",
                             "fwd_ms": fwd, "fwd_bwd_ms": both, "kernels": kernels,
                             "wall_s": time.time() - t0})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        if args.sweep:
            saved = {kn: triton_kernels.TILE_CONFIGS[kn][D] for kn in SWEEP}
            for i in range(max(len(SWEEP[kn][D]) for kn in SWEEP)):
                for kn in SWEEP:
                    tried = SWEEP[kn][D]
                    triton_kernels.TILE_CONFIGS[kn][D] = tried[i] if i < len(tried) else saved[kn]
                row = {"D": D, "method": "triton",
                       "tiles": {kn: triton_kernels.TILE_CONFIGS[kn][D] for kn in SWEEP}}  # fmt: skip
                try:
                    row["kernels"] = per_kernel(step("triton", True))
                except Exception as e:  # noqa: BLE001
                    row["error"] = str(e)[-300:]
                rows.append(row)
                print(json.dumps(row), flush=True)
            for kn in SWEEP:
                triton_kernels.TILE_CONFIGS[kn][D] = saved[kn]
        del q, k, v, dout, leaves
        clear_sparse_caches()
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "args": vars(args), "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
