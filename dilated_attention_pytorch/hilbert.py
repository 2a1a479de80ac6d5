"""Hilbert-curve token order for 2-D patch grids.

Dilated attention cuts a ``(B, N, ...)`` sequence into contiguous segments of ``w``
tokens and attends within each. Image patches are usually flattened row by row, so on
a 64 x 64 patch grid a segment of 256 tokens is a 4 x 64 strip: a patch and the patch
just below it often sit in different segments. Reordering the tokens along a Hilbert
curve first makes each segment a compact 2-D region instead (a 16 x 16 square here,
a compact blob on any grid), so more spatial neighbours share a segment.

Usage, with ``x`` of shape ``(B, H*W, ...)`` in row-major patch order::

    perm = hilbert_permutation(H, W, device=x.device)  # (H*W,)
    inv = inverse_permutation(perm)                     # (H*W,)
    y = attention(x[:, perm])                           # segments are compact regions
    y = y[:, inv]                                       # back to row-major order

The curve
---------
A cell ``(r, c)`` of a ``height x width`` grid is token ``r * width + c`` and
``perm[k]`` is the token of the ``k``-th cell along the curve. The curve starts at the
top-left cell ``(0, 0)`` and runs along the longer side: for ``width >= height`` it
ends at the top-right cell ``(0, width - 1)``, otherwise at the bottom-left cell
``(height - 1, 0)``. On a ``2**L x 2**L`` grid it is the standard Hilbert curve, the
same order as the classic ``d2xy`` bit-twiddling with ``x`` the column and ``y`` the
row: it fills the top-left quadrant, then the bottom-left, bottom-right and top-right
ones, and every aligned run of ``4**k`` tokens is a ``2**k x 2**k`` square.

Any other grid gets a generalized Hilbert curve, built by recursive splitting of the
rectangle (the "gilbert" scheme of J. Červený). In the rectangle's own frame the
curve goes from corner ``(0, 0)`` to corner ``(w - 1, 0)`` of its major side (length
``w``; the minor side has length ``h``). A single row or column is walked straight.
A rectangle more than 1.5 times longer than high is cut across its major side into
two halves walked one after the other. Any other rectangle is cut into three: a
lower-left block ``w/2 x h/2`` walked up along the minor side, the full-width upper
part walked along the major side, and a lower-right block walked down, as in the
Hilbert "U". Halves are rounded to even lengths where that is possible, which keeps
every sub-rectangle fillable with unit steps between its two corners.

Unit steps, and the one exception
---------------------------------
Consecutive tokens are grid neighbours (Manhattan distance 1) with one exception:
when the longer side is odd and the shorter side is even and at least 4 (e.g.
``12 x 15``, ``4 x 5``, ``33 x 16``), the curve makes exactly one diagonal step (row
and column both change by 1). This is forced by ending at a corner: colour the grid
like a chess board; a path through all ``h * w`` cells (an even number) alternates
colours, so its two ends differ in colour, but the corners ``(0, 0)`` and
``(0, w - 1)`` have the same colour when ``w`` is odd. When the shorter side is 2
(``2 x 5``, ``7 x 2``, ...) the curve instead keeps unit steps and ends one cell
short of the corner, at ``(0, width - 2)`` or ``(height - 2, 0)``. Every other grid,
including all squares and all grids with an odd number of cells, has unit steps only
and ends at the corner. For attention only segment membership matters, and the
segments stay compact either way.

``hilbert_permutation`` caches the order per ``(height, width)`` and returns a new
tensor on each call; a 1024 x 1024 grid takes well under a second the first time.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor

__all__ = ["hilbert_permutation", "inverse_permutation", "segment_boundaries", "segment_map"]

# A piece of a split rectangle: its own (major, minor) lengths, whether its major axis
# runs along the parent's minor axis (swap), and the affine map from the piece's
# (major, minor) coordinates to the parent's: i = oi + si * a, j = oj + sj * b, where
# (a, b) are the piece's coordinates, swapped first when ``swap`` is set.
_Piece = tuple[int, int, bool, int, int, int, int]


def _split(w: int, h: int) -> list[_Piece]:
    """The pieces of a ``w x h`` rectangle (major side ``w``), in curve order; ``[]``
    for a single row or column, which is walked straight."""
    if w == 1 or h == 1:
        return []
    if 2 * w > 3 * h:
        # Long rectangle: two halves side by side along the major axis. An even first
        # half keeps the second half as fillable as the whole.
        w2 = w // 2
        if w2 % 2 and w > 2:
            w2 += 1
        return [(w2, h, False, 0, 1, 0, 1), (w - w2, h, False, w2, 1, 0, 1)]
    # Hilbert "U": up the lower-left block, across the top, down the lower-right block.
    # An even h2 lets both side blocks end at their far corner.
    h2 = h // 2
    if h2 % 2 and h > 2:
        h2 += 1
    w2 = w // 2
    return [
        (h2, w2, True, 0, 1, 0, 1),
        (w, h - h2, False, 0, 1, h2, 1),
        (h2, w - w2, True, w - 1, -1, h2 - 1, -1),
    ]


def _curve(w: int, h: int) -> tuple[Tensor, Tensor]:
    """Cells ``(i, j)`` of the generalized Hilbert curve of a ``w x h`` rectangle in its
    own frame (``i`` along the major side of length ``w``), as two int64 tensors.

    The curve depends only on ``(w, h)``, and the recursion meets only a few distinct
    sub-rectangle shapes (a handful per halving level), so each shape is built once,
    smallest first, from the curves of its pieces: no Python recursion, and the work
    is a few concatenations per shape.
    """
    pieces: dict[tuple[int, int], list[_Piece]] = {}
    todo = [(w, h)]
    while todo:
        shape = todo.pop()
        if shape not in pieces:
            pieces[shape] = _split(*shape)
            todo.extend(p[:2] for p in pieces[shape])
    curves: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    for cw, ch in sorted(pieces, key=lambda s: s[0] * s[1]):  # pieces are smaller
        parts = pieces[(cw, ch)]
        if not parts:
            line = torch.arange(max(cw, ch), dtype=torch.long)
            zero = torch.zeros_like(line)
            curves[(cw, ch)] = (line, zero) if ch == 1 else (zero, line)
            continue
        ii, jj = [], []
        for pw, ph, swap, oi, si, oj, sj in parts:
            a, b = curves[(pw, ph)]
            if swap:
                a, b = b, a
            ii.append(a * si + oi)
            jj.append(b * sj + oj)
        curves[(cw, ch)] = (torch.cat(ii), torch.cat(jj))
    return curves[(w, h)]


def _check_side(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(
            f"hilbert_permutation: {name} must be a positive int (patches along that side "
            f"of the grid), got bool {value!r}; pass the number of patches as an int."
        )
    try:
        side = operator.index(value)
    except TypeError:
        raise TypeError(
            f"hilbert_permutation: {name} must be a positive int (patches along that side "
            f"of the grid), got {type(value).__name__} {value!r}; pass the number of "
            f"patches as an int, e.g. {name}=image_size // patch_size."
        ) from None
    if side <= 0:
        raise ValueError(
            f"hilbert_permutation: {name} must be a positive int (patches along that side "
            f"of the grid), got {side}; a grid needs at least one patch per side "
            f"(use 1 for a single row or column)."
        )
    return side


@functools.lru_cache(maxsize=32)
def _hilbert_cpu(height: int, width: int) -> Tensor:
    if width >= height:
        i, j = _curve(width, height)  # major axis along the columns
        rows, cols = j, i
    else:
        i, j = _curve(height, width)  # major axis along the rows
        rows, cols = i, j
    return rows * width + cols


def hilbert_permutation(
    height: int, width: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Row-major token indices of a ``height x width`` patch grid in Hilbert-curve order.

    Cell ``(r, c)`` is token ``r * width + c``; ``perm[k]`` is the token of the
    ``k``-th cell along the curve, so ``x[:, perm]`` puts a ``(B, height*width, ...)``
    sequence in curve order and ``x[:, perm][:, inverse_permutation(perm)]`` is ``x``
    again. Power-of-two squares get the standard Hilbert curve, any other grid a
    generalized one whose contiguous runs of tokens cover compact 2-D regions;
    consecutive cells are grid neighbours except for one diagonal step when the longer
    side is odd and the shorter even and >= 4 (see the module docstring for the curve's
    start, end and orientation).

    Args:
        height: number of patch rows, a positive int.
        width: number of patch columns, a positive int.
        device: where to put the result (default: CPU).

    Returns:
        A new int64 tensor of shape ``(height * width,)`` holding a permutation of
        ``range(height * width)``; results are cached per ``(height, width)``.

    Raises:
        TypeError: ``height`` or ``width`` is not an int (bools are rejected too).
        ValueError: ``height`` or ``width`` is not positive.

    Example:
        >>> hilbert_permutation(2, 2)
        tensor([0, 2, 3, 1])
        >>> inverse_permutation(hilbert_permutation(4, 4)).view(4, 4)  # curve position
        tensor([[ 0,  1, 14, 15],
                [ 3,  2, 13, 12],
                [ 4,  7,  8, 11],
                [ 5,  6,  9, 10]])
    """
    h = _check_side("height", height)
    w = _check_side("width", width)
    return _hilbert_cpu(h, w).to(device=device, copy=True)


