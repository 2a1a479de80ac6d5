"""Plot block-sparse forward+backward time against sparsity from a benchmark JSON.

Reads the rows of one or more benchmark JSON files (written by
``benchmarks/bench_block_sparse.py``; by default the two runs of the current kernels'
sweep, ``block_sparse_nvidia-h200_pipelined_sweep_{a,b}_20261204.json``) and draws, per head dim, the time of the Triton
kernels and of FlexAttention for each pattern, dense cuDNN SDPA, and dense time x the
kept fraction (time proportional to the kept blocks), into ``docs/block_sparse_speed.png``.

Usage: ``python scripts/plot_block_sparse_speed.py [--json F [F ...]] [--seq-len N] [--out F]``
(needs matplotlib).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_JSON = [
    RESULTS / f"block_sparse_nvidia-h200_pipelined_sweep_{part}_20261204.json" for part in "ab"
]
STYLE = {"triton": "-o", "flex": "--s"}


def draw(data: dict, seq_len: int, out: Path) -> None:
    rows = [r for r in data["rows"] if r["seq_len"] == seq_len and r["backward"] and "ms" in r]
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4.2), layout="constrained",
                             squeeze=False)  # fmt: skip
    for ax, D in zip(axes[0], dims, strict=True):
        here = [r for r in rows if r["head_dim"] == D]
        dense = next(r["ms"] for r in here if r["method"] == "dense")
        kept = sorted({1 - r["sparsity"] for r in here if r["method"] != "dense"})
        ax.plot([1 - k for k in kept], [dense * k for k in kept], ":", color="grey",
                label="dense x kept fraction")  # fmt: skip
        ax.axhline(dense, color="black", lw=1, label=f"dense cuDNN SDPA ({dense:.0f} ms)")
        for method, style in STYLE.items():
            for pattern in sorted({r["pattern"] for r in here if r["method"] == method}):
                pts = sorted((r["sparsity"], r["ms"]) for r in here
                             if r["method"] == method and r["pattern"] == pattern)  # fmt: skip
                ax.plot(*zip(*pts, strict=True), style, ms=3, lw=1, label=f"{method} {pattern}")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity ratio (fraction of block pairs dropped)")
        ax.set_ylabel("forward+backward ms")
        ax.set_title(f"N = {seq_len:,}, D = {D}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncols=2)
    fig.suptitle(f"Block-sparse attention on one {data.get('device', 'GPU')}, bf16, H = 16",
                 fontsize=10)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    Image.open(buffer).convert("P", palette=Image.Palette.ADAPTIVE).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, nargs="+", default=DEFAULT_JSON)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "block_sparse_speed.png")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.json]
    # One run's device and settings, every run's rows (a sweep split over several runs);
    # a row measured twice is taken from the later run.
    rows: dict[tuple, dict] = {}
    for run in runs:
        for row in run["rows"]:
            key = tuple(row.get(k) for k in ("method", "pattern", "head_dim", "sparsity",
                                             "seq_len", "backward", "causal"))  # fmt: skip
            rows[key] = row
    data = {**runs[0], "rows": list(rows.values())}
    draw(data, args.seq_len, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
