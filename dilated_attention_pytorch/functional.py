"""``dilated_attention``: the public, differentiable entry point."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from .autograd import first_order_only
from .backends import (
    AttentionCall,
    Backend,
    BackendChoice,
    ForwardContext,
    choose_backend,
    select_backend,
)
from .dropout import seed_tensor
from .ops import backend_key, dilated_attention_op
from .plan import DilatedPlan, make_plan
from .segments import token_major
from .validation import (
    check_cu_seqlens,
    check_cu_seqlens_form,
    check_key_padding_mask,
    check_qkv,
    check_scalars,
    warn_if_transposed,
)

__all__ = ["dilated_attention", "explain_backend"]


class _DilatedAttentionFunction(torch.autograd.Function):
    """``(q, k, v) -> (out, lse_pair)``; the backend's backward, and a vmap rule that folds
    the mapped dimension into the batch (every batch element is independent)."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, backend: Backend, fctx: ForwardContext):
        # out (B, N, H, D); lse_pair (2, B, N, H): the LSE is lse_pair[0] + lse_pair[1].
        return backend.forward(q, k, v, fctx)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, backend, fctx = inputs
        out, lse_pair = output
        ctx.save_for_backward(q, k, v, out, lse_pair)
        ctx.backend = backend
        ctx.fctx = fctx
        ctx.mark_non_differentiable(lse_pair)
        ctx.set_materialize_grads(False)

    @staticmethod
    @first_order_only("dilated_attention")
    def backward(ctx, dout: Tensor | None, _dlse: Tensor | None):
        q, k, v, out, lse_pair = ctx.saved_tensors
        if dout is None:  # only the (non-differentiable) LSE was used
            return None, None, None, None, None
        dq, dk, dv = ctx.backend.backward(token_major(dout), q, k, v, out, lse_pair, ctx.fctx)
        return dq, dk, dv, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, backend, fctx):
        size = info.batch_size
        qkv = []
        for t, d in zip((q, k, v), in_dims[:3]):
            t = t.unsqueeze(0).expand(size, *t.shape) if d is None else t.movedim(d, 0)
            qkv.append(t.reshape(size * t.shape[1], *t.shape[2:]))
        mask = fctx.key_padding_mask
        if mask is not None:
            mask = mask.repeat(size, 1)
        fctx = dataclasses.replace(fctx, key_padding_mask=mask)
        out, lse_pair = _DilatedAttentionFunction.apply(
            *(token_major(t) for t in qkv), backend, fctx
        )
        out = out.reshape(size, -1, *out.shape[1:])
        lse_pair = lse_pair.reshape(2, size, -1, *lse_pair.shape[2:])
        return (out, lse_pair), (0, 1)


def _call(
    q: Tensor,
    plan: DilatedPlan,
    is_causal: bool,
    dropout_p: float,
    key_padding_mask: bool,
    requires_grad: bool,
    packed: bool = False,
) -> AttentionCall:
    return AttentionCall(
        device_type=q.device.type,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        is_causal=is_causal,
        dropout=dropout_p > 0.0,
        key_padding_mask=key_padding_mask,
        plan=plan,
        requires_grad=requires_grad,
        packed=packed,
    )


