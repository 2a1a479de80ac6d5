"""Fused Triton kernels for dilated attention: forward, backward and block-level ops.

Every kernel reads and writes ``(B, N, H, D)`` tensors *in place* through their
strides: the dilated positions ``s*w + o + r*t`` of segment ``s`` are rows
``t`` of a strided view with token stride ``r * stride_n`` (DESIGN.md section 2),
so no gather/scatter copy of q, k, v, out or the gradients is ever made.

Launch structure (one branch ``(w, r)`` per launch, grid
``(segments * query_tiles_per_segment, B * heads_of_the_branch)``):

- forward: each program owns one tile of dilated query positions of one
  ``(batch, head)``; it runs a flash-style online softmax over the key tiles of
  its segment, then merges its ``(O_i, LSE_i)`` into the accumulators with the
  LSE rule of DESIGN.md section 1. Within a launch every ``(position, head)``
  belongs to one program and launches run in order, so the read-modify-write
  is race free.
- backward: ``delta = rowsum(dO * O)`` once, then per branch a dK/dV kernel (a
  program per key tile loops over the query tiles of the segment) and a dQ
  kernel (a program per query tile loops over the key tiles). ``P`` is rebuilt
  from the *final* mixed LSE, so summing the branches gives the exact gradient
  of the joint softmax.

Accumulation across branches: when a ``(position, head)`` can be covered by
several branches ("softmax" mixing with more than one branch) the partial
results go to fp32 accumulators, the heads processed in chunks so that an
accumulator stays <= ``ACC_CHUNK_BYTES``; the branch with ``r = 1`` (it covers
every position) runs last and writes the final dtype directly, so there is no
separate cast pass. With a single branch per head ("head_split", or one
branch) every kernel writes its final output directly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..plan import Branch, DilatedPlan

__all__ = [
    "dilated_backward",
    "dilated_forward",
    "triton_block_backward",
    "triton_block_forward",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Upper bound on one fp32 accumulator (out, dq, dk or dv) for the heads processed
# together; 1 GiB keeps the multi-branch path's extra memory well under the size
# of q itself at N = 1M, H = 16, D = 64 while launches stay large.
ACC_CHUNK_BYTES = 1 << 30


# --------------------------------------------------------------------------- kernels


@triton.jit
def _dilated_len(seg_len, o, dil):
    # Number of positions t in [0, seg_len) with t % dil == o (0 when seg_len <= o).
    return tl.where(seg_len > o, (seg_len - o + dil - 1) // dil, 0)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
    start, stop, len_k, offs_m, offs_n, qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
):  # fmt: skip
    # Online softmax over key tiles [start, stop). MASK applies the bound and causal
    # masks (only the diagonal / last tiles need them: the bulk loop skips the `where`).
    for n in range(start, stop, BLOCK_N):
        offs = n + offs_n
        kmask = offs < len_k
        offs64 = offs.to(tl.int64)
        k = tl.load(k_base + offs64[:, None] * row_k, mask=kmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            valid = kmask[None, :]
            if CAUSAL:
                valid = valid & (offs[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        if HAS_KPM:
            pad = tl.load(m_base + offs64 * row_m, mask=kmask, other=1)
            qk = tl.where((pad == 0)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no key so far keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs64[:, None] * row_v, mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Acc, Lse, Kpm,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
    s_ob, s_on, s_oh, s_ab, s_an, s_ah, s_lb, s_ln, s_lh, s_mb, s_mn,
    seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, tiles_per_seg, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_IN: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = pid_m // tiles_per_seg
    m0 = (pid_m % tiles_per_seg) * BLOCK_M
    b = (pid_bh // num_heads).to(tl.int64)
    h = h_first + pid_bh % num_heads
    o = (h - head0) % dil  # the plan's offset rule, passed as ints
    len_q = _dilated_len(tl.minimum(seg_q, n_q - seg * seg_q), o, dil)
    if m0 >= len_q:
        return
    len_k = _dilated_len(tl.minimum(seg_k, n_k - seg * seg_k), o, dil)
    h64 = h.to(tl.int64)
    tok_q = (seg * seg_q + o).to(tl.int64)
    tok_k = (seg * seg_k + o).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < len_q
    rows_q = tok_q + offs_m.to(tl.int64) * dil  # token index of each query row

    q = tl.load(
        Q + b * s_qb + h64 * s_qh + rows_q[:, None] * s_qn + offs_d[None, :],
        mask=qmask[:, None],
        other=0.0,
    )
    k_base = K + b * s_kb + h64 * s_kh + tok_k * s_kn + offs_d[None, :]
    v_base = V + b * s_vb + h64 * s_vh + tok_k * s_vn + offs_d[None, :]
    m_base = Kpm + b * s_mb + tok_k * s_mn
    row_k = dil * s_kn
    row_v = dil * s_vn
    row_m = dil * s_mn

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Key tiles entirely in range and (causal) entirely at or before the first query
    # of the tile need no mask; the rest (diagonal, ragged end) go through the masked loop.
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    hi = len_k
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(len_k, m0 + BLOCK_M)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
        0, full_hi, len_k, offs_m, offs_n, qk_scale, BLOCK_N, False, CAUSAL, HAS_KPM,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
        full_hi, hi, len_k, offs_m, offs_n, qk_scale, BLOCK_N, True, CAUSAL, HAS_KPM,
    )  # fmt: skip

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    lse_ptrs = Lse + b * s_lb + h64 * s_lh + rows_q * s_ln
    if ACC_IN:
        # Merge with what earlier branches left (DESIGN.md section 1 LSE rule).
        acc_old = tl.load(
            Acc + b * s_ab + h64 * s_ah + rows_q[:, None] * s_an + offs_d[None, :],
            mask=qmask[:, None],
            other=0.0,
        ).to(tl.float32)
        lse_old = tl.load(lse_ptrs, mask=qmask, other=float("-inf"))
        # No branch wrote this row yet (lse -inf): the accumulator was never
        # initialised there, so do not read it (saves a zero-fill pass).
        acc_old = tl.where((lse_old == float("-inf"))[:, None], 0.0, acc_old)
        mx = tl.maximum(lse_old, lse)
        shift = tl.where(mx == float("-inf"), 0.0, mx)
        w_old = tl.exp(lse_old - shift)
        w_new = tl.exp(lse - shift)
        tot = w_old + w_new
        tot_safe = tl.where(tot > 0.0, tot, 1.0)
        out = (w_old[:, None] * acc_old + w_new[:, None] * out) / tot_safe[:, None]
        lse = tl.where(tot > 0.0, shift + tl.log(tot_safe), float("-inf"))
    tl.store(
        Out + b * s_ob + h64 * s_oh + rows_q[:, None] * s_on + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=qmask[:, None],
    )
    tl.store(lse_ptrs, lse, mask=qmask)


@triton.jit
def _delta_kernel(
    DO, Out, Delta, n, num_heads,
    s_db, s_dn, s_dh, s_ob, s_on, s_oh, s_lb, s_ln, s_lh,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # delta[b, p, h] = sum_d dO * O, in fp32: the softmax-backward row term.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = rows < n
    offs_d = tl.arange(0, HEAD_DIM)
    do = tl.load(
        DO + b * s_db + h * s_dh + rows[:, None] * s_dn + offs_d[None, :],
        mask=mask[:, None],
        other=0.0,
    )
    o = tl.load(
        Out + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_d[None, :],
        mask=mask[:, None],
        other=0.0,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + b * s_lb + h * s_lh + rows * s_ln, delta, mask=mask)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, dl_base, row_q, row_do, row_l, row_dl,
    start, stop, len_q, offs_n, keep_k, qk_scale,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr,
):  # fmt: skip
    # Transposed formulation: scores are (keys, queries), so dK/dV stay in registers.
    # dQ has its own kernel (recomputing S and dP): adding dS K into an fp32 dQ buffer
    # with atomics from here measured 1.2x slower on an H200 (and is not deterministic).
    for m in range(start, stop, BLOCK_M):
        offs = m + tl.arange(0, BLOCK_M)
        qmask = offs < len_q
        offs64 = offs.to(tl.int64)
        q = tl.load(q_base + offs64[:, None] * row_q, mask=qmask[:, None], other=0.0)
        do = tl.load(do_base + offs64[:, None] * row_do, mask=qmask[:, None], other=0.0)
        lse = tl.load(lse_base + offs64 * row_l, mask=qmask, other=float("-inf"))
        # Rows with no key (and rows out of range) have lse = -inf: +inf makes P = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(dl_base + offs64 * row_dl, mask=qmask, other=0.0)
        qk_t = tl.dot(k, tl.trans(q)) * qk_scale
        p_t = tl.exp2(qk_t - lse2[None, :])
        if MASK:
            p_t = tl.where(offs[None, :] >= offs_n[:, None], p_t, 0.0)
        if HAS_KPM:
            p_t = tl.where(keep_k[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DKacc, DVacc, Kpm,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_gb, s_gn, s_gh, s_ab, s_an, s_ah, s_mb, s_mn,
    seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, tiles_per_seg, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_IN: tl.constexpr,
):  # fmt: skip
    # s_g*: strides of DK and DV (same layout); s_a*: strides of DKacc and DVacc.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = pid_n // tiles_per_seg
    n0 = (pid_n % tiles_per_seg) * BLOCK_N
    b = (pid_bh // num_heads).to(tl.int64)
    h = h_first + pid_bh % num_heads
    o = (h - head0) % dil
    len_k = _dilated_len(tl.minimum(seg_k, n_k - seg * seg_k), o, dil)
    if n0 >= len_k:
        return
    len_q = _dilated_len(tl.minimum(seg_q, n_q - seg * seg_q), o, dil)
    h64 = h.to(tl.int64)
    tok_q = (seg * seg_q + o).to(tl.int64)
    tok_k = (seg * seg_k + o).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_n < len_k
    rows_k = tok_k + offs_n.to(tl.int64) * dil
    k = tl.load(
        K + b * s_kb + h64 * s_kh + rows_k[:, None] * s_kn + offs_d[None, :],
        mask=kmask[:, None],
        other=0.0,
    )
    v = tl.load(
        V + b * s_vb + h64 * s_vh + rows_k[:, None] * s_vn + offs_d[None, :],
        mask=kmask[:, None],
        other=0.0,
    )
    keep_k = kmask
    if HAS_KPM:
        keep_k = tl.load(Kpm + b * s_mb + rows_k * s_mn, mask=kmask, other=1) == 0
    q_base = Q + b * s_qb + h64 * s_qh + tok_q * s_qn + offs_d[None, :]
    do_base = DO + b * s_db + h64 * s_dh + tok_q * s_dn + offs_d[None, :]
    lse_base = Lse + b * s_lb + h64 * s_lh + tok_q * s_ln
    dl_base = Delta + b * s_eb + h64 * s_eh + tok_q * s_en
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Causal: queries before the key tile see none of it; query tiles that start at or
    # after the tile's last key need no mask; the ones in between straddle the diagonal.
    lo = 0
    free = 0
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        free = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, len_q)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, dl_base,
            dil * s_qn, dil * s_dn, dil * s_ln, dil * s_en,
            lo, free, len_q, offs_n, keep_k, qk_scale, BLOCK_M, True, HAS_KPM,
        )  # fmt: skip
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, dl_base,
        dil * s_qn, dil * s_dn, dil * s_ln, dil * s_en,
        free, len_q, len_q, offs_n, keep_k, qk_scale, BLOCK_M, False, HAS_KPM,
    )  # fmt: skip
    dk = dk * scale
    acc_off = b * s_ab + h64 * s_ah + rows_k[:, None] * s_an + offs_d[None, :]
    if ACC_IN:
        dk += tl.load(DKacc + acc_off, mask=kmask[:, None], other=0.0)
        dv += tl.load(DVacc + acc_off, mask=kmask[:, None], other=0.0)
    out_off = b * s_gb + h64 * s_gh + rows_k[:, None] * s_gn + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, m_base, row_k, row_v, row_m,
    start, stop, len_k, offs_m, qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
):  # fmt: skip
    for n in range(start, stop, BLOCK_N):
        offs = n + tl.arange(0, BLOCK_N)
        kmask = offs < len_k
        offs64 = offs.to(tl.int64)
        k = tl.load(k_base + offs64[:, None] * row_k, mask=kmask[:, None], other=0.0)
        v = tl.load(v_base + offs64[:, None] * row_v, mask=kmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(qk - lse2[:, None])
        if MASK:
            valid = kmask[None, :]
            if CAUSAL:
                valid = valid & (offs[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        if HAS_KPM:
            pad = tl.load(m_base + offs64 * row_m, mask=kmask, other=1)
            p = tl.where((pad == 0)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DQacc, Kpm,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_gb, s_gn, s_gh, s_ab, s_an, s_ah, s_mb, s_mn,
    seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, tiles_per_seg, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_IN: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = pid_m // tiles_per_seg
    m0 = (pid_m % tiles_per_seg) * BLOCK_M
    b = (pid_bh // num_heads).to(tl.int64)
    h = h_first + pid_bh % num_heads
    o = (h - head0) % dil
    len_q = _dilated_len(tl.minimum(seg_q, n_q - seg * seg_q), o, dil)
    if m0 >= len_q:
        return
    len_k = _dilated_len(tl.minimum(seg_k, n_k - seg * seg_k), o, dil)
    h64 = h.to(tl.int64)
    tok_q = (seg * seg_q + o).to(tl.int64)
    tok_k = (seg * seg_k + o).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < len_q
    rows_q = tok_q + offs_m.to(tl.int64) * dil
    q = tl.load(
        Q + b * s_qb + h64 * s_qh + rows_q[:, None] * s_qn + offs_d[None, :],
        mask=qmask[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * s_db + h64 * s_dh + rows_q[:, None] * s_dn + offs_d[None, :],
        mask=qmask[:, None],
        other=0.0,
    )
    lse = tl.load(Lse + b * s_lb + h64 * s_lh + rows_q * s_ln, mask=qmask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + b * s_eb + h64 * s_eh + rows_q * s_en, mask=qmask, other=0.0)
    k_base = K + b * s_kb + h64 * s_kh + tok_k * s_kn + offs_d[None, :]
    v_base = V + b * s_vb + h64 * s_vh + tok_k * s_vn + offs_d[None, :]
    m_base = Kpm + b * s_mb + tok_k * s_mn
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    hi = len_k
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(len_k, m0 + BLOCK_M)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, m_base, dil * s_kn, dil * s_vn, dil * s_mn,
        0, full_hi, len_k, offs_m, qk_scale, BLOCK_N, False, CAUSAL, HAS_KPM,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, m_base, dil * s_kn, dil * s_vn, dil * s_mn,
        full_hi, hi, len_k, offs_m, qk_scale, BLOCK_N, True, CAUSAL, HAS_KPM,
    )  # fmt: skip
    dq = dq * scale
    if ACC_IN:
        dq += tl.load(
            DQacc + b * s_ab + h64 * s_ah + rows_q[:, None] * s_an + offs_d[None, :],
            mask=qmask[:, None],
            other=0.0,
        )
    tl.store(
        DQ + b * s_gb + h64 * s_gh + rows_q[:, None] * s_gn + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qmask[:, None],
    )


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of one kernel (BLOCK_M: queries, BLOCK_N: keys)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_index() -> None:
    # Triton 3.6's interpreter turns scalar tensors into Python ints with
    # int(ndarray of shape (1,)), which numpy >= 2.4 rejects, and the kernels' loop
    # bounds need it. Take the single element explicitly instead. Only the interpreter
    # (CPU tests) is touched; compiled kernels never go through this path.
    import triton.runtime.interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_dilated_patched", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dilated_patched = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_index()


# Measured on an H200 in bf16 (benchmarks/bench_dilated.py --tune, the fastest of a few
# candidates per kernel, timed alone on LongNet's r = 1 branch at N = 256K); 16 and 32
# are untuned. The benchmark can override entries to try others. The interpreter gets
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
    64: KernelConfig(128, 64, 8, 3),
    128: KernelConfig(64, 64, 4, 2),
}
_INTERPRET_CONFIG = KernelConfig(16, 16, 1, 1)


def _config(table: dict[int, KernelConfig], head_dim: int) -> KernelConfig:
    return _INTERPRET_CONFIG if interpreting() else table[head_dim]


# --------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class _Launch:
    """One branch restricted to a chunk of heads, in chunk-relative head indices.

    ``seg_q``/``seg_k``: segment length in query/key tokens (the same ``w`` for
    dilated attention; the block lengths for block ops). ``head0``: head index of the
    branch's first head (offset rule ``o = (h - head0) % dil``, may be negative);
    ``h_first``/``num_heads``: the heads this launch runs.
    """

    seg_q: int
    seg_k: int
    dil: int
    head0: int
    h_first: int
    num_heads: int


def _s3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _kpm_args(kpm: Tensor | None, like: Tensor) -> tuple[Tensor, int, int]:
    if kpm is None:
        return like, 0, 0  # never read: HAS_KPM is False
    return kpm, kpm.stride(0), kpm.stride(1)


def _launch_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, acc: Tensor, lse: Tensor, kpm: Tensor | None,
    launch: _Launch, *, scale: float, causal: bool, acc_in: bool,
) -> None:  # fmt: skip
    # q: (B, Nq, Hc, D); k, v: (B, Nk, Hc, D); out, acc: (B, Nq, Hc, D); lse: (B, Nq, Hc)
    B, n_q, _, D = q.shape
    n_k = k.shape[1]
    cfg = _config(FWD_CONFIGS, D)
    num_segments = triton.cdiv(n_q, launch.seg_q)
    tiles = triton.cdiv(triton.cdiv(launch.seg_q, launch.dil), cfg.block_m)
    grid = (num_segments * tiles, B * launch.num_heads)
    kpm_t, s_mb, s_mn = _kpm_args(kpm, q)
    _fwd_kernel[grid](
        q, k, v, out, acc, lse, kpm_t,
        *_s3(q), *_s3(k), *_s3(v), *_s3(out), *_s3(acc), *_s3(lse), s_mb, s_mn,
        launch.seg_q, launch.seg_k, n_q, n_k, launch.dil, launch.head0, launch.h_first,
        launch.num_heads, tiles, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        HAS_KPM=kpm is not None, ACC_IN=acc_in, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _compute_delta(dout: Tensor, out: Tensor) -> Tensor:
    """``rowsum(dout * out)`` in fp32, ``(B, N, H)``."""
    B, N, H, D = out.shape
    delta = torch.empty(B, N, H, dtype=torch.float32, device=out.device)
    block = 16 if interpreting() else 64
    _delta_kernel[(triton.cdiv(N, block), B * H)](
        dout, out, delta, N, H, *_s3(dout), *_s3(out), *_s3(delta), HEAD_DIM=D, BLOCK=block
    )
    return delta


def _launch_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, kpm: Tensor | None,
    grads: tuple[Tensor, Tensor, Tensor], accs: tuple[Tensor, Tensor, Tensor], launch: _Launch,
    *, scale: float, causal: bool, acc_in: bool, which: str,
) -> None:  # fmt: skip
    # which: "dkdv" or "dq". grads/accs: (dq, dk, dv) targets and fp32 accumulators.
    B, n_q, _, D = q.shape
    n_k = k.shape[1]
    num_segments = triton.cdiv(n_q, launch.seg_q)
    kpm_t, s_mb, s_mn = _kpm_args(kpm, q)
    common = (
        *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(lse), *_s3(delta),
    )  # fmt: skip
    tail = (
        launch.seg_q, launch.seg_k, n_q, n_k, launch.dil, launch.head0, launch.h_first,
        launch.num_heads,
    )  # fmt: skip
    if which == "dkdv":
        cfg = _config(DKDV_CONFIGS, D)
        tiles = triton.cdiv(triton.cdiv(launch.seg_k, launch.dil), cfg.block_n)
        grid = (num_segments * tiles, B * launch.num_heads)
        _bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, grads[1], grads[2], accs[1], accs[2], kpm_t,
            *common, *_s3(grads[1]), *_s3(accs[1]), s_mb, s_mn,
            *tail, tiles, scale * LOG2E, scale,
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
            HAS_KPM=kpm is not None, ACC_IN=acc_in, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    else:
        cfg = _config(DQ_CONFIGS, D)
        tiles = triton.cdiv(triton.cdiv(launch.seg_q, launch.dil), cfg.block_m)
        grid = (num_segments * tiles, B * launch.num_heads)
        _bwd_dq_kernel[grid](
            q, k, v, dout, lse, delta, grads[0], accs[0], kpm_t,
            *common, *_s3(grads[0]), *_s3(accs[0]), s_mb, s_mn,
            *tail, tiles, scale * LOG2E, scale,
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
            HAS_KPM=kpm is not None, ACC_IN=acc_in, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip


# --------------------------------------------------------------------------- plan driver


def _branch_heads(branch: Branch) -> tuple[int, int]:
    """``(head_start, head_stop)`` of a branch; checks the plan's offset rule is ours."""
    start = min(g.head_start for g in branch.head_groups)
    stop = max(g.head_stop for g in branch.head_groups)
    for g in branch.head_groups:
        # The kernels compute o = (h - start) % r; the plan must agree (DESIGN.md 1).
        if g.offset != (g.head_start - start) % branch.dilation_rate or (
            g.num_heads > 1 and g.head_step != branch.dilation_rate
        ):
            raise ValueError(
                f"plan head group {g} does not follow the offset rule o = (h - {start}) % r"
            )
    return start, stop


