"""Memory estimate of block-sparse attention: what a forward+backward allocates, by part.

Pure arithmetic on the pattern (no tensor is allocated). The sizes follow the code of
the Triton kernels' path (:mod:`.triton_kernels`) and of the ring (:mod:`.ring`); the
kept blocks enter through the index lists and, over a ring, through the key/value
blocks a rank receives and the gradients it sends back.
"""

from __future__ import annotations

import torch

from ..validation import check_bool, check_choice, check_num_kv_heads, check_positive_int
from .patterns import BlockSparsePattern

__all__ = ["block_sparse_memory_estimate"]

GiB = 2**30
# FlexAttention's backward holds one more input-sized buffer than our kernels (measured
# on an H200, torch 2.11: benchmarks/results/block_sparse_nvidia-h200_sweep_20261204.json).
_FLEX_EXTRA_INPUTS = 1


def _list_bytes(mask: torch.Tensor) -> int:
    """Bytes of the cached index lists of a ``(..., Qb, Kb)`` block mask on the device:
    the mask, then for it and its transpose the counts and indices: int32 as they are
    cached, plus the int64 lists they are cast from while they are built (a ring step
    builds them next to its buffers). The sort that builds them briefly takes more
    (int64 over the whole mask), before the attention's own buffers exist on one
    device."""
    counts_q, counts_k = mask.sum(-1), mask.sum(-2)
    heads = mask.shape[0] if mask.dim() == 3 else 1
    kmax_q = max(1, int(counts_q.max()))
    kmax_k = max(1, int(counts_k.max()))
    qb, kb = mask.shape[-2], mask.shape[-1]
    lists = heads * (qb + qb * kmax_q + kb + kb * kmax_k)
    return mask.numel() + lists * (8 + 4)


def _flex_list_bytes(mask: torch.Tensor) -> int:
    """Bytes of the cached FlexAttention ``BlockMask`` of a ``(..., Qb, Kb)`` block mask:
    int32 index tables padded to ``Kb`` (``flex.flex_block_mask``) for the full and the
    partial blocks and their transposes, with their counts. At N = 512K and blocks of
    128 that is 0.25 GiB (measured on an H200:
    benchmarks/results/block_sparse_nvidia-h200_pipelined_long_20261204.json)."""
    heads = mask.shape[0] if mask.dim() == 3 else 1
    qb, kb = mask.shape[-2], mask.shape[-1]
    return heads * 4 * (2 * qb * kb + 2 * kb * qb + 2 * qb + 2 * kb)


def _ring_blocks(mask: torch.Tensor, k: int, position: int) -> tuple[int, int]:
    """Key blocks rank ``position`` of ``k`` receives and sends (any head's rows)."""
    rows = mask.any(0) if mask.dim() == 3 else mask
    n = rows.shape[-1] // k
    owner = torch.arange(rows.shape[-1]) // n
    mine = slice(position * n, (position + 1) * n)
    received = int((rows[mine].any(0) & (owner != position)).sum())
    sent = sum(int(rows[p * n : (p + 1) * n, mine].any(0).sum()) for p in range(k) if p != position)
    return received, sent


