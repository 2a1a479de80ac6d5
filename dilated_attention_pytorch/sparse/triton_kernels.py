"""Triton kernels of block-sparse attention: a program walks only its kept blocks.

The layout is FlexAttention's: for every query block a list of the key blocks it keeps
(``kv_num``, ``kv_idx``), and for the dK/dV pass the transposed lists (for every key
block, the query blocks that keep it). Dropped blocks are never loaded and never
multiplied: work is proportional to the kept blocks.

The key blocks are *held* blocks: ``k_first[j]`` is the first local row of held block
``j`` in ``k``/``v`` and ``k_glob[j]`` its first global token. On one device the held
blocks are the sequence's blocks in order; in the ring they are the local blocks
followed by the received ones (:mod:`.ring`), so one kernel serves both. Causal
masking and the shorter last block use global positions.

Three kernels, FlashAttention-2's split: the forward (online softmax, LSE saved), the
dK/dV pass (a program per key tile, over the query blocks that keep it) and the dQ
pass (a program per query tile, over its key blocks). ``delta = rowsum(dO * O)`` comes
from the dilated backend's kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.launch import _compute_delta

__all__ = ["sparse_backward_triton", "sparse_forward_triton", "triton_block_sizes_ok"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _rows(X, b, h, rows, s_b, s_n, s_h, offs_d):
    # Pointers of rows ``rows`` (int64) of batch b, head h: (len(rows), HEAD_DIM).
    return X + b * s_b + h * s_h + rows[:, None] * s_n + offs_d[None, :]


@triton.jit
def _query_tile(num_heads, BS: tl.constexpr, BLOCK_M: tl.constexpr):
    # This program's batch, head, query block and first query row (grid: tiles, B * H).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    qb = tile // (BS // BLOCK_M)
    m0 = qb * BS + (tile % (BS // BLOCK_M)) * BLOCK_M
    return (bh // num_heads).to(tl.int64), (bh % num_heads).to(tl.int64), qb, m0


@triton.jit
def _key_tile(Idx, KFirst, KGlob, t, len_k, seq_len, offs_n, BS: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    # Step t of a query tile's loop: key tile t % (BS / BLOCK_N) of its kept block
    # t // (BS / BLOCK_N). Returns the first local and global key, the local and global
    # keys of the tile and which of them exist.
    kb = tl.load(Idx + t // (BS // BLOCK_N))
    j = (t % (BS // BLOCK_N)) * BLOCK_N
    k0 = tl.load(KFirst + kb) + j
    g0 = tl.load(KGlob + kb) + j
    kl = k0 + offs_n
    kg = g0 + offs_n
    return k0, g0, kl, kg, (kl < len_k) & (kg < seq_len)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _valid(qg, kg, kmask, CAUSAL: tl.constexpr):
    # (len(qg), len(kg)) pairs that may attend: key in range and, when causal, not later.
    ok = kmask[None, :] & (qg[:, None] >= 0)
    if CAUSAL:
        ok = ok & (kg[None, :] <= qg[:, None])
    return ok


@triton.jit
def _sparse_fwd(
    Q, K, V, Out, Lse, KvNum, KvIdx, KFirst, KGlob,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_on, s_oh, s_lb, s_ln, s_lh,
    s_numh, s_idxh, s_idxq, len_q, len_k, seq_len, q_start, num_heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, h, qb, m0 = _query_tile(num_heads, BS, BLOCK_M)
    if m0 >= len_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qmask = offs_m < len_q
    qg = q_start + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(_rows(Q, b, h, offs_m.to(tl.int64), s_qb, s_qn, s_qh, offs_d),
                mask=qmask[:, None], other=0.0)  # fmt: skip
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    num = tl.load(KvNum + h * s_numh + qb)
    # One flat loop over (kept block, key tile of the block): the software pipeliner
    # overlaps the loads of the next tile with this one's matmuls.
    for t in range(num * (BS // BLOCK_N)):
        k0, g0, kl, kg, kmask = _key_tile(KvIdx + h * s_idxh + qb * s_idxq, KFirst, KGlob, t,
                                          len_k, seq_len, offs_n, BS, BLOCK_N)  # fmt: skip
        k = tl.load(_rows(K, b, h, kl.to(tl.int64), s_kb, s_kn, s_kh, offs_d),
                    mask=kmask[:, None], other=0.0)  # fmt: skip
        qk = _dot(q, tl.trans(k), IEEE) * qk_scale
        # Only tiles at the end of the sequence or on the causal diagonal need a mask.
        edge = (k0 + BLOCK_N > len_k) | (g0 + BLOCK_N > seq_len)
        if CAUSAL:
            edge = edge | (g0 + BLOCK_N - 1 > q_start + m0)
        if edge:
            qk = tl.where(_valid(qg, kg, kmask, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_rows(V, b, h, kl.to(tl.int64), s_vb, s_vn, s_vh, offs_d),
                    mask=kmask[:, None], other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    rows = offs_m.to(tl.int64)
    tl.store(_rows(Out, b, h, rows, s_ob, s_on, s_oh, offs_d), out.to(Out.dtype.element_ty),
             mask=qmask[:, None])  # fmt: skip
    tl.store(Lse + b * s_lb + h * s_lh + rows * s_ln, lse, mask=qmask)


@triton.jit
def _load_lse2(Lse, b, h, rows, s_lb, s_ln, s_lh, mask):
    # The LSE in log2 units; a row without keys (-inf) gives +inf, so its p is 0.
    lse = tl.load(Lse + b * s_lb + h * s_lh + rows * s_ln, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _sparse_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, QNum, QIdx, KFirst, KGlob,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_gb, s_gn, s_gh,
    s_numh, s_idxh, s_idxk, len_q, len_k, seq_len, q_start, num_heads, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # A program per key tile (BLOCK_N rows of held block kb): over the query blocks
    # that keep kb. Lse and Delta share their strides (s_l*); DK and DV too (s_g*).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    kb = tile // (BS // BLOCK_N)
    j0 = (tile % (BS // BLOCK_N)) * BLOCK_N
    k0 = tl.load(KFirst + kb) + j0
    g0 = tl.load(KGlob + kb) + j0
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kl = k0 + offs_n
    kg = g0 + offs_n
    kmask = (kl < len_k) & (kg < seq_len)
    krows = kl.to(tl.int64)
    k = tl.load(_rows(K, b, h, krows, s_kb, s_kn, s_kh, offs_d), mask=kmask[:, None], other=0.0)
    v = tl.load(_rows(V, b, h, krows, s_vb, s_vn, s_vh, offs_d), mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    num = tl.load(QNum + h * s_numh + kb)
    for t in range(num * (BS // BLOCK_M)):
        qb = tl.load(QIdx + h * s_idxh + kb * s_idxk + t // (BS // BLOCK_M))
        q0 = qb * BS + (t % (BS // BLOCK_M)) * BLOCK_M
        ql = q0 + offs_m
        qmask = ql < len_q
        qg = q_start + ql
        qrows = ql.to(tl.int64)
        q = tl.load(_rows(Q, b, h, qrows, s_qb, s_qn, s_qh, offs_d),
                    mask=qmask[:, None], other=0.0)  # fmt: skip
        do = tl.load(_rows(DO, b, h, qrows, s_db, s_dn, s_dh, offs_d),
                     mask=qmask[:, None], other=0.0)  # fmt: skip
        lse2 = _load_lse2(Lse, b, h, qrows, s_lb, s_ln, s_lh, qmask)
        delta = tl.load(Delta + b * s_lb + h * s_lh + qrows * s_ln, mask=qmask, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # (BLOCK_N, BLOCK_M): S transposed
        pt = tl.exp2(st - lse2[None, :])
        # Rows past len_q have lse +inf, so p = 0 there; only keys need a mask.
        edge = (g0 + BLOCK_N > seq_len) | (k0 + BLOCK_N > len_k)
        if CAUSAL:
            edge = edge | (g0 + BLOCK_N - 1 > q_start + q0)
        if edge:
            pt = tl.where(tl.trans(_valid(qg, kg, kmask, CAUSAL)), pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    tl.store(_rows(DK, b, h, krows, s_gb, s_gn, s_gh, offs_d), (dk * scale).to(DK.dtype.element_ty),
             mask=kmask[:, None])  # fmt: skip
    tl.store(_rows(DV, b, h, krows, s_gb, s_gn, s_gh, offs_d), dv.to(DV.dtype.element_ty),
             mask=kmask[:, None])  # fmt: skip


@triton.jit
def _sparse_dq(
    Q, K, V, DO, Lse, Delta, DQ, KvNum, KvIdx, KFirst, KGlob,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_gb, s_gn, s_gh,
    s_numh, s_idxh, s_idxq, len_q, len_k, seq_len, q_start, num_heads, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, h, qb, m0 = _query_tile(num_heads, BS, BLOCK_M)
    if m0 >= len_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qmask = offs_m < len_q
    qg = q_start + offs_m
    qrows = offs_m.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(_rows(Q, b, h, qrows, s_qb, s_qn, s_qh, offs_d), mask=qmask[:, None], other=0.0)
    do = tl.load(_rows(DO, b, h, qrows, s_db, s_dn, s_dh, offs_d), mask=qmask[:, None], other=0.0)
    lse2 = _load_lse2(Lse, b, h, qrows, s_lb, s_ln, s_lh, qmask)
    delta = tl.load(Delta + b * s_lb + h * s_lh + qrows * s_ln, mask=qmask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    num = tl.load(KvNum + h * s_numh + qb)
    for t in range(num * (BS // BLOCK_N)):
        k0, g0, kl, kg, kmask = _key_tile(KvIdx + h * s_idxh + qb * s_idxq, KFirst, KGlob, t,
                                          len_k, seq_len, offs_n, BS, BLOCK_N)  # fmt: skip
        krows = kl.to(tl.int64)
        k = tl.load(_rows(K, b, h, krows, s_kb, s_kn, s_kh, offs_d),
                    mask=kmask[:, None], other=0.0)  # fmt: skip
        v = tl.load(_rows(V, b, h, krows, s_vb, s_vn, s_vh, offs_d),
                    mask=kmask[:, None], other=0.0)  # fmt: skip
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse2[:, None])
        edge = (k0 + BLOCK_N > len_k) | (g0 + BLOCK_N > seq_len)
        if CAUSAL:
            edge = edge | (g0 + BLOCK_N - 1 > q_start + m0)
        if edge:
            p = tl.where(_valid(qg, kg, kmask, CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(_rows(DQ, b, h, qrows, s_gb, s_gn, s_gh, offs_d), (dq * scale).to(DQ.dtype.element_ty),
             mask=qmask[:, None])  # fmt: skip


# --------------------------------------------------------------------------- launches


# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel and head dim, for
# blocks of >= 128 tokens (smaller blocks clamp the tiles). Tuned on an H200 in bf16
# (benchmarks/bench_block_sparse.py --tune at N = 128K, 2026-12-04; 16, 32 and 256 are
# untuned); a benchmark may override entries.
TILE_CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 128, 8, 2),
            256: (64, 32, 4, 2)},
    "dkdv": {16: (32, 128, 4, 3), 32: (32, 128, 4, 3), 64: (32, 128, 4, 3), 128: (64, 128, 8, 3),
             256: (32, 32, 4, 2)},
    "dq": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3),
           256: (32, 32, 4, 2)},
}  # fmt: skip


def _tiles(kernel: str, block_size: int, head_dim: int, interpreting: bool) -> tuple:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``kernel`` for this call."""
    if interpreting:
        t = min(16, block_size)
        return t, t, 1, 1
    bm, bn, warps, stages = TILE_CONFIGS[kernel][head_dim]
    return min(bm, block_size), min(bn, block_size), warps, stages


