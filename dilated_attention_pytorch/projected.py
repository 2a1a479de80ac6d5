"""Self-attention from the layer's input, with q, k and v recomputed in the backward.

:class:`~dilated_attention_pytorch.MultiheadDilatedAttention` (``recompute_qkv=True``, the
default) runs its q/k/v projections and the dilated attention as one autograd node:

- forward: ``q, k, v = x W_q^T + b_q, ...``, the attention, and only ``x`` (the layer's
  input, which the projections keep anyway when their weights train), the attention
  output and its LSE are kept.
  q, k and v are freed as soon as the attention has run.
- backward: a few heads at a time (:func:`head_chunks`), their q, k, v are recomputed from
  ``x`` in one matmul, the backend's backward runs on those heads alone (a part of the
  plan: :func:`~dilated_attention_pytorch.plan.heads_plan`; every head's branches are
  mixed within the head, so this is exact), and their gradients go to one
  ``[dq | dk | dv]`` buffer (the backend's ``backward_into``). Then one matmul gives
  ``dx`` and one per projection its weight gradient.

What the layer holds at its peak (the attention's backward) is then the input, the
attention output and its gradient, ``[dq | dk | dv]`` and one chunk's q, k, v and backend
buffers, instead of the whole q, k, v, their gradients and the backend's accumulators for
every head. The price is the three projections' matmuls once more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import first_order_only
from .backends import Backend, ForwardContext, select_backend
from .backends.blocks import compute_dtype
from .functional import _call, forward_context, packed_documents
from .ops import _context, _fresh, _resolve, _run_backward_into, _run_forward, backend_key
from .plan import DilatedPlan, heads_plan, make_plan
from .rotary import apply_rotary, check_rotary_tables
from .segments import token_major
from .validation import check_key_padding_mask

__all__ = [
    "HEAD_CHUNKS",
    "BackendHeads",
    "HeadsAttention",
    "head_chunks",
    "projected_attention",
    "run_projected",
]

# The backward recomputes q, k, v for about 1/HEAD_CHUNKS of the heads at a time: the
# chunk's q, k, v and the backend's per-chunk buffers (fp32 accumulators) then stay a
# small fraction of one (B, N, E) activation, while each recompute matmul still reads x
# once for several heads.
HEAD_CHUNKS = 8


def head_chunks(num_heads: int, kv_group: int) -> list[tuple[int, int]]:
    """``(first, stop)`` query heads of each chunk of the backward: ``num_heads //
    HEAD_CHUNKS`` heads (at least one K/V head's ``kv_group`` query heads, and a multiple of
    them, so that a chunk reads whole K/V heads)."""
    size = max(kv_group, num_heads // HEAD_CHUNKS // kv_group * kv_group)
    return [(a, min(num_heads, a + size)) for a in range(0, num_heads, size)]


class HeadsAttention:
    """The attention the node runs, on a range of query heads at a time.

    ``plan`` is the whole call's plan; ``forward`` and ``backward_into`` run query heads
    ``[first, stop)`` (whole K/V heads: the bounds are multiples of the plan's K/V group
    size) on q, k, v of those heads alone. :class:`BackendHeads` runs them on this device;
    the ring's form lives in :mod:`dilated_attention_pytorch.distributed.projected_ring`.
    """

    plan: DilatedPlan

    def forward_chunks(self) -> list[tuple[int, int]]:
        """The head ranges of the forward, in order (:func:`head_chunks`)."""
        return head_chunks(self.plan.num_heads, self.plan.kv_group_size)

    def backward_chunks(self) -> list[tuple[int, int]]:
        """The head ranges of the backward, in order (:func:`head_chunks`)."""
        return head_chunks(self.plan.num_heads, self.plan.kv_group_size)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, first: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        """``(out (B, N, h, D), lse pair (2, B, N, h))`` of heads ``[first, stop)``."""
        raise NotImplementedError

    def backward_into(
        self, grads: tuple[Tensor, Tensor, Tensor], dout: Tensor, q: Tensor, k: Tensor,
        v: Tensor, out: Tensor, lse_pair: Tensor, first: int, stop: int,
    ) -> None:  # fmt: skip
        """The gradients of q, k, v of heads ``[first, stop)`` written into ``grads``."""
        raise NotImplementedError


class BackendHeads(HeadsAttention):
    """:class:`HeadsAttention` on this device: a backend with its forward context, each
    range of heads run as its part of the plan (:func:`~dilated_attention_pytorch.plan.heads_plan`)."""

    def __init__(self, backend: Backend, fctx: ForwardContext) -> None:
        self.backend, self.fctx, self.plan = backend, fctx, fctx.plan

    def _context(self, first: int, stop: int) -> ForwardContext:
        return dataclasses.replace(self.fctx, plan=heads_plan(self.plan, first, stop))

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, first: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        return _run_forward(self.backend, q, k, v, self._context(first, stop))

    def backward_into(self, grads, dout, q, k, v, out, lse_pair, first, stop) -> None:
        _run_backward_into(
            self.backend, grads, dout, q, k, v, out, lse_pair, self._context(first, stop)
        )


@dataclass
class _Spec:
    """Everything but the tensors: the head dim, the attention and the rotary tables."""

    head_dim: int
    attention: HeadsAttention
    rotary: tuple[Tensor, Tensor] | None = None  # (cos, sin) applied to q and k

    @property
    def plan(self) -> DilatedPlan:
        return self.attention.plan

    @property
    def num_heads(self) -> int:
        return self.plan.num_heads


def projected_attention(
    x: Tensor,
    weights: tuple[Tensor, Tensor, Tensor],
    biases: tuple[Tensor | None, Tensor | None, Tensor | None],
    *,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    branch_mixing: str,
    scale: float | None,
    dropout_p: float,
    backend: str | Backend,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    cu_seqlens: Tensor | None,
    max_seqlen: int | None,
    rotary: tuple[Tensor, Tensor] | None = None,
) -> Tensor | None:
    """``dilated_attention(x W_q^T + b_q, x W_k^T + b_k, x W_v^T + b_v, ...)`` on ``x`` of
    shape ``(B, N, E)``, as ``(B, N, H, D)``, with q, k, v recomputed in the backward.

    ``weights``: ``W_q (H D, E)``, ``W_k`` and ``W_v`` ``(H_kv D, E)``; ``biases`` the
    matching biases or ``None``. ``rotary``: ``(cos, sin)`` of
    :func:`~dilated_attention_pytorch.rotary.rotary_tables`, applied to q and k after the
    projection (:class:`~dilated_attention_pytorch.rotary.RotaryAttention`'s rule).
    Returns ``None`` (the caller then runs the projections and the attention as separate
    nodes) for the one case this node does not reproduce:
    dropout on packed documents with a backend that runs them one by one (each document
    then draws its own seed).
    """
    D = weights[0].shape[0] // num_heads
    # q's shape, dtype and device (q_proj maps E = H * D features to H heads of D), for
    # the checks.
    q_like = x.unflatten(-1, (num_heads, D))
    if rotary is not None:
        rotary = check_rotary_tables(rotary, q_like)
    key_padding_mask = check_key_padding_mask(key_padding_mask, q_like)
    documents, packed = packed_documents(cu_seqlens, max_seqlen, q_like, key_padding_mask)
    plan = make_plan(segment_lengths, dilation_rates, num_heads, branch_mixing, num_kv_heads)
    is_packed = cu_seqlens is not None
    call = _call(
        q_like, plan, is_causal, dropout_p, key_padding_mask is not None, True, packed=is_packed
    )
    chosen = select_backend(backend, call)
    if is_packed and dropout_p > 0.0 and not chosen.capabilities.packed:
        return None
    seed, fctx = forward_context(
        plan, D, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
        key_padding_mask=key_padding_mask, documents=documents,
    )  # fmt: skip
    spec = _Spec(D, BackendHeads(chosen, fctx), rotary)
    if torch.compiler.is_compiling():
        return _compiled(
            x, weights, biases, spec, seed, backend_key(chosen), packed or (None, None)
        )
    fctx.seed = int(seed.item()) if dropout_p > 0.0 else 0
    return run_projected(x, weights, biases, spec)


def run_projected(
    x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...], spec: _Spec
) -> Tensor:
    """The node on checked inputs (eager): ``(B, N, H, D)``."""
    out, _ = _ProjectedAttentionFunction.apply(x, *weights, *biases, spec)
    return out


def _heads(spec: _Spec, first: int, stop: int) -> tuple[slice, slice]:
    """Query heads ``[first, stop)`` and their K/V heads, as slices."""
    g = spec.plan.kv_group_size
    return slice(first, stop), slice(first // g, stop // g)


def _rotate(spec: _Spec, q: Tensor, k: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """q and k rotated by the rotary tables (none: unchanged). ``inverse``: by the opposite
    angles, which maps the gradients of rotated q and k to those of q and k (a rotation's
    transpose is its inverse)."""
    if spec.rotary is None:
        return q, k
    cos, sin = spec.rotary
    if inverse:
        sin = -sin
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _qkv_rows(spec: _Spec, first: int, stop: int) -> tuple[slice, slice]:
    """Rows of ``W_q`` and of ``W_k``/``W_v`` for query heads ``[first, stop)``."""
    D, g = spec.head_dim, spec.plan.kv_group_size
    return slice(first * D, stop * D), slice(first // g * D, stop // g * D)


def _chunk_weights(
    weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...], spec: _Spec, first: int,
    stop: int,
) -> tuple[Tensor, Tensor | None, tuple[slice, slice, slice]]:  # fmt: skip
    """The rows of ``W_q``, ``W_k``, ``W_v`` (and of the biases) for query heads
    ``[first, stop)``, concatenated, and the row ranges of each."""
    rows_q, rows_kv = _qkv_rows(spec, first, stop)
    parts = (rows_q, rows_kv, rows_kv)
    w = torch.cat([wt[rows] for wt, rows in zip(weights, parts, strict=True)])
    b = None
    if biases[0] is not None:
        b = torch.cat([bt[rows] for bt, rows in zip(biases, parts, strict=True)])
    return w, b, parts


def _split_heads(y: Tensor, parts: tuple[slice, ...], head_dim: int) -> tuple[Tensor, ...]:
    """``(B, N, [q | k | v] features)`` as ``(B, N, heads, D)`` views of q, k, v."""
    sizes = [rows.stop - rows.start for rows in parts]
    return tuple(token_major(t.unflatten(-1, (-1, head_dim))) for t in y.split(sizes, dim=-1))


def _project(
    x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...], spec: _Spec,
    first: int, stop: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """q, k, v of query heads ``[first, stop)`` (and their K/V heads) in one matmul, as
    ``(B, N, heads, D)`` views of its output."""
    w, b, parts = _chunk_weights(weights, biases, spec, first, stop)
    return _split_heads(F.linear(x, w, b), parts, spec.head_dim)


def _forward(
    x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...], spec: _Spec
) -> tuple[Tensor, Tensor]:
    """``(out (B, N, H, D), lse pair)``: one matmul for q, k, v, then the attention a chunk
    of heads at a time, so that the backend's buffers (fp32 accumulators, block outputs)
    are a chunk's."""
    q, k, v = _project(x, weights, biases, spec, 0, spec.num_heads)
    out = lse_pair = None
    for first, stop in spec.attention.forward_chunks():
        heads, kv_heads = _heads(spec, first, stop)
        qc, kc = _rotate(spec, q[:, :, heads], k[:, :, kv_heads])
        out_c, lse_c = spec.attention.forward(qc, kc, v[:, :, kv_heads], first, stop)
        del qc, kc
        if (first, stop) == (0, spec.num_heads):  # one chunk: its output is the whole
            return out_c, lse_c
        if out is None:
            out = out_c.new_empty(q.shape)
            lse_pair = lse_c.new_empty(*lse_c.shape[:-1], q.shape[2])
        out[:, :, heads] = out_c
        lse_pair[..., heads] = lse_c
        del out_c, lse_c
    return out, lse_pair


def _backward(
    dout: Tensor, x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...],
    out: Tensor, lse_pair: Tensor, spec: _Spec, needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """``(dx, dW_q, dW_k, dW_v, db_q, db_k, db_v)``, ``None`` where ``needs`` (7 flags)
    says no. Per chunk of heads: q, k, v recomputed, the attention's backward written into
    the chunk's ``[dq | dk | dv]``, then its share of ``dx`` (one matmul, added to the
    others' in place) and its rows of each weight and bias gradient: the gradients of q,
    k, v are never held for every head at once."""
    dout = token_major(dout)
    B, N, E = x.shape
    need_x, need_w, need_b = needs[0], needs[1:4], needs[4:7]
    # Each weight and bias gradient in its own storage, as separate projections give;
    # every chunk fills its rows.
    dws = [torch.empty_like(w) if need else None for w, need in zip(weights, need_w, strict=True)]
    dbs = [
        torch.empty_like(b) if need and b is not None else None
        for b, need in zip(biases, need_b, strict=True)
    ]
    x2 = x.reshape(B * N, E)
    dx = None
    for first, stop in spec.attention.backward_chunks():
        heads, kv_heads = _heads(spec, first, stop)
        w, b, parts = _chunk_weights(weights, biases, spec, first, stop)
        q, k, v = _split_heads(F.linear(x, w, b), parts, spec.head_dim)
        del b
        q, k = _rotate(spec, q, k)
        widths = [rows.stop - rows.start for rows in parts]
        dqkv = torch.empty(B, N, sum(widths), dtype=x.dtype, device=x.device)
        targets = _split_heads(dqkv, parts, spec.head_dim)
        spec.attention.backward_into(
            targets, dout[:, :, heads], q, k, v, out[:, :, heads], lse_pair[:, :, :, heads],
            first, stop,
        )  # fmt: skip
        del q, k, v
        if spec.rotary is not None:  # gradients of the rotated q, k -> of q, k
            dq, dk = _rotate(spec, targets[0], targets[1], inverse=True)
            targets[0].copy_(dq)
            targets[1].copy_(dk)
            del dq, dk
        del targets
        flat = dqkv.view(B * N, sum(widths))  # explicit widths: B * N may be 0
        if need_x:  # dx += [dq | dk | dv] of the chunk @ its rows of the weights
            dx = torch.matmul(flat, w) if dx is None else dx.addmm_(flat, w)
        del w
        _write_rows(flat, parts, x2, dws, dbs)
        del flat, dqkv  # before the next chunk's
    if dx is not None:
        dx = dx.view(B, N, E)
    return dx, *dws, *dbs


def _write_rows(flat: Tensor, parts: tuple[slice, ...], x2: Tensor, dws: list, dbs: list) -> None:
    """A chunk's rows of the weight gradients (``d(q|k|v)^T x``) and of the bias
    gradients (column sums), written in place; ``flat``: its ``[dq | dk | dv]`` per
    token. (A function of its own: no view of ``flat`` outlives the call.)"""
    widths = [rows.stop - rows.start for rows in parts]
    for i, (column, rows) in enumerate(zip(flat.split(widths, dim=1), parts, strict=True)):
        if dws[i] is not None:
            torch.matmul(column.t(), x2, out=dws[i][rows])
        if dbs[i] is not None:
            torch.sum(column, 0, out=dbs[i][rows])


class _ProjectedAttentionFunction(torch.autograd.Function):
    """``(x, W_q, W_k, W_v, b_q, b_k, b_v) -> (out (B, N, H, D), lse pair)``."""

    @staticmethod
    def forward(x, wq, wk, wv, bq, bk, bv, spec: _Spec):
        return _forward(x, (wq, wk, wv), (bq, bk, bv), spec)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, wq, wk, wv, bq, bk, bv, spec = inputs
        out, lse_pair = output
        ctx.save_for_backward(x, wq, wk, wv, bq, bk, bv, out, lse_pair)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse_pair)
        ctx.set_materialize_grads(False)

    @staticmethod
    @first_order_only("MultiheadDilatedAttention (recompute_qkv=True)")
    def backward(ctx, dout: Tensor | None, _dlse: Tensor | None):
        x, wq, wk, wv, bq, bk, bv, out, lse_pair = ctx.saved_tensors
        if dout is None:
            return (None,) * 8
        needs = tuple(ctx.needs_input_grad[:7])
        grads = _backward(dout, x, (wq, wk, wv), (bq, bk, bv), out, lse_pair, ctx.spec, needs)
        return *grads, None


