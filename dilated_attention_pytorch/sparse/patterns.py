"""Block-sparse attention patterns: which (query block, key block) pairs are computed.

The sequence is cut into blocks of ``block_size`` tokens (the last one shorter when
``block_size`` does not divide ``N``). A pattern is a bool *block mask*
``keep[i, j]``: query block ``i`` attends to key block ``j``; token ``p`` attends to
token ``p'`` iff ``keep[p // block_size, p' // block_size]`` (and ``p' <= p`` when
causal). :meth:`BlockSparsePattern.mask_mod` is the same rule in FlexAttention's
``mask_mod(b, h, q_idx, kv_idx)`` form. Every backend, the ring and the pictures in
the docs read the same block mask.

Generators (``make_block_sparse_pattern(pattern_type, ...)``), each with one size knob
that is chosen to come as close as possible to the requested ``sparsity_ratio``
(the fraction of block pairs *dropped* among those causality allows):

- ``local_window``: key blocks within ``window`` blocks of the query block (before it
  only, when causal).
- ``dilated_sparse``: LongNet's branches at block granularity. Branch ``(W, r)`` (in
  blocks) keeps key block ``j`` for query block ``i`` when both lie in the same
  ``W``-block segment and their offsets in it agree modulo ``r``. The default
  schedule is ``W = s * 2**k`` blocks with ``r = 2**k`` for ``k = 0, 1, ..`` until a
  segment covers the sequence (coarser branches for longer segments); the knob is
  the scale ``s``. Given ``segment_lengths`` / ``dilation_rates`` (tokens), the
  branches are ``(c * w / block_size, r)`` with the knob ``c`` scaling the segments.
- ``global_local``: the first ``num_global`` blocks attend to and are attended by
  everything, plus a local window (the knob).
- ``random``: every pair kept with probability ``density`` (the knob), seeded and
  reproducible; per head when ``num_heads`` is given.

The diagonal block is always kept, so no query row is ever empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..validation import check_bool, check_positive_int, validate_branches

__all__ = [
    "PATTERN_TYPES",
    "BlockSparsePattern",
    "kv_block_lists",
    "make_block_sparse_pattern",
    "pattern_from_block_mask",
]

PATTERN_TYPES = ("local_window", "dilated_sparse", "global_local", "random")


@dataclass(frozen=True)
class BlockSparsePattern:
    """A block-sparse attention pattern for sequences of ``seq_len`` tokens.

    Attributes:
        pattern_type: the generator that built it (or ``"custom"``).
        seq_len: ``N``, tokens.
        block_size: tokens per block.
        block_mask: bool ``(num_blocks, num_blocks)``, or ``(H, num_blocks, num_blocks)``
            for per-head patterns (on the CPU).
        is_causal: whether token ``p`` only sees ``p' <= p`` (and blocks ``j <= i``).
        sparsity_ratio: achieved fraction of causally allowed block pairs dropped.
        requested_ratio: the ratio that was asked for (``None``: the knob was given).
        knobs: the generator's settings, e.g. ``{"window": 3}``.
    """

    pattern_type: str
    seq_len: int
    block_size: int
    block_mask: Tensor
    is_causal: bool = False
    sparsity_ratio: float = 0.0
    requested_ratio: float | None = None
    knobs: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.block_mask.shape[-1]

    @property
    def per_head(self) -> bool:
        return self.block_mask.dim() == 3

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """FlexAttention's ``mask_mod``: whether token ``q_idx`` attends to ``kv_idx``."""
        mask = self.block_mask.to(q_idx.device)
        bs = self.block_size
        keep = (
            mask[h, q_idx // bs, kv_idx // bs] if self.per_head else mask[q_idx // bs, kv_idx // bs]
        )
        if self.is_causal:
            keep = keep & (kv_idx <= q_idx)
        return keep

    def token_mask(self, device: torch.device | str | None = None) -> Tensor:
        """Dense bool ``(N, N)`` (or ``(H, N, N)``) token mask: O(N^2), for tests and pictures."""
        pos = torch.arange(self.seq_len, device=device)
        blocks = pos // self.block_size
        mask = self.block_mask.to(device)
        dense = mask[..., blocks[:, None], blocks[None, :]]
        if self.is_causal:
            dense = dense & (pos[None, :] <= pos[:, None])
        return dense

    def kept_pairs(self) -> int:
        """Token pairs attended (summed over heads for per-head patterns)."""
        sizes = _block_sizes(self.seq_len, self.block_size)
        mask = self.block_mask.to(torch.int64)
        pairs = (sizes[:, None] * sizes[None, :]) * mask
        if self.is_causal:
            # A diagonal block of s tokens has s (s + 1) / 2 causal pairs.
            diag = torch.diagonal(mask, dim1=-2, dim2=-1) * (sizes * (sizes + 1) // 2)
            pairs = torch.tril(pairs, diagonal=-1)
            return int(pairs.sum() + diag.sum())
        return int(pairs.sum())


def _block_sizes(seq_len: int, block_size: int) -> Tensor:
    nb = math.ceil(seq_len / block_size)
    sizes = torch.full((nb,), block_size, dtype=torch.int64)
    if nb:
        sizes[-1] = seq_len - (nb - 1) * block_size
    return sizes


def _allowed(nb: int, is_causal: bool) -> Tensor:
    allowed = torch.ones(nb, nb, dtype=torch.bool)
    return torch.tril(allowed) if is_causal else allowed


def _sparsity(mask: Tensor, is_causal: bool) -> float:
    allowed = _allowed(mask.shape[-1], is_causal)
    kept = (mask & allowed).sum().item()
    total = allowed.sum().item() * (mask.shape[0] if mask.dim() == 3 else 1)
    return 1.0 - kept / total


def _finish(mask: Tensor, is_causal: bool) -> Tensor:
    """Restrict to what causality allows and keep the diagonal."""
    nb = mask.shape[-1]
    mask = mask | torch.eye(nb, dtype=torch.bool)
    return mask & _allowed(nb, is_causal)


# --------------------------------------------------------------------------- generators


def local_window_mask(nb: int, is_causal: bool, window: int) -> Tensor:
    i = torch.arange(nb)
    dist = i[:, None] - i[None, :]
    return _finish(dist.abs() <= window, is_causal)


def dilated_sparse_mask(nb: int, is_causal: bool, branches: Sequence[tuple[int, int]]) -> Tensor:
    i = torch.arange(nb)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    for w, r in branches:
        w = min(w, nb)  # a segment of nb blocks or more holds them all
        same = (i[:, None] // w) == (i[None, :] // w)
        offset = (i % w) % r
        mask |= same & (offset[:, None] == offset[None, :])
    return _finish(mask, is_causal)


def global_local_mask(nb: int, is_causal: bool, window: int, num_global: int) -> Tensor:
    i = torch.arange(nb)
    glob = i < num_global
    mask = ((i[:, None] - i[None, :]).abs() <= window) | glob[:, None] | glob[None, :]
    return _finish(mask, is_causal)


def random_mask(
    nb: int, is_causal: bool, density: float, seed: int, num_heads: int | None
) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (nb, nb) if num_heads is None else (num_heads, nb, nb)
    return _finish(torch.rand(shape, generator=gen) < density, is_causal)


def _default_schedule(nb: int, scale: float) -> list[tuple[int, int]]:
    branches, k = [], 0
    while True:
        w = max(1, round(min(scale * 2**k, 2.0**62)))
        branches.append((w, 2**k))
        # Done at the branch covering every block; a branch whose rate is nb or more
        # keeps only the diagonal, and so does every coarser one (scale < 1).
        if w >= nb or 2**k >= nb:
            return branches
        k += 1


def _closest(
    build: Callable[[float], Tensor], knobs: Sequence[float], target: float, is_causal: bool
) -> tuple[float, Tensor, float]:
    """The knob whose pattern's sparsity is closest to ``target`` (sparsity falls as
    the knob grows), found by bisection over the sorted ``knobs``."""
    lo, hi = 0, len(knobs) - 1
    cache: dict[int, tuple[Tensor, float]] = {}

    def at(idx: int) -> tuple[Tensor, float]:
        if idx not in cache:
            mask = build(knobs[idx])
            cache[idx] = (mask, _sparsity(mask, is_causal))
        return cache[idx]

    while hi - lo > 1:  # invariant: sparsity(lo) >= target >= sparsity(hi), when reachable
        mid = (lo + hi) // 2
        if at(mid)[1] >= target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda idx: (abs(at(idx)[1] - target), idx))
    return knobs[best], *at(best)


def _check_ratio(ratio: object) -> float | None:
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"sparsity_ratio must be a float in [0, 1), got {type(ratio).__name__}.")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"sparsity_ratio must be in [0, 1) (the fraction of block pairs dropped; 0.9 "
            f"keeps 10%), got {ratio}."
        )
    return float(ratio)