def _s3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _lists(num: Tensor, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, int, int, int]:
    """Lists on ``device`` as int32 with a head dimension; head strides 0 when shared."""
    shared = num.dim() == 1
    num = num[None] if shared else num
    idx = idx[None] if shared else idx
    num = num.to(device=device, dtype=torch.int32).contiguous()
    idx = idx.to(device=device, dtype=torch.int32).contiguous()
    s_numh = 0 if shared else num.stride(0)
    s_idxh = 0 if shared else idx.stride(0)
    return num, idx, s_numh, s_idxh, idx.stride(1)


def sparse_forward_triton(
    q: Tensor, k: Tensor, v: Tensor, lists: tuple[Tensor, Tensor], k_first: Tensor,
    k_glob: Tensor, *, block_size: int, q_start: int, seq_len: int, scale: float,
    is_causal: bool, interpreting: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """q ``(B, Lq, H, D)``; held k, v ``(B, Lk, H, D)`` -> out (q.dtype), lse ``(B, Lq, H)`` fp32.

    ``lists``: ``(kv_num (Qb,) or (H, Qb), kv_idx (..., Qb, Kmax))`` into held blocks;
    ``k_first``/``k_glob``: int32 first local row / first global token of each held block.
    """
    B, Lq, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Lq, H, dtype=torch.float32, device=q.device)
    num, idx, s_numh, s_idxh, s_idxq = _lists(*lists, q.device)
    bm, bn, warps, stages = _tiles("fwd", block_size, D, interpreting)
    grid = (triton.cdiv(Lq, block_size) * (block_size // bm), B * H)
    _sparse_fwd[grid](
        q, k, v, out, lse, num, idx, k_first, k_glob,
        *_s3(q), *_s3(k), *_s3(v), *_s3(out), *_s3(lse),
        s_numh, s_idxh, s_idxq, Lq, k.shape[1], seq_len, q_start, H, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, BS=block_size, CAUSAL=is_causal,
        IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def sparse_backward_triton(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    lists: tuple[Tensor, Tensor], t_lists: tuple[Tensor, Tensor], k_first: Tensor,
    k_glob: Tensor, *, block_size: int, q_start: int, seq_len: int, scale: float,
    is_causal: bool, grad_dtype: torch.dtype, interpreting: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (``grad_dtype``) of q and of the held k, v; ``t_lists`` are the
    transposed lists (for each held key block, the query blocks that keep it)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    lse = lse.contiguous()
    delta = _compute_delta(dout, out)  # (B, Lq, H) fp32, the strides of lse
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=grad_dtype, device=q.device)  # unkept rows stay 0
    dv = torch.zeros(v.shape, dtype=grad_dtype, device=q.device)
    ieee = q.dtype == torch.float32
    num, idx, s_numh, s_idxh, s_idxq = _lists(*lists, q.device)
    tnum, tidx, t_numh, t_idxh, t_idxk = _lists(*t_lists, q.device)
    common = dict(HEAD_DIM=D, BS=block_size, CAUSAL=is_causal, IEEE=ieee)
    bm, bn, warps, stages = _tiles("dkdv", block_size, D, interpreting)
    n_kb = k_first.numel()
    _sparse_dkdv[(n_kb * (block_size // bn), B * H)](
        q, k, v, dout, lse, delta, dk, dv, tnum, tidx, k_first, k_glob,
        *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(lse), *_s3(dk),
        t_numh, t_idxh, t_idxk, Lq, Lk, seq_len, q_start, H, scale * LOG2E, scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    bm, bn, warps, stages = _tiles("dq", block_size, D, interpreting)
    _sparse_dq[(triton.cdiv(Lq, block_size) * (block_size // bm), B * H)](
        q, k, v, dout, lse, delta, dq, num, idx, k_first, k_glob,
        *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(lse), *_s3(dq),
        s_numh, s_idxh, s_idxq, Lq, Lk, seq_len, q_start, H, scale * LOG2E, scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    return dq, dk, dv


def triton_block_sizes_ok(block_size: int) -> bool:
    """Block sizes the kernels take: powers of two from 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0