def inverse_permutation(perm: Tensor) -> Tensor:
    """The inverse of a permutation: ``inv[perm] = arange(N)``.

    ``y[:, inv]`` undoes ``y = x[:, perm]``, and ``inv[t]`` is the position of token
    ``t`` along the order ``perm`` describes.

    Args:
        perm: ``(N,)`` integer tensor holding each of ``0 .. N-1`` once.

    Returns:
        ``(N,)`` int64 tensor on ``perm``'s device.

    Raises:
        TypeError: ``perm`` is not a tensor, or not of an integer dtype.
        ValueError: ``perm`` is not 1-D, or not a permutation of ``range(N)``. The check
            reads values back, so on a GPU compute the inverse once, not every step.

    Example:
        >>> inverse_permutation(torch.tensor([2, 0, 1]))
        tensor([1, 2, 0])
    """
    if not isinstance(perm, Tensor):
        raise TypeError(
            f"inverse_permutation: perm must be a torch.Tensor of integer indices, got "
            f"{type(perm).__name__}; wrap it with torch.as_tensor(perm)."
        )
    if perm.dtype == torch.bool or perm.dtype.is_floating_point or perm.dtype.is_complex:
        raise TypeError(
            f"inverse_permutation: perm must have an integer dtype, got {perm.dtype}; "
            f"convert it with perm.long()."
        )
    if perm.dim() != 1:
        raise ValueError(
            f"inverse_permutation: perm must be 1-D (N,), got shape {tuple(perm.shape)}; "
            f"pass one permutation at a time."
        )
    perm = perm.long()
    n = perm.numel()
    if n and (int(perm.min()) < 0 or int(perm.max()) >= n):
        raise ValueError(
            f"inverse_permutation: perm must be a permutation of range({n}), but its "
            f"values span [{int(perm.min())}, {int(perm.max())}]; every index must lie "
            f"in [0, {n})."
        )
    counts = torch.bincount(perm, minlength=n)
    if n and bool((counts != 1).any()):
        dup = int(torch.argmax(counts))
        raise ValueError(
            f"inverse_permutation: perm must be a permutation of range({n}), but "
            f"{dup} appears {int(counts[dup])} times; each index must appear exactly once."
        )
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n, dtype=torch.long, device=perm.device)
    return inv


