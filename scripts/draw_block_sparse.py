"""Draw the block masks of the four block-sparse patterns into ``docs/block_sparse.png``.

One panel per generator of :func:`dilated_attention_pytorch.make_block_sparse_pattern`
(64 blocks, sparsity ratio 0.9, non-causal above and causal below): a dark cell is a
(query block, key block) pair that is computed; the title gives the achieved ratio and
the knob the generator chose.

Usage: ``python scripts/draw_block_sparse.py [--out docs/block_sparse.png]`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

from dilated_attention_pytorch import make_block_sparse_pattern  # noqa: E402
from dilated_attention_pytorch.sparse import PATTERN_TYPES  # noqa: E402

BLOCKS, BLOCK_SIZE, RATIO = 64, 64, 0.9


def draw(out: Path) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.4), layout="constrained")
    for row, causal in enumerate((False, True)):
        for col, name in enumerate(PATTERN_TYPES):
            pattern = make_block_sparse_pattern(
                name, BLOCKS * BLOCK_SIZE, block_size=BLOCK_SIZE, sparsity_ratio=RATIO,
                is_causal=causal,
            )  # fmt: skip
            ax = axes[row, col]
            ax.imshow(pattern.block_mask.numpy(), cmap="Greys", interpolation="nearest")
            knob = {k: v for k, v in pattern.knobs.items() if k != "branches_in_blocks"}
            knob_text = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in knob.items()
            )
            ax.set_title(
                f"{name}{' (causal)' if causal else ''}\n"
                f"dropped {pattern.sparsity_ratio:.3f}; {knob_text}",
                fontsize=8,
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.supxlabel("key block", fontsize=9)
    fig.supylabel("query block", fontsize=9)
    fig.suptitle(
        f"Block-sparse patterns: {BLOCKS} x {BLOCKS} blocks of {BLOCK_SIZE} tokens, requested "
        f"sparsity ratio {RATIO} (dark = computed)",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    Image.open(buffer).convert("L").save(out, format="png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "docs" / "block_sparse.png",
    )
    args = parser.parse_args()
    draw(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