def make_block_sparse_pattern(
    pattern_type: str,
    seq_len: int,
    *,
    block_size: int = 64,
    sparsity_ratio: float | None = None,
    is_causal: bool = False,
    num_heads: int | None = None,
    seed: int = 0,
    **knobs: object,
) -> BlockSparsePattern:
    """Build a named block-sparse pattern for ``seq_len`` tokens.

    Args:
        pattern_type: one of :data:`PATTERN_TYPES`.
        seq_len: ``N``, tokens (any positive int; the last block may be shorter).
        block_size: tokens per block.
        sparsity_ratio: fraction of (causally allowed) block pairs to drop, in
            ``[0, 1)``; the generator's knob is chosen to come closest, and the
            achieved value is :attr:`BlockSparsePattern.sparsity_ratio`. ``None``: give
            the knob instead (``window=``, ``scale=``, ``density=``); neither gives the
            generator's default (ratio 0.9).
        is_causal: keep only blocks ``j <= i`` (and tokens ``p' <= p``).
        num_heads: for ``random``, one pattern per head (``block_mask`` ``(H, nb, nb)``).
        seed: the ``random`` pattern's seed, an int in ``[0, 2**63)``.
        **knobs: ``window`` (local_window, global_local; an int >= 0), ``num_global``
            (global_local, default 1), ``scale`` (dilated_sparse; a finite positive
            number), ``segment_lengths`` and ``dilation_rates`` (dilated_sparse, tokens),
            ``density`` (random; in ``[0, 1]``).

    Returns:
        A :class:`BlockSparsePattern`.

    Raises:
        ValueError: unknown pattern (the valid ones are listed), a ratio outside
            ``[0, 1)``, a non-positive size, a knob the generator does not take or out of
            its range, a seed out of range.
        TypeError: a size or seed that is not an int.
    """
    if pattern_type not in PATTERN_TYPES:
        raise ValueError(
            f"unknown pattern_type {pattern_type!r}; choose one of {list(PATTERN_TYPES)}."
        )
    seq_len = check_positive_int("seq_len", seq_len)
    block_size = check_positive_int("block_size", block_size)
    check_bool("is_causal", is_causal)
    if num_heads is not None:
        check_positive_int("num_heads", num_heads)
    _check_seed(seed)
    ratio = _check_ratio(sparsity_ratio)
    allowed_knobs = {
        "local_window": {"window"},
        "dilated_sparse": {"scale", "segment_lengths", "dilation_rates"},
        "global_local": {"window", "num_global"},
        "random": {"density"},
    }[pattern_type]
    unknown = set(knobs) - allowed_knobs
    if unknown:
        raise ValueError(
            f"pattern {pattern_type!r} takes the knobs {sorted(allowed_knobs)}, got "
            f"{sorted(unknown)}."
        )
    nb = math.ceil(seq_len / block_size)
    size_knob = {"local_window": "window", "global_local": "window",
                 "dilated_sparse": "scale", "random": "density"}[pattern_type]  # fmt: skip
    if ratio is None and knobs.get(size_knob) is None:
        ratio = 0.9
    if ratio is not None and knobs.get(size_knob) is not None:
        raise ValueError(
            f"pass either sparsity_ratio or {size_knob}= (the knob it picks), not both."
        )

    build: Callable[[float], Tensor]
    candidates: list[float]
    settings: dict[str, object] = {}
    if pattern_type == "local_window":
        candidates = list(range(nb))

        def build(x: float) -> Tensor:
            return local_window_mask(nb, is_causal, int(x))

    elif pattern_type == "global_local":
        num_global = check_positive_int("num_global", knobs.get("num_global", 1))
        settings["num_global"] = num_global
        candidates = list(range(nb))

        def build(x: float) -> Tensor:
            return global_local_mask(nb, is_causal, int(x), num_global)

    elif pattern_type == "dilated_sparse":
        ws, rs = knobs.get("segment_lengths"), knobs.get("dilation_rates")
        if (ws is None) != (rs is None):
            raise ValueError("pass segment_lengths and dilation_rates together, or neither.")
        if ws is not None:
            ws, rs = validate_branches(ws, rs)
            settings.update(segment_lengths=list(ws), dilation_rates=list(rs))
            base = [(w / block_size, r) for w, r in zip(ws, rs, strict=True)]

            def schedule(c: float) -> list[tuple[int, int]]:
                return [(max(1, round(min(c * w, 2.0**62))), r) for w, r in base]

            biggest = max(w for w, _ in base)
            candidates = sorted({2 ** (k / 4) for k in range(-80, 81)
                                 if 2 ** (k / 4) * biggest <= 4 * nb + 4})  # fmt: skip
        else:

            def schedule(c: float) -> list[tuple[int, int]]:
                return _default_schedule(nb, c)

            candidates = [float(s) for s in range(1, nb + 1)]

        def build(x: float) -> Tensor:
            return dilated_sparse_mask(nb, is_causal, schedule(x))

    else:  # random
        allowed_pairs = nb * (nb + 1) // 2 if is_causal else nb * nb
        off_diag = max(1, allowed_pairs - nb)
        candidates = [k / 1000 for k in range(1001)]

        def build(x: float) -> Tensor:
            return random_mask(nb, is_causal, x, seed, num_heads)

        settings["seed"] = seed
        if ratio is not None:  # expected sparsity is linear in the density: solve it
            density = min(1.0, max(0.0, 1.0 - ratio * allowed_pairs / off_diag))
            candidates = [density]

    if ratio is None:
        knob = knobs[size_knob]
        if isinstance(knob, bool) or not isinstance(knob, (int, float)):
            _bad_knob(size_knob, knob)
        if pattern_type in ("local_window", "global_local"):
            knob = int(knob) if isinstance(knob, int) and knob >= 0 else _bad_knob(size_knob, knob)
        elif pattern_type == "random":
            if not 0.0 <= knob <= 1.0:
                _bad_knob(size_knob, knob)
        elif not (math.isfinite(knob) and knob > 0):
            _bad_knob(size_knob, knob)
        mask = build(knob)
        achieved = _sparsity(mask, is_causal)
    else:
        knob, mask, achieved = _closest(build, candidates, ratio, is_causal)
    if pattern_type in ("local_window", "global_local"):
        knob = int(knob)
    settings[size_knob] = knob
    if pattern_type == "dilated_sparse":
        # (segment in blocks, rate); a segment longer than the sequence is reported as nb
        settings["branches_in_blocks"] = [(min(w, nb), r) for w, r in schedule(knob)]
    return BlockSparsePattern(
        pattern_type=pattern_type,
        seq_len=seq_len,
        block_size=block_size,
        block_mask=mask,
        is_causal=is_causal,
        sparsity_ratio=achieved,
        requested_ratio=ratio,
        knobs=settings,
    )


