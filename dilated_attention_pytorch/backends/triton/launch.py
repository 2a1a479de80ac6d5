"""Launching the Triton kernels: tile configs, a plan's branches, block ops.

Launch structure (one branch ``(w, r)`` per launch, except the joint launches at the
end, grid
``(segments * tiles_per_segment, B * heads_of_the_branch)``):

- forward: each program owns one tile of dilated query positions of one
  ``(batch, head)``; it runs a flash-style online softmax over the key tiles of
  its segment, then merges its ``(O_i, LSE_i)`` into the accumulators with the
  LSE rule that mixes branches (the LSE kept as a pair ``hi + lo``, see
  :mod:`.kernels`). Within a launch every ``(position, head)``
  belongs to one program and launches run in order, so the read-modify-write
  is race free.
- backward: ``delta = rowsum(dO * O)`` once, then per branch (where the branches
  do not nest, see "Joint branches" below) a dK/dV kernel (a program per key tile
  loops over the query tiles of the segment) and a dQ kernel (a program per query
  tile loops over the key tiles). ``P`` is rebuilt
  from the *final* mixed LSE, so summing the branches gives the exact gradient
  of the joint softmax.

Accumulation across branches: when a ``(position, head)`` can be covered by
several branches ("softmax" mixing with more than one branch) the partial
results go to fp32 accumulators, the heads processed in chunks so that an
accumulator stays <= ``ACC_CHUNK_BYTES``; the branch with ``r = 1`` (it covers
every position) runs last and writes the final dtype directly, so there is no
separate cast pass. With a single branch per head ("head_split", or one
branch) every kernel writes its final output directly.

Joint branches (``BRANCH_MODE = "joint"``, the default): where the branches nest
(LongNet's plans, not causal; :func:`_joint_branches`) the forward, the dQ pass and
the dK/dV pass run all branches in one launch each, a program per tile of positions
that the same branches cover: over the keys of every one of them (forward, dQ), or
over the queries of every branch that reads them (dK/dV, one K/V head per query
head). No fp32 accumulator and no merge, so what the two paragraphs above say of
several branches applies only where a plan does not nest (and to the dK/dV pass of
grouped-query attention).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from triton.runtime import _allocation

from ...plan import Branch, DilatedPlan
from ..blocks import sum_query_heads
from .kernels import (
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _delta_kernel,
    _fwd_kernel,
    _joint_dkdv_kernel,
    _joint_dq_kernel,
    _joint_fwd_kernel,
    _zero_uncovered_kernel,
)

__all__ = [
    "ACC_CHUNK_BYTES",
    "DKDV_CONFIGS",
    "DKDV_DQ_CONFIGS",
    "DQ_MODE",
    "DQ_MODES",
    "LOAD_MODE",
    "LOAD_MODES",
    "DQ_CONFIGS",
    "BRANCH_MODE",
    "BRANCH_MODES",
    "FWD_CONFIGS",
    "KernelConfig",
    "dilated_backward",
    "dilated_forward",
    "interpreting",
    "triton_block_backward",
    "triton_block_forward",
]

# Upper bound on one fp32 accumulator (out, dq, dk or dv) for the heads processed
# together; 1 GiB keeps the multi-branch path's extra memory well under the size
# of q itself at N = 1M, H = 16, D = 64 while launches stay large.
ACC_CHUNK_BYTES = 1 << 30


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of one kernel (BLOCK_M: queries, BLOCK_N: keys).

    ``maxnreg``: a cap on registers per thread for the compiler (``None``: its own
    choice). An SM holds 64K registers, so 8-warp programs run two per SM only at 128
    registers or fewer; a cap that costs no or few spills can double the programs an SM
    runs at once.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Measured on an H200 in bf16 (benchmarks/bench_dilated.py --tune, the fastest of a few
# candidates per kernel, timed alone on LongNet's r = 1 branch at N = 256K); 16 and 32
# are untuned. The D=64 dQ tile was retuned on an H100 (2026-12-06): 64 x 64 with 4
# warps, 52.7 -> 45.1 ms of dQ kernels in LongNet's forward+backward at N = 1M
# (benchmarks/results/commits_nvidia-h100-80gb-hbm3_dq_tile_d64_20261206.json). The benchmark can override entries to try others. The interpreter gets
# small tiles so CPU tests exercise many tiles, partial tiles and the causal diagonal.
FWD_CONFIGS: dict[int, KernelConfig] = {
    16: KernelConfig(128, 64, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(128, 64, 8, 3),
    128: KernelConfig(64, 64, 4, 3),
}
DKDV_CONFIGS: dict[int, KernelConfig] = {
    16: KernelConfig(32, 128, 4, 3),
    32: KernelConfig(32, 128, 4, 3),
    64: KernelConfig(32, 128, 4, 4),
    128: KernelConfig(32, 64, 4, 4),
}
DQ_CONFIGS: dict[int, KernelConfig] = {
    16: KernelConfig(128, 32, 4, 3),
    32: KernelConfig(128, 32, 4, 3),
    64: KernelConfig(64, 64, 4, 3),
    128: KernelConfig(64, 64, 4, 2),
}
# The dK/dV kernel when it also adds dQ (DQ_MODE "atomic" or "tma").
DKDV_DQ_CONFIGS: dict[int, KernelConfig] = dict(DKDV_CONFIGS)
_INTERPRET_CONFIG = KernelConfig(16, 16, 1, 1)

# How the backward computes dQ: "separate" (a dQ kernel that recomputes the scores and
# dP: seven matmuls per tile pair, deterministic), "atomic" (the dK/dV kernel adds dS K
# into an fp32 buffer with atomics: five matmuls) or "tma" (the same adds as bulk
# reduce-adds through a tensor descriptor). With torch.use_deterministic_algorithms(True)
# the backward always uses "separate".
DQ_MODES = ("separate", "atomic", "tma")
DQ_MODE = "separate"

# How the kernels' loops read tiles of q, k, v and dO: "pointer" (a load per row), "tma"
# (tensor descriptors of the dilated rows, copied by the Hopper tensor memory accelerator;
# Hopper GPUs and the interpreter only, and tensors whose layout a descriptor can address,
# else "pointer") or "auto" (the default: "tma" on Hopper GPUs, where it was measured
# faster, "pointer" elsewhere, the interpreter included).
LOAD_MODES = ("auto", "pointer", "tma")
LOAD_MODE = "auto"

# How the forward and the backward run a softmax-mixing plan: "joint" (one launch for all
# branches per pass: one online softmax per query over every covering branch's keys; dQ
# summed over them, and dK/dV over the queries of every branch reading a key, in
# registers; no fp32 accumulators; plans whose rates, segment lengths and head offsets
# nest, see _joint_branches, not causal, no packed documents; dK/dV with one K/V head
# per query head, dQ in its own kernel) or "per_branch" (a launch per branch merging
# into fp32 accumulators; every plan).
BRANCH_MODES = ("joint", "per_branch")
BRANCH_MODE = "joint"

# The joint dK/dV runs for head dims up to this one (None: every head dim; 0: none);
# larger ones run the dK/dV pass per branch, their forward and dQ staying joint. Timed
# against the per-branch dK/dV interleaved in one process on H100s (2026-12-07, LongNet
# at N = 1M, H = 16, bf16, forward+backward; benchmarks/bench_joint_passes.py), the joint
# dK/dV was 2.1% and 4.6% faster at D = 64 in two runs, and 3.1% faster and 3.6% slower
# at D = 128, within the runs' spread; it holds 2 GiB less at both.
JOINT_DKDV_MAX_HEAD_DIM: int | None = None

# The dK/dV kernels (joint and per branch, dQ in its own kernel) read each query row's
# LSE pair and delta as one packed 16-byte word (``_backward_rows`` with ``packed``)
# instead of three 4-byte values, at the cost of a fourth fp32 value per row and head.
# Measured on an H200 and an H100 (N = 1M, LongNet's plan; README "Packed row terms"):
# forward+backward 15% faster at D = 64 (joint dK/dV), causal calls 12-15% faster.
# False: three separate values.
PACKED_ROW_TERMS = True

LOG2E = 1.4426950408889634  # log2(e), as the kernels' constant


def _config(table: dict[int, KernelConfig], head_dim: int) -> KernelConfig:
    return _INTERPRET_CONFIG if interpreting() else table[head_dim]


# --------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class _Launch:
    """One branch restricted to a chunk of heads, in chunk-relative head indices.

    ``seg_q``/``seg_k``: segment length in query/key tokens (the same ``w`` for
    dilated attention; the block lengths for block ops). ``head0``: head index of the
    branch's first head (offset rule ``o = (h - head0) % dil``, may be negative);
    ``h_first``/``num_heads``: the heads this launch runs. ``kv_group``: query heads per
    K/V head (grouped-query attention): query head ``h`` reads K/V head ``h // kv_group``.
    """

    seg_q: int
    seg_k: int
    dil: int
    head0: int
    h_first: int
    num_heads: int
    kv_group: int = 1
    # Packed documents: (first token int64, length int32) of every segment, on the device,
    # and the longest segment's length.
    segments: tuple[Tensor, Tensor] | None = None
    longest: int = 0


def _s3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _launch_tiles(
    kernel: triton.JITFunction, table: dict[int, KernelConfig], tensors: tuple[Tensor, ...],
    strided: tuple[Tensor, ...], kpm: Tensor | None, launch: _Launch, *, scales: tuple,
    per_key_tile: bool, causal: bool, acc_in: bool, lse_pair: bool, loaded: tuple[Tensor, ...],
    **constexprs: int,
) -> None:  # fmt: skip
    """Launch the forward, dK/dV or dQ kernel for one branch.

    ``tensors``: the kernel's tensor arguments before ``Kpm``, q and k first;
    ``strided``: the tensors whose ``(B, N, H)`` strides it takes, in its order;
    ``loaded``: the tensors it reads through tensor descriptors when :func:`_tma_loads`
    allows (``TMA_LOADS``), through pointers otherwise;
    ``scales``: its arguments after ``tiles_per_seg`` (the score scale and the stride
    between the LSE's planes). A program runs a tile of dilated queries, or of keys with
    ``per_key_tile`` (dK/dV). ``lse_pair``: the LSE is a ``(hi, lo)`` pair.
    ``constexprs``: the kernel's own further compile-time arguments.
    """
    q, k = tensors[0], tensors[1]
    B, n_q, _, D = q.shape
    cfg = _config(table, D)
    seg_len, block = (launch.seg_k, cfg.block_n) if per_key_tile else (launch.seg_q, cfg.block_m)
    # Tiles per segment: for its longest segment only (a segment longer than the sequence,
    # or than every packed document, would only add programs that return at once).
    seg_len = min(seg_len, launch.longest if launch.segments is not None else
                  (k.shape[1] if per_key_tile else n_q))  # fmt: skip
    tiles = triton.cdiv(triton.cdiv(max(seg_len, 1), launch.dil), block)
    num_segments = (
        triton.cdiv(n_q, launch.seg_q) if launch.segments is None else launch.segments[0].numel()
    )
    grid = (num_segments * tiles, B * launch.num_heads)
    # Without a mask the kernel never reads Kpm (HAS_KPM is False), nor the segment
    # tables without VARLEN: pass any tensor.
    kpm_t, s_mb, s_mn = (q, 0, 0) if kpm is None else (kpm, kpm.stride(0), kpm.stride(1))
    # The tensors the kernel reads by rows (`loaded`): through tensor descriptors when
    # LOAD_MODE and the layout of every one of them allow.
    tma_loads = _tma_loads(*loaded)
    if tma_loads and not interpreting():
        _ensure_allocator()
    seg_start, seg_len_t = (q, q) if launch.segments is None else launch.segments
    kernel[grid](
        *tensors, kpm_t, seg_start, seg_len_t, *[s for t in strided for s in _s3(t)], s_mb, s_mn,
        launch.seg_q, launch.seg_k, n_q, k.shape[1], launch.dil, launch.head0, launch.h_first,
        launch.num_heads, launch.kv_group, tiles, *scales,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        HAS_KPM=kpm is not None, ACC_IN=acc_in, LSE_PAIR=lse_pair,
        VARLEN=launch.segments is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, TMA_LOADS=tma_loads, **constexprs, **_cap(cfg),
    )  # fmt: skip


def _cap(cfg: KernelConfig) -> dict:
    # The register cap as a launch option (the interpreter has no registers to cap).
    return {} if cfg.maxnreg is None or interpreting() else {"maxnreg": cfg.maxnreg}


def _launch_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, acc: Tensor, lse: Tensor, kpm: Tensor | None,
    launch: _Launch, *, scale: float, causal: bool, acc_in: bool,
) -> None:  # fmt: skip
    # q: (B, Nq, Hc, D); k, v: (B, Nk, Hc, D); out, acc: (B, Nq, Hc, D); lse: (2, B, Nq, Hc)
    # (hi, lo) planes, or one (B, Nq, Hc) LSE.
    lse_hi, s_lp, pair = _lse_args(lse)
    tensors = (q, k, v, out, acc, lse_hi)
    _launch_tiles(
        _fwd_kernel, FWD_CONFIGS, tensors, tensors, kpm, launch,
        scales=(scale, s_lp), per_key_tile=False, causal=causal, acc_in=acc_in, lse_pair=pair,
        loaded=(q, k, v, acc) if acc_in else (q, k, v), NEG_SCALE=scale < 0,
    )  # fmt: skip


def _lse_args(lse: Tensor) -> tuple[Tensor, int, bool]:
    """The kernels' view of an LSE: a ``(2, B, N, H)`` pair gives its ``hi`` plane, the
    stride to the ``lo`` plane and ``LSE_PAIR``; a single ``(B, N, H)`` LSE itself."""
    pair = lse.dim() == 4
    return (lse[0], lse.stride(0), True) if pair else (lse, 0, False)


def _backward_rows(
    dout: Tensor, out: Tensor, lse: Tensor, packed: bool = False
) -> tuple[Tensor, Tensor]:
    """The backward's per-row terms, each head's rows next to each other in memory: the
    LSE (a ``(B, N, H)`` LSE or a ``(2, B, N, H)`` pair, same shape, copied into a
    heads-first buffer; a pair's ``lo`` plane in log2 units, ``lo * log2(e)``, which the
    kernels' ``_load_lse`` expects) and ``delta`` (``(B, N, H)``, the strides of one LSE
    plane). The dK/dV kernel reads both for a tile's queries at every step: with a row
    stride of 1 (at ``r = 1``) that is a few wide loads from one base instead of a 4-byte
    load and an address per row.

    ``packed`` (:data:`PACKED_ROW_TERMS`, for the dK/dV kernels): one ``(B, H, N, 4)`` fp32
    buffer holding each row's ``(hi, lo2, delta, 0)``, ``hi`` with ``-inf`` (a row with
    no key) already ``+inf``; the pair and ``delta`` returned are views of it (``lo`` one
    element after ``hi``, rows 4 apart), which every kernel reads through its strides,
    and the dK/dV kernels read as one 16-byte word per row."""
    if packed:
        B, N, H = out.shape[:3]
        words = torch.empty(B, H, N, 4, dtype=torch.float32, device=out.device)
        pair, delta = _packed_views(words)
        return pair, _compute_delta(dout, out, into=delta, lse=lse)
    copy = torch.empty_like(lse.transpose(-1, -2), memory_format=torch.contiguous_format)
    copy = copy.transpose(-1, -2)  # heads-first, shaped like lse
    if lse.dim() == 4:
        copy[0].copy_(lse[0])
        torch.mul(lse[1], LOG2E, out=copy[1])
    else:
        copy.copy_(lse)
    plane = copy[0] if copy.dim() == 4 else copy
    return copy, _compute_delta(dout, out, into=torch.empty_like(plane))


def _row_words(pair: Tensor) -> Tensor:
    """The ``(B, H, N, 4)`` words of packed row terms (``_backward_rows`` with
    ``packed``) under their ``(2, B, N, H)`` pair view, or under a view of some of its
    heads."""
    _, B, N, H = pair.shape
    return pair.as_strided(
        (B, H, N, 4), (pair.stride(1), pair.stride(3), pair.stride(2), 1), pair.storage_offset()
    )


def _packed_views(words: Tensor) -> tuple[Tensor, Tensor]:
    """The ``(2, B, N, H)`` pair and ``(B, N, H)`` delta views of packed row terms, words
    ``(B, H, N, 4)`` holding ``(hi, lo2, delta, 0)``."""
    return words[..., :2].permute(3, 0, 2, 1), words[..., 2].transpose(1, 2)


def _compacts(launch: _Launch, n: int) -> bool:
    """Whether a launch over ``n`` tokens reads its own gathered row terms
    (:func:`_compact_rows`): ``r > 1``, no packed documents, ``n`` and the segment length
    multiples of ``r``."""
    r = launch.dil
    return r > 1 and launch.segments is None and n % r == 0 and launch.seg_q % r == 0


def _gather_branch_rows(src: Tensor, launch: _Launch) -> Tensor:
    """A launch's own rows of per-row values ``src`` (``(..., Hc, N, C)``, any strides):
    ``(..., num_heads, N / r, C)``, new and contiguous, row ``s * (w / r) + t`` of head
    ``h_first + i`` holding token ``s * w + o + r * t`` of that head
    (``o = (h - head0) % r``; the layout :func:`_compacts` allows)."""
    r, n, c = launch.dil, src.shape[-2], src.shape[-1]
    part = src[..., launch.h_first : launch.h_first + launch.num_heads, :, :]
    part = part.unflatten(-2, (n // r, r))  # (..., heads, N / r, r, C), a view
    heads = torch.arange(launch.h_first, launch.h_first + launch.num_heads, device=src.device)
    index = ((heads - launch.head0) % r).view(-1, 1, 1, 1)
    return torch.gather(part, -2, index.expand(*part.shape[:-2], 1, c)).squeeze(-2)


def _compact_words(pair: Tensor, launch: _Launch) -> tuple[Tensor, Tensor] | None:
    """:func:`_compact_rows` of packed row terms (``pair``: their ``(2, B, N, Hc)`` pair
    view): the launch's rows gathered as packed words, ``(B, num_heads, N / r, 4)``, given
    as their pair and delta views (:func:`_packed_views`)."""
    if not _compacts(launch, pair.shape[-2]):
        return None
    return _packed_views(_gather_branch_rows(_row_words(pair), launch))


def _compact_rows(rows: Tensor, launch: _Launch) -> Tensor | None:
    """The rows of a branch with ``r > 1`` taken out of the backward's heads-first row
    terms (``rows``: ``(..., N, Hc)``, unit stride on ``N``), or ``None`` where the layout
    does not allow it (``r == 1``, packed documents, ``N`` or the segment length not a
    multiple of ``r``): ``(..., N / r, num_heads)`` for the launch's heads, heads-first
    (:func:`_gather_branch_rows`). The kernels then read a query tile's row terms from
    consecutive addresses (``COMPACT``) instead of every ``r``-th."""
    if not _compacts(launch, rows.shape[-2]) or rows.stride(-2) != 1:
        return None
    gathered = _gather_branch_rows(rows.transpose(-1, -2).unsqueeze(-1), launch)
    return gathered.squeeze(-1).transpose(-1, -2)


def _branch_rows(
    lse: Tensor, delta: Tensor, launch: _Launch, packed: bool = False
) -> tuple[Tensor, Tensor, bool]:
    """The row terms a launch reads: ``(lse, delta, compact)``, its own gathered rows
    (:func:`_compact_rows`, or :func:`_compact_words` where they are ``packed``;
    ``compact`` True) where it takes them, else those given."""
    if packed:
        words = _compact_words(lse, launch)
        return (*words, True) if words is not None else (lse, delta, False)
    rows = _compact_rows(lse, launch), _compact_rows(delta, launch)
    return (*rows, True) if rows[0] is not None else (lse, delta, False)


def _compute_delta(
    dout: Tensor, out: Tensor, into: Tensor | None = None, lse: Tensor | None = None
) -> Tensor:
    """``rowsum(dout * out)`` in fp32, ``(B, N, H)``: into ``into`` (any strides), else a
    new contiguous tensor.

    With ``lse`` (the forward's ``(B, N, H)`` LSE or ``(2, B, N, H)`` pair), ``into`` is
    the delta view of packed row terms (:func:`_packed_views`) and the same launch writes
    each row's whole word, ``(hi, lo2, delta, 0)`` (``_backward_rows`` with ``packed``),
    instead of three more passes over them."""
    B, N, H, D = out.shape
    delta = torch.empty(B, N, H, dtype=torch.float32, device=out.device) if into is None else into
    block = 16 if interpreting() else 64
    pair = lse is not None and lse.dim() == 4
    hi = dout if lse is None else (lse[0] if pair else lse)  # dout: a pointer never read
    _delta_kernel[(triton.cdiv(N, block), B * H)](
        dout, out, delta, hi, N, H, *_s3(dout), *_s3(out), *_s3(delta),
        *((0, 0, 0) if lse is None else _s3(hi)), lse.stride(0) if pair else 0,
        HEAD_DIM=D, BLOCK=block, PACK=lse is not None, LSE_PAIR=pair,
    )  # fmt: skip
    return delta


def _launch_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, kpm: Tensor | None,
    grads: tuple[Tensor, Tensor, Tensor], accs: tuple[Tensor, Tensor, Tensor], launch: _Launch,
    *, scale: float, causal: bool, acc_in: bool, which: str, dq_add: int = 0,
    dq_acc: Tensor | None = None, compact: bool = False, grouped: bool = False,
    packed: bool = False,
) -> None:  # fmt: skip
    # which: "dkdv" or "dq". grads/accs: (dq, dk, dv) targets and fp32 accumulators.
    # lse, delta: the row terms of _backward_rows, lse (2, B, N, H) (hi, lo2) planes or
    # one (B, N, H) LSE; with compact, both the branch's own rows (_compact_rows). dq_add
    # > 0 (dkdv only): the kernel also adds its share of dQ into the fp32 buffer dq_acc
    # (see _dq_add). grouped (dkdv only, see _grouped_dkdv): dK/dV targets and
    # accumulators with the K/V heads, a program per (K/V head, offset class). packed:
    # lse and delta are views of packed row terms (_backward_rows), which the dK/dV
    # kernel reads as one word per row.
    lse_hi, s_lp, pair = _lse_args(lse)
    inputs = (q, k, v, dout, lse_hi, delta)
    constexprs = {"COMPACT": compact}
    if which == "dkdv":
        constexprs["GROUPED"] = grouped
        if grouped:
            g = launch.kv_group
            classes = (launch.num_heads // g) * min(g, launch.dil)
            launch = dataclasses.replace(launch, num_heads=classes)
        # DK and DV share their strides, and so do DKacc and DVacc. Without dq_add the
        # kernel never reads DQacc: any tensor stands in.
        kernel, table = _bwd_dkdv_kernel, DKDV_DQ_CONFIGS if dq_add else DKDV_CONFIGS
        dq_t = dq_acc if dq_add else q
        tensors = (*inputs, grads[1], grads[2], accs[1], accs[2], dq_t)
        strided = (*inputs, grads[1], accs[1], dq_t)
        constexprs["DQ_ADD"] = dq_add
        constexprs["PACKED"] = packed
        if dq_add == 2:
            _ensure_allocator()
    else:
        kernel, table = _bwd_dq_kernel, DQ_CONFIGS
        tensors = strided = (*inputs, grads[0], accs[0])
    _launch_tiles(
        kernel, table, tensors, strided, kpm, launch,
        scales=(scale, s_lp, launch.seg_q // launch.dil if compact else 0),
        per_key_tile=which == "dkdv", causal=causal, acc_in=acc_in, lse_pair=pair,
        loaded=(q, k, v, dout), **constexprs,
    )  # fmt: skip


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Global scratch memory for Triton kernels that build tensor descriptors on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for device-side tensor descriptors, unless the caller set
    one. Triton keeps it in a context variable (per thread): autograd's backward runs in
    its own thread, so this runs before each launch that needs it."""
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def _dq_add(device: torch.device) -> int:
    """How the backward computes dQ (the ``DQ_ADD`` of the dK/dV kernel): 0 in a dQ
    kernel of its own (:data:`DQ_MODE` ``"separate"``, or deterministic algorithms on),
    1 by atomic adds from the dK/dV kernel (``"atomic"``), 2 by the tensor memory
    accelerator's bulk reduce-add (``"tma"``; compute capability 9.0 or later, else 1)."""
    if DQ_MODE not in DQ_MODES:
        raise ValueError(f"DQ_MODE must be one of {DQ_MODES}, got {DQ_MODE!r}")
    if DQ_MODE == "separate" or torch.are_deterministic_algorithms_enabled():
        return 0
    if DQ_MODE == "tma" and (interpreting() or not _on_hopper(device)):
        return 1
    return DQ_MODES.index(DQ_MODE)


def _on_hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later (tensor memory accelerator)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_loads(*tensors: Tensor) -> bool:
    """Whether the loops read tiles of these ``(B, N, H, D)`` tensors through tensor
    descriptors: with :data:`LOAD_MODE` ``"tma"`` on a Hopper GPU or the interpreter,
    with ``"auto"`` on a Hopper GPU only, and in both cases only when each tensor is
    16-byte aligned with unit stride on D and every other stride a multiple of 16 bytes
    (what a descriptor needs); else through pointers."""
    if LOAD_MODE not in LOAD_MODES:
        raise ValueError(
            f"LOAD_MODE must be one of {LOAD_MODES}, got {LOAD_MODE!r}; 'auto' (the default) "
            "reads through tensor descriptors on Hopper GPUs and through pointers elsewhere"
        )
    if LOAD_MODE == "pointer":
        return False
    if not (_on_hopper(tensors[0].device) or (LOAD_MODE == "tma" and interpreting())):
        return False
    return all(
        t.data_ptr() % 16 == 0
        and t.stride(-1) == 1
        and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in tensors
    )


# --------------------------------------------------------------------------- plan driver


def _branch_heads(branch: Branch) -> tuple[int, int, int]:
    """``(head0, head_start, head_stop)`` of a branch: its heads and the head ``head0``
    (possibly negative) of the kernels' offset rule ``o = (h - head0) % r``; checks that
    the plan follows that rule."""
    start = min(g.head_start for g in branch.head_groups)
    stop = max(g.head_stop for g in branch.head_groups)
    r = branch.dilation_rate
    first = next(g for g in branch.head_groups if g.head_start == start)
    # A plan of some of a larger plan's heads (plan.heads_plan) starts at any offset.
    head0 = start - first.offset
    for g in branch.head_groups:
        if g.offset != (g.head_start - head0) % r or (g.num_heads > 1 and g.head_step != r):
            raise ValueError(
                f"plan head group {g} does not follow the offset rule o = (h - {head0}) % r"
            )
    return head0, start, stop


@dataclass(frozen=True)
class _Schedule:
    """How a plan's branches are launched.

    ``multi``: some ``(position, head)`` is covered by several branches, so partial
    results go through fp32 accumulators. ``final``: index of a branch that covers
    every ``(position, head)`` (``r == 1`` over all heads), launched last to write the
    final dtype; ``None`` if there is none. ``full``: the outputs need no zero fill.
    """

    branches: tuple[tuple[Branch, int, int, int], ...]  # (branch, head0, head_start, head_stop)
    multi: bool
    final: int | None
    full: bool


def _schedule(plan: DilatedPlan) -> _Schedule:
    H = plan.num_heads
    # In head_split mode with fewer heads than branches, some branches run no head.
    items = [(b, *_branch_heads(b)) for b in plan.branches if b.head_groups]
    items = [it for it in items if it[3] > it[2]]
    count = [0] * H
    for _, _, start, stop in items:
        for h in range(start, stop):
            count[h] += 1
    multi = max(count, default=0) > 1
    final = None
    for i, (b, _, start, stop) in enumerate(items):
        if b.dilation_rate == 1 and start == 0 and stop == H:
            final = i
    if final is not None:
        # The covering branch goes last: it reads the accumulators and writes the output.
        items.append(items.pop(final))
        final = len(items) - 1
    # Without multi-coverage, the outputs are complete iff every head runs an r = 1 branch.
    full = final is not None or (
        not multi and all(count) and all(b.dilation_rate == 1 for b, _, _, _ in items)
    )
    return _Schedule(tuple(items), multi, final, full)


def _head_chunks(
    accumulate: bool, B: int, N: int, H: int, D: int, kv_group: int = 1
) -> list[tuple[int, int]]:
    """Chunks of heads whose fp32 accumulators (when ``accumulate``) stay under
    :data:`ACC_CHUNK_BYTES`; their bounds are multiples of ``kv_group``, so that a chunk's
    query heads read a chunk of K/V heads."""
    if not accumulate:
        return [(0, H)]
    per_head = B * N * D * 4
    size = max(1, min(H, ACC_CHUNK_BYTES // max(1, per_head)))
    size = max(kv_group, size // kv_group * kv_group)
    return [(c, min(H, c + size)) for c in range(0, H, size)]


def _launches_for_chunk(
    sched: _Schedule,
    c_lo: int,
    c_hi: int,
    kv_group: int = 1,
    documents: Sequence[int] | None = None,
    device: torch.device | None = None,
) -> list[tuple[int, _Launch]]:
    """Branch index and launch (chunk-relative heads) for every branch touching the chunk;
    with ``documents`` (packed document lengths) each launch carries its segment table."""
    out = []
    for i, (branch, head0, start, stop) in enumerate(sched.branches):
        lo, hi = max(start, c_lo), min(stop, c_hi)
        if hi <= lo:
            continue
        w, r = branch.segment_length, branch.dilation_rate
        segments, longest = None, 0
        if documents is not None:
            segments = _segment_table(tuple(documents), w, device)
            longest = min(w, max(documents, default=0))
        launch = _Launch(w, w, r, head0 - c_lo, lo - c_lo, hi - lo, kv_group, segments, longest)
        out.append((i, launch))
    return out


@functools.lru_cache(maxsize=64)
def _segment_table(
    documents: tuple[int, ...], segment_length: int, device: torch.device | None
) -> tuple[Tensor, Tensor]:
    """First token (int64) and length (int32) of every segment of packed documents of
    these lengths: each document is cut into segments of ``segment_length`` tokens from its
    own first token, the last one shorter. Cached: a forward and its backward, and every
    head chunk, read the same table."""
    starts: list[int] = []
    lengths: list[int] = []
    first = 0
    for n in documents:
        for s in range(0, n, segment_length):
            starts.append(first + s)
            lengths.append(min(segment_length, n - s))
        first += n
    return (
        torch.tensor(starts, dtype=torch.int64, device=device),
        torch.tensor(lengths, dtype=torch.int32, device=device),
    )


def _kpm_u8(key_padding_mask: Tensor | None) -> Tensor | None:
    # bool -> uint8 view (same bytes): Triton loads it as an integer, 1 = padding.
    return None if key_padding_mask is None else key_padding_mask.view(torch.uint8)


def _single_coverage(
    sched: _Schedule, num_heads: int, kv_group: int, documents: Sequence[int] | None,
    device: torch.device,
) -> Tensor | None:  # fmt: skip
    """Where the outputs need zeros in some rows only: the ``(3, H)`` int32 table of
    :func:`_coverage_table` when no ``(position, head)`` is covered by more than one
    branch (``head_split`` mixing, for one), the outputs are not all covered, K/V heads
    are the query heads and there are no packed documents; else ``None`` (a full zero
    fill where ``sched.full`` is False). :func:`_zero_uncovered` then writes only the rows
    the kernels leave, instead of zeroing whole tensors that the kernels mostly
    overwrite."""
    if sched.full or sched.multi or kv_group != 1 or documents is not None:
        return None
    key = tuple((b.segment_length, b.dilation_rate, h0, lo, hi) for b, h0, lo, hi in sched.branches)
    return _coverage_table(key, num_heads, device)


@functools.lru_cache(maxsize=64)
def _coverage_table(
    branches: tuple[tuple[int, int, int, int, int], ...], num_heads: int, device: torch.device
) -> Tensor:
    """Per head, ``(rate, offset, segment length)`` of the one branch that runs it (its
    positions ``p`` with ``(p mod w) mod r == offset``, the kernels' offset rule
    ``offset = (h - head0) mod r``), given ``(w, r, head0, head_start, head_stop)`` per
    branch; ``(1, -1, 1)`` for a head no branch runs. Int32 ``(3, H)`` on ``device``."""
    table = [[1] * num_heads, [-1] * num_heads, [1] * num_heads]
    for w, r, head0, start, stop in branches:
        for h in range(start, stop):
            table[0][h], table[1][h], table[2][h] = r, (h - head0) % r, w
    return torch.tensor(table, dtype=torch.int32, device=device)


def _first_launch_coverage(
    launches: list[tuple[int, _Launch]], sched: _Schedule, num_heads: int, kv_group: int,
    dq_add: int, device: torch.device,
) -> Tensor | None:  # fmt: skip
    """For the fp32 accumulators of one head chunk's backward pass through several
    branches: the :func:`_coverage_table` of the chunk's first launch, which stores the
    rows it covers without reading the accumulators, so that only the other rows need
    zeros first (:func:`_zero_uncovered`). ``None`` (zero-fill them whole) with
    grouped-query attention, the ``DQ_MODE`` forms, packed documents, or where the first
    launch is the final one (it writes the outputs, not the accumulators)."""
    if kv_group != 1 or dq_add or len(launches) < 2:
        return None
    i, first = launches[0]
    if i == sched.final or first.segments is not None:
        return None
    stop = first.h_first + first.num_heads
    key = ((first.seg_q, first.dil, first.head0, first.h_first, stop),)
    return _coverage_table(key, num_heads, device)


def _zero_uncovered(tensors: tuple[Tensor, ...], cover: Tensor) -> None:
    """Zeros into the rows of ``tensors`` (1 to 3 ``(B, N, H, D)`` tensors with equal
    strides) that the branches of ``cover`` (:func:`_single_coverage` or
    :func:`_first_launch_coverage`) leave."""
    x = tensors[0]
    B, N, H, D = x.shape
    if any(t.stride() != x.stride() or t.shape != x.shape for t in tensors):
        raise ValueError("_zero_uncovered wants tensors of one shape and strides")
    if B * N * H == 0:
        return
    block = 16 if interpreting() else 64
    padded = tensors + (x,) * (3 - len(tensors))
    _zero_uncovered_kernel[(triton.cdiv(N, block), B * H)](
        *padded, cover, N, H, *_s3(x), HEAD_DIM=D, BLOCK=block, NUM=len(tensors)
    )


def dilated_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: DilatedPlan,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    documents: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """All branches of ``plan``: q ``(B, N, H, D)``, k, v ``(B, N, H_kv, D)`` -> out
    ``(B, N, H, D)`` in q.dtype and the LSE as a ``(2, B, N, H)`` fp32 pair
    (``lse = pair[0] + pair[1]``, see :mod:`.kernels`).

    ``documents``: lengths of packed documents (``B == 1``, summing to ``N``): each is its
    own sequence, in the same launches (the kernels read a segment table).
    ``key_padding_mask``: ``(B, N)`` bool, ``True`` = padding key. Positions no branch
    covers get ``out = 0`` and the pair ``(-inf, 0)``.
    """
    B, N, H, D = q.shape
    sched = _schedule(plan)
    kpm = _kpm_u8(key_padding_mask)
    g = H // k.shape[2]
    cover = _single_coverage(sched, H, g, documents, q.device)
    alloc = torch.empty if sched.full or cover is not None else torch.zeros
    out = alloc(q.shape, dtype=q.dtype, device=q.device)
    if cover is not None:
        _zero_uncovered((out,), cover)
    lse = torch.empty((2, B, N, H), dtype=torch.float32, device=q.device)
    joint = _joint_pass("forward", sched, H, N, D, g, causal=causal, documents=documents)
    if joint is not None:
        # One launch writes every (position, head) of out and the LSE pair.
        _joint_forward(q, k, v, out, lse, kpm, joint, scale=scale)
        return out, lse
    # The LSE is read back by later branches (multi) or may stay uncovered: start at
    # (-inf, 0).
    if sched.multi or not sched.full:
        lse[0].fill_(-math.inf)
        lse[1].zero_()
    if N == 0:
        return out, lse
    for c_lo, c_hi in _head_chunks(sched.multi, B, N, H, D, g):
        hs, ks = slice(c_lo, c_hi), slice(c_lo // g, c_hi // g)
        qc, kc, vc, oc = q[:, :, hs], k[:, :, ks], v[:, :, ks], out[:, :, hs]
        lc = lse[:, :, :, hs]
        # The kernels never read an accumulator row whose LSE is still -inf, so it needs
        # no zero fill, except when it is copied out at the end (no covering branch).
        acc_alloc = torch.zeros if sched.final is None else torch.empty
        acc = (
            acc_alloc(B, N, c_hi - c_lo, D, dtype=torch.float32, device=q.device)
            if sched.multi
            else oc
        )
        launches = _launches_for_chunk(sched, c_lo, c_hi, g, documents, q.device)
        for j, (i, launch) in enumerate(launches):
            target = oc if (not sched.multi or i == sched.final) else acc
            _launch_forward(
                qc, kc, vc, target, acc, lc, kpm, launch,
                scale=scale, causal=causal, acc_in=sched.multi and j > 0,
            )  # fmt: skip
        if sched.multi and sched.final is None:
            oc.copy_(acc)  # no branch covers everything: one cast pass
        del acc
    return out, lse


@dataclass(frozen=True)
class _JointBranches:
    """A plan the joint kernels run: its branches by rising rate (rates, segment
    lengths, ``head0`` of the offset rule), and the length of their units (the first
    segment length, or ``N`` where that is shorter)."""

    rates: tuple[int, ...]
    segments: tuple[int, ...]
    head0: tuple[int, ...]
    unit: int


def _joint_branches(
    sched: _Schedule, num_heads: int, n: int, *, causal: bool,
    documents: Sequence[int] | None, block_m: int,
) -> _JointBranches | None:  # fmt: skip
    """The joint kernels' view of a plan on ``n`` tokens, or ``None`` where they do not
    apply.

    They apply (with :data:`BRANCH_MODE` ``"joint"``, not causal, no packed documents,
    ``n > 0``) when several branches run every head, their rates rise from 1 with each
    dividing the next, each segment length divides the next one and the first is a
    multiple of the largest rate, and the head offsets nest (``o_j % r_{j-1} ==
    o_{j-1}`` for every head), as in LongNet's plans. Then a position that branch ``j``
    covers is covered by every branch before it, so one launch runs each query over the
    keys of all the branches that cover it: one online softmax in the forward
    (``_joint_forward``), one dQ sum in the backward (``_joint_dq``); and each key over
    the queries of all the branches that read it (``_joint_dkdv``). A program's tile
    holds positions of one class in one unit (the first segment length), ``1 / r`` of
    them for the largest rate ``r``: where that is less than a tile of ``block_m`` rows
    (the kernel's: query rows, or key rows for dK/dV), most of every tile would be
    padding, each looping over all the covering branches' keys, and that pass runs per
    branch instead.
    """
    if BRANCH_MODE not in BRANCH_MODES:
        raise ValueError(
            f"BRANCH_MODE must be one of {BRANCH_MODES}, got {BRANCH_MODE!r}; 'joint' "
            "(the default) runs nesting softmax-mixing plans in one launch"
        )
    items = sorted(sched.branches, key=lambda it: it[0].dilation_rate)
    if BRANCH_MODE != "joint" or causal or documents is not None or len(items) < 2 or n == 0:
        return None
    if any(start != 0 or stop != num_heads for _, _, start, stop in items):
        return None
    rates = tuple(b.dilation_rate for b, _, _, _ in items)
    segs = tuple(b.segment_length for b, _, _, _ in items)
    head0 = tuple(h0 for _, h0, _, _ in items)
    # The first segment length, a multiple of every rate: every unit of it starts at a
    # position that is 0 modulo each rate, so a class's residues are the same in each.
    # The kernels index segments in int32.
    if rates[0] != 1 or segs[0] % rates[-1] or segs[-1] >= 2**31:
        return None
    if segs[0] // rates[-1] < block_m:
        return None
    for j in range(1, len(items)):
        if rates[j] <= rates[j - 1] or rates[j] % rates[j - 1] or segs[j] % segs[j - 1]:
            return None
        for h in range(num_heads):
            if (h - head0[j]) % rates[j] % rates[j - 1] != (h - head0[j - 1]) % rates[j - 1]:
                return None
    return _JointBranches(rates, segs, head0, min(segs[0], n))


# The tile rows each joint pass's programs hold: the kernel table and the field.
_JOINT_TILE_ROWS = {
    "forward": (FWD_CONFIGS, "block_m"),
    "dq": (DQ_CONFIGS, "block_m"),
    "dkdv": (DKDV_CONFIGS, "block_n"),
}


def _packs_row_terms(dq_add: int) -> bool:
    """Whether the backward packs its row terms (``_backward_rows`` with ``packed``):
    :data:`PACKED_ROW_TERMS`, checked, with dQ in its own kernel (``dq_add`` 0; the
    ``DQ_MODE`` forms read them as separate values). ``dilated_backward`` and
    ``get_memory_estimate`` decide through here."""
    if not isinstance(PACKED_ROW_TERMS, bool):
        raise ValueError(
            f"PACKED_ROW_TERMS must be a bool, got {PACKED_ROW_TERMS!r}; True (the default) "
            "reads the backward's row terms as one packed word per row, False as separate "
            "values"
        )
    return PACKED_ROW_TERMS and not dq_add


def _joint_pass(
    which: str, sched: _Schedule, num_heads: int, n: int, head_dim: int, kv_group: int, *,
    causal: bool, documents: Sequence[int] | None, dq_add: int = 0,
) -> _JointBranches | None:  # fmt: skip
    """Whether one pass (``"forward"``, ``"dq"``, ``"dkdv"``) of a call runs jointly:
    :func:`_joint_branches` with that pass's tile rows, except that with ``dq_add``
    (``DQ_MODE``: the dK/dV kernel adds dQ) the backward runs per branch, and the joint
    dK/dV needs one K/V head per query head and a head dim of at most
    :data:`JOINT_DKDV_MAX_HEAD_DIM`. The launchers and the memory estimate
    (``memory._triton_extra``) decide through it."""
    if which != "forward" and dq_add:
        return None
    cap = JOINT_DKDV_MAX_HEAD_DIM
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise ValueError(
            f"JOINT_DKDV_MAX_HEAD_DIM must be None or an int >= 0, got {cap!r}; None (the "
            "default) runs the joint dK/dV at every head dim, 0 at none"
        )
    if which == "dkdv" and (kv_group > 1 or (cap is not None and head_dim > cap)):
        return None
    table, field = _JOINT_TILE_ROWS[which]
    rows = getattr(_config(table, head_dim), field)
    return _joint_branches(sched, num_heads, n, causal=causal, documents=documents, block_m=rows)


@functools.lru_cache(maxsize=64)
def _joint_programs(
    rates: tuple[int, ...], unit: int, block_m: int
) -> tuple[tuple[int, int, int], ...]:
    """``(class, view, tile)`` of the joint kernels' programs in one unit of ``unit``
    positions (see ``kernels._joint_tile``), the classes covered by the most branches
    first: they run longest."""
    out = []
    last = len(rates) - 1
    for c in range(last, -1, -1):
        stride = rates[c] if c == last else rates[c + 1]
        views = 1 if c == last else rates[c + 1] // rates[c] - 1
        tiles = triton.cdiv(triton.cdiv(unit, stride), block_m)
        out += [(c, v, t) for v in range(views) for t in range(tiles)]
    return tuple(out)


def _joint_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kpm: Tensor | None,
    joint: _JointBranches, *, scale: float,
) -> None:  # fmt: skip
    # out, lse: the call's whole output and (2, B, N, H) LSE pair, written once.
    _launch_joint(_joint_fwd_kernel, FWD_CONFIGS, (q, k, v, out, lse[0]), kpm, joint,
                  scales=(scale, lse.stride(0)), NEG_SCALE=scale < 0)  # fmt: skip


def _joint_dq(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, dq: Tensor,
    kpm: Tensor | None, joint: _JointBranches, *, scale: float,
) -> None:  # fmt: skip
    # lse, delta: the whole sequence's row terms of _backward_rows; dq written once.
    _launch_joint(_joint_dq_kernel, DQ_CONFIGS, (q, k, v, dout, lse[0], delta, dq), kpm, joint,
                  scales=(scale, lse.stride(0)))  # fmt: skip


def _joint_dkdv(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, dk: Tensor,
    dv: Tensor, kpm: Tensor | None, joint: _JointBranches, *, scale: float, packed: bool,
) -> None:  # fmt: skip
    # lse, delta: the whole sequence's row terms of _backward_rows (packed: views of its
    # packed words); dk, dv (one K/V head per query head, equal strides) written once.
    # The program table's tiles are key tiles.
    tensors = (q, k, v, dout, lse[0], delta, dk, dv)
    _launch_joint(_joint_dkdv_kernel, DKDV_CONFIGS, tensors, kpm, joint,
                  scales=(scale, lse.stride(0)), strided=tensors[:-1], loaded=tensors[:4],
                  key_tiles=True, PACKED=packed)  # fmt: skip


def _launch_joint(
    kernel: triton.JITFunction, table: dict[int, KernelConfig], tensors: tuple[Tensor, ...],
    kpm: Tensor | None, joint: _JointBranches, *, scales: tuple,
    strided: tuple[Tensor, ...] | None = None, loaded: tuple[Tensor, ...] | None = None,
    key_tiles: bool = False, **constexprs: bool,
) -> None:  # fmt: skip
    """Launch a joint kernel (``_joint_fwd_kernel``, ``_joint_dq_kernel``,
    ``_joint_dkdv_kernel``) over every branch, head and batch: a program per (unit,
    program-table entry) and (batch, head). ``tensors``: its ``(B, N, H, ...)`` tensor
    arguments before ``Kpm``, q, k and v first; ``strided``: those whose strides it
    takes, in order (default: all); ``loaded``: those its loops read through tensor
    descriptors where every one of them allows it (``_tma_loads``; default: q, k, v);
    ``scales``: its arguments after ``kv_group``; ``key_tiles``: the table's tiles are
    ``block_n`` key rows (else ``block_m`` query rows)."""
    q, k, v = tensors[:3]
    B, N, H, D = q.shape
    cfg = _config(table, D)
    rows = cfg.block_n if key_tiles else cfg.block_m
    programs, rates, segs, head0 = _joint_tables(joint, rows, q.device)
    entries = programs.numel() // 3
    kpm_t, s_mb, s_mn = (q, 0, 0) if kpm is None else (kpm, kpm.stride(0), kpm.stride(1))
    tma_loads = _tma_loads(*(tensors[:3] if loaded is None else loaded))
    if tma_loads and not interpreting():
        _ensure_allocator()
    grid = (entries * triton.cdiv(N, joint.unit), B * H)
    kernel[grid](
        *tensors, kpm_t, programs, rates, segs, head0,
        *[s for t in (tensors if strided is None else strided) for s in _s3(t)], s_mb, s_mn,
        N, joint.unit, entries, H, H // k.shape[2], *scales,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        NUM_BRANCHES=len(joint.rates), HAS_KPM=kpm is not None, TMA_LOADS=tma_loads,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs, **_cap(cfg),
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _joint_tables(
    joint: _JointBranches, block_m: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The joint kernels' program table and branch tables (int32, on the device).
    programs = _joint_programs(joint.rates, joint.unit, block_m)
    return tuple(  # type: ignore[return-value]
        torch.tensor(x, dtype=torch.int32, device=device).reshape(-1)
        for x in (programs, joint.rates, joint.segments, joint.head0)
    )


def dilated_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    plan: DilatedPlan,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    documents: Sequence[int] | None = None,
    grads: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` (in the input dtype, shaped like q, k, v) given the final
    out and LSE pair ``(2, B, N, H)`` of :func:`dilated_forward`; written into ``grads``
    when given (token-major, unit stride on D, dk and dv with equal strides).

    With grouped-query attention (k, v with ``H_kv < H`` heads) a dK/dV program adds up
    the shares of a K/V head's query heads that read the same dilated key rows (those
    with the same offset) and writes per K/V head (:func:`_grouped_dkdv`); where a launch
    does not run whole K/V groups, or dQ is added by the dK/dV kernel (``DQ_MODE``), the
    kernels write one fp32 gradient per query head instead, summed per K/V head after.
    """
    B, N, H, D = q.shape
    sched = _schedule(plan)
    kpm = _kpm_u8(key_padding_mask)
    g = H // k.shape[2]
    if grads is None:
        cover = _single_coverage(sched, H, g, documents, q.device)
        alloc = torch.empty if sched.full or cover is not None else torch.zeros
        dq = alloc(q.shape, dtype=q.dtype, device=q.device)
        dk = alloc(k.shape, dtype=k.dtype, device=k.device)
        dv = alloc(v.shape, dtype=v.dtype, device=v.device)
        if cover is not None:
            _zero_uncovered((dq, dk, dv), cover)
    else:
        dq, dk, dv = grads
        if dk.stride() != dv.stride():
            raise ValueError(f"dk and dv must share strides, got {dk.stride()} and {dv.stride()}")
        if not sched.full:  # some rows get no gradient from any branch
            for t in grads:
                t.zero_()
    if N == 0:
        return dq, dk, dv
    f32 = dict(dtype=torch.float32, device=q.device)
    dq_add = _dq_add(q.device)
    # dQ of every branch in one launch where the plan nests (dQ in its own kernel), and
    # dK/dV of every branch in another (also one K/V head per query head). Each decides
    # by its own tiles (_joint_pass); what they leave runs per branch.
    joint_dq, joint_dkdv = (
        _joint_pass(which, sched, H, N, D, g, causal=causal, documents=documents, dq_add=dq_add)
        for which in ("dq", "dkdv")
    )
    packed = _packs_row_terms(dq_add)
    lse, delta = _backward_rows(dout, out, lse, packed=packed)
    if joint_dkdv is not None:
        _joint_dkdv(dout, q, k, v, lse, delta, dk, dv, kpm, joint_dkdv, scale=scale, packed=packed)
    if joint_dq is not None:
        _joint_dq(dout, q, k, v, lse, delta, dq, kpm, joint_dq, scale=scale)
    passes = () if joint_dkdv else ("dkdv",)
    if not dq_add and joint_dq is None:
        passes += ("dq",)
    if not passes:
        return dq, dk, dv
    for c_lo, c_hi in _head_chunks(sched.multi or g > 1 or dq_add > 0, B, N, H, D, g):
        hs, ks = slice(c_lo, c_hi), slice(c_lo // g, c_hi // g)
        doc, qc, dlc, dqc = (t[:, :, hs] for t in (dout, q, delta, dq))
        kc, vc, dkc, dvc = (t[:, :, ks] for t in (k, v, dk, dv))
        lc = lse[:, :, :, hs]
        shape = (B, N, c_hi - c_lo, D)
        launches = _launches_for_chunk(sched, c_lo, c_hi, g, documents, q.device)
        grouped = _grouped_dkdv(launches, g, dq_add)
        # Accumulators: the first launch stores the rows it covers, only the others
        # start at zero (None: zero-filled whole). The same for every pass.
        first_cover = _first_launch_coverage(launches, sched, c_hi - c_lo, g, dq_add, q.device)
        # dK/dV for all branches first, then dQ: at most two fp32 accumulators live at once;
        # with dq_add the dK/dV pass also adds dQ into a third, and there is no dQ pass.
        dq_acc = torch.zeros(shape, **f32) if dq_add else None
        for which in passes:
            # Through fp32 accumulators: several branches, or per-query-head dK/dV.
            per_query_head = g > 1 and which == "dkdv" and not grouped
            through = sched.multi or per_query_head
            first = first_cover if through else None
            acc_alloc = torch.empty if first is not None else torch.zeros
            if through and which == "dkdv":
                kv_shape = (B, N, (c_hi - c_lo) // g, D) if grouped else shape
                dk_acc, dv_acc = acc_alloc(kv_shape, **f32), acc_alloc(kv_shape, **f32)
                if first is not None:
                    _zero_uncovered((dk_acc, dv_acc), first)
                accs = (dk_acc, dk_acc, dv_acc)  # the dQ slot is unused here
            elif through:
                dq_acc = acc_alloc(shape, **f32)
                if first is not None:
                    _zero_uncovered((dq_acc,), first)
                accs = (dq_acc, dq_acc, dq_acc)
            else:
                accs = (dqc, dkc, dvc)
            for j, (i, launch) in enumerate(launches):
                final = not through or (i == sched.final and not per_query_head)
                # A branch with r > 1 reads its own rows of the row terms, gathered here
                # (3 fp32 values per row it runs, 4 packed, freed after its launch).
                lb, db, compact = _branch_rows(lc, dlc, launch, packed)
                _launch_backward(
                    doc, qc, kc, vc, lb, db, kpm, (dqc, dkc, dvc) if final else accs, accs,
                    launch, scale=scale, causal=causal, acc_in=through and j > 0, which=which,
                    dq_add=dq_add, dq_acc=dq_acc, compact=compact, grouped=grouped,
                    packed=packed,
                )  # fmt: skip
                del lb, db
            if per_query_head:
                dkc.copy_(sum_query_heads(accs[1], g))
                dvc.copy_(sum_query_heads(accs[2], g))
            elif through and sched.final is None:
                if which == "dkdv":
                    dkc.copy_(accs[1])
                    dvc.copy_(accs[2])
                else:
                    dqc.copy_(accs[0])
            # Free this pass's accumulators before the next is allocated: at most two
            # are live at once.
            del accs
            dk_acc = dv_acc = None
            if not dq_add:
                dq_acc = None
        if dq_add:
            dqc.copy_(dq_acc)
            dq_acc = None
    return dq, dk, dv


def _grouped_dkdv(launches: list[tuple[int, _Launch]], kv_group: int, dq_add: int) -> bool:
    """Whether the dK/dV pass of a chunk's launches runs a program per (K/V head, offset
    class): with grouped-query attention (``kv_group > 1``), dQ in its own kernel and
    every launch running whole K/V groups. Such a program adds up the shares of the query
    heads of its K/V head that read the same key rows (those with its offset) and writes
    dK/dV per K/V head: no fp32 dK/dV per query head, no summing pass. Two launches run
    the same K/V group only when two branches cover its heads (softmax mixing), where
    the pass goes through fp32 accumulators (per K/V head) anyway."""
    return (
        kv_group > 1
        and not dq_add
        and all(la.h_first % kv_group == 0 and la.num_heads % kv_group == 0 for _, la in launches)
    )


# --------------------------------------------------------------------------- block ops


def _block_kpm(key_keep: Tensor | None, dropout: object) -> Tensor | None:
    """A block's ``(Bb, Lk)`` keep mask as the kernels' uint8 padding mask (1 = padding)."""
    if dropout is not None:
        raise ValueError(
            "the triton backend does not implement dropout; use backend='pytorch' (or 'auto') "
            "for calls with dropout."
        )
    return None if key_keep is None else _kpm_u8((~key_keep).contiguous())


def triton_block_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_keep: Tensor | None = None,
    dropout: object = None,
) -> tuple[Tensor, Tensor]:
    """One block of queries against one block of keys (same signature as ``blocks.py``).

    q: ``(Bb, Lq, Hs, D)``, k/v: ``(Bb, Lk, Hk, D)`` with ``Hk`` dividing ``Hs`` (query
    head ``i`` reads K/V head ``i // (Hs / Hk)``), any token-major strides (unit stride on D), fp16/bf16 on CUDA (fp32 would run its dots in tf32), head dim in
    {16, 32, 64, 128}. ``causal``: query ``t`` sees keys ``t' <= t`` (blocks aligned at 0).
    ``key_keep``: ``(Bb, Lk)`` bool, ``True`` where a key may be attended. ``dropout``
    must be ``None`` (not implemented here).
    Returns ``out (Bb, Lq, Hs, D)`` in q.dtype and ``lse (Bb, Lq, Hs)`` fp32 (``-inf``
    for rows with no key).
    """
    kpm = _block_kpm(key_keep, dropout)
    Bb, Lq, Hs, D = q.shape
    Lk = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(Bb, Lq, Hs, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    launch = _Launch(Lq, max(Lk, 1), 1, 0, 0, Hs, Hs // k.shape[2])
    _launch_forward(q, k, v, out, out, lse, kpm, launch, scale=scale, causal=causal, acc_in=False)
    return out, lse


def triton_block_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_keep: Tensor | None = None,
    dropout: object = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` in q.dtype for one block, given the *final* out/lse.

    Shapes and ``key_keep`` as in :func:`triton_block_forward`; ``lse`` is
    ``(Bb, Lq, Hs)`` and may be ``-inf`` for rows with no key (their probabilities are 0).
    """
    kpm = _block_kpm(key_keep, dropout)
    Lq, Hs = q.shape[1], q.shape[2]
    Lk = k.shape[1]
    # Every row is written (dK/dV tiles cover the keys, dQ tiles the queries), except
    # when a block is empty.
    alloc = torch.zeros if Lq == 0 or Lk == 0 else torch.empty
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    if Lq == 0 or Lk == 0:
        return dq, dk, dv
    lse, delta = _backward_rows(dout, out, lse)
    g = Hs // k.shape[2]
    launch = _Launch(Lq, Lk, 1, 0, 0, Hs, g)
    grads = (dq, dk, dv)
    for which in ("dkdv", "dq"):
        # With grouped-query attention a dK/dV program adds up the shares of all query
        # heads of its K/V head (r = 1: one offset class) and writes dK/dV directly.
        _launch_backward(
            dout, q, k, v, lse, delta, kpm, grads, grads, launch,
            scale=scale, causal=causal, acc_in=False, which=which,
            grouped=_grouped_dkdv([(0, launch)], g, 0),
        )  # fmt: skip
    return dq, dk, dv
