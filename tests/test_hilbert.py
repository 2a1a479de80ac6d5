"""Hilbert token order: permutation, textbook curve, unit steps, locality, inverse, errors."""

from __future__ import annotations

import time

import pytest
import torch

from dilated_attention_pytorch.hilbert import hilbert_permutation, inverse_permutation

SHAPES = [
    (1, 1),
    (1, 7),
    (7, 1),
    (2, 2),
    (4, 4),
    (8, 8),
    (3, 5),
    (6, 10),
    (5, 5),
    (16, 9),
    (32, 32),
    (33, 17),
    (2, 33),
    (12, 15),
    (64, 63),
]


def _rows_cols(perm: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return perm // width, perm % width


def _has_diagonal_step(height: int, width: int) -> bool:
    """The documented exception: longer side odd, shorter side even and at least 4."""
    longer, shorter = max(height, width), min(height, width)
    return longer % 2 == 1 and shorter % 2 == 0 and shorter >= 4


def _expected_end(height: int, width: int) -> tuple[int, int]:
    """The far corner of the longer side; one cell short of it when the shorter side is 2
    and the longer one odd (parity forbids the corner, and no diagonal step is made)."""
    longer, shorter = max(height, width), min(height, width)
    short_by = 1 if (shorter == 2 and longer % 2 == 1) else 0
    if width >= height:
        return 0, width - 1 - short_by
    return height - 1 - short_by, 0


def _d2xy(n: int, d: int) -> tuple[int, int]:
    """Textbook Hilbert index -> (x, y) on an n x n grid, n a power of two."""
    x = y = 0
    s, t = 1, d
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:  # rotate the sub-square
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x += s * rx
        y += s * ry
        t //= 4
        s *= 2
    return x, y


def _mean_perimeter(order: torch.Tensor, height: int, width: int, segment: int) -> float:
    """Mean perimeter (cell edges on the boundary) of the cell sets of the contiguous
    runs of ``segment`` tokens in ``order``: small means compact, a square of ``s`` cells
    has ``4 * sqrt(s)``, a 1 x s strip ``2 * s + 2``."""
    label = torch.empty(height * width, dtype=torch.long)
    label[order] = torch.arange(height * width) // segment
    grid = label.view(height, width)
    count = torch.zeros(int(label.max()) + 1)
    ones = torch.ones(height * width)
    for a, b in ((grid[:, 1:], grid[:, :-1]), (grid[1:], grid[:-1])):
        cut = a != b
        count.index_add_(0, a[cut], ones[: int(cut.sum())])
        count.index_add_(0, b[cut], ones[: int(cut.sum())])
    for border in (grid[0], grid[-1], grid[:, 0], grid[:, -1]):
        count.index_add_(0, border, ones[: border.numel()])
    return float(count.mean())


# --------------------------------------------------------------------------- permutation


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_is_a_permutation(height: int, width: int) -> None:
    perm = hilbert_permutation(height, width)
    assert perm.dtype == torch.long and perm.shape == (height * width,)
    assert torch.equal(torch.sort(perm).values, torch.arange(height * width))


@pytest.mark.parametrize("level", range(7))
def test_power_of_two_square_is_the_textbook_hilbert_curve(level: int) -> None:
    # Convention: d2xy's x is the column and y the row; both start at the top-left cell
    # and end at the top-right one (documented in the module).
    n = 2**level
    expected = torch.tensor([y * n + x for x, y in (_d2xy(n, d) for d in range(n * n))])
    assert torch.equal(hilbert_permutation(n, n), expected)


def test_small_examples() -> None:
    assert hilbert_permutation(2, 2).tolist() == [0, 2, 3, 1]
    assert hilbert_permutation(1, 5).tolist() == [0, 1, 2, 3, 4]
    assert hilbert_permutation(5, 1).tolist() == [0, 1, 2, 3, 4]
    # 2 x 3: the longer side (3) is odd and the shorter (2) even: unit steps, and the
    # curve ends one cell short of the top-right corner.
    assert hilbert_permutation(2, 3).tolist() == [0, 3, 4, 5, 2, 1]


# --------------------------------------------------------------------------- unit steps


def _check_steps(height: int, width: int) -> None:
    perm = hilbert_permutation(height, width)
    rows, cols = _rows_cols(perm, width)
    dr, dc = rows.diff().abs(), cols.diff().abs()
    diagonal = (dr == 1) & (dc == 1)
    assert bool(((dr + dc == 1) | diagonal).all()), (height, width)
    assert int(diagonal.sum()) == int(_has_diagonal_step(height, width)), (height, width)
    assert (int(rows[0]), int(cols[0])) == (0, 0)
    if height * width > 1:
        assert (int(rows[-1]), int(cols[-1])) == _expected_end(height, width), (height, width)


def test_consecutive_cells_are_neighbours_except_the_documented_diagonal() -> None:
    # Every grid up to 32 x 32: unit steps, except exactly one diagonal step when the
    # longer side is odd and the shorter side even and >= 4 (never for squares).
    for height in range(1, 33):
        for width in range(1, 33):
            _check_steps(height, width)


@pytest.mark.parametrize(
    ("height", "width"), [(12, 15), (15, 12), (4, 5), (33, 16), (2, 101), (101, 2), (100, 63)]
)
def test_documented_exception_on_larger_grids(height: int, width: int) -> None:
    _check_steps(height, width)


def test_large_grid_is_fast_and_continuous() -> None:
    start = time.perf_counter()
    perm = hilbert_permutation(1024, 1024)
    assert time.perf_counter() - start < 10.0  # ~0.05 s here; seconds at most
    assert torch.equal(torch.sort(perm).values, torch.arange(1024 * 1024))
    rows, cols = _rows_cols(perm, 1024)
    assert bool((rows.diff().abs() + cols.diff().abs() == 1).all())


# --------------------------------------------------------------------------- locality


@pytest.mark.parametrize("segment", [16, 64, 256, 1024])
def test_segments_are_squares_on_a_power_of_two_grid(segment: int) -> None:
    side = int(segment**0.5)
    perm = hilbert_permutation(64, 64)
    rows, cols = _rows_cols(perm, 64)
    for r, c in zip(rows.view(-1, segment), cols.view(-1, segment)):
        assert int(r.max() - r.min()) + 1 == side and int(c.max() - c.min()) + 1 == side
    # The least perimeter any set of `segment` cells can have.
    assert _mean_perimeter(perm, 64, 64, segment) == 4 * side


@pytest.mark.parametrize(("segment", "row_major"), [(64, 130.0), (256, 136.0)])
def test_segments_beat_row_major_strips_on_64x64(segment: int, row_major: float) -> None:
    # Row-major segments are 1 x 64 and 4 x 64 strips; Hilbert ones 8 x 8 and 16 x 16.
    assert _mean_perimeter(torch.arange(64 * 64), 64, 64, segment) == row_major
    hilbert = _mean_perimeter(hilbert_permutation(64, 64), 64, 64, segment)
    assert hilbert == 4 * segment**0.5 and hilbert <= 0.5 * row_major


@pytest.mark.parametrize(
    ("height", "width", "segment"),
    [(48, 80, 64), (63, 100, 64), (100, 100, 64), (96, 96, 64), (250, 250, 256)],
)
def test_segments_beat_row_major_strips_on_any_grid(height: int, width: int, segment: int) -> None:
    # segment <= width: row-major segments are (at most two-row) strips.
    hilbert = _mean_perimeter(hilbert_permutation(height, width), height, width, segment)
    row_major = _mean_perimeter(torch.arange(height * width), height, width, segment)
    assert hilbert <= 0.4 * row_major, (hilbert, row_major)


@pytest.mark.parametrize(
    ("height", "width"), [(48, 80), (63, 100), (33, 17), (60, 45), (96, 96), (250, 250)]
)
@pytest.mark.parametrize("segment", [16, 64, 256, 1024])
def test_segments_are_nearly_square_on_any_grid(height: int, width: int, segment: int) -> None:
    if segment > height * width // 4:
        pytest.skip("fewer than four segments")
    hilbert = _mean_perimeter(hilbert_permutation(height, width), height, width, segment)
    # Within 1.5x of a square's perimeter (observed: 1.14x .. 1.44x on these grids).
    assert hilbert <= 1.5 * 4 * segment**0.5, hilbert


# --------------------------------------------------------------------------- inverse


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_inverse_round_trips(height: int, width: int) -> None:
    perm = hilbert_permutation(height, width)
    inv = inverse_permutation(perm)
    n = height * width
    assert torch.equal(inv[perm], torch.arange(n)) and torch.equal(perm[inv], torch.arange(n))
    x = torch.randn(2, n, 3, 4)
    assert torch.equal(x[:, perm][:, inv], x)
    assert torch.equal(x[:, inv][:, perm], x)


def test_inverse_of_any_integer_permutation() -> None:
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    for p in (perm, perm.int(), perm.short()):
        inv = inverse_permutation(p)
        assert inv.dtype == torch.long and torch.equal(inv[perm], torch.arange(50))
    assert inverse_permutation(torch.empty(0, dtype=torch.long)).numel() == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("height", "width", "exc", "match"),
    [
        (8.0, 8, TypeError, r"height must be a positive int .*got float 8\.0; pass"),
        (8, "8", TypeError, r"width must be a positive int .*got str '8'; pass"),
        (True, 8, TypeError, r"height must be a positive int .*got bool True"),
        (8, None, TypeError, r"width must be a positive int .*got NoneType None"),
        (0, 8, ValueError, r"height must be a positive int .*got 0; a grid needs at least"),
        (8, -3, ValueError, r"width must be a positive int .*got -3; a grid needs at least"),
    ],
)
def test_bad_sides(height, width, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hilbert_permutation(height, width)


def test_numpy_integers_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    assert torch.equal(hilbert_permutation(np.int64(3), np.int32(5)), hilbert_permutation(3, 5))


@pytest.mark.parametrize(
    ("perm", "exc", "match"),
    [
        ([1, 0], TypeError, r"perm must be a torch\.Tensor .*got list; wrap it"),
        (torch.tensor([1.0, 0.0]), TypeError, r"integer dtype, got torch\.float32; convert"),
        (torch.tensor([True, False]), TypeError, r"integer dtype, got torch\.bool"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, r"1-D \(N,\), got shape \(2, 2\)"),
        (torch.tensor([0, 3, 1]), ValueError, r"range\(3\), but its values span \[0, 3\]"),
        (torch.tensor([-1, 0]), ValueError, r"values span \[-1, 0\]; every index"),
        (torch.tensor([0, 2, 2]), ValueError, r"range\(3\), but 2 appears 2 times"),
    ],
)
def test_bad_inverse_input(perm, exc, match) -> None:
    with pytest.raises(exc, match=match):
        inverse_permutation(perm)


# --------------------------------------------------------------------------- device, cache


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_device_is_honoured(device) -> None:
    perm = hilbert_permutation(4, 6, device=device)
    assert perm.device.type == "cpu" and perm.dtype == torch.long
    assert inverse_permutation(perm).device == perm.device


def test_each_call_returns_a_fresh_tensor() -> None:
    first = hilbert_permutation(8, 8)
    expected = first.clone()
    first.zero_()
    assert torch.equal(hilbert_permutation(8, 8), expected)


def test_segment_map_and_boundaries() -> None:
    from dilated_attention_pytorch.hilbert import segment_boundaries, segment_map

    raster = segment_map(torch.arange(16), 4, 4, 4)
    assert torch.equal(raster, torch.arange(4).repeat_interleave(4).view(4, 4))
    curve = segment_map(hilbert_permutation(4, 4), 4, 4, 4)
    # Along the curve the four segments of 4 cells are the four 2 x 2 quadrants.
    for r0, c0 in [(0, 0), (0, 2), (2, 0), (2, 2)]:
        assert curve[r0 : r0 + 2, c0 : c0 + 2].unique().numel() == 1
    # Boundary length: 3 full rows of 4 edges for strips, 2 crossing lines for quadrants.
    assert len(segment_boundaries(raster)) == 12
    assert len(segment_boundaries(curve)) == 8
    with pytest.raises(ValueError, match=r"order must have shape \(16,\)"):
        segment_map(torch.arange(15), 4, 4, 4)