def segment_map(order: Tensor, height: int, width: int, segment_length: int) -> Tensor:
    """Which segment each cell of a patch grid falls in when tokens run in ``order``.

    Dilated attention cuts the token sequence into segments of ``segment_length``
    consecutive tokens; with the tokens of a ``height x width`` grid taken in ``order``
    (``torch.arange(height * width)`` for row-major, :func:`hilbert_permutation` for
    the curve), cell ``(r, c)`` is in segment ``position // segment_length``.

    Args:
        order: ``(height * width,)`` permutation: ``order[k]`` is the row-major cell of
            the ``k``-th token.
        height, width: the grid.
        segment_length: tokens per segment, positive.

    Returns:
        ``(height, width)`` int64 segment index of every cell.
    """
    _check_side("height", height)
    _check_side("width", width)
    _check_side("segment_length", segment_length)
    if tuple(order.shape) != (height * width,):
        raise ValueError(
            f"segment_map: order must have shape ({height * width},) for a {height} x "
            f"{width} grid, got {tuple(order.shape)}."
        )
    position = inverse_permutation(order)
    return (position // segment_length).view(height, width).cpu()


def segment_boundaries(labels: Tensor) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Unit edges between neighbouring cells of different segments, for drawing.

    Args:
        labels: ``(height, width)`` segment index per cell (:func:`segment_map`).

    Returns:
        ``((x0, y0), (x1, y1))`` line pieces in image coordinates (cell ``(r, c)`` is
        centred at ``x = c``, ``y = r``); their count is the total perimeter inside the
        grid, a measure of how compact the segments are.
    """
    edges: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for r, c in (labels[:, 1:] != labels[:, :-1]).nonzero().tolist():  # between c and c+1
        edges.append(((c + 0.5, r - 0.5), (c + 0.5, r + 0.5)))
    for r, c in (labels[1:] != labels[:-1]).nonzero().tolist():  # between r and r+1
        edges.append(((c - 0.5, r + 0.5), (c + 0.5, r + 0.5)))
    return edges
