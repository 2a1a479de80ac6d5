"""The plan: which heads run which branch, with which token offset.

Pure Python (torch only to ask whether ``torch.compile`` is tracing). FLOP counts of a plan live here too, so that benchmarks and
memory estimates count the same work. Every backend and the ring consume a :class:`DilatedPlan`;
nobody re-derives head offsets.

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

Grouped-query attention (``num_kv_heads = H_kv < H``): query head ``h`` reads K/V head
``h // (H / H_kv)``. A head group's K/V heads are then split further so that each
:class:`HeadGroup` reads its K/V heads as a strided view too: its query heads come in runs
of ``kv_share`` consecutive heads (of the group) per K/V head, and its K/V heads are the
progression ``range(kv_start, kv_stop, kv_step)``. With ``r % (H / H_kv) == 0`` every
query head of a group has a K/V head of its own (``kv_share = 1``); with
``(H / H_kv) % r == 0`` runs of ``(H / H_kv) / r`` query heads share one. Several head
groups may then share one offset.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .validation import (
    check_branch_mixing,
    check_num_kv_heads,
    check_positive_int,
    validate_branches,
    warn_branches_without_heads,
    warn_uncovered_positions,
)

# Uncovered positions are searched among the first COVERAGE_SEARCH positions (the whole
# pattern when it repeats within them, as it does unless the segment lengths are huge
# and coprime).
COVERAGE_SEARCH = 2**16


@dataclass(frozen=True)
class HeadGroup:
    """Heads ``range(head_start, head_stop, head_step)`` of one branch, all with token offset ``offset``.

    They read K/V heads ``range(kv_start, kv_stop, kv_step)``: query head ``i`` of the
    group reads K/V head ``i // kv_share`` of it (the same heads, ``kv_share = 1``,
    without grouped-query attention).
    """

    offset: int
    head_start: int
    head_stop: int
    head_step: int
    kv_start: int = -1  # -1: the query heads themselves (set by __post_init__)
    kv_stop: int = -1
    kv_step: int = 1
    kv_share: int = 1

    def __post_init__(self) -> None:
        if self.kv_start < 0:
            object.__setattr__(self, "kv_start", self.head_start)
            object.__setattr__(self, "kv_stop", self.head_stop)
            object.__setattr__(self, "kv_step", self.head_step)

    @property
    def kv_heads(self) -> range:
        return range(self.kv_start, self.kv_stop, self.kv_step)

    @property
    def kv_slice(self) -> slice:
        return slice(self.kv_start, self.kv_stop, self.kv_step)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

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

    @property
    def offsets_used(self) -> int:
        """How many offsets some head uses: offsets ``0 .. offsets_used - 1``; positions
        at the others (``offsets_used .. r - 1``) take no part in this branch."""
        return len({g.offset for g in self.head_groups})


@dataclass(frozen=True)
class DilatedPlan:
    """All branches of one attention call. Built by :func:`make_plan`."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    num_heads: int
    branch_mixing: str
    branches: tuple[Branch, ...]
    num_kv_heads: int = 0  # K/V heads (0: num_heads, set by __post_init__)
    # A plan of some heads of a larger one (heads_plan): its head 0 is head ``first_head``
    # of a plan of ``parent_heads`` heads (0: num_heads). Dropout streams count in those.
    first_head: int = 0
    parent_heads: int = 0

    def __post_init__(self) -> None:
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.parent_heads == 0:
            object.__setattr__(self, "parent_heads", self.num_heads)

    @property
    def kv_group_size(self) -> int:
        """Query heads per K/V head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

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


@dataclass(frozen=True)
class UncoveredPositions:
    """Positions ``p`` that no head attends in any branch; their output is 0 for every head.

    ``p`` is uncovered when, in every branch ``(w, r)``, its offset ``(p mod w) mod r``
    is one that no head uses (see :attr:`Branch.offsets_used`).
    """

    examples: tuple[int, ...]  # the first uncovered positions (at most 8)
    period: int  # the pattern of uncovered positions repeats every ``period`` tokens
    per_period: int | None  # uncovered positions per period; None if not counted


def uncovered_positions(plan: DilatedPlan) -> UncoveredPositions | None:
    """The positions no head of ``plan`` attends, or ``None`` when every position has one.

    The search covers the first :data:`COVERAGE_SEARCH` positions: the whole repeating
    pattern unless its period (the lcm over branches of ``r``, or of ``w`` when ``r``
    does not divide it) is longer.
    """
    rules = [(b.segment_length, b.dilation_rate, b.offsets_used) for b in plan.branches]
    if any(used == r for _, r, used in rules):
        return None  # a branch with a head for every offset covers every position
    period = math.lcm(*(r if w % r == 0 else w for w, r, _ in rules))
    examples: list[int] = []
    count = 0
    for p in range(COVERAGE_SEARCH):
        if p >= period and (len(examples) == 8 or not examples):
            break  # one whole period counted, and the examples found (or none exist)
        if all((p % w) % r >= used for w, r, used in rules):
            count += p < period
            if len(examples) < 8:
                examples.append(p)
    if not examples:
        return None
    return UncoveredPositions(tuple(examples), period, count if period <= COVERAGE_SEARCH else None)


def heads_for_full_coverage(plan: DilatedPlan) -> int:
    """The fewest heads with which every offset of every branch of ``plan`` has a head.

    ``"softmax"``: ``max(r)``. ``"head_split"``: group ``i`` must hold ``r_i`` heads;
    groups get ``H // G`` heads and the first ``H % G`` one more, so the fewest is
    ``G * (max(r) - 1) + j + 1`` with ``j`` the last branch of rate ``max(r)``.
    """
    rs = plan.dilation_rates
    top = max(rs)
    if plan.branch_mixing == "softmax":
        return top
    last = max(i for i, r in enumerate(rs) if r == top)
    return len(rs) * (top - 1) + last + 1


def num_dilated_positions(length: int, dilation_rate: int, offset: int) -> int:
    """Number of positions ``t`` in ``[0, length)`` with ``t mod r == offset``."""
    if length <= offset:
        return 0
    return (length - offset + dilation_rate - 1) // dilation_rate


def make_plan(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    branch_mixing: str = "softmax",
    num_kv_heads: int | None = None,
) -> DilatedPlan:
    """Build (and cache) the plan for ``num_heads`` query heads and ``num_kv_heads`` K/V
    heads (default ``num_heads``; it must divide ``num_heads``).

    In ``"softmax"`` mode a head count smaller than the largest dilation rate is
    allowed: offsets ``>= num_heads`` then go unused, so some positions of that
    branch are covered by no head (likewise in ``"head_split"`` mode for a group with
    fewer heads than its branch's rate). When some positions are covered by no head in
    *any* branch (their output is 0), a ``UserWarning`` names them and the fix, once per
    configuration (the plan is built once per configuration). In ``"head_split"`` mode
    with fewer heads than branches the last branches get no head and are not computed;
    a ``UserWarning`` says so, once per configuration (the coverage warning, which lists
    them as "run by 0 heads", when positions are left uncovered too).
    """
    ws, rs = validate_branches(segment_lengths, dilation_rates)
    mixing = check_branch_mixing(branch_mixing)
    num_heads = check_positive_int("num_heads", num_heads)
    key = (ws, rs, num_heads, mixing, check_num_kv_heads(num_kv_heads, num_heads))
    if torch.compiler.is_compiling():
        # Traced: built afresh (a lookup in _PLANS would become a guard on the dict, and
        # the first cache miss would cost a second compilation).
        return _build_plan(*key)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _build_plan(*key)
    return plan


# Plans built so far. A plain dict rather than functools.lru_cache: torch.compile traces
# through a dict lookup, but warns about (and ignores) an lru_cache wrapper.
_PLANS: dict[tuple, DilatedPlan] = {}
_MAX_PLANS = 256


def _kv_parts(group: HeadGroup, group_size: int) -> tuple[HeadGroup, ...]:
    """``group`` cut into head groups that each read their K/V heads as one strided view,
    when query head ``h`` reads K/V head ``h // group_size``."""
    if group_size == 1:
        return (group,)
    heads = group.heads
    runs: list[list[int]] = []  # [K/V head, index in heads of its first query head, count]
    for i, h in enumerate(heads):
        if runs and runs[-1][0] == h // group_size:
            runs[-1][2] += 1
        else:
            runs.append([h // group_size, i, 1])
    parts: list[list[list[int]]] = [[runs[0]]]
    for run in runs[1:]:
        part = parts[-1]
        same_share = run[2] == part[0][2]
        same_step = len(part) == 1 or run[0] - part[-1][0] == part[1][0] - part[0][0]
        if same_share and same_step:
            part.append(run)
        else:
            parts.append([run])
    out = []
    for part in parts:
        share = part[0][2]
        q = heads[part[0][1] : part[0][1] + share * len(part)]
        kv_step = part[1][0] - part[0][0] if len(part) > 1 else 1
        kv = range(part[0][0], part[-1][0] + 1, kv_step)
        # Bounds one past the last head, as the groups of _build_plan end at most there.
        out.append(
            HeadGroup(group.offset, q[0], q[-1] + 1, q.step, kv[0], kv[-1] + 1, kv.step, share)
        )
    return tuple(out)


def _build_plan(
    ws: tuple[int, ...], rs: tuple[int, ...], num_heads: int, mixing: str, num_kv_heads: int
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
    group_size = num_heads // num_kv_heads
    branches = [
        Branch(
            b.segment_length,
            b.dilation_rate,
            sum((_kv_parts(g, group_size) for g in b.head_groups), ()),
        )
        for b in branches
    ]
    plan = DilatedPlan(ws, rs, num_heads, mixing, tuple(branches), num_kv_heads)
    uncovered = uncovered_positions(plan)
    if uncovered is not None:
        warn_uncovered_positions(
            [(b.segment_length, b.dilation_rate, len(b.heads), b.offsets_used) for b in branches],
            num_heads=num_heads,
            branch_mixing=mixing,
            examples=uncovered.examples,
            period=uncovered.period,
            per_period=uncovered.per_period,
            heads_needed=heads_for_full_coverage(plan),
        )
    elif mixing == "head_split":  # covered, but a branch may still have no head at all
        warn_branches_without_heads(
            [(b.segment_length, b.dilation_rate, len(b.heads)) for b in branches],
            num_heads=num_heads,
        )
    return plan


@functools.lru_cache(maxsize=256)
def heads_plan(plan: DilatedPlan, head_start: int, head_stop: int) -> DilatedPlan:
    """The part of ``plan`` run by query heads ``[head_start, head_stop)``, as a plan of
    ``head_stop - head_start`` heads numbered from 0 (K/V heads from
    ``head_start / (H / H_kv)``).

    Each head keeps its branches and offsets, so running the heads of a plan in parts
    computes exactly what the whole plan computes (every head's branches are mixed within
    the head). The bounds must be multiples of ``H / H_kv``, so that the part reads whole
    K/V heads.
    """
    g = plan.kv_group_size
    if not 0 <= head_start < head_stop <= plan.num_heads:
        raise ValueError(
            f"heads [{head_start}, {head_stop}) are not a non-empty range of a plan's "
            f"{plan.num_heads} heads; pass 0 <= head_start < head_stop <= {plan.num_heads}."
        )
    if head_start % g or head_stop % g:
        raise ValueError(
            f"heads [{head_start}, {head_stop}) split a K/V head's {g} query heads; the "
            f"bounds must be multiples of {g} (num_heads / num_kv_heads)."
        )
    kv0 = head_start // g
    branches = []
    for b in plan.branches:
        groups = []
        for grp in b.head_groups:
            heads = [h for h in grp.heads if head_start <= h < head_stop]
            if not heads:
                continue
            first = grp.heads.index(heads[0])
            kv = grp.kv_heads
            # Query head i of the group reads K/V head i // kv_share of the group's K/V heads.
            kv_first = kv[first // grp.kv_share]
            kv_last = kv[(first + len(heads) - 1) // grp.kv_share]
            groups.append(
                HeadGroup(
                    grp.offset, heads[0] - head_start, heads[-1] + 1 - head_start, grp.head_step,
                    kv_first - kv0, kv_last + 1 - kv0, grp.kv_step, grp.kv_share,
                )
            )  # fmt: skip
        branches.append(Branch(b.segment_length, b.dilation_rate, tuple(groups)))
    return DilatedPlan(
        plan.segment_lengths, plan.dilation_rates, head_stop - head_start, plan.branch_mixing,
        tuple(branches), (head_stop - head_start) // g, plan.first_head + head_start,
        plan.parent_heads,
    )  # fmt: skip


def segment_lengths_of(seq_len: int, segment_length: int) -> list[int]:
    """Lengths of the segments of a ``seq_len``-token sequence (the last may be shorter)."""
    full, rest = divmod(seq_len, segment_length)
    return [segment_length] * full + ([rest] if rest else [])


def attended_pairs(plan: DilatedPlan, seq_len: int, *, is_causal: bool = False) -> int:
    """``(query, key, head)`` triples the plan attends per batch element.

    Counted with multiplicity across branches (a pair two branches share counts twice,
    as both compute it). For branch ``(w, r)`` and a head with offset ``o``, a segment
    of ``s`` tokens holds ``L = num_dilated_positions(s, r, o)`` positions and attends
    ``L**2`` pairs, ``L (L + 1) / 2`` when causal.
    """
    total = 0
    for branch in plan.branches:
        lengths = segment_lengths_of(seq_len, branch.segment_length)
        for group in branch.head_groups:
            for length in lengths:
                n = num_dilated_positions(length, branch.dilation_rate, group.offset)
                total += group.num_heads * (n * (n + 1) // 2 if is_causal else n * n)
    return total


def attention_flops(
    plan: DilatedPlan,
    seq_len: int,
    head_dim: int,
    *,
    batch: int = 1,
    is_causal: bool = False,
    backward: bool = False,
) -> float:
    """Useful FLOPs of one call: ``4 * D`` per attended pair (``QK^T`` and ``PV``).

    With ``backward=True``, forward plus backward: ``3.5x`` the forward (the backward
    does five of the forward's two matmuls per pair, flash-attention's convention).
    """
    forward = 4.0 * head_dim * batch * attended_pairs(plan, seq_len, is_causal=is_causal)
    return 3.5 * forward if backward else forward