@dataclass(frozen=True)
class _Schedule:
    """How a plan's branches are launched.

    ``multi``: some ``(position, head)`` is covered by several branches, so partial
    results go through fp32 accumulators. ``final``: index of a branch that covers
    every ``(position, head)`` (``r == 1`` over all heads), launched last to write the
    final dtype; ``None`` if there is none. ``full``: the outputs need no zero fill.
    """

    branches: tuple[tuple[Branch, int, int], ...]  # (branch, head_start, head_stop)
    multi: bool
    final: int | None
    full: bool


def _schedule(plan: DilatedPlan) -> _Schedule:
    H = plan.num_heads
    # In head_split mode with fewer heads than branches, some branches run no head.
    items = [(b, *_branch_heads(b)) for b in plan.branches if b.head_groups]
    items = [it for it in items if it[2] > it[1]]
    count = [0] * H
    for _, start, stop in items:
        for h in range(start, stop):
            count[h] += 1
    multi = max(count, default=0) > 1
    final = None
    for i, (b, start, stop) in enumerate(items):
        if b.dilation_rate == 1 and start == 0 and stop == H:
            final = i
    if final is not None:
        # The covering branch goes last: it reads the accumulators and writes the output.
        items.append(items.pop(final))
        final = len(items) - 1
    # Without multi-coverage, the outputs are complete iff every head runs an r = 1 branch.
    full = final is not None or (
        not multi and all(count) and all(b.dilation_rate == 1 for b, _, _ in items)
    )
    return _Schedule(tuple(items), multi, final, full)


