from __future__ import annotations

import pytest

from dilated_attention_pytorch.oracle import _head_offsets
from dilated_attention_pytorch.plan import make_plan, num_dilated_positions
from dilated_attention_pytorch.validation import validate_branches


@pytest.mark.parametrize("mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 8, 16])
def test_plan_offsets_match_definition(mixing: str, num_heads: int) -> None:
    ws, rs = [4, 8, 16], [1, 3, 5]
    plan = make_plan(ws, rs, num_heads, mixing)
    table = plan.offsets()
    for i, r in enumerate(rs):
        assert table[i] == _head_offsets(i, len(ws), r, num_heads, mixing)


def test_head_split_groups_are_contiguous_first_groups_larger() -> None:
    plan = make_plan([4, 8, 16], [1, 2, 4], 8, "head_split")
    assert [b.heads for b in plan.branches] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    # head j of a group uses offset j mod r
    assert plan.offsets()[1][3:6] == [0, 1, 0]


def test_softmax_plan_with_fewer_heads_than_dilation_leaves_offsets_unused() -> None:
    plan = make_plan([16], [8], 3, "softmax")
    assert [g.offset for g in plan.branches[0].head_groups] == [0, 1, 2]


def test_plan_is_cached() -> None:
    assert make_plan([4], [2], 4) is make_plan((4,), (2,), 4)


@pytest.mark.parametrize(
    ("length", "r", "o", "expected"),
    [(8, 2, 0, 4), (8, 3, 2, 2), (7, 3, 0, 3), (2, 3, 2, 0), (0, 1, 0, 0)],
)
def test_num_dilated_positions(length: int, r: int, o: int, expected: int) -> None:
    assert num_dilated_positions(length, r, o) == expected == len(range(o, length, r))


def test_validate_branches_returns_tuples() -> None:
    assert validate_branches([4, 8], [1, 2]) == ((4, 8), (1, 2))
