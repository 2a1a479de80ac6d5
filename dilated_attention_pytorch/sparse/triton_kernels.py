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

Each loop step carries the first row of the next step's tile, read from the list with a
plain load (:func:`_next_row`, :func:`_next_key_tile`), so that Triton's software
pipeliner keeps the tiles of the next two steps in flight. On one device (``direct``) a
key block's rows are computed from its number, with no table to read; whole key tiles
off the causal diagonal (``EVEN_K``) and whole query tiles (``EVEN_Q``) are loaded
without masks. A program order (:func:`schedules`) starts the
blocks with much longer lists than the rest first, so they do not run alone at the end.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.launch import _backward_rows

__all__ = ["sparse_backward_triton", "sparse_forward_triton", "triton_block_sizes_ok"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _rows(X, b, h, rows, s_b, s_n, s_h, offs_d):
    # Pointers of rows ``rows`` (int64) of batch b, head h: (len(rows), HEAD_DIM).
    return X + b * s_b + h * s_h + rows[:, None] * s_n + offs_d[None, :]


@triton.jit
def _tile_ptrs(X, b, h, r0, s_b, s_n, s_h, offs_r, offs_d):
    # Pointers of rows r0 + offs_r of batch b, head h: a 64-bit scalar base plus 32-bit
    # offsets that stay the same from one tile to the next.
    return (X + (b * s_b + h * s_h + r0.to(tl.int64) * s_n)) + (offs_r[:, None] * s_n
                                                                + offs_d[None, :])  # fmt: skip


@triton.jit
def _load(ptrs, rmask, EVEN: tl.constexpr):
    # A tile whose rows all exist (EVEN) needs no mask.
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=rmask[:, None], other=0.0)