# --------------------------------------------------------------------------- torch.compile
# While torch.compile traces, the node runs as two custom operators (opaque to the
# compiler, like dilated_attention's): the settings as plain arguments, the backend by its
# key, packed documents as tensors read inside.


def _op_spec(
    x: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, segment_lengths: list[int],
    dilation_rates: list[int], branch_mixing: str, scale: float, is_causal: bool,
    dropout_p: float, key_padding_mask: Tensor | None, seed: Tensor, backend: str,
    cu_seqlens: Tensor | None, max_seqlen: Tensor | None, cos: Tensor | None,
    sin: Tensor | None,
) -> _Spec:  # fmt: skip
    fctx = _context(
        x.unflatten(-1, (num_heads, head_dim)), num_kv_heads, segment_lengths, dilation_rates,
        branch_mixing, scale, is_causal, dropout_p, key_padding_mask, seed, cu_seqlens,
        max_seqlen,
    )  # fmt: skip
    rotary = None if cos is None or sin is None else (cos, sin)
    return _Spec(head_dim, BackendHeads(_resolve(backend), fctx), rotary)


@torch.library.custom_op("dilated_attention_pytorch::projected_forward", mutates_args=())
def _forward_op(
    x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Tensor | None, bk: Tensor | None,
    bv: Tensor | None, num_heads: int, num_kv_heads: int, head_dim: int,
    segment_lengths: list[int], dilation_rates: list[int], branch_mixing: str, scale: float,
    is_causal: bool, dropout_p: float, key_padding_mask: Tensor | None, seed: Tensor,
    backend: str, cu_seqlens: Tensor | None = None, max_seqlen: Tensor | None = None,
    cos: Tensor | None = None, sin: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    spec = _op_spec(x, num_heads, num_kv_heads, head_dim, segment_lengths, dilation_rates,
                    branch_mixing, scale, is_causal, dropout_p, key_padding_mask, seed, backend,
                    cu_seqlens, max_seqlen, cos, sin)  # fmt: skip
    out, lse_pair = _forward(x, (wq, wk, wv), (bq, bk, bv), spec)
    return _fresh(out), _fresh(lse_pair)


@_forward_op.register_fake
def _(x, wq, wk, wv, bq, bk, bv, num_heads, num_kv_heads, head_dim, *settings,
      **kwargs):  # fmt: skip
    B, N, _ = x.shape
    return (
        x.new_empty(B, N, num_heads, head_dim),
        x.new_empty(2, B, N, num_heads, dtype=compute_dtype(x.dtype)),
    )


@torch.library.custom_op("dilated_attention_pytorch::projected_backward", mutates_args=())
def _backward_op(
    dout: Tensor, x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Tensor | None,
    bk: Tensor | None, bv: Tensor | None, out: Tensor, lse_pair: Tensor, num_heads: int,
    num_kv_heads: int, head_dim: int, segment_lengths: list[int], dilation_rates: list[int],
    branch_mixing: str, scale: float, is_causal: bool, dropout_p: float,
    key_padding_mask: Tensor | None, seed: Tensor, backend: str,
    cu_seqlens: Tensor | None = None, max_seqlen: Tensor | None = None,
    cos: Tensor | None = None, sin: Tensor | None = None,
) -> list[Tensor]:  # fmt: skip
    """``[dx, dW_q, dW_k, dW_v, db_q, db_k, db_v]``; a bias that is ``None`` gets an
    empty gradient."""
    spec = _op_spec(x, num_heads, num_kv_heads, head_dim, segment_lengths, dilation_rates,
                    branch_mixing, scale, is_causal, dropout_p, key_padding_mask, seed, backend,
                    cu_seqlens, max_seqlen, cos, sin)  # fmt: skip
    return op_gradients(dout, x, (wq, wk, wv), (bq, bk, bv), out, lse_pair, spec)


def op_gradients(
    dout: Tensor, x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...],
    out: Tensor, lse_pair: Tensor, spec: _Spec,
) -> list[Tensor]:  # fmt: skip
    """A backward operator's result: ``[dx, dW_q, dW_k, dW_v, db_q, db_k, db_v]``, each a
    fresh tensor, a bias that is ``None`` getting an empty one."""
    needs = (True, True, True, True, *(b is not None for b in biases))
    grads = _backward(dout, x, weights, biases, out, lse_pair, spec, needs)
    return [x.new_empty(0) if g is None else _fresh(g) for g in grads]


