"""Triton kernels of dilated attention: forward, ``delta``, dK/dV and dQ (``@triton.jit`` only).

Every kernel reads and writes ``(B, N, H, D)`` tensors *in place* through their
strides: the dilated positions ``s*w + o + r*t`` of segment ``s`` are rows ``t`` of
a strided view with token stride ``r * stride_n``, so no
gather/scatter copy of q, k, v, out or the gradients is ever made.

A program of the forward, dK/dV and dQ kernels runs one tile of dilated positions of
one segment of one ``(batch, head)`` (:func:`_tile`); :mod:`.launch` launches them
once per branch. The joint forward, dQ and dK/dV kernels run every branch of a plan
whose branches nest in one launch, a program per tile of positions covered by the same
branches (:func:`_joint_tile`).

Scores stay in natural-log units (``S = scale * q.k``) and are converted to log2 units
only after the row maximum is subtracted (``exp2((S - m) * LOG2E)``, the product and the
subtraction in one fused multiply-add), so nothing that is subtracted from a score has
been rounded by a unit conversion. With tensor-descriptor loads (Hopper) the forward
takes the row maximum over the unscaled products (negated for a negative scale) and
scales only the maximum: float32 rounding keeps order, so that is the maximum of the
scores as computed, without a multiply per score. The log-sum-exp is kept
as a pair ``lse = hi + lo`` (planes 0 and 1 of a ``(2, B, N, H)`` tensor): ``hi`` is a
score maximum as computed (or the largest of the merged branches' maxima), ``lo`` the
log of the normaliser relative to it, in ``[0, log(#keys)]``. A single float32 LSE of
magnitude 1e7 cannot hold ``log 2``: with the pair, branches that share their best key
are averaged and the backward's ``P = exp((S - hi) - lo)`` is as exact as the forward's
(checked on an H200 at logit scales up to 1e4). The block operations of the ring
exchange one LSE instead (``LSE_PAIR`` False).

The backward reads its per-row terms (the LSE pair and ``delta``) from copies made for it
(:func:`.launch._backward_rows`): heads-first, ``lo`` already in log2 units, so that
``P = exp2((S - hi) * LOG2E - lo2)`` is two multiply-adds per score, and, for a branch
with ``r > 1`` (``COMPACT``), only the launch's heads and dilated rows, row ``t`` of
segment ``s`` at ``s * l_seg + t``, so that a tile's rows are neighbours in memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Jit code may read a global only when it is a ``tl.constexpr`` instance.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural log -> log2 units
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log2 -> natural log units


# --------------------------------------------------------------------------- helpers


@triton.jit
def _dilated_len(seg_len, o, dil):
    # Number of positions t in [0, seg_len) with t % dil == o (0 when seg_len <= o).
    return tl.where(seg_len > o, (seg_len - o + dil - 1) // dil, 0)


@triton.jit
def _tile(
    seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, tiles_per_seg, SegStart, SegLen,
    BLOCK: tl.constexpr, VARLEN: tl.constexpr, kv_group=1, GROUPED: tl.constexpr = False,
):  # fmt: skip
    # The tile this program runs. Grid axis 0: (segment, tile of BLOCK dilated positions
    # of it), axis 1: (batch, head of the launch). Returns the tile's first dilated
    # position, b (int64) and h, the segment's numbers of dilated queries and keys, and
    # the token indices (int64) of its first dilated query and key. The caller returns
    # early when the tile starts past its segment's length. VARLEN (packed documents):
    # segment `seg` starts at token SegStart[seg] and holds SegLen[seg] tokens, for
    # queries and keys alike (segments restart at every document). GROUPED: axis 1 is
    # (batch, K/V group of the launch, offset class), num_heads the groups times the
    # classes (min(kv_group, dil) per group), and h the class's first query head.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = pid // tiles_per_seg
    start = (pid % tiles_per_seg) * BLOCK
    b = (pid_bh // num_heads).to(tl.int64)
    i = pid_bh % num_heads
    if GROUPED:
        classes = tl.minimum(kv_group, dil)
        i = (i // classes) * kv_group + i % classes
    h = h_first + i
    o = (h - head0) % dil  # the plan's offset rule, passed as ints
    if VARLEN:
        first = tl.load(SegStart + seg)  # int64
        length = tl.load(SegLen + seg)
        len_q = _dilated_len(length, o, dil)
        len_k = len_q
        tok_q = first + o
        tok_k = tok_q
    else:
        len_q = _dilated_len(tl.minimum(seg_q, n_q - seg * seg_q), o, dil)
        len_k = _dilated_len(tl.minimum(seg_k, n_k - seg * seg_k), o, dil)
        tok_q = (seg * seg_q + o).to(tl.int64)
        tok_k = (seg * seg_k + o).to(tl.int64)
    return start, b, h, len_q, len_k, tok_q, tok_k


@triton.jit
def _tile_rows(start, length, tok, dil, BLOCK: tl.constexpr):
    # The tile's dilated positions, which of them are in range, and their token indices.
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < length, tok + offs.to(tl.int64) * dil


@triton.jit
def _ptr(X, b, h, row, s_b, s_n, s_h):
    # Address of token `row` (a scalar or a block of rows) of head h of batch b. h is
    # widened here, next to its products: widened where _tile computes it, the compiler
    # loses the 32x32->64-bit multiplies and ptxas allocates more registers (spills in
    # the D = 128 forward).
    return X + b * s_b + h.to(tl.int64) * s_h + row * s_n


@triton.jit
def _rows_off(b, h, rows, s_b, s_n, s_h, offs_d):
    # Offsets of the (rows, D) block of head h of batch b, for tensors sharing a layout.
    return b * s_b + h.to(tl.int64) * s_h + rows[:, None] * s_n + offs_d[None, :]


@triton.jit
def _rows_ptr(X, b, h, rows, s_b, s_n, s_h, offs_d):
    # Addresses of the (rows, D) block of head h of batch b of a (B, N, H, D) tensor.
    return _ptr(X, b, h, rows[:, None], s_b, s_n, s_h) + offs_d[None, :]


@triton.jit
def _load_rows(ptrs, mask):
    # A (rows, D) block; rows outside `mask` read as 0.
    return tl.load(ptrs, mask=mask[:, None], other=0.0)


@triton.jit
def _store_rows(ptrs, x, mask):
    # Store a (rows, D) block in the target's dtype, the rows inside `mask` only.
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _rows_source(X, b, h, tok, s_b, s_n, s_h, row, length, offs_d,
                 BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    # Where a loop reads (BLOCK, D) tiles of the dilated rows tok + row * t, t < length, of
    # head h of batch b: a tensor descriptor of them (TMA: the Hopper tensor memory
    # accelerator copies each tile, rows past `length` read as 0) or their base pointers.
    base = _ptr(X, b, h, tok, s_b, s_n, s_h)
    if TMA:
        return tl.make_tensor_descriptor(
            base, shape=[tl.maximum(length, 1), HEAD_DIM], strides=[row, 1],
            block_shape=[BLOCK, HEAD_DIM],
        )  # fmt: skip
    else:
        return base + offs_d[None, :]


@triton.jit
def _load_tile(src, start, offs64, row, mask, TMA: tl.constexpr):
    # Tile of dilated rows [start, start + BLOCK) from a _rows_source (offs64: those rows,
    # mask: which exist); rows outside read as 0 either way.
    if TMA:
        return src.load([start, 0])
    else:
        return _load_rows(src + offs64[:, None] * row, mask)


@triton.jit
def _load_lse(ptrs, s_lp, mask, LSE_PAIR: tl.constexpr, EVEN: tl.constexpr = False):
    # The backward's copy of the final LSE pair of some rows: hi, and lo in log2 units
    # (lo2), for P = exp2((S - hi) * LOG2E - lo2) (_probs). Rows with no key (and rows
    # out of range) have hi = -inf: +inf makes their P 0 instead of NaN. Without LSE_PAIR
    # the tensor holds one LSE (lo2 = 0). EVEN: every row exists (no mask).
    if EVEN:
        hi = tl.load(ptrs)
    else:
        hi = tl.load(ptrs, mask=mask, other=float("-inf"))
    hi = tl.where(hi == float("-inf"), float("inf"), hi)
    lo = tl.zeros_like(hi)
    if LSE_PAIR:
        if EVEN:
            lo = tl.load(ptrs + s_lp)
        else:
            lo = tl.load(ptrs + s_lp, mask=mask, other=0.0)
    return hi, lo


@triton.jit
def _load_packed_rows(src, start, offs64, row, mask, TMA: tl.constexpr, BLOCK: tl.constexpr):
    # (hi, lo2, delta) of a tile's rows from the packed row terms (launch._backward_rows
    # with packed: one 16-byte (hi, lo2, delta, 0) word per row, hi already +inf for rows
    # with no key), src a _rows_source of them with HEAD_DIM 4: one descriptor tile, or
    # one pointer load of the tile's words from one base (compiled for sm_90: four 4-byte
    # copies per row, not one 16-byte one), instead of three loads with their own
    # addresses. Rows outside read as 0: their query and dO rows read as 0 too, so P = 1
    # there multiplies zeros and they add nothing to dK or dV.
    t = _load_tile(src, start, offs64, row, mask, TMA)
    even, odd = tl.split(tl.reshape(t, [BLOCK, 2, 2]))  # columns (0, 2) and (1, 3)
    hi, delta = tl.split(even)
    lo, _ = tl.split(odd)
    return hi, lo, delta


@triton.jit
def _finite_rows(x):
    # (rows,) bool: whether every element of a (rows, D) block is finite (NaN < inf and
    # inf < inf are both false).
    ok = tl.abs(x.to(tl.float32)) < float("inf")
    return tl.min(ok.to(tl.int32), 1) > 0


@triton.jit
def _probs(s, hi, lo2):
    # exp((s - hi) - lo) for a (rows, keys) block of natural-unit scores, lo2 = lo * LOG2E:
    # s - hi is taken in natural units (exact where they are close), then one multiply-add
    # converts it and subtracts lo2 (compiled to two fused multiply-adds with the scale).
    return tl.exp2((s - hi[:, None]) * LOG2E - lo2[:, None])


@triton.jit
def _row_terms(h, tok, dil, h_first, l_seg, tiles_per_seg, COMPACT: tl.constexpr):
    # Where the backward's row terms (LSE pair, delta) of a tile's dilated rows lie: the
    # head, the row of dilated position 0 and the step between positions. COMPACT: the
    # launch's own heads and rows (launch._compact_rows), head h at h - h_first, segment s
    # from row s * l_seg, one row per position; else the sequence's rows, token `tok` on,
    # every dil-th.
    head = h
    row0 = tok
    step = dil
    if COMPACT:
        head = h - h_first
        row0 = (tl.program_id(0) // tiles_per_seg).to(tl.int64) * l_seg
        step = 1
    return head, row0, step


@triton.jit
def _key_tiles(m0, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    # Key range [0, hi) of a query tile starting at m0, split at full_hi: the tiles
    # before it are entirely in range and (causal) entirely at or before the tile's
    # first query, so they need no mask; the rest (diagonal, ragged end) go through
    # the masked loop.
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    hi = len_k
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(len_k, m0 + BLOCK_M)
    return full_hi, hi


@triton.jit
def _keys_ok(kmask, offs64, m_base, row_m, HAS_KPM: tl.constexpr):
    # (BLOCK_N,) bool: the keys of a tile that exist and are not padding (HAS_KPM).
    ok = kmask
    if HAS_KPM:
        pad = tl.load(m_base + offs64 * row_m, mask=kmask, other=1)
        ok = ok & (pad == 0)
    return ok


@triton.jit
def _valid_keys(key_ok, offs, offs_m, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    # Which (query, key) pairs of a (BLOCK_M, BLOCK_N) tile count (broadcastable bool),
    # given the tile's _keys_ok. MASK applies the causal mask (only the diagonal tiles need
    # it: the bulk loop skips it). Callers use it only when MASK or HAS_KPM.
    valid = key_ok[None, :]
    if MASK:
        if CAUSAL:
            valid = valid & (offs[None, :] <= offs_m[:, None])
    return valid


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, bad_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
    start, stop, len_k, offs_m, offs_n, sm_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    TMA: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    # Online softmax over key tiles [start, stop). With TMA (Hopper) the score is
    # unit * qk, qk the dot product (negated for a negative scale) and unit = |scale|;
    # rounding to float32 keeps order, so the row maximum m of the scores as computed is
    # unit times that of qk, rounded: only the maximum is scaled (no multiply per score),
    # and P = exp2((unit * qk - m) * LOG2E) takes the product and the subtraction in one
    # fused multiply-add. With pointer loads qk is the score itself (unit 1): compiled for
    # sm_90 the other form raised those kernels' registers from 108-128 to 139-169, past
    # the 128 at which two 8-warp programs fit an SM (not measured on a GPU without TMA).
    # bad_i: rows that attended a key whose value is not finite in a masked tile (there
    # such values are zeroed so that the rows that do not attend them stay finite: 0 * inf
    # would be NaN).
    unit = 1.0
    if TMA:
        unit = tl.abs(sm_scale)
    for n in range(start, stop, BLOCK_N):
        offs = n + offs_n
        kmask = offs < len_k
        offs64 = offs.to(tl.int64)
        k = _load_tile(k_base, n, offs64, row_k, kmask, TMA)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N): scores / unit
        if TMA:
            if NEG_SCALE:
                qk = -qk
        else:
            qk = qk * sm_scale
        if MASK or HAS_KPM:
            key_ok = _keys_ok(kmask, offs64, m_base, row_m, HAS_KPM)
            qk = tl.where(_valid_keys(key_ok, offs, offs_m, MASK, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * unit)
        # A row with no key so far keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((qk * unit - m_safe[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, n, offs64, row_v, kmask, TMA)
        if (MASK and CAUSAL) or HAS_KPM:
            # Keys some rows of the tile skip (the future, padding): zero their values if
            # not finite, and flag the rows that do read one. Per key, never per (query,
            # key) pair (that costs registers in every tile): the first key of the tile
            # that counts and whose value is not finite; a row reads it when it is in
            # range (before or at the row, if causal). (Past a ragged end the rows load
            # as 0 and every row reads every key in range: nothing to do.)
            finite = _finite_rows(v)
            first_bad = tl.min(tl.where(key_ok & ~finite, offs, 2147483647), 0)
            if MASK and CAUSAL:
                bad_i = bad_i | (first_bad <= offs_m)
            else:
                bad_i = bad_i | (first_bad < 2147483647)
            v = tl.where(finite[:, None], v, 0.0).to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i, bad_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Acc, Lse, Kpm, SegStart, SegLen,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
    s_ob, s_on, s_oh, s_ab, s_an, s_ah, s_lb, s_ln, s_lh, s_mb, s_mn,
    seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, kv_group, tiles_per_seg,
    sm_scale, s_lp,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_IN: tl.constexpr, LSE_PAIR: tl.constexpr,
    VARLEN: tl.constexpr, TMA_LOADS: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    # A program per query tile: its output and LSE, merged into what earlier branches
    # left when ACC_IN. LSE_PAIR: Lse holds (hi, lo) planes s_lp apart (ACC_IN needs it),
    # else one LSE. NEG_SCALE: sm_scale < 0 (read with TMA_LOADS only, see _fwd_inner).
    m0, b, h, len_q, len_k, tok_q, tok_k = _tile(
        seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, tiles_per_seg, SegStart, SegLen,
        BLOCK_M, VARLEN,
    )  # fmt: skip
    if m0 >= len_q:
        return
    offs_m, qmask, rows_q = _tile_rows(m0, len_q, tok_q, dil, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = _load_rows(_rows_ptr(Q, b, h, rows_q, s_qb, s_qn, s_qh, offs_d), qmask)
    hk = h // kv_group  # the K/V head this query head reads (grouped-query attention)
    k_base = _rows_source(K, b, hk, tok_k, s_kb, s_kn, s_kh, dil * s_kn, len_k, offs_d,
                          BLOCK_N, HEAD_DIM, TMA_LOADS)  # fmt: skip
    v_base = _rows_source(V, b, hk, tok_k, s_vb, s_vn, s_vh, dil * s_vn, len_k, offs_d,
                          BLOCK_N, HEAD_DIM, TMA_LOADS)  # fmt: skip
    m_base = Kpm + b * s_mb + tok_k * s_mn
    row_k = dil * s_kn
    row_v = dil * s_vn
    row_m = dil * s_mn

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bad_i = tl.zeros([BLOCK_M], dtype=tl.int1)
    full_hi, hi = _key_tiles(m0, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i, bad_i = _fwd_inner(
        acc, l_i, m_i, bad_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
        0, full_hi, len_k, offs_m, offs_n, sm_scale, BLOCK_N, False, CAUSAL, HAS_KPM, TMA_LOADS,
        NEG_SCALE,
    )  # fmt: skip
    acc, l_i, m_i, bad_i = _fwd_inner(
        acc, l_i, m_i, bad_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
        full_hi, hi, len_k, offs_m, offs_n, sm_scale, BLOCK_N, True, CAUSAL, HAS_KPM, TMA_LOADS,
        NEG_SCALE,
    )  # fmt: skip

    # A row with a key has l > 0, or l = NaN where a score was NaN (a non-finite key): it
    # must stay NaN, not pass for a row without keys, which later branches would drop.
    has_key = l_i != 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    # A row that attends a non-finite value has no finite output.
    out = tl.where(bad_i[:, None], float("nan"), out)
    # This tile's LSE pair: the row maximum as computed, and log(l) relative to it. On a
    # GPU the maximum skips NaN scores: a row whose only keys are NaN keeps m = -inf with
    # l = NaN, and gets hi = 0 so that no merge takes it for a row without keys.
    lse_hi = tl.where(has_key, tl.where(m_i == float("-inf"), 0.0, m_i), float("-inf"))
    lse_lo = tl.log2(l_safe) * LN2
    lse_ptrs = _ptr(Lse, b, h, rows_q, s_lb, s_ln, s_lh)
    if ACC_IN:
        # Merge with what earlier branches left (the LSE rule that mixes branches), with
        # weights relative to the larger hi: never from a sum of two large LSEs.
        # (Through a tensor descriptor with TMA_LOADS: no (BLOCK_M, D) tile of addresses
        # in registers, which keeps the D=64 forms at two programs per SM on Hopper.)
        acc_src = _rows_source(Acc, b, h, tok_q, s_ab, s_an, s_ah, dil * s_an, len_q, offs_d,
                               BLOCK_M, HEAD_DIM, TMA_LOADS)  # fmt: skip
        acc_old = _load_tile(acc_src, m0, offs_m.to(tl.int64), dil * s_an, qmask, TMA_LOADS)
        acc_old = acc_old.to(tl.float32)
        hi_old = tl.load(lse_ptrs, mask=qmask, other=float("-inf"))
        lo_old = tl.load(lse_ptrs + s_lp, mask=qmask, other=0.0)
        # No branch wrote this row yet (hi -inf): the accumulator was never
        # initialised there, so do not read it (saves a zero-fill pass).
        acc_old = tl.where((hi_old == float("-inf"))[:, None], 0.0, acc_old)
        mx = tl.maximum(hi_old, lse_hi)
        shift = tl.where(mx == float("-inf"), 0.0, mx)
        w_old = tl.exp2(((hi_old - shift) + lo_old) * LOG2E)
        w_new = tl.exp2(((lse_hi - shift) + lse_lo) * LOG2E)
        tot = w_old + w_new
        tot_safe = tl.where(tot > 0.0, tot, 1.0)
        out = (w_old[:, None] * acc_old + w_new[:, None] * out) / tot_safe[:, None]
        lse_hi = mx
        lse_lo = tl.log2(tot_safe) * LN2
    _store_rows(_rows_ptr(Out, b, h, rows_q, s_ob, s_on, s_oh, offs_d), out, qmask)
    if LSE_PAIR:
        tl.store(lse_ptrs, lse_hi, mask=qmask)
        tl.store(lse_ptrs + s_lp, lse_lo, mask=qmask)
    else:
        # One LSE (block operations of the ring).
        tl.store(lse_ptrs, lse_hi + lse_lo, mask=qmask)


@triton.jit
def _joint_tile(
    Programs, Rates, Head0, n, unit, num_programs, num_heads, BLOCK_M: tl.constexpr,
    NUM_BRANCHES: tl.constexpr,
):  # fmt: skip
    # The tile of the joint kernels (_joint_fwd_kernel, _joint_dq_kernel: query rows;
    # _joint_dkdv_kernel: key rows, the same classes, BLOCK_M its key tile) this program
    # runs. Every branch of a softmax-mixing plan whose rates and segment lengths nest
    # (each divides the next, the first rate 1, the first segment length a multiple of
    # the last rate; launch._joint_branches) runs in one launch: a query's keys are those
    # of every branch that covers it. With offsets o_j = (h - head0_j) % r_j that nest
    # too, a position covered by branch j is covered by every branch before it, so each
    # position has a class c (the last branch that covers it), and the positions of a
    # class within a unit (the first segment length, which divides every other) are
    # views of constant stride: for c below the last branch, the residues o_c + i * r_c
    # modulo r_{c+1} other than o_{c+1}, stride r_{c+1}; for the last, o_c modulo r_c.
    # Programs[e] = (c, view, tile) lists them heaviest first; grid axis 0 = (unit,
    # entry): the programs of a unit run side by side and share its keys in L2; axis 1
    # = (batch, head). Returns c, b (int64), h, the unit's first token (int64), the
    # tile's first position in its view, the view's length, its first token and stride.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    e = pid % num_programs
    u = pid // num_programs
    c = tl.load(Programs + 3 * e)
    view = tl.load(Programs + 3 * e + 1)
    m0 = tl.load(Programs + 3 * e + 2) * BLOCK_M
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    r_c = tl.load(Rates + c)
    resid = (h - tl.load(Head0 + c)) % r_c
    stride = r_c
    if c < NUM_BRANCHES - 1:
        r_n = tl.load(Rates + c + 1)
        o_n = (h - tl.load(Head0 + c + 1)) % r_n
        skip = (o_n - resid) // r_c  # the residue of the next branch, not this class
        resid = resid + (view + (view >= skip).to(tl.int32)) * r_c
        stride = r_n
    first = u.to(tl.int64) * unit
    len_q = _dilated_len(tl.minimum(unit, n - first).to(tl.int32), resid, stride)
    return c, b, h, first, m0, len_q, first + resid, stride


@triton.jit
def _joint_rows(j, Rates, Segs, Head0, h, first, n):
    # Branch j's dilated positions of head h in the segment holding the unit that starts
    # at token `first`: its rate (the step between them), the first one's token (int64)
    # and how many there are.
    r_j = tl.load(Rates + j)
    w_j = tl.load(Segs + j)
    o_j = (h - tl.load(Head0 + j)) % r_j
    seg_first = (first // w_j) * w_j
    length = _dilated_len(tl.minimum(w_j, n - seg_first).to(tl.int32), o_j, r_j)
    return r_j, seg_first + o_j, length


@triton.jit
def _joint_branch(
    j, Rates, Segs, Head0, K, V, Kpm, b, h, hk, first, n, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
    s_mb, s_mn, offs_d, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA_LOADS: tl.constexpr,
):  # fmt: skip
    # Branch j's keys for a tile of the unit starting at token `first`, as the inner
    # loops (_fwd_inner, _bwd_dq_inner) read them: the sources of its K and V rows (K/V
    # head hk), the padding mask's base, the three row steps, the number of dilated keys
    # of its segment there and where its whole key tiles end.
    r_j, tok_k, len_k = _joint_rows(j, Rates, Segs, Head0, h, first, n)
    k_base = _rows_source(K, b, hk, tok_k, s_kb, s_kn, s_kh, r_j * s_kn, len_k, offs_d,
                          BLOCK_N, HEAD_DIM, TMA_LOADS)  # fmt: skip
    v_base = _rows_source(V, b, hk, tok_k, s_vb, s_vn, s_vh, r_j * s_vn, len_k, offs_d,
                          BLOCK_N, HEAD_DIM, TMA_LOADS)  # fmt: skip
    m_base = Kpm + b * s_mb + tok_k * s_mn
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    return k_base, v_base, m_base, r_j * s_kn, r_j * s_vn, r_j * s_mn, len_k, full_hi


@triton.jit
def _joint_fwd_kernel(
    Q, K, V, Out, Lse, Kpm, Programs, Rates, Segs, Head0,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
    s_ob, s_on, s_oh, s_lb, s_ln, s_lh, s_mb, s_mn,
    n, unit, num_programs, num_heads, kv_group, sm_scale, s_lp,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BRANCHES: tl.constexpr, HAS_KPM: tl.constexpr, TMA_LOADS: tl.constexpr,
    NEG_SCALE: tl.constexpr,
):  # fmt: skip
    # Every branch in one launch (_joint_tile): one online softmax per query over the
    # keys of every branch that covers it, which is the LSE merge of the branches'
    # outputs, so no fp32 accumulator; out and the LSE pair written once.
    c, b, h, first, m0, len_q, tok_q, stride = _joint_tile(
        Programs, Rates, Head0, n, unit, num_programs, num_heads, BLOCK_M, NUM_BRANCHES
    )
    if m0 >= len_q:
        return
    offs_m, qmask, rows_q = _tile_rows(m0, len_q, tok_q, stride, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(_rows_ptr(Q, b, h, rows_q, s_qb, s_qn, s_qh, offs_d), qmask)
    hk = h // kv_group

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bad_i = tl.zeros([BLOCK_M], dtype=tl.int1)
    for j in range(0, c + 1):  # the branches that cover class c
        k_base, v_base, m_base, row_k, row_v, row_m, len_k, full_hi = _joint_branch(
            j, Rates, Segs, Head0, K, V, Kpm, b, h, hk, first, n, s_kb, s_kn, s_kh,
            s_vb, s_vn, s_vh, s_mb, s_mn, offs_d, BLOCK_N, HEAD_DIM, TMA_LOADS,
        )  # fmt: skip
        acc, l_i, m_i, bad_i = _fwd_inner(
            acc, l_i, m_i, bad_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
            0, full_hi, len_k, offs_m, offs_n, sm_scale, BLOCK_N, False, False, HAS_KPM,
            TMA_LOADS, NEG_SCALE,
        )  # fmt: skip
        acc, l_i, m_i, bad_i = _fwd_inner(
            acc, l_i, m_i, bad_i, q, k_base, v_base, m_base, row_k, row_v, row_m,
            full_hi, len_k, len_k, offs_m, offs_n, sm_scale, BLOCK_N, True, False, HAS_KPM,
            TMA_LOADS, NEG_SCALE,
        )  # fmt: skip
    # The epilogue of _fwd_kernel without a merge (see there), except for a row with a
    # score of +inf: its l is NaN (inf - inf), and its LSE is +inf (lo = 0 after hi =
    # +inf), as the per-branch launches' merge and the dense softmax give it; a NaN LSE
    # would make the backward's P NaN for every key of the row.
    has_key = l_i != 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(bad_i[:, None], float("nan"), out)
    lse_hi = tl.where(has_key, tl.where(m_i == float("-inf"), 0.0, m_i), float("-inf"))
    lse_lo = tl.where(m_i == float("inf"), 0.0, tl.log2(l_safe) * LN2)
    _store_rows(_rows_ptr(Out, b, h, rows_q, s_ob, s_on, s_oh, offs_d), out, qmask)
    lse_ptrs = _ptr(Lse, b, h, rows_q, s_lb, s_ln, s_lh)
    tl.store(lse_ptrs, lse_hi, mask=qmask)
    tl.store(lse_ptrs + s_lp, lse_lo, mask=qmask)


@triton.jit
def _zero_uncovered_kernel(
    X0, X1, X2, Cover, n, num_heads, s_b, s_n, s_h,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, NUM: tl.constexpr,
):  # fmt: skip
    # Zeros into the (position, head) rows that no branch covers of NUM (1 to 3)
    # (B, N, H, D) tensors with the same strides. Cover: per head the rate r, offset o
    # and segment length w of the one branch that runs it (three int32 rows of
    # num_heads; o = -1 where none does). Position p is covered iff (p mod w) mod r == o.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    r = tl.load(Cover + h)
    o = tl.load(Cover + num_heads + h)
    w = tl.load(Cover + 2 * num_heads + h)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    zero = (rows < n) & ((rows % w) % r != o)
    off = _rows_off(b, h, rows, s_b, s_n, s_h, tl.arange(0, HEAD_DIM))
    z = tl.zeros((BLOCK, HEAD_DIM), dtype=tl.float32)
    _store_rows(X0 + off, z, zero)
    if NUM > 1:
        _store_rows(X1 + off, z, zero)
    if NUM > 2:
        _store_rows(X2 + off, z, zero)


# --------------------------------------------------------------------------- backward


@triton.jit
def _delta_kernel(
    DO, Out, Delta, Lse, n, num_heads,
    s_db, s_dn, s_dh, s_ob, s_on, s_oh, s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_ep,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr = False,
    LSE_PAIR: tl.constexpr = False,
):  # fmt: skip
    # delta[b, p, h] = sum_d dO * O, in fp32: the softmax-backward row term.
    # PACK: Delta is the delta of the packed row terms (launch._backward_rows), two
    # elements into each row's 16-byte word, and the whole word (hi, lo2, delta, 0) is
    # written here: hi from Lse with -inf (a row with no key) as +inf, lo2 = lo * log2(e)
    # from the plane s_ep after it (LSE_PAIR; else 0).
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = rows < n
    offs_d = tl.arange(0, HEAD_DIM)
    do = _load_rows(_rows_ptr(DO, b, h, rows, s_db, s_dn, s_dh, offs_d), mask)
    o = _load_rows(_rows_ptr(Out, b, h, rows, s_ob, s_on, s_oh, offs_d), mask)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if PACK:
        lse_ptrs = _ptr(Lse, b, h, rows, s_eb, s_en, s_eh)
        hi = tl.load(lse_ptrs, mask=mask, other=0.0)
        hi = tl.where(hi == float("-inf"), float("inf"), hi)
        if LSE_PAIR:
            lo2 = tl.load(lse_ptrs + s_ep, mask=mask, other=0.0) * LOG2E
        else:
            lo2 = tl.zeros_like(hi)
        c = tl.arange(0, 4)[None, :]
        word = tl.where(c == 0, hi[:, None], tl.where(c == 1, lo2[:, None], 0.0))
        word = tl.where(c == 2, delta[:, None], word)
        word_ptrs = _ptr(Delta - 2, b, h, rows[:, None], s_lb, s_ln, s_lh) + c
        tl.store(word_ptrs, word, mask=mask[:, None])
    else:
        tl.store(_ptr(Delta, b, h, rows, s_lb, s_ln, s_lh), delta, mask=mask)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, dl_base, row_q, row_do, row_l, row_dl, s_lp,
    start, stop, len_q, offs_n, keep_k, sm_scale, k_dq, dqa_base, row_dqa, dq_desc,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr, LSE_PAIR: tl.constexpr,
    DQ_ADD: tl.constexpr, TMA: tl.constexpr, SCALAR_BASE: tl.constexpr, EVEN: tl.constexpr,
    PACKED: tl.constexpr = False, DP_FIRST: tl.constexpr = True,
):  # fmt: skip
    # Transposed formulation: scores are (keys, queries), so dK/dV stay in registers.
    # DQ_ADD 0: dQ has its own kernel (recomputing S and dP; deterministic). 1: this
    # kernel adds scale * dS K into an fp32 dQ buffer with atomics on pointers; 2: with
    # the tensor memory accelerator's bulk reduce-add (a descriptor of the buffer's
    # dilated rows, Hopper and later). k_dq: k with non-finite rows zeroed where pairs
    # may be masked (the dQ kernel's rule).
    # In this layout each thread holds a slice of the LSE and delta of every query of
    # the tile. SCALAR_BASE: their addresses are a 64-bit scalar per tile plus
    # loop-invariant 32-bit row offsets (not a 64-bit product per row and step), and
    # EVEN: every query tile of [start, stop) is whole (no masks on those loads).
    # PACKED: lse_base is a _rows_source of the packed row terms (_load_packed_rows) and
    # dl_base unused.
    if SCALAR_BASE and not PACKED:
        loc_l = tl.arange(0, BLOCK_M) * row_l
        loc_dl = tl.arange(0, BLOCK_M) * row_dl
    for m in range(start, stop, BLOCK_M):
        offs = m + tl.arange(0, BLOCK_M)
        qmask = offs < len_q
        offs64 = offs.to(tl.int64)
        q = _load_tile(q_base, m, offs64, row_q, qmask, TMA)
        do = _load_tile(do_base, m, offs64, row_do, qmask, TMA)
        if PACKED:
            hi, lo, delta = _load_packed_rows(lse_base, m, offs64, row_l, qmask, TMA, BLOCK_M)
        elif SCALAR_BASE:
            m64 = tl.cast(m, tl.int64)
            hi, lo = _load_lse((lse_base + m64 * row_l) + loc_l, s_lp, qmask, LSE_PAIR, EVEN)
            dl_ptrs = (dl_base + m64 * row_dl) + loc_dl
            if EVEN:
                delta = tl.load(dl_ptrs)
            else:
                delta = tl.load(dl_ptrs, mask=qmask, other=0.0)
        else:
            hi, lo = _load_lse(lse_base + offs64 * row_l, s_lp, qmask, LSE_PAIR)
            delta = tl.load(dl_base + offs64 * row_dl, mask=qmask, other=0.0)
        qk_t = tl.dot(k, tl.trans(q)) * sm_scale
        if DP_FIRST:
            # V dO^T does not need P: issued here, its tensor-core work runs while the
            # exp2 below does (issued after P V's update, it waited for the exp: on an
            # H100 at N = 1M the joint dK/dV kernel took 75.9 -> 68.4 ms at D=64, 148.0
            # -> 130.3 at D=128; docs/triton.md). The causal kernel keeps the old order:
            # compiled for sm_90 this order raised its spills (D=64: 116-272 -> 196-512
            # bytes per thread), and a causal call took 126.2 -> 138.6 ms with it.
            dp_t = tl.dot(v, tl.trans(do))
        p_t = tl.exp2((qk_t - hi[None, :]) * LOG2E - lo[None, :])
        if MASK:
            p_t = tl.where(offs[None, :] >= offs_n[:, None], p_t, 0.0)
        if HAS_KPM or DQ_ADD > 0:
            # Key rows past the segment (a ragged last tile) load as 0 and score 0: below
            # an LSE of about -88 their P overflows. DK/DV never store those rows, but a
            # fused dQ would add their inf * 0 = NaN, so they count nowhere.
            p_t = tl.where(keep_k[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        if not DP_FIRST:
            dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if MASK or HAS_KPM:
            # Pairs that do not count give 0 even where a value is not finite (0 * inf).
            ds_t = tl.where(p_t == 0.0, 0.0, ds_t)
        dk += tl.dot(ds_t.to(q.dtype), q)
        if DQ_ADD > 0:
            dq = tl.dot(tl.trans(ds_t.to(k_dq.dtype)), k_dq) * sm_scale  # (BLOCK_M, D)
            if DQ_ADD == 1:
                ptrs = dqa_base + offs64[:, None] * row_dqa
                tl.atomic_add(ptrs, dq, mask=qmask[:, None], sem="relaxed")
            else:
                dq_desc.atomic_add([m, 0], dq)  # rows past len_q fall outside the descriptor
    return dk, dv


@triton.jit
def _bwd_dkdv_head(
    dk, dv, k, v, k_dq, keep_k, offs_n, offs_d, n0, b, h, tok_q, len_q,
    Q, DO, Lse, Delta, DQacc,
    s_qb, s_qn, s_qh, s_db, s_dn, s_dh, s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_cb, s_cn, s_ch,
    dil, h_first, tiles_per_seg, sm_scale, s_lp, l_seg,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, LSE_PAIR: tl.constexpr,
    DQ_ADD: tl.constexpr, TMA_LOADS: tl.constexpr, COMPACT: tl.constexpr,
    PACKED: tl.constexpr = False,
):  # fmt: skip
    # Query head h's share of the key tile's dK and dV (unscaled dK), added to dk, dv.
    # PACKED: Lse holds the packed row terms (_load_packed_rows; Delta unused).
    q_base = _rows_source(Q, b, h, tok_q, s_qb, s_qn, s_qh, dil * s_qn, len_q, offs_d,
                          BLOCK_M, HEAD_DIM, TMA_LOADS)  # fmt: skip
    do_base = _rows_source(DO, b, h, tok_q, s_db, s_dn, s_dh, dil * s_dn, len_q, offs_d,
                           BLOCK_M, HEAD_DIM, TMA_LOADS)  # fmt: skip
    lh, lrow0, lstep = _row_terms(h, tok_q, dil, h_first, l_seg, tiles_per_seg, COMPACT)
    lse_base = _ptr(Lse, b, lh, lrow0, s_lb, s_ln, s_lh)
    dl_base = _ptr(Delta, b, lh, lrow0, s_eb, s_en, s_eh)
    if PACKED:
        lse_base = _rows_source(Lse, b, lh, lrow0, s_lb, s_ln, s_lh, lstep * s_ln, len_q,
                                tl.arange(0, 4), BLOCK_M, 4, TMA_LOADS)  # fmt: skip
    dqa_base = _ptr(DQacc, b, h, tok_q, s_cb, s_cn, s_ch) + offs_d[None, :]
    dq_desc = 0
    if DQ_ADD == 2:
        dq_desc = tl.make_tensor_descriptor(
            _ptr(DQacc, b, h, tok_q, s_cb, s_cn, s_ch), shape=[len_q, HEAD_DIM],
            strides=[dil * s_cn, 1], block_shape=[BLOCK_M, HEAD_DIM],
        )  # fmt: skip
    # Not causal, dQ in its own kernel: the LSE and delta addressed from a scalar base,
    # the query tiles in two loops, the whole tiles (no masks, so that the row terms of
    # consecutive rows load as wide words) and the segment's ragged last tile. On an
    # H100 (N = 1M) that made the D = 128 dK/dV kernels of LongNet's layer 16% faster.
    # At D <= 64 tiles of 32 queries keep the per-row form (compiled for sm_90, the
    # loop-invariant offsets add spills to the 32 x 128 tile, which already spills;
    # 64 x 64 and 64 x 128 take them without spilling); the causal
    # kernel (a third, masked loop) lost 3-5% with it; the DQ_ADD forms, which already
    # spill more, keep the per-row form too (not measured with this one).
    SCALAR_BASE: tl.constexpr = not CAUSAL and DQ_ADD == 0 and (HEAD_DIM > 64 or BLOCK_M >= 64)
    # Causal: queries before the key tile see none of it; query tiles that start at or
    # after the tile's last key need no mask; the ones in between straddle the diagonal.
    lo = 0
    free = 0
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        free = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, len_q)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, dl_base,
            dil * s_qn, dil * s_dn, lstep * s_ln, lstep * s_en, s_lp,
            lo, free, len_q, offs_n, keep_k, sm_scale, k_dq, dqa_base, dil * s_cn, dq_desc,
            BLOCK_M, True, HAS_KPM, LSE_PAIR, DQ_ADD, TMA_LOADS, SCALAR_BASE, False, PACKED,
            not CAUSAL,
        )  # fmt: skip
    whole = free
    if SCALAR_BASE:
        whole = tl.maximum((len_q // BLOCK_M) * BLOCK_M, free)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, dl_base,
            dil * s_qn, dil * s_dn, lstep * s_ln, lstep * s_en, s_lp,
            free, whole, len_q, offs_n, keep_k, sm_scale, k_dq, dqa_base, dil * s_cn, dq_desc,
            BLOCK_M, False, HAS_KPM, LSE_PAIR, DQ_ADD, TMA_LOADS, True, True, PACKED,
            not CAUSAL,
        )  # fmt: skip
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, dl_base,
        dil * s_qn, dil * s_dn, lstep * s_ln, lstep * s_en, s_lp,
        whole, len_q, len_q, offs_n, keep_k, sm_scale, k_dq, dqa_base, dil * s_cn, dq_desc,
        BLOCK_M, False, HAS_KPM, LSE_PAIR, DQ_ADD, TMA_LOADS, SCALAR_BASE, False, PACKED,
        not CAUSAL,
    )  # fmt: skip
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DKacc, DVacc, DQacc, Kpm, SegStart, SegLen,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_gb, s_gn, s_gh, s_ab, s_an, s_ah,
    s_cb, s_cn, s_ch, s_mb, s_mn,
    seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, kv_group, tiles_per_seg,
    sm_scale, s_lp, l_seg,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_IN: tl.constexpr, LSE_PAIR: tl.constexpr,
    VARLEN: tl.constexpr, DQ_ADD: tl.constexpr, TMA_LOADS: tl.constexpr, COMPACT: tl.constexpr,
    GROUPED: tl.constexpr, PACKED: tl.constexpr = False,
):  # fmt: skip
    # A program per key tile. s_g*: strides of DK and DV (same layout); s_a*: strides
    # of DKacc and DVacc; s_c*: strides of DQacc, the fp32 dQ buffer that DQ_ADD > 0
    # adds this tile's share of dQ into (unused with DQ_ADD 0). Lse and Delta: the row
    # terms, laid out as _row_terms says (l_seg, COMPACT); PACKED: Lse holds them as packed
    # words (_load_packed_rows).
    # GROUPED (grouped-query attention, DQ_ADD 0, the launch's heads whole K/V groups):
    # a program per key tile of each (K/V head, offset class); DK, DV and their
    # accumulators have the K/V heads. Else a program per key tile of each query head,
    # DK, DV and the accumulators per query head (the launcher sums them per K/V head).
    n0, b, h, len_q, len_k, tok_q, tok_k = _tile(
        seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, tiles_per_seg, SegStart, SegLen,
        BLOCK_N, VARLEN, kv_group, GROUPED,
    )  # fmt: skip
    if n0 >= len_k:
        return
    offs_n, kmask, rows_k = _tile_rows(n0, len_k, tok_k, dil, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    hk = h // kv_group  # the K/V head
    k = _load_rows(_rows_ptr(K, b, hk, rows_k, s_kb, s_kn, s_kh, offs_d), kmask)
    v = _load_rows(_rows_ptr(V, b, hk, rows_k, s_vb, s_vn, s_vh, offs_d), kmask)
    keep_k = kmask
    if HAS_KPM:
        keep_k = tl.load(Kpm + b * s_mb + rows_k * s_mn, mask=kmask, other=1) == 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    k_dq = k
    if DQ_ADD > 0 and (HAS_KPM or CAUSAL):
        # Masked pairs give 0 to dQ even where their key is not finite (padded keys
        # holding garbage, say); rows past the segment already load as 0.
        k_dq = tl.where(tl.abs(k.to(tl.float32)) < float("inf"), k, 0.0).to(k.dtype)
    if GROUPED:
        # The query heads of K/V head hk with this program's offset: h, h + dil, ... below
        # the group's end (h is the first; the group's first head is a multiple of
        # kv_group, so h % kv_group is the class). They read the same key rows, so their
        # shares add up here and the tile is stored once, per K/V head.
        for j in range(tl.cdiv(kv_group - h % kv_group, dil)):
            dk, dv = _bwd_dkdv_head(
                dk, dv, k, v, k_dq, keep_k, offs_n, offs_d, n0, b, h + j * dil, tok_q, len_q,
                Q, DO, Lse, Delta, DQacc,
                s_qb, s_qn, s_qh, s_db, s_dn, s_dh, s_lb, s_ln, s_lh, s_eb, s_en, s_eh,
                s_cb, s_cn, s_ch, dil, h_first, tiles_per_seg, sm_scale, s_lp, l_seg,
                HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, LSE_PAIR, DQ_ADD, TMA_LOADS, COMPACT,
                PACKED,
            )  # fmt: skip
        h_out = hk
    else:
        # One head, called outside any loop, as before the grouped form existed: compiled
        # for sm_90 its forms keep the registers and spills they had then
        # (benchmarks/kernel_resources.py's helpers).
        dk, dv = _bwd_dkdv_head(
            dk, dv, k, v, k_dq, keep_k, offs_n, offs_d, n0, b, h, tok_q, len_q,
            Q, DO, Lse, Delta, DQacc,
            s_qb, s_qn, s_qh, s_db, s_dn, s_dh, s_lb, s_ln, s_lh, s_eb, s_en, s_eh,
            s_cb, s_cn, s_ch, dil, h_first, tiles_per_seg, sm_scale, s_lp, l_seg,
            HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, LSE_PAIR, DQ_ADD, TMA_LOADS, COMPACT,
            PACKED,
        )  # fmt: skip
        h_out = h
    dk = dk * sm_scale
    acc_off = _rows_off(b, h_out, rows_k, s_ab, s_an, s_ah, offs_d)
    out_off = _rows_off(b, h_out, rows_k, s_gb, s_gn, s_gh, offs_d)
    # dV first, then dK: one accumulator tile read at a time (fewer live registers).
    if ACC_IN:
        dv += _load_rows(DVacc + acc_off, kmask)
    _store_rows(DV + out_off, dv, kmask)
    if ACC_IN:
        dk += _load_rows(DKacc + acc_off, kmask)
    _store_rows(DK + out_off, dk, kmask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, hi, lo, delta, k_base, v_base, m_base, row_k, row_v, row_m,
    start, stop, len_k, offs_m, sm_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    for n in range(start, stop, BLOCK_N):
        offs = n + tl.arange(0, BLOCK_N)
        kmask = offs < len_k
        offs64 = offs.to(tl.int64)
        k = _load_tile(k_base, n, offs64, row_k, kmask, TMA)
        v = _load_tile(v_base, n, offs64, row_v, kmask, TMA)
        p = _probs(tl.dot(q, tl.trans(k)) * sm_scale, hi, lo)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if MASK or HAS_KPM:
            key_ok = _keys_ok(kmask, offs64, m_base, row_m, HAS_KPM)
            valid = _valid_keys(key_ok, offs, offs_m, MASK, CAUSAL)
            # Pairs that do not count give 0 even where a key or value is not finite.
            ds = tl.where(valid, ds, 0.0)
            if CAUSAL or HAS_KPM:
                # Keys some rows skip: a non-finite key must not reach them through
                # 0 * inf. (Past a ragged end keys load as 0; every row reads the rest.)
                k = tl.where(tl.abs(k.to(tl.float32)) < float("inf"), k, 0.0).to(k.dtype)
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DQacc, Kpm, SegStart, SegLen,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_gb, s_gn, s_gh, s_ab, s_an, s_ah, s_mb, s_mn,
    seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, kv_group, tiles_per_seg,
    sm_scale, s_lp, l_seg,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_IN: tl.constexpr, LSE_PAIR: tl.constexpr,
    VARLEN: tl.constexpr, TMA_LOADS: tl.constexpr, COMPACT: tl.constexpr,
):  # fmt: skip
    # A program per query tile. s_g*: strides of DQ; s_a*: strides of DQacc. Lse and
    # Delta: the row terms, laid out as _row_terms says (l_seg, COMPACT).
    m0, b, h, len_q, len_k, tok_q, tok_k = _tile(
        seg_q, seg_k, n_q, n_k, dil, head0, h_first, num_heads, tiles_per_seg, SegStart, SegLen,
        BLOCK_M, VARLEN,
    )  # fmt: skip
    if m0 >= len_q:
        return
    offs_m, qmask, rows_q = _tile_rows(m0, len_q, tok_q, dil, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(_rows_ptr(Q, b, h, rows_q, s_qb, s_qn, s_qh, offs_d), qmask)
    do = _load_rows(_rows_ptr(DO, b, h, rows_q, s_db, s_dn, s_dh, offs_d), qmask)
    lh, lrow0, lstep = _row_terms(h, tok_q, dil, h_first, l_seg, tiles_per_seg, COMPACT)
    lrows = lrow0 + offs_m.to(tl.int64) * lstep
    lse_hi, lse_lo = _load_lse(_ptr(Lse, b, lh, lrows, s_lb, s_ln, s_lh), s_lp, qmask, LSE_PAIR)
    delta = tl.load(_ptr(Delta, b, lh, lrows, s_eb, s_en, s_eh), mask=qmask, other=0.0)
    hk = h // kv_group  # the K/V head this query head reads (grouped-query attention)
    k_base = _rows_source(K, b, hk, tok_k, s_kb, s_kn, s_kh, dil * s_kn, len_k, offs_d,
                          BLOCK_N, HEAD_DIM, TMA_LOADS)  # fmt: skip
    v_base = _rows_source(V, b, hk, tok_k, s_vb, s_vn, s_vh, dil * s_vn, len_k, offs_d,
                          BLOCK_N, HEAD_DIM, TMA_LOADS)  # fmt: skip
    m_base = Kpm + b * s_mb + tok_k * s_mn
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_hi, hi = _key_tiles(m0, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_inner(
        dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, m_base, dil * s_kn, dil * s_vn, dil * s_mn,
        0, full_hi, len_k, offs_m, sm_scale, BLOCK_N, False, CAUSAL, HAS_KPM, TMA_LOADS,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, m_base, dil * s_kn, dil * s_vn, dil * s_mn,
        full_hi, hi, len_k, offs_m, sm_scale, BLOCK_N, True, CAUSAL, HAS_KPM, TMA_LOADS,
    )  # fmt: skip
    dq = dq * sm_scale
    if ACC_IN:
        dq += _load_rows(_rows_ptr(DQacc, b, h, rows_q, s_ab, s_an, s_ah, offs_d), qmask)
    _store_rows(_rows_ptr(DQ, b, h, rows_q, s_gb, s_gn, s_gh, offs_d), dq, qmask)


@triton.jit
def _joint_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Kpm, Programs, Rates, Segs, Head0,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_gb, s_gn, s_gh, s_mb, s_mn,
    n, unit, num_programs, num_heads, kv_group, sm_scale, s_lp,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BRANCHES: tl.constexpr, HAS_KPM: tl.constexpr, TMA_LOADS: tl.constexpr,
):  # fmt: skip
    # dQ of every branch in one launch (_joint_tile): a query tile's dQ summed over the
    # keys of every branch that covers it, in registers, written once in dQ's dtype (no
    # fp32 accumulator). Lse and Delta: the backward's heads-first row terms of the
    # whole sequence (_row_terms without COMPACT).
    c, b, h, first, m0, len_q, tok_q, stride = _joint_tile(
        Programs, Rates, Head0, n, unit, num_programs, num_heads, BLOCK_M, NUM_BRANCHES
    )
    if m0 >= len_q:
        return
    offs_m, qmask, rows_q = _tile_rows(m0, len_q, tok_q, stride, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(_rows_ptr(Q, b, h, rows_q, s_qb, s_qn, s_qh, offs_d), qmask)
    do = _load_rows(_rows_ptr(DO, b, h, rows_q, s_db, s_dn, s_dh, offs_d), qmask)
    lse_hi, lse_lo = _load_lse(_ptr(Lse, b, h, rows_q, s_lb, s_ln, s_lh), s_lp, qmask, True)
    delta = tl.load(_ptr(Delta, b, h, rows_q, s_eb, s_en, s_eh), mask=qmask, other=0.0)
    hk = h // kv_group
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, c + 1):  # the branches that cover class c
        k_base, v_base, m_base, row_k, row_v, row_m, len_k, full_hi = _joint_branch(
            j, Rates, Segs, Head0, K, V, Kpm, b, h, hk, first, n, s_kb, s_kn, s_kh,
            s_vb, s_vn, s_vh, s_mb, s_mn, offs_d, BLOCK_N, HEAD_DIM, TMA_LOADS,
        )  # fmt: skip
        dq = _bwd_dq_inner(
            dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, m_base, row_k, row_v, row_m,
            0, full_hi, len_k, offs_m, sm_scale, BLOCK_N, False, False, HAS_KPM, TMA_LOADS,
        )  # fmt: skip
        dq = _bwd_dq_inner(
            dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, m_base, row_k, row_v, row_m,
            full_hi, len_k, len_k, offs_m, sm_scale, BLOCK_N, True, False, HAS_KPM, TMA_LOADS,
        )  # fmt: skip
    _store_rows(_rows_ptr(DQ, b, h, rows_q, s_gb, s_gn, s_gh, offs_d), dq * sm_scale, qmask)


@triton.jit
def _joint_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Kpm, Programs, Rates, Segs, Head0,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
    s_lb, s_ln, s_lh, s_eb, s_en, s_eh, s_gb, s_gn, s_gh, s_mb, s_mn,
    n, unit, num_programs, num_heads, kv_group, sm_scale, s_lp,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BRANCHES: tl.constexpr, HAS_KPM: tl.constexpr, TMA_LOADS: tl.constexpr,
    PACKED: tl.constexpr,
):  # fmt: skip
    # dK and dV of every branch in one launch (_joint_tile, over key tiles): a key of
    # class c is read by the queries of every branch j <= c in j's segment holding it,
    # so a program loops over the query tiles of each and sums the key tile's dK and dV
    # in registers, written once in their dtype (no fp32 accumulators). One K/V head per
    # query head (kv_group 1: the launcher runs grouped-query plans per branch). s_g*:
    # strides of DK and DV (the same layout). Lse and Delta: the backward's heads-first
    # row terms of the whole sequence (_row_terms without COMPACT), a branch's rows every
    # r-th.
    c, b, h, first, n0, len_k, tok_k, stride = _joint_tile(
        Programs, Rates, Head0, n, unit, num_programs, num_heads, BLOCK_N, NUM_BRANCHES
    )
    if n0 >= len_k:
        return
    offs_n, kmask, rows_k = _tile_rows(n0, len_k, tok_k, stride, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(_rows_ptr(K, b, h, rows_k, s_kb, s_kn, s_kh, offs_d), kmask)
    v = _load_rows(_rows_ptr(V, b, h, rows_k, s_vb, s_vn, s_vh, offs_d), kmask)
    keep_k = kmask
    if HAS_KPM:
        keep_k = tl.load(Kpm + b * s_mb + rows_k * s_mn, mask=kmask, other=1) == 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for j in range(0, c + 1):  # the branches whose queries read class c
        r_j, tok_q, len_q = _joint_rows(j, Rates, Segs, Head0, h, first, n)
        # The per-branch kernel's loop over branch j's query tiles (not causal, dQ in its
        # own kernel, the sequence's row terms every r_j-th row; DK stands in for the
        # unused fp32 dQ buffer).
        dk, dv = _bwd_dkdv_head(
            dk, dv, k, v, k, keep_k, offs_n, offs_d, n0, b, h, tok_q, len_q,
            Q, DO, Lse, Delta, DK,
            s_qb, s_qn, s_qh, s_db, s_dn, s_dh, s_lb, s_ln, s_lh, s_eb, s_en, s_eh,
            s_gb, s_gn, s_gh, r_j, 0, 1, sm_scale, s_lp, 0,
            HEAD_DIM, BLOCK_M, BLOCK_N, False, HAS_KPM, True, 0, TMA_LOADS, False, PACKED,
        )  # fmt: skip
    # dV first, then dK, as _bwd_dkdv_kernel stores them.
    _store_rows(_rows_ptr(DV, b, h, rows_k, s_gb, s_gn, s_gh, offs_d), dv, kmask)
    _store_rows(_rows_ptr(DK, b, h, rows_k, s_gb, s_gn, s_gh, offs_d), dk * sm_scale, kmask)
