"""Draw the dilated attention pattern, per head, into ``docs/pattern.png``.

Each panel is ``M[h, p, p']`` of the definition: how many branches of head ``h``
let query ``p`` (row) attend to key ``p'`` (column). The head offsets in the titles
come from :func:`dilated_attention_pytorch.make_plan`.

Usage: ``python scripts/draw_pattern.py [--out docs/pattern.png]`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from dilated_attention_pytorch import make_plan  # noqa: E402
from dilated_attention_pytorch.oracle import dilated_count_mask  # noqa: E402

SEQ_LEN = 32
NUM_HEADS = 4
SEGMENT_LENGTHS = (8, 16, 32)
DILATION_RATES = (1, 2, 4)


def _offsets_label(offsets: list[int | None]) -> str:
    return ", ".join("-" if o is None else str(o) for o in offsets)


def draw(out: Path) -> None:
    modes = ("softmax", "head_split")
    fig, axes = plt.subplots(
        len(modes), NUM_HEADS, figsize=(2.1 * NUM_HEADS + 1, 2.4 * len(modes)), layout="constrained"
    )
    num_branches = len(SEGMENT_LENGTHS)
    # 0 (white) .. number of branches (darkest): a pair can lie in several branches.
    cmap = ListedColormap(["#ffffff", "#9ecae1", "#4292c6", "#08306b"][: num_branches + 1])
    for row, mode in enumerate(modes):
        plan = make_plan(SEGMENT_LENGTHS, DILATION_RATES, NUM_HEADS, mode)
        offsets = plan.offsets()  # offsets[branch][head]
        counts = dilated_count_mask(
            SEQ_LEN, NUM_HEADS, SEGMENT_LENGTHS, DILATION_RATES, branch_mixing=mode
        )
        for h in range(NUM_HEADS):
            ax = axes[row, h]
            image = ax.imshow(counts[h].numpy(), cmap=cmap, vmin=-0.5, vmax=num_branches + 0.5)
            ax.set_title(
                f"{mode}, head {h}\noffset per branch: {_offsets_label([b[h] for b in offsets])}",
                fontsize=8,
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"N={SEQ_LEN}, segment_lengths={list(SEGMENT_LENGTHS)}, "
        f"dilation_rates={list(DILATION_RATES)}  (rows: queries, columns: keys)",
        fontsize=9,
    )
    bar = fig.colorbar(image, ax=axes, ticks=range(num_branches + 1), shrink=0.7)
    bar.set_label("branches containing the pair", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "pattern.png"
    )
    args = parser.parse_args()
    draw(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