@triton.jit
def _program(Sched, NB, TPB: tl.constexpr, SCHED: tl.constexpr):
    # This program's batch, head, block and tile of the block. Grid: (H * NB * TPB, B),
    # a block's TPB tiles side by side; ``Sched`` (when SCHED) maps the program's slot
    # to ``h * NB + block`` so that blocks with long lists start first.
    pid = tl.program_id(0)
    slot = pid // TPB
    if SCHED:
        slot = tl.load(Sched + slot)
    return tl.program_id(1).to(tl.int64), (slot // NB).to(tl.int64), slot % NB, pid % TPB


@triton.jit
def _block_start(kb, ok, KFirst, KGlob, BS: tl.constexpr, DIRECT: tl.constexpr):
    # First local and first global key of held block kb (0 unless ok: past the list's
    # end, where the tables may even be empty). DIRECT: the held blocks are the
    # sequence's blocks in order (one device), no table to read.
    if DIRECT:
        k0 = kb * BS
        g0 = k0
    else:
        k0 = tl.load(KFirst + kb, mask=ok, other=0, eviction_policy="evict_last")
        g0 = tl.load(KGlob + kb, mask=ok, other=0, eviction_policy="evict_last")
    return k0, g0


@triton.jit
def _start(Rot, h, blk, n_blocks, ROT: tl.constexpr):
    # Where block blk of head h starts walking its list (0 unless ROT; see Sweep).
    if ROT:
        return tl.load(Rot + h * n_blocks + blk)
    else:
        return 0


@triton.jit
def _entry(j, rot, num, ROT: tl.constexpr):
    # List position of the j-th block walked (j < num) when the walk starts at rot and
    # wraps around.
    if ROT:
        j = j + rot
        j = tl.where(j >= num, j - num, j)
    return j


@triton.jit
def _first_key_tile(Idx, KFirst, KGlob, n_steps, rot, BS: tl.constexpr, DIRECT: tl.constexpr):
    # First local and global key of a query tile's first step (the kept block it starts at).
    ok = n_steps > 0
    return _block_start(tl.load(Idx + rot, mask=ok, other=0), ok, KFirst, KGlob, BS, DIRECT)


@triton.jit
def _next_key_tile(Idx, KFirst, KGlob, t, n_steps, k0, g0, rot, num, BS: tl.constexpr,
                   BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, ROT: tl.constexpr):  # fmt: skip
    # First local and global key of step t + 1 from step t's (k0, g0): the next tile of
    # the same block, or the first of the next kept block. See _next_row.
    u = t + 1
    j = _entry(u // (BS // BLOCK_N), rot, num, ROT)
    kb = tl.load(Idx + j, mask=u < n_steps, other=0, eviction_policy="evict_last")
    nk0, ng0 = _block_start(kb, u < n_steps, KFirst, KGlob, BS, DIRECT)
    same = u % (BS // BLOCK_N) != 0
    return tl.where(same, k0 + BLOCK_N, nk0), tl.where(same, g0 + BLOCK_N, ng0)


@triton.jit
def _next_row(Idx, t, n_steps, r0, rot, num, BS: tl.constexpr, TILE: tl.constexpr,
              ROT: tl.constexpr):  # fmt: skip
    # First row of step t + 1's query tile from step t's (r0): the next tile of the same
    # block, or the first of the next kept block. The lists are read with plain loads
    # into loop-carried values (FlexAttention's way): the software pipeliner then loads
    # the tiles two steps ahead, while a list entry read in the step that uses it
    # becomes an asynchronous copy the pipeliner waits for in full at every step (Triton
    # 3.6), leaving each tile's load latency exposed.
    u = t + 1
    j = _entry(u // (BS // TILE), rot, num, ROT)
    nxt = tl.load(Idx + j, mask=u < n_steps, other=0, eviction_policy="evict_last")
    return tl.where(u % (BS // TILE) == 0, nxt * BS, r0 + TILE)


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
def _edge(k0, g0, last_q, len_k, seq_len, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
          EVEN_K: tl.constexpr):  # fmt: skip
    # Whether the key tile starting at local k0 / global g0 needs a mask for queries up
    # to global last_q: at the end of the keys or, when causal, past the first query.
    # Only the causal test remains when every key tile is whole (EVEN_K).
    if EVEN_K:
        edge = g0 < 0  # False
    else:
        edge = (k0 + BLOCK_N > len_k) | (g0 + BLOCK_N > seq_len)
    if CAUSAL:
        edge = edge | (g0 + BLOCK_N - 1 > last_q)
    return edge


@triton.jit
def _sparse_fwd(
    Q, K, V, Out, Lse, KvNum, KvIdx, KFirst, KGlob, Sched, Rot,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_on, s_oh, s_lb, s_ln, s_lh,
    s_numh, s_idxh, s_idxq, len_q, len_k, seq_len, q_start, n_qb, qk_scale, kv_group,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr,
    DIRECT: tl.constexpr, SCHED: tl.constexpr, ROT: tl.constexpr,
):  # fmt: skip
    b, h, qb, sub = _program(Sched, n_qb, BS // BLOCK_M, SCHED)
    hk = h // kv_group  # the K/V head of query head h (grouped-query attention)
    m0 = qb * BS + sub * BLOCK_M
    if m0 >= len_q:
        return
    offs_m = tl.arange(0, BLOCK_M)
    qmask = m0 + offs_m < len_q
    qg = q_start + m0 + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load(_tile_ptrs(Q, b, h, m0, s_qb, s_qn, s_qh, offs_m, offs_d), qmask, EVEN_Q)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    num = tl.load(KvNum + h * s_numh + qb)
    idx = KvIdx + h * s_idxh + qb * s_idxq
    # One flat loop over (kept block, key tile of the block): the software pipeliner
    # overlaps the loads of the next tiles with this one's matmuls.
    n_steps = num * (BS // BLOCK_N)
    rot = _start(Rot, h, qb, n_qb, ROT)
    k0, g0 = _first_key_tile(idx, KFirst, KGlob, n_steps, rot, BS, DIRECT)
    for t in range(n_steps):
        kmask = (k0 + offs_n < len_k) & (g0 + offs_n < seq_len)
        k = _load(_tile_ptrs(K, b, hk, k0, s_kb, s_kn, s_kh, offs_n, offs_d), kmask, EVEN_K)
        qk = _dot(q, tl.trans(k), IEEE) * qk_scale
        # Only tiles at the end of the sequence or on the causal diagonal need a mask.
        if CAUSAL or not EVEN_K:
            if _edge(k0, g0, q_start + m0, len_k, seq_len, BLOCK_N, CAUSAL, EVEN_K):
                qk = tl.where(_valid(qg, g0 + offs_n, kmask, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(_tile_ptrs(V, b, hk, k0, s_vb, s_vn, s_vh, offs_n, offs_d), kmask, EVEN_K)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
        k0, g0 = _next_key_tile(idx, KFirst, KGlob, t, n_steps, k0, g0, rot, num, BS, BLOCK_N,
                                DIRECT, ROT)  # fmt: skip
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    rows = (m0 + offs_m).to(tl.int64)
    tl.store(_rows(Out, b, h, rows, s_ob, s_on, s_oh, offs_d), out.to(Out.dtype.element_ty),
             mask=qmask[:, None])  # fmt: skip
    tl.store(Lse + b * s_lb + h * s_lh + rows * s_ln, lse, mask=qmask)


@triton.jit
def _load_lse2(Lse, b, h, r0, offs, s_lb, s_ln, s_lh, mask, EVEN: tl.constexpr):
    # The LSE in log2 units; a row without keys (-inf) gives +inf, so its p is 0.
    ptrs = Lse + (b * s_lb + h * s_lh + r0.to(tl.int64) * s_ln) + offs * s_ln
    if EVEN:
        lse = tl.load(ptrs)
    else:
        lse = tl.load(ptrs, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _load_row_vec(X, b, h, r0, offs, s_b, s_n, s_h, mask, EVEN: tl.constexpr):
    ptrs = X + (b * s_b + h * s_h + r0.to(tl.int64) * s_n) + offs * s_n
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dkdv_head(
    Q, DO, Lse, Delta, QNum, QIdx, Rot, b, h, kb, k, v, dk, dv, k0, g0, kg, kmask,
    s_qb, s_qn, s_qh, s_db, s_dn, s_dh, s_lb, s_ln, s_lh, s_numh, s_idxh, s_idxk,
    len_q, len_k, seq_len, q_start, n_kb, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr,
    ROT: tl.constexpr,
):  # fmt: skip
    # Query head h's share of the key tile's dK (unscaled) and dV, added to dk, dv: over
    # the query blocks of head h that keep key block kb.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    num = tl.load(QNum + h * s_numh + kb)
    idx = QIdx + h * s_idxh + kb * s_idxk
    n_steps = num * (BS // BLOCK_M)
    rot = _start(Rot, h, kb, n_kb, ROT)
    q0 = tl.load(idx + rot, mask=n_steps > 0, other=0) * BS
    for t in range(n_steps):
        q0 = tl.multiple_of(q0, BLOCK_M)  # a tile's first row: aligned row-vector loads
        qmask = q0 + offs_m < len_q
        q = _load(_tile_ptrs(Q, b, h, q0, s_qb, s_qn, s_qh, offs_m, offs_d), qmask, EVEN_Q)
        do = _load(_tile_ptrs(DO, b, h, q0, s_db, s_dn, s_dh, offs_m, offs_d), qmask, EVEN_Q)
        lse2 = _load_lse2(Lse, b, h, q0, offs_m, s_lb, s_ln, s_lh, qmask, EVEN_Q)
        delta = _load_row_vec(Delta, b, h, q0, offs_m, s_lb, s_ln, s_lh, qmask, EVEN_Q)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # (BLOCK_N, BLOCK_M): S transposed
        dpt = _dot(v, tl.trans(do), IEEE)  # before the exp2, which its matmul overlaps
        pt = tl.exp2(st - lse2[None, :])
        # Rows past len_q have lse +inf, so p = 0 there; only keys need a mask.
        if CAUSAL or not EVEN_K:
            if _edge(k0, g0, q_start + q0, len_k, seq_len, BLOCK_N, CAUSAL, EVEN_K):
                qg = q_start + q0 + offs_m
                pt = tl.where(tl.trans(_valid(qg, kg, kmask, CAUSAL)), pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
        q0 = _next_row(idx, t, n_steps, q0, rot, num, BS, BLOCK_M, ROT)
    return dk, dv


@triton.jit
def _sparse_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, QNum, QIdx, KFirst, KGlob, Sched, Rot,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_gb, s_gn, s_gh,
    s_numh, s_idxh, s_idxk, len_q, len_k, seq_len, q_start, n_kb, qk_scale, scale, kv_group,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr,
    DIRECT: tl.constexpr, SCHED: tl.constexpr, GROUPED: tl.constexpr, ROT: tl.constexpr,
):  # fmt: skip
    # A program per key tile (BLOCK_N rows of held block kb) and head hp: over the query
    # blocks that keep kb. Lse and Delta share their strides (s_l*); DK and DV too (s_g*).
    # GROUPED (grouped-query attention): hp is a K/V head; the program adds up the shares
    # of its kv_group query heads (each over its own list) and writes dK/dV of head hp.
    b, hp, kb, sub = _program(Sched, n_kb, BS // BLOCK_N, SCHED)
    if GROUPED:
        hk = hp
    else:
        hk = hp // kv_group
    j0 = sub * BLOCK_N
    if DIRECT:
        k0 = kb * BS + j0
        g0 = k0
    else:
        k0 = tl.load(KFirst + kb) + j0
        g0 = tl.load(KGlob + kb) + j0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = (k0 + offs_n < len_k) & (g0 + offs_n < seq_len)
    kg = g0 + offs_n
    k = _load(_tile_ptrs(K, b, hk, k0, s_kb, s_kn, s_kh, offs_n, offs_d), kmask, EVEN_K)
    v = _load(_tile_ptrs(V, b, hk, k0, s_vb, s_vn, s_vh, offs_n, offs_d), kmask, EVEN_K)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if GROUPED:
        for i in range(kv_group):
            dk, dv = _dkdv_head(
                Q, DO, Lse, Delta, QNum, QIdx, Rot, b, hp * kv_group + i, kb, k, v, dk, dv, k0,
                g0, kg, kmask, s_qb, s_qn, s_qh, s_db, s_dn, s_dh, s_lb, s_ln, s_lh, s_numh,
                s_idxh, s_idxk, len_q, len_k, seq_len, q_start, n_kb, qk_scale, HEAD_DIM,
                BLOCK_M, BLOCK_N, BS, CAUSAL, IEEE, EVEN_Q, EVEN_K, ROT,
            )  # fmt: skip
    else:
        dk, dv = _dkdv_head(
            Q, DO, Lse, Delta, QNum, QIdx, Rot, b, hp, kb, k, v, dk, dv, k0, g0, kg, kmask,
            s_qb, s_qn, s_qh, s_db, s_dn, s_dh, s_lb, s_ln, s_lh, s_numh, s_idxh, s_idxk,
            len_q, len_k, seq_len, q_start, n_kb, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BS,
            CAUSAL, IEEE, EVEN_Q, EVEN_K, ROT,
        )  # fmt: skip
    krows = (k0 + offs_n).to(tl.int64)
    tl.store(_rows(DK, b, hp, krows, s_gb, s_gn, s_gh, offs_d), (dk * scale).to(DK.dtype.element_ty),
             mask=kmask[:, None])  # fmt: skip
    tl.store(_rows(DV, b, hp, krows, s_gb, s_gn, s_gh, offs_d), dv.to(DV.dtype.element_ty),
             mask=kmask[:, None])  # fmt: skip


@triton.jit
def _sparse_dq(
    Q, K, V, DO, Lse, Delta, DQ, KvNum, KvIdx, KFirst, KGlob, Sched, Rot,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_gb, s_gn, s_gh,
    s_numh, s_idxh, s_idxq, len_q, len_k, seq_len, q_start, n_qb, qk_scale, scale, kv_group,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr,
    DIRECT: tl.constexpr, SCHED: tl.constexpr, ROT: tl.constexpr,
):  # fmt: skip
    b, h, qb, sub = _program(Sched, n_qb, BS // BLOCK_M, SCHED)
    hk = h // kv_group
    m0 = qb * BS + sub * BLOCK_M
    if m0 >= len_q:
        return
    offs_m = tl.arange(0, BLOCK_M)
    qmask = m0 + offs_m < len_q
    qg = q_start + m0 + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load(_tile_ptrs(Q, b, h, m0, s_qb, s_qn, s_qh, offs_m, offs_d), qmask, EVEN_Q)
    do = _load(_tile_ptrs(DO, b, h, m0, s_db, s_dn, s_dh, offs_m, offs_d), qmask, EVEN_Q)
    lse2 = _load_lse2(Lse, b, h, m0, offs_m, s_lb, s_ln, s_lh, qmask, EVEN_Q)
    delta = _load_row_vec(Delta, b, h, m0, offs_m, s_lb, s_ln, s_lh, qmask, EVEN_Q)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    num = tl.load(KvNum + h * s_numh + qb)
    idx = KvIdx + h * s_idxh + qb * s_idxq
    n_steps = num * (BS // BLOCK_N)
    rot = _start(Rot, h, qb, n_qb, ROT)
    k0, g0 = _first_key_tile(idx, KFirst, KGlob, n_steps, rot, BS, DIRECT)
    for t in range(n_steps):
        kmask = (k0 + offs_n < len_k) & (g0 + offs_n < seq_len)
        k = _load(_tile_ptrs(K, b, hk, k0, s_kb, s_kn, s_kh, offs_n, offs_d), kmask, EVEN_K)
        v = _load(_tile_ptrs(V, b, hk, k0, s_vb, s_vn, s_vh, offs_n, offs_d), kmask, EVEN_K)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse2[:, None])
        if CAUSAL or not EVEN_K:
            if _edge(k0, g0, q_start + m0, len_k, seq_len, BLOCK_N, CAUSAL, EVEN_K):
                p = tl.where(_valid(qg, g0 + offs_n, kmask, CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
        k0, g0 = _next_key_tile(idx, KFirst, KGlob, t, n_steps, k0, g0, rot, num, BS, BLOCK_N,
                                DIRECT, ROT)  # fmt: skip
    rows = (m0 + offs_m).to(tl.int64)
    tl.store(_rows(DQ, b, h, rows, s_gb, s_gn, s_gh, offs_d), (dq * scale).to(DQ.dtype.element_ty),
             mask=qmask[:, None])  # fmt: skip


# --------------------------------------------------------------------------- launches


# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel and head dim, for
# blocks of >= 128 tokens (smaller blocks clamp the tiles). Tuned in bf16 with
# benchmarks/profile_block_sparse_kernels.py --sweep at N = 128K, local_window at 0.9,
# each kernel's own CUDA time: on an H200 on 2026-12-04, then the forward at D=64 and dQ
# at D=64 and 128 on an H100 on 2026-12-06 (after the loops began carrying the next
# tile's offset), then the dK/dV kernel at D=128 on an H200 on 2026-12-06 with the
# random pattern (4 stages: 51.9 against 61.2 ms); 16, 32 and 256 are untuned. A
# benchmark may override entries. Float32 inputs take at most 64 x 64 tiles and 2 stages
# (shared memory).
TILE_CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {16: (128, 128, 4, 3), 32: (128, 128, 4, 3), 64: (128, 64, 4, 3),
            128: (128, 128, 8, 3), 256: (64, 32, 4, 2)},
    "dkdv": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 128, 8, 4),
             256: (32, 32, 4, 2)},
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3),
           256: (32, 32, 4, 2)},
}  # fmt: skip


def _tiles(kernel: str, block_size: int, head_dim: int, interpreting: bool,
           wide: bool = False) -> tuple:  # fmt: skip
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``kernel`` for this call
    (``wide``: 4-byte inputs)."""
    if interpreting:
        t = min(16, block_size)
        return t, t, 1, 1
    bm, bn, warps, stages = TILE_CONFIGS[kernel][head_dim]
    if wide:
        bm, bn, stages = min(bm, 64), min(bn, 64), min(stages, 2)
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


def _schedule(num: Tensor, heads: int) -> Tensor | None:
    """Program order over ``h * NB + block`` that starts the blocks with long lists first.

    A block whose list is more than twice the mean (a global block of ``global_local``,
    say) would otherwise start late and run alone at the end. Those blocks come first,
    longest first; the others keep their order (neighbouring blocks share keys in the
    cache). ``None`` when no block is that long (the plain order).
    """
    counts = num.to(torch.float32)
    counts = counts.expand(heads, -1) if counts.dim() == 1 else counts
    flat = counts.reshape(-1)
    heavy = flat > 2.0 * flat.mean()
    if not bool(heavy.any()):
        return None
    key = torch.where(heavy, flat, torch.zeros_like(flat))
    return torch.sort(key, descending=True, stable=True).indices.to(torch.int32)


def schedules(lists: tuple[Tensor, Tensor], t_lists: tuple[Tensor, Tensor], heads: int,
              device: torch.device, kv_group: int = 1) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Program orders of the query-block kernels and of the dK/dV kernel (see
    :func:`_schedule`), on ``device``; compute them once per pattern and pass them on.
    With grouped-query attention (``kv_group`` query heads per K/V head) the dK/dV
    programs are per K/V head, ordered by their query heads' summed list lengths."""
    out = []
    # Only the counts are read.
    for num, h, g in ((lists[0], heads, 1), (t_lists[0], heads // kv_group, kv_group)):
        counts = num.cpu()
        if g > 1 and counts.dim() == 2:
            counts = counts.view(h, g, -1).sum(1)
        order = _schedule(counts, h)
        out.append(None if order is None else order.to(device))
    return out[0], out[1]


def _sched_args(sched: Tensor | None, like: Tensor) -> tuple[Tensor, bool]:
    return (like, False) if sched is None else (sched, True)


# --------------------------------------------------------------------------- sweeps

# ``enabled``: sweep starts where the cache model prefers them (False: every list from
# its first entry). For tests and benchmarks: ``resident`` overrides the programs resident
# on the GPU at once (needed under the interpreter, which has no occupancy), and
# ``force`` takes the sweep starts whatever the model says.
SWEEP: dict = {"enabled": True, "resident": None, "force": False}
# Time of a program outside its loop, in loop steps (loading q, storing out): the
# simulated dispatch only needs it roughly.
_PROLOGUE, _EPILOGUE = 2.0, 1.0
# The cache model: walks simulated (in multiples of the resident programs, the first
# third only warming the cache up), and when sweep starts are taken (see Sweep.table):
# their hit-rate gain, and either the in-order hit rate at most _MODEL_IN_ORDER or the
# misses left with the starts at most _MODEL_MISSES of the in-order ones.
_MODEL_WALKS, _MODEL_GAIN, _MODEL_IN_ORDER, _MODEL_MISSES = 6, 0.05, 0.5, 0.5


def _dispatch(counts: list[list[int]], order: Tensor | None, resident: int,
              tiles_per_block: int, steps_per_block: int, group: int) -> list[tuple]:  # fmt: skip
    """Start time (in loop steps) of every list's walk, in launch order:
    ``[(time, head, block)]``; see :func:`sweep_starts`."""
    NB = len(counts[0])
    free = [0.0] * max(1, resident)
    walks = []
    slots = range(len(counts) // group * NB) if order is None else order.cpu().tolist()
    for slot in slots:
        hp, blk = divmod(int(slot), NB)
        for sub in range(tiles_per_block):
            t = heapq.heappop(free) + _PROLOGUE
            walked = 0.0
            for h in range(hp * group, hp * group + group):
                if sub == 0:
                    walks.append((t + walked, h, blk))
                walked += counts[h][blk] * steps_per_block
            heapq.heappush(free, t + walked + _EPILOGUE)
    return walks


def sweep_starts(mask: Tensor, heads: int, order: Tensor | None, resident: int,
                 tiles_per_block: int, steps_per_block: int, group: int = 1) -> Tensor:  # fmt: skip
    """Where each list's walk starts, so that the programs on the GPU at the same time walk
    the same part of the keys (int32 ``(heads, NB)``: a position in the list; the walk
    wraps around to the list's start).

    ``mask`` ``(NB, NK)`` or ``(heads, NB, NK)``: block ``i``'s list is row ``i``'s kept
    columns in order. Programs are dispatched in launch order (``order``: slot ->
    ``h // group * NB + block``, None: in order; ``tiles_per_block`` programs per slot;
    a program walks the lists of its ``group`` heads one after the other,
    ``steps_per_block`` loop steps per kept block) onto ``resident`` places, each to
    the first one free: a greedy dispatch simulated in loop steps, for the first batch
    (the next batches' programs repeat its order and take its starts). A program
    starting at time ``s`` starts at its first kept block at or past
    ``NK * frac(s / T)`` (``T``: the mean walk; past its last kept block, at its first),
    where the programs started before it, which walk their lists at about one list per
    ``T``, then are. Then the K/V blocks (or Q/dO blocks) a position needs are
    loaded once into the L2 cache and read by every resident program that keeps them,
    instead of the resident programs spreading over the whole sequence.
    """
    return _starts_and_walks(mask, heads, order, resident, tiles_per_block, steps_per_block,
                             group)[0]  # fmt: skip


def _starts_and_walks(mask: Tensor, heads: int, order: Tensor | None, resident: int,
                      tiles_per_block: int, steps_per_block: int,
                      group: int) -> tuple[Tensor, list[tuple]]:  # fmt: skip
    # sweep_starts and the simulated dispatch it came from (for cache_hit_rate).
    m = mask.cpu()
    shared = m.dim() == 2
    NB, NK = m.shape[-2:]
    H = heads
    counts = m.sum(-1).expand(H, NB)
    walks = _dispatch(counts.tolist(), order, resident, tiles_per_block, steps_per_block, group)
    mean = float(counts.double().mean()) * steps_per_block
    where = torch.zeros(H, NB, dtype=torch.float64)
    if walks:
        t, h, blk = (torch.tensor(c) for c in zip(*walks, strict=True))
        where[h, blk] = t.double()
    where = where / max(mean, 1e-9)
    where = ((where - where.floor()) * NK).ceil().long()  # the first key block at or past it
    # A list's position of that block: the kept blocks before it, counted by a search in
    # the flat sorted keys (list, block) of all kept blocks.
    lists = torch.arange(NB) if shared else torch.arange(H * NB).view(H, NB)
    flat = m.reshape(-1).nonzero().flatten()  # list * NK + block, increasing
    rot = torch.searchsorted(flat, lists * NK + where) - torch.searchsorted(flat, lists * NK)
    return torch.where(rot >= counts, torch.zeros_like(rot), rot).to(torch.int32), walks


def cache_hit_rate(mask: Tensor, walks: list[tuple], starts: Tensor | None, resident: int,
                   steps_per_block: int, capacity: int) -> float:  # fmt: skip
    """Modelled L2 hit rate of the block reads of ``6 * resident`` walks from the middle
    of the simulated dispatch ``walks`` (:func:`_dispatch`), in the order of their
    loop steps, in a least-recently-used cache of ``capacity`` blocks; the first third of
    them only fill the cache. ``starts``: sweep starts (None: lists walked from their
    first entry). A model, not the GPU's cache: it ranks the two orders."""
    m = mask.cpu()
    count = min(len(walks), _MODEL_WALKS * max(1, resident))
    first = (len(walks) - count) // 2
    sample = walks[first : first + count]
    if not sample or capacity <= 0:
        return 0.0
    warm = sample[count // 3][0]
    reads = []
    for t0, h, blk in sample:
        cols = (m[h, blk] if m.dim() == 3 else m[blk]).nonzero().flatten().tolist()
        r = int(starts[h, blk]) if starts is not None and cols else 0
        cols = cols[r:] + cols[:r]
        reads += [(t0 + j * steps_per_block, h, c) for j, c in enumerate(cols)]
    reads.sort()
    cache: OrderedDict = OrderedDict()
    hits = counted = 0
    for t, h, c in reads:
        key = (h, c)
        hit = key in cache
        if hit:
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
        if t >= warm:
            counted += 1
            hits += hit
    return hits / max(1, counted)


def working_set_blocks(mask: Tensor, resident_blocks: int) -> float:
    """Distinct columns kept by ``resident_blocks`` consecutive rows of ``mask`` (its
    first head), averaged over up to 9 evenly spaced windows: about the blocks the
    programs resident at once read when each walks its list from the start. 0 for a
    mask without rows."""
    m = mask[0] if mask.dim() == 3 else mask
    NB = m.shape[0]
    if NB == 0:
        return 0.0
    w = max(1, min(NB, resident_blocks))
    firsts = range(0, NB - w + 1, max(1, (NB - w) // 8))
    return sum(int(m[i : i + w].any(0).sum()) for i in firsts) / len(firsts)


def _takes_starts(in_order: float, swept: float) -> bool:
    """The decision of :meth:`Sweep.table` from the model's two hit rates."""
    if swept - in_order < _MODEL_GAIN:
        return False
    return in_order <= _MODEL_IN_ORDER or 1.0 - swept <= _MODEL_MISSES * (1.0 - in_order)


class Sweep:
    """A pattern's sweep starts (:func:`sweep_starts`) for each kernel and occupancy,
    computed on first use; cached with the pattern's lists."""

    def __init__(self, mask: Tensor, heads: int, kv_group: int,
                 orders: tuple[Tensor | None, Tensor | None]) -> None:  # fmt: skip
        self.mask = mask.detach()  # copied to the host only if a table is computed
        self.heads, self.kv_group, self.orders = heads, kv_group, orders
        self._tables: dict[tuple, Tensor | None] = {}

    def table(self, kernel: str, resident: int, tiles_per_block: int, steps_per_block: int,
              block_bytes: int, cache_bytes: int, device: torch.device,
              force: bool = False) -> Tensor | None:  # fmt: skip
        """Starts of ``kernel`` ("fwd", "dq": lists of key blocks; "dkdv": of query
        blocks) on ``device``, or None (lists walked from their first entry) unless
        ``force`` or all of: the blocks the resident programs read overflow
        ``cache_bytes`` (``block_bytes`` per block); in a cache of that size the model
        (:func:`cache_hit_rate`) hits at least 5 points more often with the starts; and
        either walking in order misses at least half the time, or the starts at least
        halve the misses.

        Patterns whose lists follow the query (``local_window``, ``dilated_sparse``,
        ``global_local``) keep the launch order's locality and walk from the start; lists
        scattered independently of the query (``random``) take the starts. The last
        condition is fitted to measurements, not derived: on an H100 and an H200 the
        starts paid for ``random`` at N = 128K and 512K (in order the model hits 10-44%
        at D=128, 76-78% at D=64 at 128K, and the starts leave 8-44% of those misses in
        all but one kernel and occupancy) and cost 1.4-3.6% for ``dilated_sparse`` at
        D=128 (63-92% in order; the starts leave 55-100% of the misses, although the
        model gains 5-15 points at 512K: those kernels are not waiting on memory)."""
        key = (kernel, resident, tiles_per_block, steps_per_block, block_bytes, cache_bytes,
               str(device), force)  # fmt: skip
        if key not in self._tables:
            dkdv = kernel == "dkdv"
            mask = self.mask.cpu()
            mask = mask.transpose(-1, -2) if dkdv else mask
            group = self.kv_group if dkdv else 1
            order = self.orders[1 if dkdv else 0]
            table = None
            blocks = working_set_blocks(mask, -(-resident // tiles_per_block) * group)
            if force or blocks * block_bytes > cache_bytes:
                starts, walks = _starts_and_walks(mask, self.heads, order, resident,
                                                  tiles_per_block, steps_per_block, group)  # fmt: skip
                capacity = cache_bytes // max(1, block_bytes)
                take = force
                if not take:
                    rates = [cache_hit_rate(mask, walks, s, resident, steps_per_block,
                                            capacity) for s in (None, starts)]  # fmt: skip
                    take = _takes_starts(*rates)
                table = starts.to(device) if take else None
            self._tables[key] = table
        return self._tables[key]


_RESIDENT: dict[tuple, int] = {}


def _resident_programs(kernel, grid: tuple, args: tuple, kwargs: dict,
                       device: torch.device) -> int:  # fmt: skip
    """Programs of ``kernel`` (compiled for these arguments) the GPU holds at once:
    multiprocessors times the blocks one holds by registers, shared memory and threads
    (the compiled kernel's own counts, as Triton's persistent-kernel tutorials compute
    them)."""
    key = (kernel.fn.__name__, str(device), args[0].dtype, tuple(sorted(kwargs.items())))
    if key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        threads = 32 * kwargs["num_warps"]
        regs = getattr(props, "regs_per_multiprocessor", 65536)
        smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
        shared = compiled.metadata.shared
        per_sm = min(regs // max(1, compiled.n_regs * threads),
                     smem // (shared + 1024) if shared else 32,
                     props.max_threads_per_multi_processor // threads, 32)  # fmt: skip
        _RESIDENT[key] = max(1, per_sm) * props.multi_processor_count
    return _RESIDENT[key]


def _rotation(sweep: Sweep | None, name: str, kernel, grid: tuple, args: list, kwargs: dict,
              tiles_per_block: int, steps_per_block: int, block_bytes: int,
              device: torch.device) -> tuple[Tensor | None, bool]:  # fmt: skip
    """``(table, ROT)`` of a launch: its sweep starts, or ``(None, False)`` when the
    pattern needs none (or sweeps are off, or the occupancy is unknown)."""
    if sweep is None or not SWEEP["enabled"]:
        return None, False
    resident = SWEEP["resident"]
    if resident is None:
        if device.type != "cuda":
            return None, False
        resident = _resident_programs(kernel, grid, tuple(args), {**kwargs, "ROT": True},
                                      device)  # fmt: skip
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    # The model's cache: half the L2 (H100/H200: each half is nearer to half the SMs).
    cache_bytes = getattr(props, "L2_cache_size", 50 * 2**20) // 2
    table = sweep.table(name, resident, tiles_per_block, steps_per_block, block_bytes,
                        cache_bytes, device, SWEEP["force"])  # fmt: skip
    return table, table is not None


def sparse_forward_triton(
    q: Tensor, k: Tensor, v: Tensor, lists: tuple[Tensor, Tensor], k_first: Tensor,
    k_glob: Tensor, *, block_size: int, q_start: int, seq_len: int, scale: float,
    is_causal: bool, interpreting: bool = False, direct: bool = False,
    sched: Tensor | None = None, sweep: Sweep | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """q ``(B, Lq, H, D)``; held k, v ``(B, Lk, H_kv, D)`` (``H_kv`` dividing ``H``; query
    head ``h`` reads K/V head ``h // (H / H_kv)``) -> out (q.dtype), lse ``(B, Lq, H)`` fp32.

    ``lists``: ``(kv_num (Qb,) or (H, Qb), kv_idx (..., Qb, Kmax))`` into held blocks;
    ``k_first``/``k_glob``: int32 first local row / first global token of each held block.
    ``direct``: the held blocks are the sequence's blocks in order and ``q_start`` is 0
    (one device). ``sched``: program order from :func:`schedules` (None: plain order);
    ``sweep``: the pattern's :class:`Sweep` (None: every list walked from its start).
    """
    B, Lq, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Lq, H, dtype=torch.float32, device=q.device)
    num, idx, s_numh, s_idxh, s_idxq = _lists(*lists, q.device)
    bm, bn, warps, stages = _tiles("fwd", block_size, D, interpreting, q.element_size() == 4)
    n_qb = triton.cdiv(Lq, block_size)
    order, use_sched = _sched_args(sched, num)
    grid = (H * n_qb * (block_size // bm), B)
    args = [q, k, v, out, lse, num, idx, k_first, k_glob, order, num,
            *_s3(q), *_s3(k), *_s3(v), *_s3(out), *_s3(lse),
            s_numh, s_idxh, s_idxq, Lq, k.shape[1], seq_len, q_start, n_qb, scale * LOG2E,
            H // k.shape[2]]  # fmt: skip
    kwargs = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, BS=block_size, CAUSAL=is_causal,
                  IEEE=q.dtype == torch.float32, SCHED=use_sched,
                  **_even(Lq, k.shape[1], seq_len, block_size, direct),
                  num_warps=warps, num_stages=stages)  # fmt: skip
    _launch(_sparse_fwd, "fwd", grid, args, kwargs, sweep, block_size // bm, block_size // bn,
            2 * block_size * D * k.element_size())  # fmt: skip
    return out, lse


def _launch(kernel, name: str, grid: tuple, args: list, kwargs: dict, sweep: Sweep | None,
            tiles_per_block: int, steps_per_block: int, block_bytes: int,
            rot_arg: int = 10) -> None:  # fmt: skip
    # The launch, with the sweep starts (args[rot_arg], the Rot argument; a placeholder
    # tensor otherwise) when the pattern has them.
    table, rot = _rotation(sweep, name, kernel, grid, args, kwargs, tiles_per_block,
                           steps_per_block, block_bytes, args[0].device)  # fmt: skip
    if rot:
        args[rot_arg] = table
    kernel[grid](*args, ROT=rot, **kwargs)


def _even(len_q: int, len_k: int, seq_len: int, block_size: int, direct: bool) -> dict:
    # EVEN_Q: every query tile is whole; EVEN_K: every key tile is whole (one device).
    even_k = direct and len_k == seq_len and seq_len % block_size == 0
    return dict(EVEN_Q=len_q % block_size == 0, EVEN_K=even_k, DIRECT=direct)


def sparse_backward_triton(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    lists: tuple[Tensor, Tensor], t_lists: tuple[Tensor, Tensor], k_first: Tensor,
    k_glob: Tensor, *, block_size: int, q_start: int, seq_len: int, scale: float,
    is_causal: bool, grad_dtype: torch.dtype, interpreting: bool = False,
    direct: bool = False, scheds: tuple[Tensor | None, Tensor | None] = (None, None),
    sweep: Sweep | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (``grad_dtype``) of q and of the held k, v; ``t_lists`` are the
    transposed lists (for each held key block, the query blocks that keep it);
    ``scheds``: the program orders of the dQ and dK/dV kernels (:func:`schedules`; the
    dK/dV one over K/V heads with grouped-query attention). With grouped-query attention
    (k, v with ``H_kv < H`` heads) a dK/dV program per K/V head adds up the shares of its
    query heads: dK/dV are written once, per K/V head."""
    B, Lq, H, D = q.shape
    Lk, H_kv = k.shape[1], k.shape[2]
    kv_group = H // H_kv
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    # LSE and delta heads-first, with the same strides (the kernels read both with s_l*).
    lse, delta = _backward_rows(dout, out, lse)
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device)
    # Unkept rows stay 0.
    dk = torch.zeros(k.shape, dtype=grad_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=grad_dtype, device=q.device)
    ieee = q.dtype == torch.float32
    num, idx, s_numh, s_idxh, s_idxq = _lists(*lists, q.device)
    tnum, tidx, t_numh, t_idxh, t_idxk = _lists(*t_lists, q.device)
    common = dict(HEAD_DIM=D, BS=block_size, CAUSAL=is_causal, IEEE=ieee,
                  **_even(Lq, Lk, seq_len, block_size, direct))  # fmt: skip
    bm, bn, warps, stages = _tiles("dkdv", block_size, D, interpreting, ieee)
    n_kb = k_first.numel()
    order, use_sched = _sched_args(scheds[1], tnum)
    # Q and dO tiles are what the dK/dV programs read from their lists.
    block_bytes = 2 * block_size * D * q.element_size()
    _launch(
        _sparse_dkdv, "dkdv", (H_kv * n_kb * (block_size // bn), B),
        [q, k, v, dout, lse, delta, dk, dv, tnum, tidx, k_first, k_glob, order, tnum,
         *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(lse), *_s3(dk),
         t_numh, t_idxh, t_idxk, Lq, Lk, seq_len, q_start, n_kb, scale * LOG2E, scale, kv_group],
        dict(BLOCK_M=bm, BLOCK_N=bn, SCHED=use_sched, GROUPED=kv_group > 1, num_warps=warps,
             num_stages=stages, **common),
        sweep, block_size // bn, block_size // bm, block_bytes, rot_arg=13,
    )  # fmt: skip
    bm, bn, warps, stages = _tiles("dq", block_size, D, interpreting, ieee)
    n_qb = triton.cdiv(Lq, block_size)
    order, use_sched = _sched_args(scheds[0], num)
    _launch(
        _sparse_dq, "dq", (H * n_qb * (block_size // bm), B),
        [q, k, v, dout, lse, delta, dq, num, idx, k_first, k_glob, order, num,
         *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(lse), *_s3(dq),
         s_numh, s_idxh, s_idxq, Lq, Lk, seq_len, q_start, n_qb, scale * LOG2E, scale, kv_group],
        dict(BLOCK_M=bm, BLOCK_N=bn, SCHED=use_sched, num_warps=warps, num_stages=stages,
             **common),
        sweep, block_size // bm, block_size // bn, 2 * block_size * D * k.element_size(),
        rot_arg=12,
    )  # fmt: skip
    return dq, dk, dv


def triton_block_sizes_ok(block_size: int) -> bool:
    """Block sizes the kernels take: powers of two from 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0