def fake_gradients(
    x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...]
) -> list[Tensor]:
    """:func:`op_gradients`' shapes, for the fake implementations."""
    return [
        x.new_empty(x.shape), *(w.new_empty(w.shape) for w in weights),
        *(x.new_empty(0) if b is None else b.new_empty(b.shape) for b in biases),
    ]  # fmt: skip


@_backward_op.register_fake
def _(dout, x, wq, wk, wv, bq, bk, bv, *settings, **kwargs):  # fmt: skip
    return fake_gradients(x, (wq, wk, wv), (bq, bk, bv))


def register_projected_autograd(forward_op, backward_op) -> None:
    """The autograd rule of a node's operator pair: ``forward_op(x, W_q, W_k, W_v, b_q, b_k,
    b_v, *settings) -> (out, lse pair)`` (the LSE not differentiable) and
    ``backward_op(dout, x, W_q, W_k, W_v, b_q, b_k, b_v, out, lse pair, *settings)`` ->
    :func:`op_gradients`' list."""

    def setup_context(ctx, inputs, output) -> None:
        x, wq, wk, wv, bq, bk, bv, *settings = inputs
        out, lse_pair = output
        ctx.save_for_backward(x, wq, wk, wv, bq, bk, bv, out, lse_pair)
        ctx.settings = settings
        ctx.mark_non_differentiable(lse_pair)

    def backward_rule(ctx, dout: Tensor, _dlse: Tensor):
        x, wq, wk, wv, bq, bk, bv, out, lse_pair = ctx.saved_tensors
        grads = backward_op(dout.contiguous(), x, wq, wk, wv, bq, bk, bv, out, lse_pair,
                            *ctx.settings)  # fmt: skip
        dbs = [None if b is None else g for b, g in zip((bq, bk, bv), grads[4:], strict=True)]
        return (*grads[:4], *dbs, *(None for _ in ctx.settings))

    forward_op.register_autograd(backward_rule, setup_context=setup_context)


register_projected_autograd(_forward_op, _backward_op)


def _compiled(
    x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...], spec: _Spec,
    seed: Tensor, backend: str, packed: tuple[Tensor | None, Tensor | None],
) -> Tensor:  # fmt: skip
    """The node through the custom operators (while ``torch.compile`` traces)."""
    assert isinstance(spec.attention, BackendHeads)
    fctx, plan = spec.attention.fctx, spec.plan
    cos, sin = spec.rotary if spec.rotary is not None else (None, None)
    out, _ = _forward_op(
        x, *weights, *biases, plan.num_heads, plan.num_kv_heads, spec.head_dim,
        list(plan.segment_lengths), list(plan.dilation_rates), plan.branch_mixing,
        float(fctx.scale), fctx.is_causal, float(fctx.dropout_p), fctx.key_padding_mask, seed,
        backend, *packed, cos, sin,
    )  # fmt: skip
    return out