def kv_block_lists(block_mask: Tensor) -> tuple[Tensor, Tensor]:
    """FlexAttention's layout of a ``(..., Qb, Kb)`` bool block mask.

    Returns ``kv_num_blocks (..., Qb)`` (int64) and ``kv_indices (..., Qb, Kmax)``:
    the kept key blocks of each query block in increasing order, padded with 0.
    """
    counts = block_mask.sum(-1)
    kmax = max(1, int(counts.max())) if block_mask.numel() else 1
    # Kept blocks first (stable sort of "dropped" flags), in increasing block order.
    order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices
    indices = order[..., :kmax].clone()
    indices[torch.arange(kmax, device=block_mask.device) >= counts.unsqueeze(-1)] = 0
    return counts, indices


def _bad_knob(name: str, value: object) -> int:
    raise ValueError(
        f"{name}={value!r} is not valid: window is an int >= 0, scale a finite positive "
        f"number, density a float in [0, 1]."
    )


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"seed must be an int (the random pattern's generator seed), got "
            f"{type(seed).__name__} {seed!r}."
        )
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}.")


def pattern_from_block_mask(
    block_mask: Tensor, seq_len: int, block_size: int, *, is_causal: bool = False
) -> BlockSparsePattern:
    """Wrap a user's bool block mask (its diagonal is added, so no row is empty)."""
    if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool:
        raise TypeError(
            f"a block mask must be a bool tensor (num_blocks, num_blocks) or (H, nb, nb), "
            f"got {getattr(block_mask, 'dtype', type(block_mask).__name__)}."
        )
    nb = math.ceil(seq_len / block_size)
    if block_mask.dim() not in (2, 3) or tuple(block_mask.shape[-2:]) != (nb, nb):
        raise ValueError(
            f"the block mask must have shape ({nb}, {nb}) or (H, {nb}, {nb}) for {seq_len} "
            f"tokens in blocks of {block_size}, got {tuple(block_mask.shape)}."
        )
    mask = _finish(block_mask.cpu(), is_causal)
    return BlockSparsePattern(
        "custom", seq_len, block_size, mask, is_causal, _sparsity(mask, is_causal)
    )
