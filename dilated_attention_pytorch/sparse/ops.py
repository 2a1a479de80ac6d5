"""``torch.compile`` support for the block-sparse modules: two custom operators.

Building a pattern searches its knob by the sparsity it achieves (host reads of tensor
values), which the compiler cannot trace. So while compiling, the block-sparse modules
call ``dilated_attention_pytorch::block_sparse_forward`` (and ``::block_sparse_backward``
in the backward), registered with ``torch.library``: they take the pattern's settings as
a string, build (and cache) the pattern themselves and run the ``pytorch`` or ``triton``
kernels; fake implementations give the shapes. A compiled model therefore has no graph
break around block-sparse attention (``fullgraph=True`` works). In eager mode nothing
changes.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import Tensor

from ..backends.blocks import compute_dtype
from ..dropout import seed_tensor
from ..ops import register_attention_autograd
from ..segments import token_major
from .functional import block_backward, block_forward, single_device_call
from .patterns import BlockSparsePattern, make_block_sparse_pattern

__all__ = ["block_sparse_op", "pattern_spec"]


def pattern_spec(pattern_type: str, **settings: object) -> str:
    """The operators' description of a pattern: ``make_block_sparse_pattern``'s arguments
    other than ``seq_len`` and ``is_causal``, as JSON."""
    return json.dumps({"pattern_type": pattern_type, **settings}, sort_keys=True)


@functools.lru_cache(maxsize=32)
def _pattern(spec: str, seq_len: int, is_causal: bool) -> BlockSparsePattern:
    settings = json.loads(spec)
    pattern_type = settings.pop("pattern_type")
    return make_block_sparse_pattern(pattern_type, seq_len, is_causal=is_causal, **settings)


def _call(q: Tensor, spec, is_causal, scale, dropout_p, seed, kernel):
    pattern = _pattern(spec, q.shape[1], is_causal)
    seed_value = int(seed.item()) if dropout_p > 0.0 else 0
    return single_device_call(
        pattern, q.shape[1], q.shape[-1], is_causal, scale, dropout_p, seed_value, kernel
    )


@torch.library.custom_op("dilated_attention_pytorch::block_sparse_forward", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: str,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    seed: Tensor,
    kernel: str,
) -> tuple[Tensor, Tensor]:
    call = _call(q, spec, is_causal, scale, dropout_p, seed, kernel)
    out, lse = block_forward(call, token_major(q), token_major(k), token_major(v))
    # The compute dtype, as the fake says (the triton kernels return q.dtype: exact upcast).
    cdt = compute_dtype(q.dtype)
    return out.to(cdt).contiguous(), lse.to(cdt).contiguous()


@_forward.register_fake
def _(q, k, v, spec, is_causal, scale, dropout_p, seed, kernel):
    B, N, H, _ = q.shape
    cdt = compute_dtype(q.dtype)
    return q.new_empty(B, N, H, v.shape[-1], dtype=cdt), q.new_empty(B, N, H, dtype=cdt)


@torch.library.custom_op("dilated_attention_pytorch::block_sparse_backward", mutates_args=())
def _backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    spec: str,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    seed: Tensor,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    call = _call(q, spec, is_causal, scale, dropout_p, seed, kernel)
    if kernel == "triton":  # its kernels take out and dout in q.dtype (exact downcasts)
        out, dout = out.to(q.dtype), dout.to(q.dtype)
    grads = block_backward(
        call, token_major(dout), token_major(q), token_major(k), token_major(v), out, lse
    )
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v), strict=True))


@_backward.register_fake
def _(dout, q, k, v, out, lse, spec, is_causal, scale, dropout_p, seed, kernel):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_attention_autograd(_forward, _backward)


def block_sparse_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: str,
    *,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    kernel: str,
) -> Tensor:
    """Block-sparse attention of the pattern ``spec`` (:func:`pattern_spec`) through the
    custom operator: ``(B, N, H, D)`` -> ``(B, N, H, D)`` in q.dtype."""
    seed = seed_tensor(dropout_p)
    out, _ = _forward(q, k, v, spec, is_causal, scale, float(dropout_p), seed, kernel)
    return out.to(q.dtype)
