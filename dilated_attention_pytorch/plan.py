"""The plan: which heads run which branch, with which token offset.

Pure Python, no torch. Every backend and the ring consume a :class:`DilatedPlan`;
nobody re-derives head offsets (DESIGN.md section 2.1).

A *branch* is a pair ``(w, r)``: segment length ``w`` and dilation rate ``r``.
Within a branch, the heads that share one token offset ``o`` form a
:class:`HeadGroup`. Its heads are always an arithmetic progression
``range(head_start, head_stop, head_step)``, so a backend can select them with a
strided view of the head dimension instead of a gather.

- ``"softmax"`` mixing: every head runs every branch; head ``h`` uses offset
  ``h mod r``. The heads with offset ``o`` are ``range(o, H, r)``.
- ``"head_split"`` mixing: heads are cut into ``G = len(branches)`` contiguous
  groups, the first ``H % G`` one head larger; group ``i`` runs branch ``i`` only
  and its ``j``-th head uses offset ``j mod r_i``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

BRANCH_MIXINGS = ("softmax", "head_split")


@dataclass(frozen=True)
class HeadGroup:
    """Heads ``range(head_start, head_stop, head_step)`` of one branch, all with token offset ``offset``."""

    offset: int
    head_start: int
    head_stop: int
    head_step: int

    @property
    def heads(self) -> range:
        return range(self.head_start, self.head_stop, self.head_step)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def head_slice(self) -> slice:
        return slice(self.head_start, self.head_stop, self.head_step)


@dataclass(frozen=True)
class Branch:
    """One ``(segment_length, dilation_rate)`` pair and the head groups that run it."""

    segment_length: int
    dilation_rate: int
    head_groups: tuple[HeadGroup, ...]

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(sorted(h for g in self.head_groups for h in g.heads))


@dataclass(frozen=True)
class DilatedPlan:
    """All branches of one attention call. Built by :func:`make_plan`."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    num_heads: int
    branch_mixing: str
    branches: tuple[Branch, ...]

    def offsets(self) -> list[list[int | None]]:
        """``offsets()[i][h]``: the offset head ``h`` uses in branch ``i``, ``None`` if it does not run it."""
        table: list[list[int | None]] = []
        for branch in self.branches:
            row: list[int | None] = [None] * self.num_heads
            for group in branch.head_groups:
                for h in group.heads:
                    row[h] = group.offset
            table.append(row)
        return table


def num_dilated_positions(length: int, dilation_rate: int, offset: int) -> int:
    """Number of positions ``t`` in ``[0, length)`` with ``t mod r == offset``."""
    if length <= offset:
        return 0
    return (length - offset + dilation_rate - 1) // dilation_rate


def _check_int_list(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a list or tuple of positive ints, got {type(values).__name__} "
            f"{values!r}; pass e.g. {name}=[2048, 4096]."
        )
    out = []
    for i, v in enumerate(values):
        # bool is an int subclass; reject it explicitly.
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(
                f"{name}[{i}] must be an int, got {type(v).__name__} {v!r}; "
                f"convert it with int() or fix the config."
            )
        if v <= 0:
            raise ValueError(
                f"{name}[{i}] must be a positive int, got {v}; every segment length and "
                f"dilation rate must be >= 1."
            )
        out.append(int(v))
    return tuple(out)


def validate_branches(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the branch lists of DESIGN.md section 1 and return them as int tuples.

    Raises:
        TypeError: a list is not a sequence of ints.
        ValueError: an empty list, unequal lengths, a non-positive value or ``r > w``.
    """
    ws = _check_int_list("segment_lengths", segment_lengths)
    rs = _check_int_list("dilation_rates", dilation_rates)
    if len(ws) == 0 or len(rs) == 0:
        raise ValueError(
            f"segment_lengths and dilation_rates must be non-empty, got {list(ws)} and "
            f"{list(rs)}; give at least one branch, e.g. segment_lengths=[N], dilation_rates=[1]."
        )
    if len(ws) != len(rs):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length (one dilation rate "
            f"per segment length), got {len(ws)} segment lengths {list(ws)} and {len(rs)} "
            f"dilation rates {list(rs)}."
        )
    for i, (w, r) in enumerate(zip(ws, rs)):
        if r > w:
            raise ValueError(
                f"branch {i}: dilation rate {r} is larger than its segment length {w}; "
                f"each dilation rate must satisfy 1 <= r <= w."
            )
    return ws, rs


def check_branch_mixing(branch_mixing: object) -> str:
    if branch_mixing not in BRANCH_MIXINGS:
        raise ValueError(
            f"branch_mixing must be one of {list(BRANCH_MIXINGS)}, got {branch_mixing!r}."
        )
    return branch_mixing  # type: ignore[return-value]


def make_plan(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    branch_mixing: str = "softmax",
) -> DilatedPlan:
    """Build (and cache) the plan for ``num_heads`` heads.

    In ``"softmax"`` mode a head count smaller than the largest dilation rate is
    allowed: offsets ``>= num_heads`` then go unused, so some positions of that
    branch are covered by no head.
    """
    ws, rs = validate_branches(segment_lengths, dilation_rates)
    mixing = check_branch_mixing(branch_mixing)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}.")
    return _make_plan_cached(ws, rs, int(num_heads), mixing)


@functools.lru_cache(maxsize=256)
def _make_plan_cached(
    ws: tuple[int, ...], rs: tuple[int, ...], num_heads: int, mixing: str
) -> DilatedPlan:
    branches = []
    if mixing == "softmax":
        for w, r in zip(ws, rs):
            groups = tuple(HeadGroup(o, o, num_heads, r) for o in range(min(r, num_heads)))
            branches.append(Branch(w, r, groups))
    else:
        num_groups = len(ws)
        base, extra = divmod(num_heads, num_groups)
        start = 0
        for i, (w, r) in enumerate(zip(ws, rs)):
            size = base + (1 if i < extra else 0)
            stop = start + size
            groups = tuple(HeadGroup(o, start + o, stop, r) for o in range(min(r, size)))
            branches.append(Branch(w, r, groups))
            start = stop
    return DilatedPlan(ws, rs, num_heads, mixing, tuple(branches))
