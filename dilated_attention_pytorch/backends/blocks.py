"""Attention of one block of queries against one block of keys, returning ``(out, lse)``.

These are the per-block primitives of the ``pytorch`` backend and of the ring:

- ``math_*``: PyTorch matmuls, any device and dtype, key masks and dropout. Memory
  is bounded by chunking the batch of segments, never ``O(N^2)``.
- ``cudnn_*`` / ``flash_*``: PyTorch's cuDNN and flash-attention ops (the kernels
  behind SDPA), on CUDA for fp16/bf16. They read the strided segment views in place
  and return the LSE; cuDNN is preferred on Hopper and newer, where it is faster.
  :func:`block_kernel` is the one routing rule between them.

All tensors are token-major: q ``(Bb, Lq, Hs, D)``, k/v ``(Bb, Lk, Hk, D)``,
out ``(Bb, Lq, Hs, D)``, lse ``(Bb, Lq, Hs)``. ``Hk`` divides ``Hs``: query head ``i``
reads K/V head ``i // (Hs / Hk)`` (grouped-query attention; ``Hk = Hs`` without it).
The math path folds the query heads that share a K/V head into its rows, so K/V are
read once per K/V head and never copied; the fused ops need equal head counts, so they
run once per position in a run of ``Hs / Hk`` query heads: query heads ``j, j + s,
j + 2s, ...`` (``s = Hs / Hk``, a strided view) read K/V heads ``0, 1, 2, ...``, all of
them, in place; the K/V gradients of the ``s`` calls are summed in float32. ``causal`` means query ``t`` sees
keys ``t' <= t`` of the block (blocks aligned at position 0). The backward takes
the *final* mixed ``out`` and ``lse`` so it yields the exact joint-softmax gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..dropout import DropoutKeys

# Upper bound on score-matrix elements materialised at once by the math path. On CUDA
# 2**24 (64 MiB per fp32 temporary) keeps the GPU busy; on the CPU 2**18 (1 MiB) is as
# fast (the matmuls stay large enough for its cores) and keeps the five or so live
# temporaries of a tile from dominating the layer's memory.
_MAX_SCORE_ELEMENTS = 1 << 24
_MAX_SCORE_ELEMENTS_CPU = 1 << 18


def max_score_elements(device: torch.device) -> int:
    """Score elements one math-path tile may hold on ``device``."""
    return _MAX_SCORE_ELEMENTS if device.type == "cuda" else _MAX_SCORE_ELEMENTS_CPU


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_query_heads(x: Tensor, kv_group: int) -> Tensor:
    """``(..., H, D)`` per query head -> ``(..., H / kv_group, D)`` per K/V head: the sum
    over each K/V head's ``kv_group`` query heads (grouped-query K/V gradients)."""
    return x if kv_group == 1 else x.unflatten(-2, (-1, kv_group)).sum(-2)


