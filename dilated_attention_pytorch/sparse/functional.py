"""``block_sparse_attention``: attention restricted to the kept blocks of a pattern.

The ``pytorch`` implementation gathers, for a chunk of query blocks, only the key
blocks each keeps (FlexAttention's ``kv_num_blocks`` / ``kv_indices`` layout, padded
to the chunk's longest list) and computes their softmax with matmuls; dropped blocks
are never read and never multiplied. Memory is bounded by the chunk (no ``N x N``
tensor). The backward recomputes the probabilities from the saved log-sum-exp,
chunk by chunk, and scatters dK/dV back to the kept key blocks.

The same block computation serves the ring (:mod:`.ring`), which passes the
queries of its shard and the key blocks it holds or received, with their global
block numbers.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..autograd import first_order_only
from ..backends.blocks import compute_dtype, max_score_elements, sum_query_heads
from ..dropout import draw_seed, dropout_keep
from ..segments import token_major
from ..validation import check_choice, check_qkv, check_scalars
from .flex import BLOCK_MASK_CACHE as flex_cache
from .flex import flex_block_sparse_attention, flex_unsupported
from .patterns import BlockSparsePattern, kv_block_lists, pattern_from_block_mask

logger = logging.getLogger("dilated_attention_pytorch")

__all__ = [
    "block_sparse_attention",
    "clear_sparse_caches",
    "kv_block_lists",
    "pattern_from_block_mask",
]

SPARSE_BACKENDS = ("auto", "pytorch", "flex", "triton")
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:  # the kernels need Triton; without it the "triton" backend says so
    from . import triton_kernels


@dataclass(frozen=True)
class SparseCall:
    """Settings of one call, shared by its forward and backward."""

    block_mask: Tensor  # (Qb, Kb) bool on the CPU: rows are this call's query blocks
    block_size: int
    q_start: int  # global token of the first query (shards of a ring start later)
    k_blocks: Tensor  # (Kb,) int64 global block number of each key block held
    k_start: Tensor  # (Kb,) int64 first local key token of each key block held
    k_len: int  # local key tokens held
    seq_len: int  # N: the whole sequence (dropout ids, last block)
    scale: float
    is_causal: bool
    dropout_p: float = 0.0
    seed: int = 0
    head: int | None = None  # per-head patterns run one head at a time (pytorch path)
    # "pytorch" (gathered matmuls) or "triton" (kernels over the kept-block lists).
    kernel: str = "pytorch"
    per_head_mask: Tensor | None = field(default=None, repr=False)  # (H, Qb, Kb) if per head
    # Gradients of the Triton path in the input dtype (one device: every gradient row is
    # written once from fp32 registers); the ring adds received gradients, so it keeps
    # the compute dtype (None).
    grads_in_input_dtype: bool = False
    # The held key blocks are the sequence's blocks in order and q_start is 0 (one
    # device): the Triton kernels then compute block positions instead of reading them.
    held_in_order: bool = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_shape_unsupported(block_size: int, head_dim: int) -> list[str]:
    """Why the Triton kernels cannot take this block size and head dim; empty when they can."""
    reasons = []
    if block_size < 16 or block_size & (block_size - 1):
        reasons.append(f"the Triton kernels need a power-of-two block size >= 16, got {block_size}")
    D = head_dim
    if D < 16 or D > 256 or D & (D - 1):
        reasons.append(f"the Triton kernels need a power-of-two head dim in [16, 256], got {D}")
    return reasons


def triton_unsupported(q: Tensor, block_size: int, dropout_p: float) -> list[str]:
    """Why the Triton kernels cannot run a call on ``q``; empty when they can."""
    reasons = []
    if not HAS_TRITON:
        reasons.append("Triton is not installed (pip install 'dilated-attention-pytorch[triton]')")
    if q.device.type != "cuda" and not (_interpreting() and q.device.type == "cpu"):
        reasons.append(f"the Triton kernels run on CUDA, got {q.device.type}")
    if dropout_p != 0.0:
        reasons.append("the Triton kernels have no dropout")
    reasons += triton_shape_unsupported(block_size, q.shape[-1])
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"the Triton kernels run float16/bfloat16/float32, got {q.dtype}")
    elif q.dtype == torch.bfloat16 and q.device.type == "cpu" and _interpreting():
        # Seen with Triton 3.6: its CPU interpreter returns wrong bf16 dot products even
        # for a minimal kernel (float16 and float32 are right).
        reasons.append(
            "under TRITON_INTERPRET=1 the Triton kernels cannot run bfloat16 (the interpreter "
            "mis-computes bfloat16 dots; bfloat16 runs on CUDA), use float32 or float16"
        )
    return reasons


_LISTS: OrderedDict[tuple, tuple] = OrderedDict()


def _device_lists(mask: Tensor, device: torch.device, key: object = None) -> tuple:
    """``(kv lists, transposed lists)`` of a ``(..., Qb, Kb)`` block mask on ``device``,
    int32 as the Triton kernels read them (cached per ``key``, e.g. a pattern: building
    them costs a sort of the mask, and casting them at every call a launch each)."""
    if key is not None and (key, str(device)) in _LISTS:
        _LISTS.move_to_end((key, str(device)))
        return _LISTS[(key, str(device))][1]
    mask = mask.to(device)
    # Contiguous too: the transposed mask's lists come out column-major.
    lists = tuple(
        tuple(t.to(torch.int32).contiguous() for t in kv_block_lists(m))
        for m in (mask, mask.transpose(-1, -2))
    )
    if key is not None:
        _LISTS[(key, str(device))] = (mask, lists)  # the mask keeps id(key) unique
        while len(_LISTS) > 32:
            _LISTS.popitem(last=False)
    return lists


_SCHEDULES: OrderedDict[tuple, tuple] = OrderedDict()


def _device_schedules(mask: Tensor, heads: int, device: torch.device, kv_group: int) -> tuple:
    """``((query-block order, dK/dV order), sweep)`` of the Triton kernels for a
    ``(..., Qb, Kb)`` block mask (cached per mask, like its lists): program orders with
    the blocks of long lists first (``triton_kernels.schedules``; ``kv_group``: query
    heads per K/V head), and where each program starts its list
    (``triton_kernels.Sweep``)."""
    key = (mask, heads, str(device), kv_group)
    if key in _SCHEDULES:
        _SCHEDULES.move_to_end(key)
        return _SCHEDULES[key]
    counts = mask.sum(-1), mask.sum(-2)  # kept key blocks per query block, and transposed
    scheds = triton_kernels.schedules((counts[0], None), (counts[1], None), heads, device,
                                      kv_group)  # fmt: skip
    scheds = (scheds, triton_kernels.Sweep(mask, heads, kv_group, scheds))
    _SCHEDULES[key] = scheds
    while len(_SCHEDULES) > 32:
        _SCHEDULES.popitem(last=False)
    return scheds


def clear_sparse_caches() -> None:
    """Drop the cached index lists and FlexAttention block masks of every pattern (they
    are kept for the 32 most recent patterns per device, to free their memory)."""
    _LISTS.clear()
    _SCHEDULES.clear()
    flex_cache.clear()


_HELD_IN_ORDER: dict[tuple, tuple[Tensor, Tensor]] = {}


def _triton_ids(call: SparseCall, device: torch.device) -> tuple[Tensor, Tensor]:
    if call.held_in_order:
        # One device: the same tables for every call of a length (a copy from pageable
        # host memory would wait for the GPU's queued work before each launch).
        key = (call.k_start.numel(), call.block_size, str(device))
        if key not in _HELD_IN_ORDER:
            ids = torch.arange(call.k_start.numel()) * call.block_size
            _HELD_IN_ORDER[key] = (ids.to(device=device, dtype=torch.int32),) * 2
        return _HELD_IN_ORDER[key]
    k_first = call.k_start.to(device=device, dtype=torch.int32)
    k_glob = (call.k_blocks * call.block_size).to(device=device, dtype=torch.int32)
    return k_first, k_glob


def _triton_settings(call: SparseCall) -> dict:
    return dict(block_size=call.block_size, q_start=call.q_start, seq_len=call.seq_len,
                scale=call.scale, is_causal=call.is_causal, interpreting=_interpreting(),
                direct=call.held_in_order)  # fmt: skip


def _one_device(call: SparseCall, sweep: triton_kernels.Sweep) -> triton_kernels.Sweep | None:
    # Sweep starts on one device only: a ring step's held blocks make a new mask at every
    # call, whose starts would be simulated again each time (and are unmeasured there).
    return sweep if call.held_in_order else None


def block_forward(call: SparseCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Out and LSE of the queries ``q`` against the held ``k``/``v`` (either kernel)."""
    if call.kernel != "triton":
        return run_heads(sparse_forward, call, call.per_head_mask, q, k, v, kv_in=(1, 2))
    mask = call.block_mask if call.per_head_mask is None else call.per_head_mask
    lists, _ = _device_lists(mask, q.device, key=mask)
    (sched, _), sweep = _device_schedules(mask, q.shape[2], q.device, q.shape[2] // k.shape[2])
    return triton_kernels.sparse_forward_triton(q, k, v, lists, *_triton_ids(call, q.device),
                                 sched=sched, sweep=_one_device(call, sweep),
                                 **_triton_settings(call))  # fmt: skip


def block_backward(
    call: SparseCall, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (compute dtype) of ``q`` and of the held ``k``/``v`` (either kernel)."""
    if call.kernel != "triton":
        return run_heads(
            sparse_backward, call, call.per_head_mask, dout, q, k, v, out, lse,
            kv_in=(2, 3), kv_out=(1, 2),
        )  # fmt: skip
    mask = call.block_mask if call.per_head_mask is None else call.per_head_mask
    lists, t_lists = _device_lists(mask, q.device, key=mask)
    scheds, sweep = _device_schedules(mask, q.shape[2], q.device, q.shape[2] // k.shape[2])
    return triton_kernels.sparse_backward_triton(
        dout, q, k, v, out, lse, lists, t_lists, *_triton_ids(call, q.device),
        scheds=scheds, sweep=_one_device(call, sweep),
        grad_dtype=q.dtype if call.grads_in_input_dtype else compute_dtype(q.dtype),
        **_triton_settings(call),
    )  # fmt: skip


def _chunks(
    kv_num: Tensor, kmax: int, B: int, H: int, bs: int, device: torch.device
) -> list[tuple[int, int]]:
    """Query-block ranges whose score tiles fit the math path's budget on ``device``."""
    per_block = max(1, B * H * bs * kmax * bs)
    step = max(1, max_score_elements(device) // per_block)
    nq = kv_num.shape[0]
    return [(a, min(nq, a + step)) for a in range(0, nq, step)]


def _chunk_tokens(
    call: SparseCall, idx: Tensor, num: Tensor, a: int, b: int, Lq: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Token indices and validity of the queries and kept keys of query blocks ``a:b``.

    Returns ``q_tok (c, bs)`` local query tokens (clamped), ``q_ok (c, bs)``,
    ``k_tok (c, Kmax*bs)`` local key tokens (clamped), ``k_ok (c, Kmax*bs)`` and
    ``allowed (c, bs, Kmax*bs)`` (validity and causality, by global positions).
    """
    bs = call.block_size
    ar = torch.arange(bs, device=device)
    q_tok = torch.arange(a, b, device=device)[:, None] * bs + ar  # (c, bs)
    q_ok = q_tok < Lq
    width = max(1, int(num[a:b].max()))  # this chunk's longest list, not the pattern's
    sel = idx[a:b, :width].to(device)  # (c, Kmax) indices into the held key blocks
    slot_ok = torch.arange(sel.shape[1], device=device)[None, :] < num[a:b, None].to(device)
    k_first = call.k_start.to(device)[sel]  # (c, Kmax)
    k_tok = (k_first[..., None] + ar).flatten(1)  # (c, Kmax*bs)
    k_glob = (call.k_blocks.to(device)[sel][..., None] * bs + ar).flatten(1)
    k_ok = slot_ok.repeat_interleave(bs, dim=1) & (k_glob < call.seq_len) & (k_tok < call.k_len)
    allowed = q_ok[:, :, None] & k_ok[:, None, :]
    if call.is_causal:
        q_glob = q_tok + call.q_start
        allowed = allowed & (k_glob[:, None, :] <= q_glob[:, :, None])
    return q_tok.clamp(max=Lq - 1), q_ok, k_tok.clamp(max=max(call.k_len - 1, 0)), k_glob, allowed


def _keep(call: SparseCall, q_tok: Tensor, k_glob: Tensor, B: int, H: int) -> Tensor:
    """Dropout keep mask ``(B, c, H, bs, Kmax*bs)`` keyed by global positions and head."""
    c = q_tok.shape[0]
    rows = torch.arange(B, device=q_tok.device)[:, None, None] * call.seq_len
    q_ids = (rows + q_tok[None] + call.q_start).reshape(B * c, -1)
    k_ids = (rows + k_glob[None]).reshape(B * c, -1)
    heads = (
        torch.arange(H, device=q_tok.device)
        if call.head is None
        else torch.tensor([call.head], device=q_tok.device)
    )
    keep = dropout_keep(call.dropout_p, call.seed, heads, q_ids, k_ids)  # (B*c, H, bs, K)
    return keep.view(B, c, *keep.shape[1:])


def _kv_chunk(x: Tensor, k_tok: Tensor, cdt: torch.dtype, kv_group: int) -> Tensor:
    """The kept key rows ``k_tok`` of k or v in the compute dtype, ``(B, c, K, H, D)``:
    each K/V head repeated for its ``kv_group`` query heads (a copy of this chunk only)."""
    xc = x[:, k_tok].to(cdt)
    return xc if kv_group == 1 else xc.repeat_interleave(kv_group, dim=3)


def sparse_forward(q: Tensor, k: Tensor, v: Tensor, call: SparseCall) -> tuple[Tensor, Tensor]:
    """q ``(B, Lq, H, D)``; k, v ``(B, Lk, H_kv, D)`` (``H_kv`` dividing ``H``) -> out
    (compute dtype), lse ``(B, Lq, H)``."""
    B, Lq, H, D = q.shape
    g = H // k.shape[2]
    cdt = compute_dtype(q.dtype)
    out = torch.zeros(B, Lq, H, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((B, Lq, H), -math.inf, dtype=cdt, device=q.device)
    num, idx = kv_block_lists(call.block_mask)
    bs = call.block_size
    for a, b in _chunks(num, idx.shape[1], B, H, bs, q.device):
        q_tok, q_ok, k_tok, k_glob, allowed = _chunk_tokens(call, idx, num, a, b, Lq, q.device)
        qc = q[:, q_tok].to(cdt)  # (B, c, bs, H, D)
        kc, vc = _kv_chunk(k, k_tok, cdt, g), _kv_chunk(v, k_tok, cdt, g)  # (B, c, K, H, D)
        s = torch.einsum("bcqhd,bckhd->bchqk", qc, kc) * call.scale
        s = s.masked_fill(~allowed[None, :, None], -math.inf)
        lse_c = torch.logsumexp(s, dim=-1)  # (B, c, H, bs)
        finite = torch.where(torch.isinf(lse_c), torch.full_like(lse_c, math.inf), lse_c)
        p = torch.exp(s - finite[..., None])
        if call.dropout_p > 0.0:
            keep = _keep(call, q_tok, k_glob, B, H).to(cdt)
            p = p * keep / (1.0 - call.dropout_p)
        o = torch.einsum("bchqk,bckhd->bcqhd", p, vc)
        rows = q_tok[q_ok]
        out[:, rows] = o[:, q_ok]
        lse[:, rows] = lse_c.transpose(2, 3)[:, q_ok]
    return out, lse


def sparse_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, call: SparseCall
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (compute dtype) of q ``(B, Lq, H, D)`` and of the held k, v
    ``(B, Lk, H_kv, D)``."""
    B, Lq, H, D = q.shape
    g = H // k.shape[2]
    cdt = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    num, idx = kv_block_lists(call.block_mask)
    bs = call.block_size
    for a, b in _chunks(num, idx.shape[1], B, H, bs, q.device):
        q_tok, q_ok, k_tok, k_glob, allowed = _chunk_tokens(call, idx, num, a, b, Lq, q.device)
        qc, doc, oc = (t[:, q_tok].to(cdt) for t in (q, dout, out))  # (B, c, bs, H, D)
        kc, vc = _kv_chunk(k, k_tok, cdt, g), _kv_chunk(v, k_tok, cdt, g)
        lse_c = lse[:, q_tok].to(cdt).permute(0, 1, 3, 2)  # (B, c, H, bs)
        lse_c = torch.where(torch.isinf(lse_c), torch.full_like(lse_c, math.inf), lse_c)
        s = torch.einsum("bcqhd,bckhd->bchqk", qc, kc) * call.scale
        s = s.masked_fill(~allowed[None, :, None], -math.inf)
        p = torch.exp(s - lse_c[..., None])
        dp = torch.einsum("bcqhd,bckhd->bchqk", doc, vc)
        if call.dropout_p > 0.0:
            keep = _keep(call, q_tok, k_glob, B, H).to(cdt) / (1.0 - call.dropout_p)
            dv_c = torch.einsum("bchqk,bcqhd->bckhd", p * keep, doc)
            dp = dp * keep
        else:
            dv_c = torch.einsum("bchqk,bcqhd->bckhd", p, doc)
        delta = (doc * oc).sum(-1).permute(0, 1, 3, 2)  # (B, c, H, bs)
        ds = p * (dp - delta[..., None])
        dq_c = torch.einsum("bchqk,bckhd->bcqhd", ds, kc) * call.scale
        dk_c = torch.einsum("bchqk,bcqhd->bckhd", ds, qc) * call.scale
        dq[:, q_tok[q_ok]] += dq_c[:, q_ok]
        flat = k_tok.flatten()
        dk.index_add_(1, flat, sum_query_heads(dk_c, g).flatten(1, 2))
        dv.index_add_(1, flat, sum_query_heads(dv_c, g).flatten(1, 2))
    return dq, dk, dv


def run_heads(
    fn, call: SparseCall, per_head_mask: Tensor | None, *tensors: Tensor,
    kv_in: tuple[int, ...] = (), kv_out: tuple[int, ...] = (),
):  # fmt: skip
    """Run ``fn(*tensors, call)`` for a shared pattern, or head by head for a per-head one.

    ``kv_in``: positions of K/V-shaped tensors (``H_kv`` heads: query head ``h`` reads
    head ``h // (H / H_kv)``); ``kv_out``: positions of K/V-shaped results, summed over
    the query heads of each K/V head.
    """
    if per_head_mask is None:
        return fn(*tensors, call)
    H = per_head_mask.shape[0]
    g = H // tensors[kv_in[0]].shape[2] if kv_in else 1
    results = []
    for h in range(H):
        sub = replace(call, block_mask=per_head_mask[h], head=h, per_head_mask=None)
        view = [
            t[:, :, h // g : h // g + 1] if i in kv_in else t[:, :, h : h + 1]
            for i, t in enumerate(tensors)
        ]
        results.append(fn(*view, sub))
    return tuple(
        sum_query_heads(torch.cat(parts, dim=2), g) if j in kv_out else torch.cat(parts, dim=2)
        for j, parts in enumerate(zip(*results, strict=True))
    )


class _BlockSparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: SparseCall):
        out, lse = block_forward(call, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero gradient for the LSE
        return out.to(q.dtype), lse

    @staticmethod
    @first_order_only("block_sparse_attention")
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # the output was not used: no gradient reaches q, k, v
            return None, None, None, None
        dout = token_major(dout)
        dq, dk, dv = block_backward(ctx.call, dout, q, k, v, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def auto_sparse_backend(q: Tensor, why_flex: list[str], why_triton: list[str]) -> str:
    """``backend="auto"``: on CUDA the Triton kernels where they run; otherwise flex
    where it runs, else the pytorch path. Measured on an H100 (N = 32K and 128K, head
    dims 64 and 128, four patterns, sparsity 0.5 to 0.97, not causal), our kernels were faster than
    FlexAttention on all forward+backward rows but one (0.99x) and on all forward rows
    but four at D=64 (0.89-0.997x)."""
    if q.device.type == "cuda" and not why_triton:
        return "triton"
    if not why_flex:
        return "flex"
    return "pytorch"


def ring_kernel(q: Tensor, backend: str, block_size: int, dropout_p: float) -> str:
    """The block kernel a ring call runs (``backend``: ``"auto"``, ``"pytorch"`` or
    ``"triton"``): ``"auto"`` is the Triton kernels on CUDA where they run."""
    why = triton_unsupported(q, block_size, dropout_p)
    if backend == "triton" and why:
        raise ValueError(f"backend='triton' cannot run this call: {'; '.join(why)}.")
    if backend == "pytorch" or why or (q.device.type != "cuda" and backend != "triton"):
        return "pytorch"
    return "triton"


def resolve_pattern(pattern: object, seq_len: int, is_causal: bool) -> BlockSparsePattern:
    """A :class:`BlockSparsePattern` for this call (a bool block mask is wrapped)."""
    if isinstance(pattern, Tensor):
        # A bare block mask: blocks of ceil(N / num_blocks) tokens.
        nb = pattern.shape[-1] if pattern.dim() >= 2 else 0
        block_size = math.ceil(seq_len / nb) if nb else 1
        return pattern_from_block_mask(pattern, seq_len, block_size, is_causal=is_causal)
    if not isinstance(pattern, BlockSparsePattern):
        raise TypeError(
            f"pattern must be a BlockSparsePattern (make_block_sparse_pattern(...)), got "
            f"{type(pattern).__name__}."
        )
    if pattern.seq_len != seq_len:
        raise ValueError(
            f"the pattern was built for {pattern.seq_len} tokens but q has {seq_len}; build it "
            f"with make_block_sparse_pattern(..., seq_len={seq_len})."
        )
    if pattern.is_causal != is_causal:
        raise ValueError(
            f"the pattern was built with is_causal={pattern.is_causal} but the call has "
            f"is_causal={is_causal}; build the pattern with the call's setting."
        )
    return pattern


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: BlockSparsePattern,
    *,
    is_causal: bool | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention on ``(B, N, H, D)`` q, k, v over the kept blocks of ``pattern``.

    Token ``p`` attends to token ``p'`` iff ``pattern.block_mask`` keeps their blocks
    (per head for per-head patterns) and, when causal, ``p' <= p``. Dropped blocks are
    never read. Exact gradients.

    Args:
        q, k, v: ``(B, N, H, D)`` (batch, tokens, heads, head dim), one dtype and device;
            k and v may have fewer heads, ``(B, N, H_kv, D)`` with ``H_kv`` dividing ``H``
            (grouped-query attention: query head ``h`` reads K/V head
            ``h // (H / H_kv)``; a per-head pattern is per query head).
        pattern: from :func:`~dilated_attention_pytorch.sparse.make_block_sparse_pattern`
            for this ``N``, or a bool block mask ``(nb, nb)`` / ``(H, nb, nb)`` (blocks of
            ``ceil(N / nb)`` tokens; the diagonal is added); a per-head pattern needs
            ``H`` heads.
        is_causal: must match the pattern's; ``None`` takes it from the pattern.
        scale: score scale, default ``D ** -0.5``.
        dropout_p: drop probability of the attention probabilities (an entry is dropped
            by a hash of its head, positions and a seed drawn from the default generator).
        backend: ``"pytorch"`` (gathers the kept key blocks per chunk of query blocks and
            runs matmuls; any device, dtype and option), ``"flex"`` (PyTorch's compiled
            FlexAttention with the pattern as its ``BlockMask``; CUDA, no dropout, ``N`` a
            multiple of a block size that is a multiple of 16), ``"triton"`` (our kernels
            over the kept-block lists; CUDA, or the CPU under ``TRITON_INTERPRET=1``;
            power-of-two block sizes >= 16 and head dims 16..256, any ``N``, no dropout)
            or ``"auto"``: on CUDA triton where it runs, else flex (as measured by
            ``benchmarks/bench_block_sparse.py`` on an H100: our kernels were faster than
            flex on all non-causal forward+backward rows but one, at D=64 and D=128); elsewhere
            pytorch.
        return_lse: also return the ``(B, N, H)`` float32 log-sum-exp.

    Returns:
        ``(B, N, H, D)`` in ``q.dtype`` (and the LSE).
    """
    check_qkv(q, k, v, grouped_query=True)
    if is_causal is None:
        is_causal = pattern.is_causal if isinstance(pattern, BlockSparsePattern) else False
    check_scalars(scale=scale, dropout_p=dropout_p, is_causal=is_causal)
    B, N, H, D = q.shape
    pattern = resolve_pattern(pattern, N, is_causal)
    per_head = pattern.block_mask if pattern.per_head else None
    if per_head is not None and per_head.shape[0] != H:
        raise ValueError(
            f"the pattern has one block mask per head for {per_head.shape[0]} heads, but q has "
            f"{H}; build it with num_heads={H}."
        )
    check_choice("backend", backend, SPARSE_BACKENDS)
    why = flex_unsupported(q, pattern, dropout_p)
    why_triton = triton_unsupported(q, pattern.block_size, dropout_p)
    if backend == "flex" and why:
        raise ValueError(f"backend='flex' cannot run this call: {'; '.join(why)}.")
    if backend == "triton" and why_triton:
        raise ValueError(f"backend='triton' cannot run this call: {'; '.join(why_triton)}.")
    if backend == "auto":
        backend = auto_sparse_backend(q, why, why_triton)
        if not torch.compiler.is_compiling():  # logging would break a compiled graph
            logger.debug(
                "block_sparse_attention: backend='auto' chose %r (triton: %s; flex: %s)",
                backend, "; ".join(why_triton) or "runs", "; ".join(why) or "runs",
            )  # fmt: skip
    if backend == "flex":
        out, lse = flex_block_sparse_attention(
            q, k, v, pattern, D**-0.5 if scale is None else float(scale)
        )
        return (out, lse) if return_lse else out
    seed = draw_seed(dropout_p)
    kernel = "triton" if backend == "triton" else "pytorch"
    call = single_device_call(pattern, N, D, is_causal, scale, dropout_p, seed, kernel)
    out, lse = _BlockSparseFunction.apply(token_major(q), token_major(k), token_major(v), call)
    return (out, lse.float()) if return_lse else out


def single_device_call(
    pattern: BlockSparsePattern,
    seq_len: int,
    head_dim: int,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    seed: int,
    kernel: str,
) -> SparseCall:
    """The :class:`SparseCall` of ``pattern`` on one device (every block held locally)."""
    nb = pattern.num_blocks
    per_head = pattern.block_mask if pattern.per_head else None
    return SparseCall(
        block_mask=pattern.block_mask if per_head is None else pattern.block_mask[0],
        block_size=pattern.block_size,
        q_start=0,
        k_blocks=torch.arange(nb),
        k_start=torch.arange(nb) * pattern.block_size,
        k_len=seq_len,
        seq_len=seq_len,
        scale=head_dim**-0.5 if scale is None else float(scale),
        is_causal=is_causal,
        dropout_p=float(dropout_p),
        seed=seed,
        kernel=kernel,
        per_head_mask=per_head,
        grads_in_input_dtype=True,
        held_in_order=True,
    )
