"""Draw how Hilbert token order shapes dilated-attention segments into ``docs/hilbert.png``.

A synthetic picture is cut into a grid of patches (tokens) and the tokens are cut into
segments of ``SEGMENT`` consecutive tokens, as dilated attention does. Black lines
are segment boundaries. In row-major order (left) each segment is a strip a few rows
high; in the order of :func:`dilated_attention_pytorch.hilbert.hilbert_permutation`
each segment is a square on a power-of-two grid (middle) and a compact blob on any
other grid (right). The thin white line is the curve itself.

Usage: ``python scripts/draw_hilbert.py [--out docs/hilbert.png]`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

from dilated_attention_pytorch.hilbert import (  # noqa: E402
    hilbert_permutation,
    segment_boundaries,
    segment_map,
)

SEGMENT = 256  # tokens per dilated-attention segment
SQUARE = (64, 64)  # patch grid (rows, columns) of the first two panels
RECTANGLE = (48, 80)  # a grid that is not a power-of-two square


def _picture(height: int, width: int) -> torch.Tensor:
    """A smooth colourful ``(height, width, 3)`` image in [0, 1]: waves and a disc."""
    y = torch.linspace(0, 1, height).view(-1, 1)
    x = torch.linspace(0, 1, width).view(1, -1) * (width / height)
    red = 0.5 + 0.5 * torch.sin(6.0 * x + 2.0 * y)
    green = 0.5 + 0.5 * torch.sin(5.0 * y - 3.0 * x * y + 1.0)
    blue = 0.5 + 0.5 * torch.cos(4.0 * (x - 0.3) ** 2 + 7.0 * y**2)
    image = torch.stack(torch.broadcast_tensors(red, green, blue), dim=-1)
    disc = ((x - 0.35 * width / height) ** 2 + (y - 0.6) ** 2 < 0.04).unsqueeze(-1)
    image = torch.where(disc, torch.tensor([0.95, 0.85, 0.2]), image)
    return 0.35 + 0.65 * image  # lighter, so the lines stay visible


def _segment_boundaries(order: torch.Tensor, height: int, width: int) -> LineCollection:
    """Black lines between neighbouring cells that lie in different segments."""
    edges = segment_boundaries(segment_map(order, height, width, SEGMENT))
    return LineCollection(edges, colors="black", linewidths=1.3)


def _panel(ax, height: int, width: int, order: torch.Tensor, title: str, curve: bool) -> None:
    ax.imshow(_picture(height, width).numpy(), interpolation="nearest")
    if curve:
        rows, cols = order // width, order % width
        ax.plot(cols.numpy(), rows.numpy(), color="white", linewidth=0.5, alpha=0.9)
        ends = dict(marker="o", markersize=6, markeredgecolor="black", ls="none", clip_on=False)
        ax.plot(cols[:1].numpy(), rows[:1].numpy(), color="limegreen", **ends)  # start
        ax.plot(cols[-1:].numpy(), rows[-1:].numpy(), color="red", **ends)  # end
    ax.add_collection(_segment_boundaries(order, height, width))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def draw(out: Path) -> None:
    (h1, w1), (h2, w2) = SQUARE, RECTANGLE
    side = int(math.isqrt(SEGMENT))
    fig, axes = plt.subplots(
        1,
        3,
        figsize=(12.5, 4.6),
        gridspec_kw={"width_ratios": [w1 / h1, w1 / h1, w2 / h2]},
        layout="constrained",
    )
    _panel(
        axes[0],
        h1,
        w1,
        torch.arange(h1 * w1),
        f"row-major, {h1} x {w1} patches:\neach segment is a {SEGMENT // w1} x {w1} strip",
        curve=False,
    )
    _panel(
        axes[1],
        h1,
        w1,
        hilbert_permutation(h1, w1),
        f"Hilbert order, {h1} x {w1} patches:\neach segment is a {side} x {side} square",
        curve=True,
    )
    _panel(
        axes[2],
        h2,
        w2,
        hilbert_permutation(h2, w2),
        f"generalized Hilbert order, {h2} x {w2} patches:\neach segment is a compact blob",
        curve=True,
    )
    fig.suptitle(
        f"Dilated-attention segments of {SEGMENT} consecutive tokens (black boundaries) "
        f"on a grid of image patches; white line: the curve, from the green dot to the red one",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    # 128 colours keep the file small (~50 KiB instead of ~190 KiB) with no visible loss.
    image = Image.open(buffer).convert("RGB").quantize(colors=128)
    image.save(out, format="png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "hilbert.png"
    )
    args = parser.parse_args()
    draw(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