def _tiles(Bb: int, Lq: int, Hs: int, Lk: int, budget: int) -> list[tuple[int, int, int, int]]:
    """``(b0, b1, q0, q1)`` tiles whose score matrices hold at most ``budget`` elements.

    Whole blocks are batched while they fit; a block whose ``Lq x Lk`` scores alone are
    too large (a long segment with little dilation) is cut into query rows, so memory
    stays bounded by ``max(budget, Hs * Lk)``, never ``Lq x Lk``.
    """
    row = Hs * max(Lk, 1)
    if Lq * row <= budget:
        step = max(1, budget // max(1, Lq * row))
        return [(a, min(Bb, a + step), 0, Lq) for a in range(0, Bb, step)]
    rows = max(1, budget // row)
    return [(a, a + 1, q0, min(Lq, q0 + rows)) for a in range(Bb) for q0 in range(0, Lq, rows)]


def _fold(x: Tensor, share: int) -> Tensor:
    """``(b, Hs, lq, ...)`` -> ``(b, Hs / share, share * lq, ...)``: the ``share`` query heads
    of one K/V head as extra rows (a view when ``x`` is contiguous, else a copy)."""
    if share == 1:
        return x
    b, hs, lq = x.shape[:3]
    return x.reshape(b, hs // share, share * lq, *x.shape[3:])


def _unfold(x: Tensor, share: int) -> Tensor:
    """The inverse of :func:`_fold`: ``(b, Hk, share * lq, ...)`` -> ``(b, Hk * share, lq, ...)``."""
    if share == 1:
        return x
    b, hk, rows = x.shape[:3]
    return x.reshape(b, hk * share, rows // share, *x.shape[3:])


def _masked_scores(
    q: Tensor,
    k: Tensor,
    scale: float,
    causal: bool,
    key_keep: Tensor | None,
    q_start: int,
    share: int = 1,
) -> Tensor:
    # q: (b, Hk, share * lq, D): query rows [q_start, q_start + lq) of the block for each of
    # the share heads of a K/V head; k: (b, Hk, Lk, D) -> scores (b, Hk, share * lq, Lk)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        lq, Lk = scores.shape[-2] // share, scores.shape[-1]
        rows = torch.arange(q_start, q_start + lq, device=q.device).repeat(share)
        future = torch.arange(Lk, device=q.device)[None, :] > rows[:, None]
        scores.masked_fill_(future, -math.inf)
    if key_keep is not None:
        scores.masked_fill_(~key_keep[:, None, None, :], -math.inf)
    return scores


def _finite_or_zero(x: Tensor, finite: Tensor | None = None) -> Tensor:
    """``x`` with its non-finite entries replaced by 0 (for products whose weight is 0);
    ``finite``: ``torch.isfinite(x)`` when the caller has it."""
    finite = torch.isfinite(x) if finite is None else finite
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _reads_non_finite(probs: Tensor, finite_v: Tensor) -> Tensor:
    """``(b, Hs, lq)`` bool: rows that give weight to a key whose value row is not finite
    (``finite_v = torch.isfinite(v)``, ``(b, Hs, Lk, D)``)."""
    bad_key = ~finite_v.all(dim=-1)  # (b, Hs, Lk)
    return ((probs > 0) & bad_key[:, :, None, :]).any(dim=-1)


def math_block_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_keep: Tensor | None = None,
    dropout: DropoutKeys | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns ``out`` (compute dtype) and ``lse`` (compute dtype); rows with no key give ``(0, -inf)``.

    ``key_keep``: ``(Bb, Lk)`` bool, ``True`` where the key may be attended.
    ``dropout``: drops entries of the block's probabilities (the LSE is that of the
    undropped scores, so merged blocks give dropout of the joint probabilities).
    With a mask (causal or ``key_keep``) a key a row does not attend never reaches it,
    even when its value is not finite; a row that attends one outputs NaN.
    """
    Bb, Lq, Hs, D = q.shape
    Lk, share = k.shape[1], Hs // k.shape[2]
    cdt = compute_dtype(q.dtype)
    out = torch.empty(Bb, Lq, Hs, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.empty(Bb, Lq, Hs, dtype=cdt, device=q.device)
    for a, b, q0, q1 in _tiles(Bb, Lq, Hs, Lk, max_score_elements(q.device)):
        qc = _fold(q[a:b, q0:q1].transpose(1, 2).to(cdt), share)
        kc = k[a:b].transpose(1, 2).to(cdt)
        vc = v[a:b].transpose(1, 2).to(cdt)
        keep = None if key_keep is None else key_keep[a:b]
        scores = _masked_scores(qc, kc, scale, causal, keep, q0, share)
        lse_c = torch.logsumexp(scores, dim=-1)  # (b, Hk, share * lq); -inf for empty rows
        finite = torch.where(torch.isinf(lse_c), torch.full_like(lse_c, math.inf), lse_c)
        probs = torch.exp(scores - finite.unsqueeze(-1))
        if dropout is not None:
            probs = probs * _fold(dropout.keep(a, b, q0, q1), share) / (1.0 - dropout.p)
        if causal or keep is not None:
            # 0 * inf would be NaN: non-finite values enter only the rows that read them.
            finite_v = torch.isfinite(vc)
            out_c = torch.matmul(probs, _finite_or_zero(vc, finite_v))
            out_c = out_c.masked_fill(_reads_non_finite(probs, finite_v)[..., None], math.nan)
        else:
            out_c = torch.matmul(probs, vc)
        out[a:b, q0:q1] = _unfold(out_c, share).transpose(1, 2)
        lse[a:b, q0:q1] = _unfold(lse_c, share).transpose(1, 2)
    return out, lse


def math_block_backward(
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
    dropout: DropoutKeys | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` in the compute dtype for one block, given the final out/lse.

    ``dropout`` must be the forward's: the same entries are dropped again.
    """
    Bb, Lq, Hs, D = q.shape
    Lk, share = k.shape[1], Hs // k.shape[2]
    cdt = compute_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    for a, b, q0, q1 in _tiles(Bb, Lq, Hs, Lk, max_score_elements(q.device)):
        qc = _fold(q[a:b, q0:q1].transpose(1, 2).to(cdt), share)
        kc = k[a:b].transpose(1, 2).to(cdt)
        vc = v[a:b].transpose(1, 2).to(cdt)
        doc = _fold(dout[a:b, q0:q1].transpose(1, 2).to(cdt), share)
        oc = _fold(out[a:b, q0:q1].transpose(1, 2).to(cdt), share)
        lse_c = _fold(lse[a:b, q0:q1].transpose(1, 2).to(cdt), share)
        # A row nobody attends has lse -inf: use +inf so its probabilities are 0, not inf.
        lse_c = torch.where(torch.isinf(lse_c), torch.full_like(lse_c, math.inf), lse_c)
        keep = None if key_keep is None else key_keep[a:b]
        probs = torch.exp(
            _masked_scores(qc, kc, scale, causal, keep, q0, share) - lse_c.unsqueeze(-1)
        )
        dprobs = torch.matmul(doc, vc.transpose(-1, -2))
        if dropout is not None:
            keep_mask = _fold(dropout.keep(a, b, q0, q1), share).to(cdt) / (1.0 - dropout.p)
            dv_c = torch.matmul((probs * keep_mask).transpose(-1, -2), doc)
            dprobs = dprobs * keep_mask
        else:
            dv_c = torch.matmul(probs.transpose(-1, -2), doc)
        delta = (doc * oc).sum(dim=-1, keepdim=True)  # rowsum(dO * O) of the *final* output
        dscores = probs * (dprobs - delta)
        if causal or keep is not None:
            # Pairs that do not count give 0 even where a key or value is not finite.
            dscores = torch.where(probs == 0, torch.zeros_like(dscores), dscores)
            kc = _finite_or_zero(kc)
        dq[a:b, q0:q1] = _unfold(torch.matmul(dscores, kc) * scale, share).transpose(1, 2)
        dk[a:b] += (torch.matmul(dscores.transpose(-1, -2), qc) * scale).transpose(1, 2)
        dv[a:b] += dv_c.transpose(1, 2)
    return dq, dk, dv


def flash_supported_reasons(device_type: str, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Why PyTorch's flash op cannot run a block; empty when it can."""
    reasons = []
    if device_type != "cuda":
        reasons.append(f"flash needs CUDA, got device {device_type!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash needs float16/bfloat16, got {dtype}")
    if head_dim % 8 != 0 or head_dim > 256:
        reasons.append(f"flash needs head_dim % 8 == 0 and <= 256, got {head_dim}")
    return reasons


def _head_major_lse(lse: Tensor) -> Tensor:
    """``(Bb, Lq, Hs)`` LSE -> contiguous float32 ``(Bb, Hs, Lq)`` for PyTorch's kernels.

    A row nobody attends has LSE ``-inf``; it becomes ``+inf`` so that the backward's
    probabilities ``exp(S - lse)`` are 0 instead of ``inf``.
    """
    lse_t = lse.transpose(1, 2).float()
    return torch.where(torch.isinf(lse_t), torch.full_like(lse_t, math.inf), lse_t).contiguous()


def flash_block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """PyTorch's flash op on strided views; returns ``out`` (q.dtype) and ``lse`` (float32)."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale
    )
    return res[0].transpose(1, 2), res[1].transpose(1, 2)


def flash_block_backward(
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
    """PyTorch's flash backward fed with the final out/lse; returns grads in q.dtype."""
    lse_t = _head_major_lse(lse)
    # Dense (non-varlen) call: no cumulative lengths; the philox state is unused at p=0.
    philox_seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    philox_offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.transpose(1, 2),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2),
        lse_t,
        None,
        None,
        q.shape[1],
        k.shape[1],
        0.0,
        causal,
        philox_seed,
        philox_offset,
        scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def cudnn_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether PyTorch's cuDNN attention op runs blocks of this kind (Hopper or newer, fp16/bf16).

    On an H200 it reads the same strided views as flash and made the whole pure-PyTorch
    backend 1.3-1.45x faster (the rows of the flash-pinned pipeline in
    benchmarks/results/dilated_bench_h200_20261121.json), so ``kernel="auto"`` prefers it.
    """
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 != 0 or head_dim > 128:
        return False
    if not (torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def cudnn_accepts_lengths(q_len: int, k_len: int) -> bool:
    """Block lengths PyTorch's cuDNN op accepts.

    With torch 2.11 on an H200 a block of one query and one key fails with "cuDNN
    Frontend error: s_q = s_kv = 1 is not supported"; such blocks appear whenever a
    dilated segment holds one position (``w == r``, or a short last segment). Blocks
    with a single query or a single key are routed away from cuDNN as well, as the op's
    shape checks treat length 1 specially.
    """
    return q_len > 1 and k_len > 1


def cudnn_block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """PyTorch's cuDNN attention op on strided views; ``out`` (q.dtype), ``lse`` (float32)."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False,
        scale=scale,
    )  # fmt: skip
    lse = res[1]
    if lse.dim() == 4:  # (Bb, Hs, Lq, 1)
        lse = lse[..., 0]
    return res[0].transpose(1, 2), lse.transpose(1, 2)


def cudnn_block_backward(
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
    """PyTorch's cuDNN attention backward fed with the final out/lse."""
    lse_t = _head_major_lse(lse).unsqueeze(-1)  # (Bb, Hs, Lq, 1), the op's layout
    philox = torch.zeros((), dtype=torch.int64, device=q.device)  # unused at p=0
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse_t, philox, philox, None, None, None, q.shape[1], k.shape[1],
        0.0, causal, scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def fused_grouped_forward(
    fused: Callable[..., tuple[Tensor, Tensor]], q: Tensor, k: Tensor, v: Tensor, *,
    scale: float, causal: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``fused(q, k, v, scale=, causal=)`` (an op that needs as many K/V heads as query
    heads) on a grouped-query block: once per position ``j`` in a run of ``s = Hs / Hk``
    query heads, on the strided view of query heads ``j, j + s, ...``, which read K/V heads
    ``0, 1, ...``. No K/V copy."""
    share = q.shape[2] // k.shape[2]
    if share == 1:
        return fused(q, k, v, scale=scale, causal=causal)
    parts = [fused(q[:, :, j::share], k, v, scale=scale, causal=causal) for j in range(share)]
    out = parts[0][0].new_empty(*q.shape[:3], v.shape[-1])
    lse = parts[0][1].new_empty(q.shape[:3])
    for j, (out_j, lse_j) in enumerate(parts):
        out[:, :, j::share] = out_j
        lse[:, :, j::share] = lse_j
    return out, lse


def fused_grouped_backward(
    fused: Callable[..., tuple[Tensor, Tensor, Tensor]], dout: Tensor, q: Tensor, k: Tensor,
    v: Tensor, out: Tensor, lse: Tensor, *, scale: float, causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The backward of :func:`fused_grouped_forward`: dQ per strided view of query heads,
    dK/dV summed over the ``Hs / Hk`` calls in the compute dtype (float32, float64 for
    float64 inputs), which they are returned in."""
    share = q.shape[2] // k.shape[2]
    if share == 1:
        return fused(dout, q, k, v, out, lse, scale=scale, causal=causal)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute_dtype(k.dtype), device=q.device)
    dv = torch.zeros(v.shape, dtype=compute_dtype(v.dtype), device=q.device)
    for j in range(share):
        heads = (slice(None), slice(None), slice(j, None, share))
        dq_j, dk_j, dv_j = fused(
            dout[heads], q[heads], k, v, out[heads], lse[heads], scale=scale, causal=causal
        )
        dq[heads] = dq_j
        dk += dk_j
        dv += dv_j
    return dq, dk, dv


KERNELS = ("auto", "cudnn", "flash", "math")


def block_kernel(
    q: Tensor, k: Tensor, key_keep: Tensor | None, dropout: DropoutKeys | None, kernel: str = "auto"
) -> str:
    """The kernel that runs one block: ``"cudnn"``, ``"flash"`` or ``"math"``.

    ``kernel`` is the caller's choice (:data:`KERNELS`). Key masks and dropout always
    take the math path (the fused ops are called without them). ``"auto"`` and
    ``"cudnn"`` take cuDNN where :func:`cudnn_usable` and :func:`cudnn_accepts_lengths`
    allow, then flash where it can run; blocks a fused op refuses go to a path that
    runs them, so every input the CPU accepts also runs on CUDA.
    """
    if kernel == "math" or key_keep is not None or dropout is not None:
        return "math"
    flash_ok = not flash_supported_reasons(q.device.type, q.dtype, q.shape[-1])
    if kernel in ("auto", "cudnn") and cudnn_usable(q.device, q.dtype, q.shape[-1]):
        if cudnn_accepts_lengths(q.shape[1], k.shape[1]):
            return "cudnn"
    if flash_ok:
        return "flash"
    return "math"


def block_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_keep: Tensor | None = None,
    dropout: DropoutKeys | None = None,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The block on the kernel :func:`block_kernel` picks (cuDNN, flash or matmuls)."""
    kernel = block_kernel(q, k, key_keep, dropout, kernel)
    if kernel != "math":
        fused = cudnn_block_forward if kernel == "cudnn" else flash_block_forward
        return fused_grouped_forward(fused, q, k, v, scale=scale, causal=causal)
    return math_block_forward(
        q, k, v, scale=scale, causal=causal, key_keep=key_keep, dropout=dropout
    )


def block_backward(
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
    dropout: DropoutKeys | None = None,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward matching :func:`block_forward`'s choice of path."""
    kernel = block_kernel(q, k, key_keep, dropout, kernel)
    if kernel != "math":
        fused = cudnn_block_backward if kernel == "cudnn" else flash_block_backward
        return fused_grouped_backward(fused, dout, q, k, v, out, lse, scale=scale, causal=causal)
    return math_block_backward(
        dout, q, k, v, out, lse, scale=scale, causal=causal, key_keep=key_keep,
        dropout=dropout,
    )  # fmt: skip