def explain_backend(
    q: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    branch_mixing: str = "softmax",
    dropout_p: float = 0.0,
    key_padding_mask: Tensor | bool | None = None,
    requires_grad: bool = True,
    backend: str | Backend = "auto",
) -> BackendChoice:
    """Which backend :func:`dilated_attention` would run for queries like ``q`` ``(B, N, H, D)``.

    Only ``q``'s device, dtype, head count and head dim matter (a tensor of one token
    will do). ``requires_grad``: whether a backward follows (training). The result's
    ``name`` is the backend; ``str()`` of it also gives the reasons faster backends
    cannot run the call, e.g. ``"pytorch (triton: triton runs on cuda devices, got 'cpu', ...)"``.
    ``key_padding_mask``: the mask you would pass (or ``True``/``False`` for whether there
    is one).
    ``dilated_attention`` itself logs this choice only at DEBUG level on the
    ``dilated_attention_pytorch`` logger.

    Example::

        >>> q = torch.empty(1, 1, 8, 64)  # (B, N, H, D) on the CPU, float32
        >>> explain_backend(q, [2048, 4096], [1, 2]).name
        'pytorch'
    """
    check_scalars(scale=None, dropout_p=dropout_p, is_causal=is_causal)
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a (B, N, H, D) torch.Tensor, got {type(q).__name__}.")
    if q.dim() != 4:  # the same error as dilated_attention's
        raise ValueError(
            f"q must have 4 dims (B, N, H, D) (batch, tokens, heads, head_dim), got shape "
            f"{tuple(q.shape)}; if your tensor is (B, H, N, D), pass q.transpose(1, 2)."
        )
    plan = make_plan(segment_lengths, dilation_rates, q.shape[2], branch_mixing)
    if not isinstance(key_padding_mask, (Tensor, bool)) and key_padding_mask is not None:
        raise TypeError(
            f"key_padding_mask must be the (B, N) bool mask, a bool or None, got "
            f"{type(key_padding_mask).__name__}."
        )
    has_mask = key_padding_mask is not None and key_padding_mask is not False
    call = _call(q, plan, is_causal, dropout_p, has_mask, bool(requires_grad))
    return choose_backend(backend, call)


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    branch_mixing: str = "softmax",
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: Tensor | None = None,
    backend: str | Backend = "auto",
    return_lse: bool = False,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LongNet dilated attention on ``(B, N, H, D)`` tensors (batch, tokens, heads, head dim).

    k and v may have fewer heads, ``(B, N, H_kv, D)`` with ``H_kv`` dividing ``H``
    (grouped-query and multi-query attention): query head ``h`` reads K/V head
    ``h // (H / H_kv)``, and its offsets stay ``h mod r``. No backend copies K/V to ``H``
    heads.

    Each branch ``(w, r)`` cuts the sequence into segments of ``w`` tokens (the last
    one shorter when ``N % w != 0``); in a segment, head ``h`` keeps every ``r``-th
    token starting at offset ``h mod r`` and attends among those. The branches are
    mixed by their softmax denominators, i.e. the result is the softmax over the
    union (with multiplicity) of every branch's keys.

    Args:
        q: ``(B, N, H, D)`` (batch, tokens, heads, head dim); k, v: ``(B, N, H_kv, D)``
            with ``H_kv`` dividing ``H`` (``H_kv = H`` for multi-head attention); one
            dtype (float16, bfloat16, float32, float64) and device.
        segment_lengths: segment length ``w`` of each branch.
        dilation_rates: dilation rate ``r`` of each branch, ``1 <= r <= w``.
        is_causal: query ``p`` only sees keys ``p' <= p``.
        branch_mixing: ``"softmax"`` (every head runs every branch) or
            ``"head_split"`` (heads are split into ``len(branches)`` groups).
        scale: score scale, default ``D ** -0.5``.
        dropout_p: drop probability of the joint attention probabilities. Applied
            whenever ``> 0``: pass ``0.0`` at evaluation. Whether an entry is dropped is
            a hash of its batch, branch, head, query and key positions and a seed drawn
            from the default generator, so the ring drops exactly the same entries;
            ``p`` is applied in steps of ``2**-24`` (rounded to the nearest step).
        key_padding_mask: ``(B, N)`` bool, ``True`` marks padding keys (never attended).
            A query that ends up with no key outputs 0.
        backend: ``"auto"``, a registered backend name (see ``available_backends()``:
            ``"triton"``, ``"pytorch"``) or a :class:`~dilated_attention_pytorch.backends.Backend`
            instance such as ``PyTorchBackend(kernel="flash")``.
        return_lse: also return the log-sum-exp of the scaled scores.
        cu_seqlens: packed documents, flash-attn's convention: a 1-D int32/int64 tensor
            ``[0, n_0, n_0 + n_1, ..., total]`` of document offsets into q, k, v of shape
            ``(1, total, H, D)``. Each document is then its own sequence: its segments
            start at its first token (the last one shorter when ``w`` does not divide
            its length) and nothing attends across documents. Read on the host (one
            device sync; under ``torch.compile`` inside the attention operator, so the
            graph does not break). The ``triton`` backend runs all documents in the same
            launches (a table of every document's segments); the ``pytorch`` backend
            runs them one after another. Not with ``key_padding_mask``.
        max_seqlen: with ``cu_seqlens``, optionally the longest document's length (an
            upper bound, checked; flash-attn's argument, accepted for drop-in use).

    Returns:
        ``out`` of shape ``(B, N, H, D)`` in ``q.dtype`` (the gradients of k and v have
        their shape), or ``(out, lse)`` with
        ``lse`` of shape ``(B, N, H)`` in float32, ``-inf`` where a query has no key.
        ``lse`` is not differentiable.

    Raises:
        RuntimeError: in the backward, when the gradient is requested with
            ``create_graph=True`` (double backward is not supported).

    Notes:
        In ``"softmax"`` mode a head count smaller than the largest dilation rate
        is allowed; offsets ``>= H`` then go unused and positions covered by no
        branch output 0.

        Branch results are merged with weights relative to the largest branch LSE (the
        LSE is carried as a pair ``hi + lo``), so several branches are as accurate as one
        at any logit scale. A query that attends a key whose value is not finite gets a
        non-finite output; keys it does not attend (padding, the future under
        ``is_causal``) never reach it. ``torch.func.vmap`` is supported: the mapped
        dimension joins the batch.
    """
    check_qkv(q, k, v, grouped_query=True)
    key_padding_mask = check_key_padding_mask(key_padding_mask, q)
    check_scalars(scale=scale, dropout_p=dropout_p, is_causal=is_causal)
    options = dict(
        is_causal=is_causal, branch_mixing=branch_mixing, scale=scale, dropout_p=dropout_p,
        backend=backend, return_lse=return_lse,
    )  # fmt: skip
    documents, packed = packed_documents(cu_seqlens, max_seqlen, q, key_padding_mask)
    make_plan(segment_lengths, dilation_rates, q.shape[2], branch_mixing, k.shape[2])
    if packed is None:  # eager: the tensors' layout can be looked at
        warn_if_transposed(q, segment_lengths)
    return _attend(
        q, k, v, segment_lengths, dilation_rates,
        key_padding_mask=key_padding_mask if cu_seqlens is None else None,
        documents=documents, packed=packed, **options,
    )  # fmt: skip


def packed_documents(
    cu_seqlens: Tensor | None, max_seqlen: object, q: Tensor, key_padding_mask: Tensor | None
) -> tuple[tuple[int, ...] | None, tuple[Tensor, Tensor | None] | None]:
    """``(documents, packed)`` of a call on ``q`` ``(B, N, H, D)`` with ``cu_seqlens``:
    eager, ``documents`` are the checked lengths, read on the host; while compiling,
    ``packed`` is ``(cu_seqlens, max_seqlen tensor)``, whose values the operator reads and
    checks (here only their form). Both ``None`` without ``cu_seqlens``."""
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError(
                "max_seqlen is the longest document of cu_seqlens; pass cu_seqlens too."
            )
        return None, None
    if torch.compiler.is_compiling():
        # The offsets are read inside the attention operator, where the graph cannot see.
        check_cu_seqlens_form(cu_seqlens, q, key_padding_mask)
        return None, (cu_seqlens, _max_seqlen_tensor(max_seqlen))
    return tuple(check_cu_seqlens(cu_seqlens, max_seqlen, q, key_padding_mask)), None


def _max_seqlen_tensor(max_seqlen: object) -> Tensor | None:
    """``max_seqlen`` for the compiled operator: ``None`` or a one-element integer tensor
    (its value is checked inside the operator, with the offsets)."""
    if max_seqlen is None or isinstance(max_seqlen, Tensor):
        if max_seqlen is not None and (max_seqlen.numel() != 1 or max_seqlen.is_floating_point()):
            raise TypeError(
                f"max_seqlen must be an int (or a one-element integer tensor), got a tensor "
                f"of shape {tuple(max_seqlen.shape)} and dtype {max_seqlen.dtype}."
            )
        return max_seqlen
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(
            f"max_seqlen must be an int (or a one-element integer tensor), got "
            f"{type(max_seqlen).__name__} {max_seqlen!r}."
        )
    return torch.tensor(max_seqlen, dtype=torch.int64)


def forward_context(
    plan: DilatedPlan,
    head_dim: int,
    *,
    scale: float | None,
    is_causal: bool,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    documents: tuple[int, ...] | None,
) -> tuple[Tensor, ForwardContext]:
    """The dropout seed tensor and the backend's context of one call. The seed is drawn
    from the default generator, once per call (only with dropout), so that the backward
    (and a ring) drops the same entries; eager callers store ``int(seed)`` in the
    context's ``seed`` (the compiled operator reads the tensor)."""
    seed = seed_tensor(dropout_p)
    fctx = ForwardContext(
        plan=plan,
        scale=head_dim**-0.5 if scale is None else float(scale),
        is_causal=is_causal,
        dropout_p=float(dropout_p),
        key_padding_mask=key_padding_mask,
        documents=documents,
    )
    return seed, fctx


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool,
    branch_mixing: str,
    scale: float | None,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    backend: str | Backend,
    return_lse: bool,
    documents: tuple[int, ...] | None = None,
    packed: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`dilated_attention` on checked inputs: one sequence per batch row, or the packed
    ``documents`` (their lengths) of one row; while compiling, ``packed`` holds the
    documents' ``(cu_seqlens, max_seqlen)`` tensors instead (read inside the operator)."""
    B, N, H, D = q.shape
    plan = make_plan(segment_lengths, dilation_rates, H, branch_mixing, k.shape[2])
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    call = _call(
        q, plan, is_causal, dropout_p, key_padding_mask is not None, requires_grad,
        packed=documents is not None or packed is not None,
    )  # fmt: skip
    chosen = select_backend(backend, call)
    if documents is not None and not chosen.capabilities.packed:
        # One call per document on views of q, k, v (split: one backward node for all).
        options = dict(
            is_causal=is_causal, branch_mixing=branch_mixing, scale=scale, dropout_p=dropout_p,
            key_padding_mask=None, backend=chosen, return_lse=return_lse,
        )  # fmt: skip
        parts = [
            _attend(*qkv, segment_lengths, dilation_rates, **options)
            for qkv in zip(*(t.split(documents, dim=1) for t in (q, k, v)), strict=True)
        ]
        if not return_lse:
            return torch.cat(parts, dim=1)
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 1)
    seed, fctx = forward_context(
        plan, D, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
        key_padding_mask=key_padding_mask, documents=documents,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        # Under torch.compile: one opaque custom operator (backend_key names the backend:
        # a registered name, or e.g. "pytorch:math" for PyTorchBackend(kernel="math")).
        out, lse_pair = dilated_attention_op(
            q, k, v, fctx, backend_key(chosen), seed, *(packed or (None, None))
        )
    else:
        fctx.seed = int(seed.item()) if dropout_p > 0.0 else 0
        out, lse_pair = _DilatedAttentionFunction.apply(
            token_major(q), token_major(k), token_major(v), chosen, fctx
        )
    if not return_lse:
        return out
    # The LSE is returned in float32 whatever the input dtype (the autograd function keeps
    # its float64 pair for float64 inputs, so gradients stay exact).
    return out, ((lse_pair[0] + lse_pair[1]) * chosen.lse_unit).float()
