"""Per-rank memory of one forward (+ backward) of *this* implementation, by arithmetic.

:func:`get_memory_estimate` replays, allocation by allocation, what the code allocates
and frees during one call (:mod:`.functional` with the ``pytorch`` or ``triton``
backend on one device, :mod:`.distributed.ring_dilated_attention` over a ring,
:mod:`.ring.standard` for ``already_split=False``, :mod:`.modules` for the multi-head
layer) and reports the peak of the bytes live at the same time. No tensor is created:
every size comes from the plan (:func:`~dilated_attention_pytorch.plan.make_plan`),
the ring layout (:func:`~dilated_attention_pytorch.distributed.ring_dilated_attention.ring_layout`)
and the shapes the code builds.

The replay is a list of allocations and frees in program order (a *timeline*); each
``_mirror_*`` function below follows one function of the library and names the lines
it mirrors. Python keeps a loop variable bound until it is rebound, so the previous
block's results stay alive while the next block runs; the replay keeps them too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch

from .backends import AttentionCall, available_backends, get_backend
from .backends.blocks import _MAX_SCORE_ELEMENTS, _MAX_SCORE_ELEMENTS_CPU, compute_dtype
from .distributed.ring_dilated_attention import _held_origin, ring_layout, ring_merges_blocks
from .distributed.validation import check_shard_length
from .plan import DilatedPlan, heads_plan, make_plan, num_dilated_positions
from .projected import head_chunks
from .segments import heads_merge_branches
from .validation import (
    SUPPORTED_DTYPES,
    check_bool,
    check_choice,
    check_head_split,
    check_num_kv_heads,
    check_positive_int,
)

__all__ = ["GiB", "MEMORY_PARTS", "get_memory_estimate"]

GiB = 2**30
"""The unit of every ``*_gb`` figure: 2**30 bytes (a GiB)."""

MEMORY_PARTS = (
    "inputs",  # q, k, v as the caller passes them (the layer: its input x)
    "parameters",  # the multi-head layer's weights and biases
    "saved_tensors",  # kept for the backward: lse, the layer's projections and norm stats
    "output",  # the output the caller holds (attention out, or the layer's output)
    "output_grad",  # the gradient of the output (and the zero gradient autograd makes for lse)
    "accumulators",  # fp32 (fp64 for fp64) out/lse and dq/dk/dv accumulators
    "gradients",  # dq, dk, dv in the input dtype (the layer: dx and the parameter grads)
    "transfer_buffers",  # ring: packed K/V held and in flight, travelling dK/dV accumulators
    "temporaries",  # per-block outputs/grads, merge temporaries, fused-kernel workspace
    "score_tiles",  # math path: score / probability tiles (bounded by _MAX_SCORE_ELEMENTS)
    "shard_gather",  # already_split=False: shard copies and the gathered output/gradients
)
"""The keys of ``get_memory_estimate(...)["parts"]``."""

if importlib.util.find_spec("triton") is not None:  # as backends/__init__.py does
    from .backends.triton.launch import (
        _compacts,
        _dq_add,
        _grouped_dkdv,
        _head_chunks,
        _joint_pass,
        _launches_for_chunk,
        _packs_row_terms,
        _schedule,
    )

_BACKENDS = ("pytorch", "triton")
# Skip ring steps that repeat the two before them (same peak, same sizes left); the
# tests replay with and without it.
_SKIP_REPEATED_STEPS = True
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- the timeline


class _Timeline:
    """Allocations and frees in program order; tracks the peak of the live bytes.

    A buffer has a reference count (views of a buffer keep it alive); it is freed when
    the count drops to zero. ``parts`` is the breakdown at the peak.
    """

    def __init__(self) -> None:
        self._part: dict[int, str] = {}
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._next = 0
        self.live = 0
        self.by_part = dict.fromkeys(MEMORY_PARTS, 0)
        self.peak = 0
        self.peak_parts = dict(self.by_part)
        self.peak_phase = ""
        self.part_max = dict(self.by_part)
        self.phase = ""

    def new(self, part: str, nbytes: int) -> int | None:
        """Allocate ``nbytes`` under ``part``; returns a handle (``None`` for 0 bytes)."""
        nbytes = int(nbytes)
        if nbytes <= 0:
            return None
        h = self._next
        self._next += 1
        self._part[h], self._bytes[h], self._refs[h] = part, nbytes, 1
        self.live += nbytes
        self.by_part[part] += nbytes
        self.part_max[part] = max(self.part_max[part], self.by_part[part])
        if self.live > self.peak:
            self.peak, self.peak_parts, self.peak_phase = self.live, dict(self.by_part), self.phase
        return h

    def ref(self, h: int | None) -> int | None:
        if h is not None:
            self._refs[h] += 1
        return h

    def free(self, *handles: int | None) -> None:
        """Drop one reference of each handle; a buffer without references is freed."""
        for h in handles:
            if h is None:
                continue
            self._refs[h] -= 1
            if self._refs[h] == 0:
                nbytes, part = self._bytes.pop(h), self._part.pop(h)
                del self._refs[h]
                self.live -= nbytes
                self.by_part[part] -= nbytes

    def move(self, h: int | None, part: str) -> None:
        """Count a live buffer under another part from now on (e.g. an accumulator that
        is returned as the output)."""
        if h is None:
            return
        old = self._part[h]
        self.by_part[old] -= self._bytes[h]
        self.by_part[part] += self._bytes[h]
        self.part_max[part] = max(self.part_max[part], self.by_part[part])
        self._part[h] = part


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class _Block:
    """One block attention call: ``Bb`` batched segments, ``lq`` queries, ``lk`` keys, ``hs`` heads.

    Layout (for the math path's operand copies): ``dense`` when the q-side views hold
    every token and head of their rows (``r == 1`` over all heads: a permutation of a
    contiguous layout), ``seg_dense`` when consecutive segments are adjacent too, and
    ``k_buffer`` when the keys come from a packed ring buffer (contiguous). ``hk``: the
    K/V heads the block reads (grouped-query attention: ``hs / hk`` query heads each;
    0 means ``hs``).
    """

    bb: int
    lq: int
    lk: int
    hs: int
    dense: bool = False
    seg_dense: bool = False
    k_buffer: bool = False
    hk: int = 0

    @property
    def kv_heads(self) -> int:
        return self.hk or self.hs

    @property
    def share(self) -> int:
        """Query heads per K/V head."""
        return self.hs // self.kv_heads


@dataclass
class _Config:
    B: int
    H: int
    D: int
    itemsize: int  # input dtype
    acc: int  # compute dtype of accumulators (4, or 8 for float64)
    kernel: str  # "fused" (cuDNN / flash), "math" (chunked matmuls) or "triton"
    plan: DilatedPlan
    max_score_elements: int
    extra: dict = field(default_factory=dict)
    Hkv: int = 0  # K/V heads (grouped-query attention); 0 means H

    def __post_init__(self) -> None:
        if not self.Hkv:
            self.Hkv = self.H

    @property
    def kv_group(self) -> int:
        """Query heads per K/V head."""
        return self.H // self.Hkv

    def qkv_bytes(self, tokens: int) -> int:
        """q (or the output, or dq) of ``tokens`` tokens."""
        return self.B * tokens * self.H * self.D * self.itemsize

    def kv_bytes(self, tokens: int) -> int:
        """k or v (or dk, dv) of ``tokens`` tokens: ``Hkv`` heads."""
        return self.B * tokens * self.Hkv * self.D * self.itemsize

    def io_bytes(self, tokens: int) -> tuple[int, int, int]:
        """q, k, v (or dq, dk, dv) of ``tokens`` tokens."""
        return self.qkv_bytes(tokens), self.kv_bytes(tokens), self.kv_bytes(tokens)

    def acc_bytes(self, tokens: int) -> int:
        return self.B * tokens * self.H * self.D * self.acc

    def acc_io_bytes(self, tokens: int) -> tuple[int, int, int]:
        """The dq, dk, dv accumulators of ``tokens`` tokens (dk, dv: ``Hkv`` heads)."""
        kv = self.B * tokens * self.Hkv * self.D * self.acc
        return self.acc_bytes(tokens), kv, kv

    def lse_bytes(self, tokens: int, itemsize: int | None = None) -> int:
        return self.B * tokens * self.H * (self.acc if itemsize is None else itemsize)


def _segment_view_shapes(B: int, N: int, w: int, r: int, o: int) -> list[tuple[int, int, bool]]:
    """``(Bb, L, adjacent)`` of the views :func:`~dilated_attention_pytorch.segments.segment_views`
    returns; ``adjacent``: consecutive segments of the view are adjacent in memory (not
    for the shorter last segments of several batch elements)."""
    shapes = []
    num_full = N // w
    full_len = num_dilated_positions(w, r, o)
    if num_full == 1 and full_len:  # one segment per batch element: one view of all B
        shapes.append((B, full_len, B == 1 or N == w))
    elif num_full and full_len:
        merged = B == 1 or N == num_full * w
        shapes += [(B * num_full, full_len, True)] if merged else [(num_full, full_len, True)] * B
    rem_len = num_dilated_positions(N - num_full * w, r, o)
    if rem_len:
        shapes.append((B, rem_len, B == 1))
    return shapes


def _tiles(blk: _Block, max_elements: int) -> list[tuple[int, int]]:
    """``(b, lq)`` of tiles of ``blocks._tiles``, in an order that has every pair of
    consecutive tile sizes the block has (only a tile and its predecessor are ever live
    together, and a larger tile after a smaller one peaks differently from the reverse):
    whole segments batched, then the shorter last batch; or, for segments cut into query
    rows, up to two full tiles, the segment's shorter last tile and the next segment's
    first tile."""
    row = blk.hs * max(blk.lk, 1)
    if blk.lq * row <= max_elements:
        step = max(1, max_elements // max(1, blk.lq * row))
        return [(min(blk.bb, a + step) - a, blk.lq) for a in range(0, min(blk.bb, 2 * step), step)]
    rows = max(1, max_elements // row)
    full, short = divmod(blk.lq, rows)
    tiles = [(1, rows)] * min(full, 2) + ([(1, short)] if short else [])
    if blk.bb > 1:  # the next segment's first tile
        tiles.append((1, rows))
    return tiles


# --------------------------------------------------------------------------- block mirrors


class _Locals:
    """A function's local names: binding a name frees what it held before (Python keeps
    the previous tile's tensors until their names are rebound)."""

    def __init__(self, tl: _Timeline) -> None:
        self.tl, self.bound = tl, {}

    def bind(self, name: str, handle: int | None) -> None:
        old = self.bound.get(name)
        self.bound[name] = handle
        self.tl.free(old)

    def release(self) -> None:
        self.tl.free(*self.bound.values())
        self.bound = {}


def _tile_sizes(cfg: _Config, blk: _Block, b: int, lq: int) -> tuple:
    """Bytes of a tile's scores, of its q-sized and k-sized operands and of a row
    statistic; whether its operands are cast to the compute dtype; whether matmul copies
    the q-side and the k-side operands; whether folding the q side copies it.

    matmul folds ``(b, Hs)`` into one batch dim. That is a view when ``b == 1`` or
    ``Hs == 1``; otherwise the strided views are copied, and so are casts that kept a
    dense view's permuted strides (a cast of a view with gaps is contiguous: a view).
    With grouped-query attention (``blocks._fold``) the q-side operands are reshaped to
    ``(b, Hk, share * lq, D)`` first: a copy unless the cast made them contiguous, and
    contiguous afterwards (matmul then copies nothing on that side).
    """
    a, hs, hk = cfg.acc, blk.hs, blk.kv_heads
    cast = cfg.itemsize != a
    q_dense = blk.dense and (b == 1 or blk.seg_dense)
    k_dense = blk.k_buffer or q_dense
    folded = blk.share > 1
    return (
        b * hs * lq * blk.lk * a,
        b * hs * lq * cfg.D * a,
        b * hk * blk.lk * cfg.D * a,
        b * hs * lq * a,
        cast,
        not folded and b > 1 and hs > 1 and (not cast or q_dense),
        b > 1 and hk > 1 and (not cast or k_dense),
        folded and (not cast or q_dense),
    )


def _mirror_q_operand(tl: _Timeline, names: _Locals, name: str, n: int, cast: bool,
                      fold: bool) -> None:  # fmt: skip
    """``name = _fold(x[...].transpose(1, 2).to(cdt), share)`` of one q-sized tile
    operand: the cast (when the dtype changes), then the fold's copy (``fold``)."""
    cast_h = tl.new("score_tiles", n) if cast else None
    if fold:
        copy = tl.new("score_tiles", n)
        tl.free(cast_h)
        names.bind(name, copy)
    elif cast:
        names.bind(name, cast_h)


def _mirror_merge(tl: _Timeline, cfg: _Config, blk: _Block) -> None:
    """``segments.merge_lse_`` into ``(out, hi, lo)``: lse-sized temporaries only (the
    block output is added by one ``addcmul_``)."""
    lse = blk.bb * blk.lq * blk.hs
    a = cfg.acc
    new_hi = tl.new("temporaries", lse * a)  # maximum(hi, lse_block)
    isinf, zeros = tl.new("temporaries", lse), tl.new("temporaries", lse * a)
    shift = tl.new("temporaries", lse * a)  # where(isinf(new_hi), zeros_like, new_hi)
    tl.free(isinf, zeros)
    diff = tl.new("temporaries", lse * a)  # hi - shift, then + lo, then exp
    tmp = tl.new("temporaries", lse * a)
    tl.free(diff)
    w_acc = tl.new("temporaries", lse * a)
    tl.free(tmp)
    diff = tl.new("temporaries", lse * a)  # lse_block - shift, then exp
    w_block = tl.new("temporaries", lse * a)
    tl.free(diff)
    total = tl.new("temporaries", lse * a)  # w_acc + w_block, then where(total > 0, ...)
    positive, ones = tl.new("temporaries", lse), tl.new("temporaries", lse * a)
    safe = tl.new("temporaries", lse * a)
    tl.free(total, positive, ones)
    tl.free(tl.new("temporaries", lse * a))  # out_acc.mul_(w_acc / total)
    # out_acc.addcmul_(out_block, w_block / total): only the ratio (CUDA casts a
    # low-precision block inside the kernel; a CPU would copy it first, not counted).
    tl.free(tl.new("temporaries", lse * a))
    tl.free(tl.new("temporaries", lse * a))  # lo.copy_(log(total))
    tl.free(new_hi, shift, w_acc, w_block, safe)


def _mirror_scaled_dout(tl: _Timeline, cfg: _Config, tokens: int) -> int:
    """``segments.scale_dout_by_lse_lo``: ``dout * exp(-lo)``, a new tensor in the input
    dtype that lives through the backward (returns its handle)."""
    lse = cfg.lse_bytes(tokens)  # exp(-lo), in the LSE's dtype
    factor = tl.new("temporaries", lse)
    if cfg.itemsize == 2:  # float16 / bfloat16: the factor is cast, the product is direct
        cast = tl.new("temporaries", cfg.lse_bytes(tokens, cfg.itemsize))
        out = tl.new("temporaries", cfg.qkv_bytes(tokens))
        tl.free(cast, factor)
        return out
    out = tl.new("temporaries", cfg.qkv_bytes(tokens))
    tl.free(factor)
    return out


def _mirror_block_forward(tl: _Timeline, cfg: _Config, blk: _Block) -> tuple:
    """``blocks.block_forward`` (or ``triton_block_forward``): returns the handles of the
    block's ``(out, lse)``."""
    lse = blk.bb * blk.lq * blk.hs
    if cfg.kernel == "fused" and blk.share > 1:
        # blocks.fused_grouped_forward: one call per strided view of query heads (all
        # kept in a list), then the block's out and lse, filled from them.
        parts = []
        for _ in range(blk.share):
            parts.append(tl.new("temporaries", lse // blk.share * cfg.D * cfg.itemsize))
            parts.append(tl.new("temporaries", lse // blk.share * 4))
        out = tl.new("temporaries", lse * cfg.D * cfg.itemsize)
        lse_h = tl.new("temporaries", lse * 4)
        tl.free(*parts)
        return out, lse_h
    if cfg.kernel in ("fused", "triton"):
        # cuDNN / flash / Triton: out in the input dtype, lse fp32; kernels read the
        # strided views in place. (cuDNN's own workspace is not modelled.)
        out = tl.new("temporaries", lse * cfg.D * cfg.itemsize)
        return out, tl.new("temporaries", lse * 4)
    # math_block_forward: out/lse in the compute dtype, then the tiles.
    a = cfg.acc
    out, lse_h = tl.new("temporaries", lse * cfg.D * a), tl.new("temporaries", lse * a)
    names = _Locals(tl)
    for b, lq in _tiles(blk, cfg.max_score_elements):
        s, oq, ok, small, cast, q_copy, k_copy, fold = _tile_sizes(cfg, blk, b, lq)
        # qc, kc, vc = q[...].to(cdt) (folded), k[...].to(cdt), v[...].to(cdt)
        _mirror_q_operand(tl, names, "qc", oq, cast, fold)
        if cast:
            for name, n in (("kc", ok), ("vc", ok)):
                names.bind(name, tl.new("score_tiles", n))
        # scores = matmul(qc, kc^T) * scale
        ops = [
            tl.new("score_tiles", oq) if q_copy else None,
            tl.new("score_tiles", ok) if k_copy else None,
        ]
        mm = tl.new("score_tiles", s)
        tl.free(*ops)
        names.bind("scores", tl.new("score_tiles", s))
        tl.free(mm)
        # lse_c = logsumexp(scores): amax, then exp(scores - max) (one tile, inside the op)
        amax, tmp = tl.new("score_tiles", small), tl.new("score_tiles", s)
        names.bind("lse_c", tl.new("score_tiles", small))
        tl.free(amax, tmp)
        names.bind("finite", tl.new("score_tiles", small))  # where(isinf(lse_c), inf, lse_c)
        # probs = exp(scores - finite)
        diff = tl.new("score_tiles", s)
        names.bind("probs", tl.new("score_tiles", s))
        tl.free(diff)
        # out[...] = matmul(probs, vc): v folded, result (b*Hs, lq, D)
        vcopy = tl.new("score_tiles", ok) if k_copy else None
        pv = tl.new("score_tiles", oq)
        tl.free(vcopy, pv)
    names.release()
    return out, lse_h


def _mirror_block_backward(tl: _Timeline, cfg: _Config, blk: _Block) -> tuple:
    """``blocks.block_backward`` (or ``triton_block_backward``): handles of ``(dq, dk, dv)``."""
    lse = blk.bb * blk.lq * blk.hs
    qn, kn = lse * cfg.D, blk.bb * blk.lk * blk.kv_heads * cfg.D
    if cfg.kernel == "triton":
        # Grouped-query blocks: dK/dV per K/V head from the grouped programs.
        grads = tuple(tl.new("temporaries", n * cfg.itemsize) for n in (qn, kn, kn))
        lse_copy = tl.new("temporaries", lse * 4)  # the LSE, heads-first (_backward_rows)
        tl.free(lse_copy, tl.new("temporaries", lse * 4))  # and delta, freed on return
        return grads
    if cfg.kernel == "fused":
        share = blk.share
        if share > 1:
            # blocks.fused_grouped_backward: dq in the input dtype, dk/dv summed in the
            # compute dtype over one call per strided view of query heads.
            grads = (
                tl.new("temporaries", qn * cfg.itemsize),
                tl.new("temporaries", kn * cfg.acc),
                tl.new("temporaries", kn * cfg.acc),
            )
        prev: tuple = ()
        for _ in range(share):
            n_lse, n_q = lse // share, qn // share
            # _head_major_lse: isinf mask, full_like(inf), where, contiguous copy (fp32).
            isinf, full = tl.new("temporaries", n_lse), tl.new("temporaries", n_lse * 4)
            where = tl.new("temporaries", n_lse * 4)
            tl.free(isinf, full)
            lse_t = tl.new("temporaries", n_lse * 4)
            tl.free(where)
            call = tuple(tl.new("temporaries", n * cfg.itemsize) for n in (n_q, kn, kn))
            # Flash-attention's backward workspace: the fp32 dQ accumulator and
            # rowsum(dO*O).
            workspace = tl.new("temporaries", n_q * 4), tl.new("temporaries", n_lse * 4)
            tl.free(*workspace, lse_t, *prev)
            prev = call
        if share == 1:
            return prev
        tl.free(*prev)
        return grads
    # math_block_backward
    a = cfg.acc
    grads = tuple(tl.new("temporaries", n * a) for n in (qn, kn, kn))
    names = _Locals(tl)
    for b, lq in _tiles(blk, cfg.max_score_elements):
        s, oq, ok, small, cast, q_copy, k_copy, q_fold = _tile_sizes(cfg, blk, b, lq)

        def fold(*sides: str, sizes=(oq, ok), copy=(q_copy, k_copy)) -> list:
            # matmul's copies of its folded operands: "q"-sized or "k"-sized side
            return [tl.new("score_tiles", sizes[x == "k"]) for x in sides if copy[x == "k"]]

        # qc, kc, vc, doc, oc = (...).to(cdt), the q-sized ones folded
        _mirror_q_operand(tl, names, "qc", oq, cast, q_fold)
        if cast:
            for name, n in (("kc", ok), ("vc", ok)):
                names.bind(name, tl.new("score_tiles", n))
        _mirror_q_operand(tl, names, "doc", oq, cast, q_fold)
        _mirror_q_operand(tl, names, "oc", oq, cast, q_fold)
        if blk.share > 1:  # lse_c = _fold(lse[...]...): a strided view, copied
            names.bind("lse_c", tl.new("score_tiles", small))
        names.bind("lse_c", tl.new("score_tiles", small))  # where(isinf(lse_c), inf, lse_c)
        # probs = exp(_masked_scores(...) - lse_c)
        ops = fold("q", "k")
        mm = tl.new("score_tiles", s)
        tl.free(*ops)
        scores = tl.new("score_tiles", s)
        tl.free(mm)
        diff = tl.new("score_tiles", s)
        tl.free(scores)
        names.bind("probs", tl.new("score_tiles", s))
        tl.free(diff)
        # dprobs = matmul(doc, vc^T)
        ops = fold("q", "k")
        names.bind("dprobs", tl.new("score_tiles", s))
        tl.free(*ops)
        # dv_c = matmul(probs^T, doc)
        ops = fold("q")
        names.bind("dv_c", tl.new("score_tiles", ok))
        tl.free(*ops)
        # delta = (doc * oc).sum(-1)
        prod = tl.new("score_tiles", oq)
        names.bind("delta", tl.new("score_tiles", small))
        tl.free(prod)
        # dscores = probs * (dprobs - delta)
        diff = tl.new("score_tiles", s)
        names.bind("dscores", tl.new("score_tiles", s))
        tl.free(diff)
        # dq[...] = matmul(dscores, kc) * scale; dk[...] += matmul(dscores^T, qc) * scale
        for operand, result in (("k", oq), ("q", ok)):
            ops = fold(operand)
            mm = tl.new("score_tiles", result)
            tl.free(*ops)
            scaled = tl.new("score_tiles", result)
            tl.free(mm, scaled)
    names.release()
    return grads


# --------------------------------------------------------------------------- single device


def _single_blocks(cfg: _Config, N: int) -> list[_Block]:
    """The blocks of ``backends.pytorch.iter_blocks``, in order."""
    blocks = []
    for branch in cfg.plan.branches:
        w, r = branch.segment_length, branch.dilation_rate
        for group in branch.head_groups:
            dense = r == 1 and group.num_heads == cfg.H and not cfg.extra.get("interleaved")
            for bb, n, adjacent in _segment_view_shapes(cfg.B, N, w, r, group.offset):
                blk = _Block(bb, n, n, group.num_heads, dense, adjacent, hk=group.num_kv_heads)
                blocks.append(blk)
    return blocks


def _mirror_pytorch_forward(tl: _Timeline, cfg: _Config, N: int) -> tuple:
    """``PyTorchBackend.forward``; returns the handles of ``(out, lse)``."""
    out_acc = tl.new("accumulators", cfg.acc_bytes(N))
    lse_acc = tl.new("accumulators", 2 * cfg.lse_bytes(N))  # the (hi, lo) pair
    prev: tuple = ()
    for blk in _single_blocks(cfg, N):
        out_b, lse_b = _mirror_block_forward(tl, cfg, blk)
        tl.free(*prev)  # `out_blk, lse_blk = ...` rebinds only after the call
        _mirror_merge(tl, cfg, blk)
        prev = (out_b, lse_b)
    # return out_acc.to(q.dtype), lse_acc: a cast (while the locals are alive) unless
    # the input dtype is the compute dtype, where .to returns out_acc itself.
    if cfg.itemsize != cfg.acc:
        out = tl.new("output", cfg.qkv_bytes(N))
        tl.free(*prev, out_acc)
    else:
        tl.free(*prev)
        out = out_acc
        tl.move(out, "output")
    tl.move(lse_acc, "saved_tensors")
    return out, lse_acc


def _mirror_pytorch_backward(tl: _Timeline, cfg: _Config, N: int, into: bool = False) -> tuple:
    """``PyTorchBackend.backward`` (``into``: ``backward_into``, which casts into the
    caller's buffers); returns the handles of the ``(dq, dk, dv)`` it allocates."""
    scaled = _mirror_scaled_dout(tl, cfg, N) if heads_merge_branches(cfg.plan) else None
    accs = [tl.new("accumulators", n) for n in cfg.acc_io_bytes(N)]
    prev: tuple = ()
    for blk in _single_blocks(cfg, N):
        grads = _mirror_block_backward(tl, cfg, blk)
        tl.free(*prev)
        prev = grads
    tl.free(*prev, scaled)  # _accumulate_grads returns: its locals go
    if into:
        tl.free(*accs)
        return ()
    return _cast_grads(tl, cfg, N, accs, ())


def _cast_grads(tl: _Timeline, cfg: _Config, tokens: int, accs: list, residue: tuple) -> tuple:
    """``return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)`` with the locals alive."""
    if cfg.itemsize != cfg.acc:
        grads = tuple(tl.new("gradients", n) for n in cfg.io_bytes(tokens))
        tl.free(*residue, *accs)
        return grads
    tl.free(*residue)
    for h in accs:
        tl.move(h, "gradients")
    return tuple(accs)


def _mirror_triton_forward(tl: _Timeline, cfg: _Config, N: int) -> tuple:
    """``backends.triton.launch.dilated_forward``: out in the input dtype, lse fp32 and,
    when several branches cover a position and the joint forward does not run them
    (``_joint_pass``), one fp32 accumulator per head chunk."""
    out = tl.new("output", cfg.qkv_bytes(N))
    lse = tl.new("saved_tensors", 2 * cfg.lse_bytes(N, 4))  # the (hi, lo) pair
    multi, chunks = cfg.extra["triton_multi"], cfg.extra["triton_chunks"]
    if cfg.extra["triton_joint_forward"]:
        return out, lse
    for lo, hi in chunks:
        # acc is deleted at the end of each chunk (`del acc`).
        tl.free(tl.new("accumulators", cfg.B * N * (hi - lo) * cfg.D * 4) if multi else None)
    return out, lse


def _mirror_triton_backward(tl: _Timeline, cfg: _Config, N: int, into: bool = False) -> tuple:
    """``dilated_backward``: per head chunk, the dK/dV pass's two fp32 accumulators, freed
    before the dQ pass's one (with ``DQ_MODE`` adding dQ from the dK/dV kernel: the dQ
    buffer first, live through the pass), and while each launch runs its branch's own
    rows of the row terms (``_compact_rows``, largest for the least dilated branch);
    ``into``: the gradients go to the caller's buffers. Where the joint kernels run the
    plan (``_joint_pass``, dQ in its own kernel) one launch writes dK and dV and one
    writes dQ before the chunks (no accumulators), and the chunks run what is left (dK/dV
    with grouped-query attention, or a pass whose tiles do not fit the plan). With
    grouped-query attention the dK/dV accumulators are per K/V head where the grouped
    programs run (``_grouped_dkdv``), else per query head and summed per K/V head
    afterwards."""
    grads = () if into else tuple(tl.new("gradients", n) for n in cfg.io_bytes(N))
    multi, g = cfg.extra["triton_multi"], cfg.kv_group
    dq_add = cfg.extra["triton_dq_add"]
    sched = _schedule(cfg.plan)
    joint_dq, joint_dkdv = cfg.extra["triton_joint_dq"], cfg.extra["triton_joint_dkdv"]
    packed = cfg.extra["triton_packed_rows"]
    if packed:  # (hi, lo, delta, 0) per row
        lse_copy, delta = tl.new("temporaries", 4 * cfg.lse_bytes(N, 4)), None
    else:
        lse_copy = tl.new("temporaries", 2 * cfg.lse_bytes(N, 4))  # the pair, heads-first
        delta = tl.new("temporaries", cfg.lse_bytes(N, 4))

    def launches(lo: int, hi: int) -> None:  # a pass's launches: one branch's rows at a time
        tl.free(tl.new("temporaries", _compact_rows_bytes(cfg, N, lo, hi, packed)))

    if joint_dq and joint_dkdv:  # two launches, no accumulators, no gathered rows
        tl.free(delta, lse_copy)
        return grads
    if multi or g > 1 or dq_add:
        for lo, hi in _head_chunks(True, cfg.B, N, cfg.H, cfg.D, g):
            size = cfg.B * N * (hi - lo) * cfg.D * 4
            grouped = _grouped_dkdv(_launches_for_chunk(sched, lo, hi, g), g, dq_add)
            per_query_head = g > 1 and not grouped
            dq = tl.new("accumulators", size) if dq_add else None
            if joint_dkdv:  # written by its joint launch before the chunks
                pass
            elif multi or per_query_head:
                kv_size = size // g if grouped else size
                accs = tl.new("accumulators", kv_size), tl.new("accumulators", kv_size)
                launches(lo, hi)
                if per_query_head:  # sum_query_heads of dk, then of dv, copied
                    for _ in range(2):
                        tl.free(tl.new("temporaries", size // g))
                tl.free(*accs)
            else:
                launches(lo, hi)
            if not dq_add and not joint_dq:
                dq = tl.new("accumulators", size) if multi else None
                launches(lo, hi)
            tl.free(dq)
    else:
        launches(0, cfg.H)
    tl.free(delta, lse_copy)
    return grads


def _compact_rows_bytes(cfg: _Config, N: int, lo: int, hi: int, packed: bool = False) -> int:
    """Bytes of the largest ``_compact_rows`` pair and delta of one launch on heads
    ``[lo, hi)``: 3 fp32 values per dilated row of each of its heads (4 ``packed``,
    ``_compact_words``)."""
    launches = _launches_for_chunk(_schedule(cfg.plan), lo, hi, cfg.kv_group)
    per_row = (4 if packed else 3) * 4 * cfg.B
    sizes = [per_row * (N // la.dil) * la.num_heads for _, la in launches if _compacts(la, N)]
    return max(sizes, default=0)


# --------------------------------------------------------------------------- ring


@dataclass(frozen=True)
class _Task:
    """One ``BlockTask``: the block, the branch whose received K/V buffer its views point
    into (``None`` for the rank's own K/V, read in place)."""

    block: _Block
    branch: int | None


def _ring_tasks(cfg: _Config, layout: tuple, L: int, step: int, held: set) -> tuple:
    """``KVRotation.tasks(step)``; ``held``: the branches holding a received K/V buffer."""
    tasks = []
    for i, b in enumerate(layout):
        origin = _held_origin(b, False, step)
        if origin is None:
            continue
        own = origin == b.position
        if not own and i not in held:
            continue  # an empty piece, never sent
        # A local branch views all L / w segments of the shard at once, a branch across
        # ranks the shard's dilated positions: (B, count, Hs, D).
        bb = cfg.B * (L // b.segment_length if b.size == 1 else 1)
        for g in b.head_groups:
            nq, nk = g.counts[b.position], g.counts[origin]
            if nq and nk:
                hs = g.heads.num_heads
                dense = b.dilation_rate == 1 and hs == cfg.H and not cfg.extra.get("interleaved")
                blk = _Block(bb, nq, nk, hs, dense, True, not own, g.heads.num_kv_heads)
                tasks.append(_Task(blk, None if own else i))
    return tuple(tasks)


def _messages_of(kind: str, size: int, step: int, position: int) -> tuple:
    """This rank's ``(origin, src, dst)`` messages at ``step``, in the order the code posts
    them (by origin), for a non-causal ring of ``size``: ``_kv_messages`` (K/V posted at
    ``step`` for ``step + 1``, ``step < size - 1``) or ``_grad_messages`` (dK/dV sent
    after ``step``, ``1 <= step < size``; the last one goes home to its origin).

    Every block travels ``origin -> origin + 1 -> ...``, so the rank forwards the block
    of origin ``position - step`` to ``position + 1`` and receives that of
    ``position - step - 1`` from ``position - 1``. The closed form replaces scanning
    every origin's path at every step (``O(size)`` each); tests pin it to the library's
    functions.
    """
    if (
        size == 1
        or (kind == "kv" and step >= size - 1)
        or (kind == "grad" and not 1 <= step < size)
    ):
        return ()
    send = ((position - step) % size, position, (position + 1) % size)
    receive = ((position - step - 1) % size, (position - 1) % size, position)
    return tuple(sorted((send, receive)))


@dataclass(frozen=True)
class _Step:
    """What one ring step does on this rank, in sizes (its *signature*)."""

    incoming: tuple  # (branch, bytes) of the K/V buffers posted for the next step
    tasks: tuple  # _Task
    grads: tuple  # (branch, bytes sent, bytes received, received buffer is home) per message


def _ring_schedule(cfg: _Config, layout: tuple, L: int, backward: bool) -> list[_Step]:
    numel = [[b.packed_numel(c, cfg.B, cfg.D) for c in range(b.size)] for b in layout]
    held = {i for i, b in enumerate(layout) if b.size > 1 and numel[i][b.position]}
    steps = []
    for step in range(max(b.size for b in layout)):
        incoming = []
        for i, b in enumerate(layout):
            for origin, _src, dst in _messages_of("kv", b.size, step, b.position):
                if dst == b.position and numel[i][origin]:
                    incoming.append((i, numel[i][origin] * cfg.itemsize))
        tasks = _ring_tasks(cfg, layout, L, step, held)
        grads = []
        for i, b in enumerate(layout):
            if not backward or step == 0 or step >= b.size:
                continue
            for origin, src, dst in _messages_of("grad", b.size, step, b.position):
                n = numel[i][origin] * cfg.acc
                if n:
                    sent = n if src == b.position else 0
                    received = n if dst == b.position else 0
                    grads.append((i, sent, received, dst == b.position and origin == b.position))
        steps.append(_Step(tuple(incoming), tasks, tuple(grads)))
        held = {i for i, _ in incoming}
    return steps


def _replay_ring_steps(
    tl: _Timeline, cfg: _Config, layout: tuple, L: int, compute, *, backward: bool
) -> dict:
    """``ring_steps`` (``KVRotation``) and, with ``backward``, ``GradRouter.route``.

    ``compute(block)`` replays one task and returns its result handles (``(dq, dk, dv)``
    in the backward). Returns the handles still bound when the loop ends.

    A step whose signature equals the two before it (and brings no accumulator home)
    starts from the same live sizes and does the same, so it reaches the same peak and
    leaves the same sizes: it is skipped. Long rings then cost a few steps per branch.
    """
    # KVRotation.__init__: each cross-rank branch packs its own dilated K/V (input dtype).
    held = {}
    for i, b in enumerate(layout):
        if b.size > 1:
            h = tl.new("transfer_buffers", b.packed_numel(b.position, cfg.B, cfg.D) * cfg.itemsize)
            if h is not None:
                held[i] = h
    tasks: list = []  # the consumer's `tasks`: the buffers their K/V views keep alive
    visiting: list = []  # backward: the (dk, dv) of visiting blocks, kept for route()
    sent: list = []  # GradRouter: accumulators referenced by the committed sends
    travelling: dict = {}  # GradRouter: branch -> the accumulator received last step
    home: list = []  # GradRouter: accumulators of this rank's K/V, back home
    schedule = _ring_schedule(cfg, layout, L, backward)
    for step, plan in enumerate(schedule):
        if (
            _SKIP_REPEATED_STEPS
            and step >= 2
            and plan == schedule[step - 1] == schedule[step - 2]
            and not any(g[3] for g in plan.grads)
        ):
            continue
        # post(step): receive buffers for the next step's K/V.
        incoming = {i: tl.new("transfer_buffers", n) for i, n in plan.incoming}
        new_tasks = [tl.ref(held[t.branch]) if t.branch is not None else None for t in plan.tasks]
        # The consumer rebinds `tasks`; its loop variable `t` still holds the previous
        # step's last task (and its K/V buffer) until the first new task is bound.
        last = tasks[-1:]
        tl.free(*tasks[:-1])
        tasks = new_tasks
        if backward:
            tl.free(*visiting)  # `visiting = {}`
            visiting = []
        for n, t in enumerate(plan.tasks):
            if n == 0:
                tl.free(*last)
                last = []
            result = compute(t.block)
            if backward and t.branch is not None:
                visiting += [tl.ref(result[1]), tl.ref(result[2])]
        tl.free(*last)
        if backward and step > 0:
            # GradRouter.route(step): wait for the previous sends, then per message (in
            # origin order) pack the visiting grads into a new accumulator, add the one
            # that arrived last step and send it on; receive the one that follows.
            tl.free(*sent)
            sent = []
            received = {}
            for i, n_sent, n_received, is_home in plan.grads:
                if n_sent:
                    sent.append(tl.new("transfer_buffers", n_sent))
                    tl.free(travelling.pop(i, None))
                if n_received:
                    buf = tl.new("transfer_buffers", n_received)
                    if is_home:
                        home.append(buf)
                    else:
                        received[i] = buf
            tl.free(*travelling.values())
            travelling = received
        # advance(): held = incoming; the old buffers go once no task views them.
        tl.free(*held.values())
        held = incoming
    tl.free(*held.values())
    return {"tasks": tasks, "visiting": visiting, "sent": sent, "home": home,
            "travelling": list(travelling.values())}  # fmt: skip


def _mirror_ring_forward(tl: _Timeline, cfg: _Config, layout: tuple, L: int) -> tuple:
    """``ring_dilated_forward``; returns the handles of ``(out, lse)``."""
    out_acc = tl.new("accumulators", cfg.acc_bytes(L))
    lse_acc = tl.new("accumulators", 2 * cfg.lse_bytes(L))  # the (hi, lo) pair
    residue: list = []  # `out_blk, lse_blk` of the previous task

    def compute(blk: _Block) -> tuple:
        out_b, lse_b = _mirror_block_forward(tl, cfg, blk)
        tl.free(*residue)
        residue[:] = [out_b, lse_b]
        _mirror_merge(tl, cfg, blk)
        return out_b, lse_b

    bound = _replay_ring_steps(tl, cfg, layout, L, compute, backward=False)
    task_buffers = bound["tasks"]
    if cfg.itemsize != cfg.acc:  # return out.to(q.dtype), lse
        out = tl.new("output", cfg.qkv_bytes(L))
        tl.free(*residue, *task_buffers, out_acc)
    else:
        tl.free(*residue, *task_buffers)
        out = out_acc
        tl.move(out, "output")
    tl.move(lse_acc, "saved_tensors")
    return out, lse_acc


def _mirror_ring_backward(
    tl: _Timeline, cfg: _Config, layout: tuple, L: int, into: bool = False
) -> tuple:
    """``ring_dilated_backward``; returns the handles of ``(dq, dk, dv)``. ``into``: the
    recomputing layer's ``_ring_backward_accumulate`` copied into its buffer (returns
    nothing)."""
    scaled = _mirror_scaled_dout(tl, cfg, L) if ring_merges_blocks(layout) else None
    accs = [tl.new("accumulators", n) for n in cfg.acc_io_bytes(L)]
    residue: list = []  # `dq_blk, dk_blk, dv_blk` of the previous task

    def compute(blk: _Block) -> tuple:
        grads = _mirror_block_backward(tl, cfg, blk)
        tl.free(*residue)
        residue[:] = list(grads)
        return grads

    bound = _replay_ring_steps(tl, cfg, layout, L, compute, backward=True)
    # router.finish(): the last sends complete; the home accumulators are added in
    # place. _ring_backward_accumulate returns: the loop's buffers go before the casts.
    tl.free(*bound["sent"], *residue, *bound["visiting"], *bound["home"], *bound["travelling"])
    tl.free(*bound["tasks"], scaled)
    if into:
        tl.free(*accs)
        return ()
    return _cast_grads(tl, cfg, L, accs, ())


# --------------------------------------------------------------------------- one call


class _AttentionMirror:
    """One attention call on one rank: single device (``dilated_attention``), the ring on
    shards (``already_split=True``) or the ring module on the whole sequence
    (``already_split=False``: shard views, gathered output and gradients)."""

    def __init__(
        self, tl: _Timeline, cfg: _Config, N: int, ring: int, split: bool, rank: int
    ) -> None:
        self.tl, self.cfg, self.N, self.ring, self.split = tl, cfg, N, ring, split
        self.L = N // ring
        self.whole = N if (ring > 1 and not split) else self.L  # tokens q, k, v hold
        self.rank = rank
        if ring > 1:
            self.layout = self.layout_of(cfg.plan)

    def layout_of(self, plan: DilatedPlan) -> tuple:
        """The ring layout of ``plan`` (the call's, or a part of its heads) on this rank."""
        return ring_layout(plan, self.L, self.ring, self.rank)

    def forward(self, qkv_part: str) -> None:
        tl, cfg, N, L = self.tl, self.cfg, self.N, self.L
        self.qkv = [tl.new(qkv_part, n) for n in cfg.io_bytes(self.whole)]
        self.copies: list = []
        self.out_shard = None
        if self.ring == 1:
            mirror = _mirror_triton_forward if cfg.kernel == "triton" else _mirror_pytorch_forward
            self.out, self.lse = mirror(tl, cfg, N)
            return
        if not self.split and cfg.B > 1:
            # token_major() copies the narrowed (B, L, H, D) shard views when B > 1.
            self.copies = [tl.new("shard_gather", n) for n in cfg.io_bytes(L)]
        self.out, self.lse = _mirror_ring_forward(tl, cfg, self.layout, L)
        if not self.split:
            # gather_replicated: ring_all_gather receives k - 1 shards, then torch.cat.
            self.out_shard = self.out
            tl.move(self.out_shard, "saved_tensors")
            parts = [tl.new("shard_gather", cfg.qkv_bytes(L)) for _ in range(self.ring - 1)]
            self.out = tl.new("output", cfg.qkv_bytes(N))
            tl.free(*parts)

    def release_forward_only(self) -> None:
        """Without a backward (no_grad) the saved tensors are not kept."""
        self.tl.free(self.lse, self.out_shard, *self.copies)

    def backward(self, dout: int | None) -> tuple:
        """Returns the handles of the gradients of q, k, v (as the caller sees them)."""
        tl, cfg, N, L = self.tl, self.cfg, self.N, self.L
        if self.ring == 1:
            # _DilatedAttentionFunction returns (out, lse): autograd materialises a zero
            # gradient for lse.
            lse_item = 4 if cfg.kernel == "triton" else None
            dlse = tl.new("output_grad", cfg.lse_bytes(N, lse_item))
            if cfg.kernel == "triton":
                grads = _mirror_triton_backward(tl, cfg, N)
            else:
                grads = _mirror_pytorch_backward(tl, cfg, N)
            tl.free(self.lse, dlse)  # saved tensors released after the backward
            return grads
        # _GatherReplicated.backward: the shard of dout, .contiguous() (a copy when B > 1).
        dout_shard = None
        if not self.split and cfg.B > 1:
            dout_shard = tl.new("shard_gather", cfg.qkv_bytes(L))
        grads = _mirror_ring_backward(tl, cfg, self.layout, L)
        tl.free(self.lse, dout_shard, self.out_shard, *self.copies)
        if self.split:
            return grads
        # _ShardReplicated.backward of q, k, v in turn: k - 1 shards received + cat.
        whole = []
        for g, n_shard, n_whole in zip(grads, cfg.io_bytes(L), cfg.io_bytes(N), strict=True):
            parts = [tl.new("shard_gather", n_shard) for _ in range(self.ring - 1)]
            whole.append(tl.new("gradients", n_whole))
            tl.free(*parts, g)
        return tuple(whole)


def _chunk_config(cfg: _Config, N: int, first: int, stop: int) -> _Config:
    """The config of the backend's call on query heads ``[first, stop)`` (the recomputing
    layer's backward): the part of the plan they run; their q, k, v are views of one
    matmul output (the math path's operands are then never dense)."""
    plan = cfg.plan if (first, stop) == (0, cfg.H) else heads_plan(cfg.plan, first, stop)
    H = stop - first
    extra = {"interleaved": True}
    if cfg.kernel == "triton" and "triton_multi" in cfg.extra:  # one device
        causal = cfg.extra["triton_causal"]
        extra.update(_triton_extra(plan, cfg.B, N, H, cfg.D, cfg.kv_group, causal))
    return dataclasses.replace(cfg, H=H, Hkv=H // cfg.kv_group, plan=plan, extra=extra)


def _mirror_projected_forward(tl: _Timeline, cfg: _Config, attn: _AttentionMirror, E: int) -> None:
    """``projected._ProjectedAttentionFunction.forward``: q, k, v from one matmul (the
    concatenated weight and bias copied first), the attention per chunk of heads (one
    device: :func:`head_chunks`, copied into the whole output and LSE; a ring: one pass
    over every head), q, k, v freed."""
    s, N = cfg.itemsize, attn.whole
    rows = (cfg.H + 2 * cfg.Hkv) * cfg.D  # of the concatenated W_q, W_k, W_v
    weight, bias = tl.new("temporaries", rows * E * s), tl.new("temporaries", rows * s)
    qkv = tl.new("temporaries", sum(cfg.io_bytes(N)))
    tl.free(weight, bias)
    attn.qkv, attn.copies, attn.out_shard = [], [], None
    if attn.ring > 1:
        c = _chunk_config(cfg, N, 0, cfg.H)
        attn.out, attn.lse = _mirror_ring_forward(tl, c, attn.layout_of(c.plan), N)
        tl.free(qkv)
        return
    mirror = _mirror_triton_forward if cfg.kernel == "triton" else _mirror_pytorch_forward
    attn.out = attn.lse = None
    for first, stop in head_chunks(cfg.H, cfg.kv_group):
        c = _chunk_config(cfg, N, first, stop)
        out_c, lse_c = mirror(tl, c, N)
        if (first, stop) == (0, cfg.H):  # one chunk: its output is the whole
            attn.out, attn.lse = out_c, lse_c
            tl.move(lse_c, "saved_tensors")
            break
        if attn.out is None:
            lse_item = 4 if cfg.kernel == "triton" else None
            attn.out = tl.new("output", cfg.qkv_bytes(N))
            attn.lse = tl.new("saved_tensors", 2 * cfg.lse_bytes(N, lse_item))
        tl.free(out_c, lse_c)
    tl.free(qkv)


def _mirror_projected_backward(tl: _Timeline, cfg: _Config, attn: _AttentionMirror, E: int) -> None:
    """``projected._ProjectedAttentionFunction.backward``: the weight and bias gradients
    first; per head chunk, the chunk's rows of the weights concatenated, q, k, v
    recomputed in one matmul, the attention's backward on the chunk (the backend's, or a
    ring pass) written into the chunk's ``[dq | dk | dv]``, then its share of ``dx`` (the
    first chunk allocates it, the others add in place) and its rows of the weight and bias
    gradients (written in place)."""
    s, N = cfg.itemsize, attn.whole
    rows = (cfg.H + 2 * cfg.Hkv) * cfg.D  # of the concatenated W_q, W_k, W_v
    tl.new("gradients", rows * E * s)  # the weight gradients
    tl.new("gradients", rows * s)  # the bias gradients
    dx = None
    for first, stop in head_chunks(cfg.H, cfg.kv_group):
        c = _chunk_config(cfg, N, first, stop)
        c_rows = (c.H + 2 * c.Hkv) * cfg.D
        weight = tl.new("temporaries", c_rows * E * s)
        bias = tl.new("temporaries", c_rows * s)
        qkv = tl.new("temporaries", sum(c.io_bytes(N)))
        tl.free(bias)
        dqkv = tl.new("gradients", sum(c.io_bytes(N)))
        if attn.ring > 1:
            _mirror_ring_backward(tl, c, attn.layout_of(c.plan), N, into=True)
        elif cfg.kernel == "triton":
            _mirror_triton_backward(tl, c, N, into=True)
        else:
            _mirror_pytorch_backward(tl, c, N, into=True)
        tl.free(qkv)
        if dx is None:
            dx = tl.new("gradients", cfg.B * N * E * s)
        tl.free(weight, dqkv)


def _replay(
    cfg: _Config, N: int, ring: int, split: bool, rank: int, with_backward: bool,
    embed_dim: int | None, recompute: bool = False,
) -> _Timeline:  # fmt: skip
    """The timeline of one call on ``rank``.

    The caller holds the inputs, the output and the output's gradient (as in
    ``out.backward(grad)``); what it does with the gradients afterwards is not counted.
    ``recompute``: the multi-head layer recomputes q, k, v in its backward
    (``recompute_qkv=True``: one device, or a ring's shards).
    """
    tl = _Timeline()
    attn = _AttentionMirror(tl, cfg, N, ring, split, rank)
    if embed_dim is None:
        tl.phase = "forward"
        attn.forward("inputs")
        if not with_backward:
            attn.release_forward_only()
            return tl
        tl.phase = "backward"
        dout = tl.new("output_grad", cfg.qkv_bytes(attn.whole))
        attn.backward(dout)
        return tl
    # MultiheadDilatedAttention.forward, self-attention (key = value = query). The
    # projections, norm and out_proj run on the tokens the rank holds: its shard with
    # already_split=True, the whole sequence otherwise.
    E, s = embed_dim, cfg.itemsize
    act = cfg.B * attn.whole * E * s
    E_kv = cfg.Hkv * cfg.D  # k_proj / v_proj output features
    for rows in (E, E_kv, E_kv, E):  # q/k/v/out_proj weights and biases
        tl.new("parameters", (rows * E + rows) * s)
    tl.new("parameters", 2 * E * s)  # LayerNorm weight and bias
    tl.phase = "forward"
    tl.new("inputs", act)  # x
    if recompute:
        _mirror_projected_forward(tl, cfg, attn, E)
    else:
        attn.forward("saved_tensors")  # q/k/v_proj outputs are the attention's q, k, v
    tl.move(attn.out, "saved_tensors")  # saved by the attention and by the LayerNorm
    normed = tl.new("saved_tensors", act)  # LayerNorm output, saved by out_proj
    stats = tl.new("saved_tensors", 2 * cfg.B * attn.whole * cfg.acc)  # LayerNorm mean, rstd
    if not with_backward:
        attn.release_forward_only()
        tl.new("output", act)  # out_proj output
        return tl
    tl.new("output", act)  # y = out_proj(normed)
    tl.phase = "backward"
    tl.new("output_grad", act)  # dy
    d_normed = tl.new("temporaries", act)  # out_proj backward: grad of its input
    tl.new("gradients", (E * E + E) * s)  # ... and of its weight and bias
    tl.free(normed)
    d_attn = tl.new("output_grad", act)  # LayerNorm backward: the attention's dout
    tl.new("gradients", 2 * E * s)
    tl.free(d_normed, stats)
    if recompute:
        _mirror_projected_backward(tl, cfg, attn, E)
        tl.free(d_attn, attn.out, attn.lse)
        return tl
    if attn.out_shard is not None:
        # The gathered output is saved by the LayerNorm alone (the ring saves its shard).
        tl.free(attn.out)
    grads = attn.backward(d_attn)
    tl.free(d_attn, *attn.qkv)  # the attention's saved tensors go
    if attn.out_shard is None:
        tl.free(attn.out)
    dx = None
    for g, rows in zip(grads, (E, E_kv, E_kv), strict=True):  # q/k/v_proj backward: dx
        contribution = tl.new("gradients", act)  # (accumulated in place), dW, db
        tl.new("gradients", (rows * E + rows) * s)
        if dx is None:
            dx = contribution
        else:
            tl.free(contribution)
        tl.free(g)
    return tl


# --------------------------------------------------------------------------- public API


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype such as torch.bfloat16, got {type(dtype).__name__} "
            f"{dtype!r}."
        )
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype}; expected one of {[str(d) for d in SUPPORTED_DTYPES]}."
        )
    return dtype


def _check_backend(backend: object, dtype: torch.dtype, head_dim: int, plan: DilatedPlan,
                   with_backward: bool) -> str:  # fmt: skip
    """``"pytorch"`` or ``"triton"``, and the backend must run the call on CUDA."""
    name = check_choice("backend", backend, _BACKENDS)
    if name not in available_backends():
        raise ValueError(
            f"backend {name!r} is not available here (Triton is not installed), so its memory "
            f"cannot be estimated; install triton or pass backend='pytorch'."
        )
    call = AttentionCall(
        device_type="cuda", dtype=dtype, head_dim=head_dim, is_causal=False, dropout=False,
        key_padding_mask=False, plan=plan, requires_grad=with_backward,
    )  # fmt: skip
    reasons = get_backend(name).why_not(call)
    if reasons:
        raise ValueError(
            f"backend {name!r} cannot run this call on CUDA: {'; '.join(reasons)}; pass "
            f"backend='pytorch' or change the arguments."
        )
    return name


def _config(
    B: int, N: int, H: int, D: int, ring: int, plan: DilatedPlan, dtype: torch.dtype, backend: str,
    device: str = "cuda", Hkv: int | None = None, causal: bool = False,
) -> _Config:  # fmt: skip
    acc, itemsize = compute_dtype(dtype).itemsize, dtype.itemsize
    if backend == "triton":
        kernel = "triton"
    else:
        # blocks.block_kernel: fp16/bf16 blocks run on cuDNN or flash where flash's head
        # dims allow (a multiple of 8, <= 256); everything else (and the CPU) on the math
        # path.
        fused = device == "cuda" and dtype in _LOW_PRECISION and D % 8 == 0 and D <= 256
        kernel = "fused" if fused else "math"
    extra = {}
    Hkv = H if Hkv is None else Hkv
    if backend == "triton" and ring == 1:
        extra = _triton_extra(plan, B, N, H, D, H // Hkv, causal)
    tile = _MAX_SCORE_ELEMENTS if device == "cuda" else _MAX_SCORE_ELEMENTS_CPU
    return _Config(B, H, D, itemsize, acc, kernel, plan, tile, extra, Hkv)


def _triton_extra(
    plan: DilatedPlan, B: int, N: int, H: int, D: int, kv_group: int, causal: bool = False
) -> dict:
    """What the Triton launches of an unpacked call on one device allocate: whether
    branches accumulate (``multi``), the head chunks, and whether the joint kernels run
    the forward, the dQ pass and the dK/dV pass (no accumulator in any; dK/dV with one
    K/V head per query head only; never causal), and whether the backward takes the row
    terms packed (``PACKED_ROW_TERMS``, dQ in its own kernel: four values per row
    instead of three), all as the launcher decides them with ``dq_add`` (``DQ_MODE``:
    whether the dK/dV kernel adds dQ; the form it takes does not change the buffers)."""
    sched = _schedule(plan)
    dq_add = _dq_add(torch.device("meta"))

    def joint(which: str) -> bool:
        return (
            _joint_pass(
                which, sched, H, N, D, kv_group, causal=causal, documents=None, dq_add=dq_add
            )
            is not None
        )

    return {
        "triton_causal": causal,
        "triton_multi": sched.multi,
        "triton_chunks": _head_chunks(sched.multi, B, N, H, D, kv_group),
        "triton_dq_add": dq_add,
        "triton_joint_forward": joint("forward"),
        "triton_joint_dq": joint("dq"),
        "triton_joint_dkdv": joint("dkdv"),
        "triton_packed_rows": _packs_row_terms(dq_add),
    }


def _ranks(ring: int) -> list[int]:
    # Ranks differ only by a position or so per dilated piece (and a shorter last ring
    # when k % g != 0); beyond 16 ranks a sample of them is replayed.
    return list(range(ring)) if ring <= 16 else sorted({0, 1, ring // 2, ring - 2, ring - 1})


def _peak(cfg: _Config, N: int, ring: int, split: bool, with_backward: bool,
          embed_dim: int | None, recompute: bool = False) -> tuple[_Timeline, int]:  # fmt: skip
    best: tuple[_Timeline, int] | None = None
    for rank in _ranks(ring):
        tl = _replay(cfg, N, ring, split, rank, with_backward, embed_dim, recompute)
        if best is None or tl.peak > best[0].peak:
            best = (tl, rank)
    assert best is not None
    return best


_KERNEL_NAMES = {
    "fused": "cuDNN / flash blocks (PyTorch's fused attention ops on CUDA)",
    "math": "chunked matmuls (blocks.math_block_*)",
    "triton": "Triton kernels",
}


def get_memory_estimate(
    seq_len: int,
    batch_size: int = 1,
    num_heads: int = 8,
    head_dim: int = 64,
    *,
    segment_lengths=(2048, 4096, 8192),
    dilation_rates=(1, 2, 4),
    ring_size: int = 1,
    branch_mixing: str = "softmax",
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "pytorch",
    already_split: bool = True,
    embed_dim: int | None = None,
    with_backward: bool = True,
    recompute_qkv: bool = True,
    device: str | torch.device = "cuda",
    num_kv_heads: int | None = None,
    is_causal: bool = False,
) -> dict:
    """Per-rank memory of one forward (+ backward) of this library's dilated attention.

    Pure arithmetic, no tensor is allocated: the call is *replayed*, allocation by
    allocation, in the order the code allocates and frees, and the peak of the bytes
    live at once is reported. Sizes are exact for the buffers the library allocates
    itself (inputs, accumulators, block outputs and gradients, packed K/V and dK/dV
    buffers of the ring, the math path's score tiles and the matmul operand copies
    PyTorch makes for them); what happens inside PyTorch's fused kernels is modelled
    from their outputs plus flash-attention's fp32 dQ accumulator.

    What is counted: the caller holds q, k, v, the output and the gradient of the
    output (``out.backward(grad)``); one forward then one backward; the peak is taken
    over the forward and the backward. For ``embed_dim`` the multi-head layer
    (:class:`~dilated_attention_pytorch.MultiheadDilatedAttention`, self-attention,
    ``layer_norm=True``, biases) is counted instead: its input ``x``, parameters,
    projections, norm, ``out_proj``, their saved tensors and gradients.

    Where the memory goes (``T = B * L * H * D`` elements, ``L`` the tokens on the
    rank, ``s`` the dtype's size, accumulators in fp32 (fp64 for fp64)):

    - ``pytorch`` backend: fp32 ``out``/``lse`` accumulators in the forward and fp32
      ``dq``/``dk``/``dv`` accumulators in the backward (``3 * 4T`` bytes), plus, per
      block (branch x head group), the block's output or gradients and the merge
      temporaries. The largest block is the ``r = 1`` branch (all heads, all tokens),
      so it costs as much as q itself. fp16/bf16 are assumed on CUDA, where blocks
      run on cuDNN / flash (head dims that are multiples of 8 up to 256); fp32/fp64
      and other head dims take the math path, whose score tiles hold up to
      ``2**24`` elements each on CUDA (``2**18`` on the CPU), up to five at once in
      the backward (plus fp32 copies of each tile's operands for fp16/bf16): a
      constant (``5 * 64 MiB`` in fp32) that dominates small inputs.
    - ``triton`` backend: out and lse written in place; fp32 accumulators only when
      several branches cover a position, per head chunk of at most
      ``ACC_CHUNK_BYTES``, and none for the passes the joint kernels run (non-causal
      softmax mixing whose rates and segment lengths nest, as LongNet's do; dK/dV with
      one K/V head per query head); the backward's copies of the row terms and
      ``delta``.
    - ring (``ring_size = k > 1``, ``L = N / k``): the same per-block work on the shard;
      each branch with ``w > L`` packs its dilated K/V (about ``2T / r`` elements) and
      holds it plus the incoming one (three during a step change: the previous one is
      still viewed by the last task); in the backward dK/dV accumulators (compute
      dtype) travel behind the blocks: about three per branch at a step change, plus
      the one that came home. ``already_split=False`` (the ring modules' default)
      keeps q, k, v, the output, its gradient and the input gradients whole on every
      rank: ``O(N)`` per rank.

    Not modelled: the causal ring (it sends fewer blocks: the estimate is an upper bound
    for contiguous shards; ``is_causal`` changes only the Triton backend's one-device
    estimate, where causal calls run every pass per branch), the zigzag
    layout (the ring modules' causal calls on the
    whole sequence: three half-size K/V buffers per branch with ``w > L`` instead of one,
    and one reordered copy of q, k, v or the output at a time),
    key padding masks and dropout (the math path's masks), cuDNN's internal workspace,
    the CUDA caching allocator's rounding and fragmentation and NCCL's own buffers.

    Checked against measurements: byte for byte against the live tensor storage of CPU
    runs (``device="cpu"``, or the CPU with CUDA's tile size; pytorch backend in fp32,
    fp64, fp16/bf16 math path, the multi-head layer,
    gloo rings of 2, 4 and 8 ranks with ``already_split`` either way, Triton under its
    interpreter), within 1% of the peaks recorded on an H200 in
    ``benchmarks/results/ring_nvidia-h200_2gpu_20261121.json`` (bf16, cuDNN/flash blocks),
    and within 0.3% of one-device forward+backward peaks of both backends on an H100
    (``benchmarks/results/dilated_bench_h100_20261206_auto_training*.json``, N = 1M).
    Grouped-query attention (``num_kv_heads < num_heads``): k, v, their gradients and
    accumulators, the ring's packed K/V and dK/dV buffers and the layer's ``k_proj`` /
    ``v_proj`` have ``num_kv_heads`` heads; the math path folds each K/V head's query
    heads into its rows, cuDNN / flash run once per strided view of query heads, and
    Triton's dK/dV accumulators are per K/V head where its grouped programs run. Checked
    to the byte on gloo rings of 2 ranks and CPU runs of the layer, within 0.3% of CPU
    runs of the attention, and within 0.3% of bf16 peaks on an H200 (32 query and 8 K/V
    heads, D=128, N = 256K and 1M, both backends;
    ``benchmarks/results/dilated_bench_h200_20261206_gqa_before_grouped_dkdv.json``,
    Triton before its grouped dK/dV programs) and on an H100 after them (N = 256K and
    512K; ``dilated_bench_h100_20261207_gqa_grouped_dkdv.json``).

    Args:
        seq_len: ``N``, the global sequence length.
        batch_size, num_heads, head_dim: ``B``, ``H``, ``D``.
        segment_lengths, dilation_rates, branch_mixing: the attention's branches, as in
            :func:`~dilated_attention_pytorch.dilated_attention`.
        ring_size: ranks sharing the sequence; 1 for one device. With ``k > 1`` the
            ring's shard rules must hold (``N % k == 0``; with ``L = N/k`` each ``w <= L``
            divides ``L`` and each ``w > L`` is a multiple of ``L``).
        dtype: input dtype.
        backend: ``"pytorch"`` or ``"triton"`` (single device: the backend; ring: whose
            block ops run the blocks).
        already_split: ring only: whether each rank passes its shard (``True``,
            ``O(N/k)`` per rank) or the whole sequence (``False``).
        embed_dim: count the multi-head layer with this width (``embed_dim ==
            num_heads * head_dim``); ``None`` for the attention alone.
        with_backward: count the backward too; ``False`` for a forward under ``no_grad``.
        recompute_qkv: with ``embed_dim``: the layer's ``recompute_qkv`` (default
            ``True``: its backward recomputes q, k, v a few heads at a time instead of
            keeping them; see :class:`~dilated_attention_pytorch.MultiheadDilatedAttention`).
            It applies on one device and on a ring's shards (``already_split=True``); the
            ring layers run whole-sequence calls as separate nodes.
        device: ``"cuda"`` (default) or ``"cpu"`` (or a ``torch.device``): where the
            call runs. The pytorch backend's blocks differ: on the CPU every block takes
            the math path, with score tiles of at most ``2**18`` elements instead of
            ``2**24``.
        num_kv_heads: K/V heads for grouped-query attention (a divisor of ``num_heads``;
            ``None``: ``num_heads``): k and v are ``(B, N, num_kv_heads, D)``.
        is_causal: the call is causal. On one device the Triton backend then runs every
            pass per branch, through fp32 accumulators where branches overlap (the
            joint kernels, which need none, take non-causal calls only): for LongNet's
            plan at 1M tokens, D=64, about 2 GiB more in training. A causal ring is
            estimated as a non-causal one (an upper bound); with ``backend="triton"``
            its ``memory_reduction_factor`` is over the causal one-device estimate.

    Returns:
        A dict; sizes per rank, ``*_gb`` in GiB (``2**30`` bytes):

        - ``mode``: ``"single_device"`` or ``"ring"``; ``ring_size``, ``local_seq_len``.
        - ``num_kv_heads``: the K/V heads counted.
        - ``q_memory_gb``, ``kv_memory_gb``, ``output_memory_gb``: q, k + v and the
          output as held by the rank (shards, or whole with ``already_split=False``).
        - ``comm_memory_gb``: the most transfer-buffer bytes live at once (packed K/V
          held and in flight, travelling and returned dK/dV accumulators).
        - ``total_per_device_gb`` / ``bytes_per_device``: the peak.
        - ``parts``: bytes by part at the peak (keys :data:`MEMORY_PARTS`; they sum to
          ``bytes_per_device``); ``part_max``: each part's own maximum over the call.
        - ``peak_phase``: ``"forward"`` or ``"backward"``; ``peak_rank``: the rank
          whose peak is reported (the largest).
        - ``memory_reduction_factor``: the same estimate with ``ring_size=1`` divided
          by this one.
        - ``branches``: per branch, ``placement`` (``"local"`` or ``"ring"``), the ranks
          of its ring and the bytes of one packed K/V buffer and one dK/dV accumulator.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a value out of range, a sequence length that breaks the ring's shard
            rules, ``embed_dim != num_heads * head_dim``, or a backend that cannot run
            the call.

    Example:
        >>> est = get_memory_estimate(8192, 1, 8, 64, segment_lengths=[1024],
        ...                           dilation_rates=[1], ring_size=4)
        >>> round(est["memory_reduction_factor"], 1)
        4.0
    """
    N = check_positive_int("seq_len", seq_len)
    B = check_positive_int("batch_size", batch_size)
    H = check_positive_int("num_heads", num_heads)
    D = check_positive_int("head_dim", head_dim)
    k = check_positive_int("ring_size", ring_size)
    split = check_bool("already_split", already_split)
    with_backward = check_bool("with_backward", with_backward)
    recompute_qkv = check_bool("recompute_qkv", recompute_qkv)
    causal = check_bool("is_causal", is_causal)
    if isinstance(device, torch.device) or (isinstance(device, str) and ":" in device):
        device = torch.device(device).type  # torch.device("cpu"), "cuda:0"
    device = check_choice("device", device, ("cuda", "cpu"))
    dtype = _check_dtype(dtype)
    H_kv = check_num_kv_heads(num_kv_heads, H)
    plan = make_plan(segment_lengths, dilation_rates, H, branch_mixing, H_kv)
    backend = _check_backend(backend, dtype, D, plan, with_backward)
    if embed_dim is not None:
        implied = check_head_split(embed_dim, H)
        if implied != D:
            raise ValueError(
                f"embed_dim={embed_dim} with num_heads={H} gives head_dim {implied}, but "
                f"head_dim={D} was passed; pass head_dim=embed_dim // num_heads, or "
                f"embed_dim=None for the attention alone."
            )
    if k > 1:
        if N % k != 0:
            raise ValueError(
                f"seq_len={N} is not divisible by ring_size={k}: each of the {k} ranks holds "
                f"N/k tokens; choose a seq_len that is a multiple of {k}."
            )
        check_shard_length(plan, N // k, k)

    cfg = _config(B, N, H, D, k, plan, dtype, backend, device, H_kv, causal)
    # The layer recomputes q, k, v in training (MultiheadDilatedAttention with
    # recompute_qkv=True; under no_grad it runs the projections as usual), on one device
    # and on a ring's shards (the whole sequence on every rank runs separate nodes).
    recompute = recompute_qkv and embed_dim is not None and with_backward
    tl, rank = _peak(cfg, N, k, split, with_backward, embed_dim, recompute and (k == 1 or split))
    if k == 1:
        reduction = 1.0
    else:
        single = _peak(_config(B, N, H, D, 1, plan, dtype, backend, device, H_kv, causal), N, 1, split,
                       with_backward, embed_dim, recompute)[0]  # fmt: skip
        reduction = single.peak / tl.peak
    whole = N if (k > 1 and not split) else N // k
    q_bytes, kv_bytes = cfg.qkv_bytes(whole), cfg.kv_bytes(whole)
    branches = []
    if k > 1:
        layout = ring_layout(plan, N // k, k, rank)
    for i, branch in enumerate(plan.branches):
        info = {
            "segment_length": branch.segment_length,
            "dilation_rate": branch.dilation_rate,
            "placement": "local",
            "ring_ranks": 1,
            "kv_buffer_bytes": 0,
            "grad_buffer_bytes": 0,
        }
        if k > 1 and layout[i].size > 1:
            rb = layout[i]
            numel = max(rb.packed_numel(c, B, D) for c in range(rb.size))
            info.update(
                placement="ring",
                ring_ranks=rb.size,
                kv_buffer_bytes=numel * cfg.itemsize,
                grad_buffer_bytes=numel * cfg.acc,
            )
        branches.append(info)
    return {
        "mode": "single_device" if k == 1 else "ring",
        "ring_size": k,
        "seq_len": N,
        "local_seq_len": N // k,
        "batch_size": B,
        "num_heads": H,
        "num_kv_heads": H_kv,
        "head_dim": D,
        "embed_dim": embed_dim,
        "dtype": str(dtype),
        "device": device,
        "backend": backend,
        "kernel": _KERNEL_NAMES[cfg.kernel],
        "already_split": split,
        "with_backward": with_backward,
        "unit": "GiB (2**30 bytes)",
        "q_memory_gb": q_bytes / GiB,
        "kv_memory_gb": 2 * kv_bytes / GiB,
        "output_memory_gb": q_bytes / GiB,
        "comm_memory_gb": tl.part_max["transfer_buffers"] / GiB,
        "total_per_device_gb": tl.peak / GiB,
        "memory_reduction_factor": reduction,
        "bytes_per_device": tl.peak,
        "parts": dict(tl.peak_parts),
        "part_max": dict(tl.part_max),
        "peak_phase": tl.peak_phase,
        "peak_rank": rank,
        "branches": branches,
    }