def block_sparse_memory_estimate(
    pattern: BlockSparsePattern,
    batch_size: int = 1,
    num_heads: int = 8,
    head_dim: int = 64,
    *,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "triton",
    ring_size: int = 1,
    with_backward: bool = True,
    num_kv_heads: int | None = None,
) -> dict:
    """Per-rank bytes of one forward (+ backward) of block-sparse attention with ``pattern``.

    Counted as the benchmark measures a training step: the caller holds q, k, v and the
    output's gradient (``out.backward(grad)``); the index lists are built once per
    pattern and cached (they are counted; the sort that builds them the first time is
    not). The peak is at the end of the backward:

    - one device (``backend="triton"``): the output and its float32 LSE (saved), the
      backward's heads-first copy of the LSE, the float32 ``delta`` row sums and q/k/v
      gradients in the input dtype: ``9 * T * s`` bytes (``T = B * N * H * D``, ``s``
      the dtype's size) plus ``12 * B * N * H`` and the lists, whatever the sparsity:
      the dropped blocks cost nothing, and nothing is ``N x N``.
    - ``backend="flex"``: FlexAttention's own buffers, modelled as one more input-sized
      buffer (measured on an H200), and its cached ``BlockMask``, whose index tables
      are padded to ``N / block_size`` entries per block row (quadratic in ``N``).
    - grouped-query attention (``num_kv_heads < num_heads``): k, v, their gradients and
      (over a ring) the blocks sent and received have ``num_kv_heads`` heads (the
      Triton dK/dV programs add up a K/V head's query heads themselves; flex's
      grouped-query buffers are modelled as its other calls', not measured on a GPU).
    - a ring of ``k`` ranks (Triton kernels, each rank passes its shard of ``L = N/k``
      tokens): the rank saves its key/value blocks plus the ``R`` blocks it received,
      and in the backward holds float32 gradients of all of them, the float32
      gradients of the ``R`` blocks going back and of the ``S`` blocks coming home,
      and its shard's gradients. ``R`` and ``S`` are the kept blocks of other ranks:
      this is where sparsity saves memory over a ring; the largest rank is reported.

    Args:
        pattern: the pattern of the call (:meth:`BlockSparseAttention.pattern`).
        batch_size, num_heads, head_dim: ``B``, ``H``, ``D``.
        dtype: input dtype; gradients accumulate in float32 over a ring (float64 for
            float64 inputs).
        backend: ``"triton"`` or ``"flex"`` (the CUDA kernels; the pure-PyTorch path
            allocates chunk-sized temporaries and is not modelled).
        ring_size: ranks sharing the sequence (``N/k`` a multiple of the block size).
        with_backward: ``False`` for a forward under ``no_grad``.
        num_kv_heads: K/V heads (a divisor of ``num_heads``; ``None``: ``num_heads``).

    Returns:
        A dict: ``bytes_per_device``, ``total_per_device_gb`` (GiB), ``parts`` (bytes by
        part: ``inputs``, ``output``, ``saved``, ``received_blocks``, ``gradients``,
        ``transfer_buffers``, ``index_lists``), ``kept_blocks`` (kept block pairs),
        ``received_blocks`` / ``sent_blocks`` (ring, the reported rank), ``peak_rank``.
    """
    if not isinstance(pattern, BlockSparsePattern):
        raise TypeError(
            f"pattern must be a BlockSparsePattern, got {type(pattern).__name__}; build it "
            f"with make_block_sparse_pattern(...) or module.pattern(seq_len)."
        )
    B = check_positive_int("batch_size", batch_size)
    H = check_positive_int("num_heads", num_heads)
    D = check_positive_int("head_dim", head_dim)
    k = check_positive_int("ring_size", ring_size)
    check_bool("with_backward", with_backward)
    check_choice("backend", backend, ("triton", "flex"))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    if pattern.per_head and pattern.block_mask.shape[0] != H:
        raise ValueError(
            f"the pattern has one block mask per head for {pattern.block_mask.shape[0]} heads, "
            f"but num_heads={H}."
        )
    H_kv = check_num_kv_heads(num_kv_heads, H)
    N, bs = pattern.seq_len, pattern.block_size
    if k > 1 and (N % k or (N // k) % bs):
        raise ValueError(
            f"a ring of {k} ranks needs N/{k} to be a multiple of block_size={bs}; N={N}."
        )
    if k > 1 and backend == "flex":
        raise ValueError("the ring runs the Triton kernels; pass backend='triton'.")
    s = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    L = N // k
    per_token = B * H * D  # elements of one token of q (or dout, or the output)
    kv_token = B * H_kv * D  # elements of one token of k (or v)
    rows = B * L * H * 4  # one float32 value per query row (lse, delta)
    mask = pattern.block_mask
    parts = dict.fromkeys(
        ("inputs", "output", "saved", "received_blocks", "gradients", "transfer_buffers",
         "index_lists"), 0,
    )  # fmt: skip
    peak_rank, received, sent = 0, 0, 0
    if k == 1:
        q_and_kv = N * (per_token + 2 * kv_token) * s
        parts["inputs"] = q_and_kv + (N * per_token * s if with_backward else 0)  # and dout
        parts["output"] = N * per_token * s
        parts["index_lists"] = _flex_list_bytes(mask) if backend == "flex" else _list_bytes(mask)
        parts["saved"] = rows if with_backward else 0
        if with_backward:
            parts["gradients"] = q_and_kv + rows  # dq, dk, dv and delta
            if backend == "flex":
                parts["gradients"] += _FLEX_EXTRA_INPUTS * N * per_token * s
            else:
                parts["gradients"] += rows  # the LSE, heads-first for the kernels
    else:
        best = None
        for position in range(k):
            r, snd = _ring_blocks(mask, k, position)
            if best is None or (r, snd) > best[:2]:
                best = (r, snd, position)
        received, sent, peak_rank = best
        R, S = received * bs, sent * bs  # tokens
        local_mask = mask[..., peak_rank * (L // bs) : (peak_rank + 1) * (L // bs), :]
        parts["inputs"] = (1 + with_backward) * L * per_token * s + 2 * L * kv_token * s
        parts["output"] = L * per_token * s
        parts["index_lists"] = _list_bytes(local_mask[..., : L // bs + received])
        parts["received_blocks"] = 2 * R * kv_token * s
        parts["saved"] = 2 * L * kv_token * s + (rows if with_backward else 0)  # K/V held
        if with_backward:
            casts = (L * per_token + 2 * L * kv_token) * s if s != acc else 0
            parts["gradients"] = (
                L * per_token * acc  # dq
                + 2 * (L + R) * kv_token * acc  # dK/dV of every held block
                + 2 * L * kv_token * acc  # this rank's dK/dV
                + casts
                + 2 * rows  # delta and the heads-first LSE
            )
            parts["transfer_buffers"] = 2 * (R + S) * kv_token * acc
        else:
            parts["transfer_buffers"] = 2 * R * kv_token * s  # receive buffers
    total = sum(parts.values())
    return {
        "seq_len": N,
        "ring_size": k,
        "local_seq_len": L,
        "backend": backend,
        "dtype": str(dtype),
        "num_kv_heads": H_kv,
        "with_backward": with_backward,
        "kept_blocks": int(pattern.block_mask.sum()),
        "received_blocks": received,
        "sent_blocks": sent,
        "peak_rank": peak_rank,
        "parts": parts,
        "bytes_per_device": total,
        "total_per_device_gb": total / GiB,
    }