def _head_chunks(plan_multi: bool, B: int, N: int, H: int, D: int) -> list[tuple[int, int]]:
    if not plan_multi:
        return [(0, H)]
    per_head = B * N * D * 4
    size = max(1, min(H, ACC_CHUNK_BYTES // max(1, per_head)))
    return [(c, min(H, c + size)) for c in range(0, H, size)]


def _launches_for_chunk(sched: _Schedule, c_lo: int, c_hi: int) -> list[tuple[int, _Launch]]:
    """Branch index and launch (chunk-relative heads) for every branch touching the chunk."""
    out = []
    for i, (branch, start, stop) in enumerate(sched.branches):
        lo, hi = max(start, c_lo), min(stop, c_hi)
        if hi <= lo:
            continue
        w, r = branch.segment_length, branch.dilation_rate
        out.append((i, _Launch(w, w, r, start - c_lo, lo - c_lo, hi - lo)))
    return out


def _kpm_u8(key_padding_mask: Tensor | None) -> Tensor | None:
    # bool -> uint8 view (same bytes): Triton loads it as an integer, 1 = padding.
    return None if key_padding_mask is None else key_padding_mask.view(torch.uint8)


def dilated_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: DilatedPlan,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """All branches of ``plan``: q, k, v ``(B, N, H, D)`` -> out ``(B, N, H, D)`` in q.dtype, lse ``(B, N, H)`` fp32.

    ``key_padding_mask``: ``(B, N)`` bool, ``True`` = padding key. Positions no branch
    covers get ``out = 0`` and ``lse = -inf``.
    """
    B, N, H, D = q.shape
    sched = _schedule(plan)
    kpm = _kpm_u8(key_padding_mask)
    out = (torch.empty if sched.full else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    # The LSE is read back by later branches (multi) or may stay uncovered: start at -inf.
    lse = torch.empty((B, N, H), dtype=torch.float32, device=q.device)
    if sched.multi or not sched.full:
        lse.fill_(-math.inf)
    if N == 0:
        return out, lse
    for c_lo, c_hi in _head_chunks(sched.multi, B, N, H, D):
        hs = slice(c_lo, c_hi)
        qc, kc, vc, oc, lc = q[:, :, hs], k[:, :, hs], v[:, :, hs], out[:, :, hs], lse[:, :, hs]
        # The kernels never read an accumulator row whose LSE is still -inf, so it needs
        # no zero fill, except when it is copied out at the end (no covering branch).
        acc_alloc = torch.zeros if sched.final is None else torch.empty
        acc = (
            acc_alloc(B, N, c_hi - c_lo, D, dtype=torch.float32, device=q.device)
            if sched.multi
            else oc
        )
        launches = _launches_for_chunk(sched, c_lo, c_hi)
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` (each ``(B, N, H, D)`` in the input dtype) given the final out/lse."""
    B, N, H, D = q.shape
    sched = _schedule(plan)
    kpm = _kpm_u8(key_padding_mask)
    alloc = torch.empty if sched.full else torch.zeros
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    if N == 0:
        return dq, dk, dv
    delta = _compute_delta(dout, out)
    f32 = dict(dtype=torch.float32, device=q.device)
    for c_lo, c_hi in _head_chunks(sched.multi, B, N, H, D):
        hs = slice(c_lo, c_hi)
        views = [t[:, :, hs] for t in (dout, q, k, v, lse, delta, dq, dk, dv)]
        doc, qc, kc, vc, lc, dlc, dqc, dkc, dvc = views
        shape = (B, N, c_hi - c_lo, D)
        launches = _launches_for_chunk(sched, c_lo, c_hi)
        # dK/dV for all branches first, then dQ: at most two fp32 accumulators live at once.
        for which in ("dkdv", "dq"):
            if sched.multi and which == "dkdv":
                dk_acc, dv_acc = torch.zeros(shape, **f32), torch.zeros(shape, **f32)
                accs = (dk_acc, dk_acc, dv_acc)  # the dQ slot is unused here
            elif sched.multi:
                dq_acc = torch.zeros(shape, **f32)
                accs = (dq_acc, dq_acc, dq_acc)
            else:
                accs = (dqc, dkc, dvc)
            for j, (i, launch) in enumerate(launches):
                final = not sched.multi or i == sched.final
                _launch_backward(
                    doc, qc, kc, vc, lc, dlc, kpm, (dqc, dkc, dvc) if final else accs, accs,
                    launch, scale=scale, causal=causal, acc_in=sched.multi and j > 0, which=which,
                )  # fmt: skip
            if sched.multi and sched.final is None:
                if which == "dkdv":
                    dkc.copy_(accs[1])
                    dvc.copy_(accs[2])
                else:
                    dqc.copy_(accs[0])
            del accs
    return dq, dk, dv


# --------------------------------------------------------------------------- block ops


def triton_block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """One block of queries against one block of keys (same signature as ``blocks.py``).

    q: ``(Bb, Lq, Hs, D)``, k/v: ``(Bb, Lk, Hs, D)``, any token-major strides (unit
    stride on D), fp16/bf16 on CUDA (fp32 would run its dots in tf32), head dim in
    {16, 32, 64, 128}. ``causal``: query ``t`` sees keys ``t' <= t`` (blocks aligned at 0).
    Returns ``out (Bb, Lq, Hs, D)`` in q.dtype and ``lse (Bb, Lq, Hs)`` fp32 (``-inf``
    for rows with no key).
    """
    Bb, Lq, Hs, D = q.shape
    Lk = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(Bb, Lq, Hs, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    launch = _Launch(Lq, max(Lk, 1), 1, 0, 0, Hs)
    _launch_forward(q, k, v, out, out, lse, None, launch, scale=scale, causal=causal, acc_in=False)
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` in q.dtype for one block, given the *final* out/lse.

    Shapes as in :func:`triton_block_forward`; ``lse`` is ``(Bb, Lq, Hs)`` and may be
    ``-inf`` for rows with no key (their probabilities are 0).
    """
    Bb, Lq, Hs, D = q.shape
    Lk = k.shape[1]
    # Every row is written (dK/dV tiles cover the keys, dQ tiles the queries), except
    # when a block is empty.
    alloc = torch.zeros if Lq == 0 or Lk == 0 else torch.empty
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    if Lq == 0 or Lk == 0:
        return dq, dk, dv
    delta = _compute_delta(dout, out)
    launch = _Launch(Lq, Lk, 1, 0, 0, Hs)
    grads = (dq, dk, dv)
    for which in ("dkdv", "dq"):
        _launch_backward(
            dout, q, k, v, lse, delta, None, grads, grads, launch,
            scale=scale, causal=causal, acc_in=False, which=which,
        )  # fmt: skip
    return dq, dk, dv
