"""``torch.compile`` support: dilated attention as two custom operators.

Under ``torch.compile`` the backends' Python (strided views, kernel launches, a dropout
seed read on the host) cannot be traced. :func:`~dilated_attention_pytorch.dilated_attention`
therefore calls, while compiling, the operator ``dilated_attention_pytorch::forward``
(and, in the backward, ``dilated_attention_pytorch::backward``), registered with
``torch.library``: opaque to the compiler, with fake implementations that give the
output shapes, so a compiled model has no graph break around attention
(``fullgraph=True`` works). In eager mode nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor

from .backends import Backend, ForwardContext, PyTorchBackend, available_backends, get_backend
from .backends.blocks import compute_dtype
from .plan import make_plan
from .segments import token_major
from .validation import check_cu_seqlens

__all__ = ["backend_key", "dilated_attention_op"]


def backend_key(backend: Backend) -> str:
    """The string that names ``backend`` to the operators: its ``op_key`` (e.g.
    ``"pytorch:math"`` for ``PyTorchBackend(kernel="math")``), else its registered name."""
    key = getattr(backend, "op_key", None)
    if key is not None:
        return key
    registered = get_backend(backend.name) if backend.name in available_backends() else None
    if registered is not backend:
        raise ValueError(
            f"torch.compile needs a registered backend: {backend!r} is not the backend "
            f"registered as {backend.name!r}; call register_backend(...) with it or pass its "
            f"name."
        )
    return backend.name


@functools.cache
def _resolve(key: str) -> Backend:
    name, _, kernel = key.partition(":")
    if kernel:
        if name != "pytorch":
            raise ValueError(f"unknown backend key {key!r}.")
        return PyTorchBackend(kernel=kernel)
    return get_backend(name)


def _context(
    q: Tensor,
    num_kv_heads: int,
    segment_lengths: list[int],
    dilation_rates: list[int],
    branch_mixing: str,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    seed: Tensor,
    cu_seqlens: Tensor | None,
    max_seqlen: Tensor | None,
) -> ForwardContext:
    plan = make_plan(segment_lengths, dilation_rates, q.shape[2], branch_mixing, num_kv_heads)
    documents = None
    if cu_seqlens is not None:  # read (and checked) here, outside the compiled graph
        documents = tuple(check_cu_seqlens(cu_seqlens, max_seqlen, q, key_padding_mask))
    return ForwardContext(
        plan=plan, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
        key_padding_mask=key_padding_mask, seed=int(seed.item()), documents=documents,
    )  # fmt: skip


def _documents(fctx: ForwardContext, backend: Backend) -> list[tuple[int, int, ForwardContext]]:
    """``(start, stop, context)`` of each non-empty document that ``backend`` must run on
    its own (it cannot take packed documents in one call); empty when it can, or when
    there are no documents. Each document's dropout seed is derived from the call's."""
    if fctx.documents is None or backend.capabilities.packed:
        return []
    parts, start = [], 0
    for i, n in enumerate(fctx.documents):
        seed = (fctx.seed + i * 0x9E3779B97F4A7C15) % 2**62 if fctx.dropout_p > 0.0 else 0
        if n > 0:
            parts.append((start, start + n, dataclasses.replace(fctx, documents=None, seed=seed)))
        start += n
    return parts


def _run_forward(
    backend: Backend, q: Tensor, k: Tensor, v: Tensor, fctx: ForwardContext
) -> tuple[Tensor, Tensor]:
    parts = _documents(fctx, backend)
    if not parts:
        return backend.forward(q, k, v, fctx)
    outs = [backend.forward(q[:, a:b], k[:, a:b], v[:, a:b], c) for a, b, c in parts]
    return torch.cat([o for o, _ in outs], 1), torch.cat([lse for _, lse in outs], 2)


def _run_backward(
    backend: Backend,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse_pair: Tensor,
    fctx: ForwardContext,
) -> tuple[Tensor, ...]:
    parts = _documents(fctx, backend)
    if not parts:
        return tuple(backend.backward(dout, q, k, v, out, lse_pair, fctx))
    grads = [
        backend.backward(
            dout[:, a:b], q[:, a:b], k[:, a:b], v[:, a:b], out[:, a:b], lse_pair[:, :, a:b], c
        )
        for a, b, c in parts
    ]
    return tuple(torch.cat(g, 1) for g in zip(*grads, strict=True))


def _run_backward_into(
    backend: Backend,
    grads: tuple[Tensor, Tensor, Tensor],
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse_pair: Tensor,
    fctx: ForwardContext,
) -> None:
    """:func:`_run_backward` written into ``grads = (dq, dk, dv)`` (the backend's
    ``backward_into``; documents run one by one are copied in)."""
    if not _documents(fctx, backend):
        backend.backward_into(grads, dout, q, k, v, out, lse_pair, fctx)
        return
    parts = _run_backward(backend, dout, q, k, v, out, lse_pair, fctx)
    for target, grad in zip(grads, parts, strict=True):
        target.copy_(grad)


def float_arguments(*values: object) -> tuple:
    """Float settings as a custom operator's arguments: ints as floats, ``None`` and
    anything else as is (the checks inside name a bad one). Operators that take their
    other settings as a string of literals take these apart, because the compiler may
    make a float symbolic (e.g. when modules with different dropout run through the same
    compiled code), and a string cannot hold a symbolic value."""
    return tuple(
        float(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for x in values
    )


def _fresh(t: Tensor) -> Tensor:
    """``t`` as a contiguous tensor that is not a view: what the fake implementations
    promise (a custom op may not return a view, and the compiler relies on strides)."""
    return t.clone(memory_format=torch.contiguous_format) if t._base is not None else t.contiguous()


@torch.library.custom_op("dilated_attention_pytorch::forward", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    branch_mixing: str,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    seed: Tensor,
    backend: str,
    cu_seqlens: Tensor | None = None,
    max_seqlen: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    fctx = _context(q, k.shape[2], segment_lengths, dilation_rates, branch_mixing, scale, is_causal,
                    dropout_p, key_padding_mask, seed, cu_seqlens, max_seqlen)  # fmt: skip
    out, lse_pair = _run_forward(
        _resolve(backend), token_major(q), token_major(k), token_major(v), fctx
    )
    return _fresh(out), lse_pair


@_forward.register_fake
def _(q, k, v, segment_lengths, dilation_rates, branch_mixing, scale, is_causal, dropout_p,
      key_padding_mask, seed, backend, cu_seqlens=None, max_seqlen=None):  # fmt: skip
    B, N, H, _ = q.shape
    lse_dtype = compute_dtype(q.dtype)
    return q.new_empty(B, N, H, v.shape[-1]), q.new_empty(2, B, N, H, dtype=lse_dtype)


@torch.library.custom_op("dilated_attention_pytorch::backward", mutates_args=())
def _backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse_pair: Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    branch_mixing: str,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    seed: Tensor,
    backend: str,
    cu_seqlens: Tensor | None = None,
    max_seqlen: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    fctx = _context(q, k.shape[2], segment_lengths, dilation_rates, branch_mixing, scale, is_causal,
                    dropout_p, key_padding_mask, seed, cu_seqlens, max_seqlen)  # fmt: skip
    grads = _run_backward(
        _resolve(backend), token_major(dout), token_major(q), token_major(k), token_major(v), out,
        lse_pair, fctx,
    )  # fmt: skip
    return tuple(_fresh(g) for g in grads)


@_backward.register_fake
def _(dout, q, k, v, out, lse_pair, segment_lengths, dilation_rates, branch_mixing, scale,
      is_causal, dropout_p, key_padding_mask, seed, backend, cu_seqlens=None,
      max_seqlen=None):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


def register_attention_autograd(forward: Any, backward: Any) -> None:
    """The autograd rule of an attention operator pair: ``forward(q, k, v, *settings) ->
    (out, lse)`` (the LSE not differentiable) and ``backward(dout, q, k, v, out, lse,
    *settings) -> (dq, dk, dv)``."""

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, *settings = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = settings
        ctx.mark_non_differentiable(lse)

    def backward_rule(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, *ctx.settings)
        return (dq, dk, dv, *(None for _ in ctx.settings))

    forward.register_autograd(backward_rule, setup_context=setup_context)


register_attention_autograd(_forward, _backward)


def dilated_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fctx: ForwardContext,
    backend: str,
    seed: Tensor,
    cu_seqlens: Tensor | None = None,
    max_seqlen: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse_pair)`` of the backend named ``backend`` (:func:`backend_key`) through the
    custom operator; packed documents as the ``cu_seqlens`` tensor (and optional one-element
    ``max_seqlen``), read inside the operator."""
    plan = fctx.plan
    return _forward(
        q, k, v, list(plan.segment_lengths), list(plan.dilation_rates), plan.branch_mixing,
        float(fctx.scale), fctx.is_causal, float(fctx.dropout_p), fctx.key_padding_mask, seed,
        backend, cu_seqlens, max_seqlen,
    )  # fmt: skip
