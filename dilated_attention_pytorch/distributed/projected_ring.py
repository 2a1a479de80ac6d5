"""The multi-head layer's recomputing node over a ring: q, k, v of the shards recomputed.

:func:`projected_ring_attention` is :func:`~dilated_attention_pytorch.projected.projected_attention`
(the one autograd node of the layer's q/k/v projections and its attention, keeping only
the input, the output and its LSE) with the attention run by
:func:`~dilated_attention_pytorch.distributed.ring_dilated_attention` on this rank's shard:

- forward: q, k, v of the shard from one matmul, one ring pass over every head (the
  same transfers as the ring alone), then q, k, v freed;
- backward: a few heads at a time (:func:`~dilated_attention_pytorch.projected.head_chunks`),
  their q, k, v recomputed and a ring pass of the backward over those heads alone (only
  their dilated K/V and dK/dV travel), written into the layer's ``[dq | dk | dv]``.

The backward's transfers are then split into several smaller ones (as many ring passes
as chunks of heads, the same bytes in all); in exchange, no rank holds the q, k, v of
its shard between the forward and the backward, nor their gradients and the ring's fp32
accumulators for every head at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import Backend
from ..backends.blocks import compute_dtype
from ..dropout import draw_seed, seed_tensor
from ..ops import _fresh, float_arguments
from ..plan import DilatedPlan, heads_plan
from ..projected import (
    HeadsAttention,
    _forward,
    _Spec,
    fake_gradients,
    op_gradients,
    register_projected_autograd,
    run_projected,
)
from ..rotary import check_rotary_tables
from .comm import RingStats, stats_by_key
from .ring_dilated_attention import (
    RingSetup,
    _parse_spec,
    _ring_backward_accumulate,
    _ring_setup,
    _spec_backend,
    ring_dilated_forward,
    spec_text,
)
from .validation import check_ring_call, check_ring_call_locally, check_timeout

__all__ = ["RECOMPUTING_BACKWARD", "RingHeads", "projected_ring_attention", "qkv_like"]

# What the collective check compares so that every rank runs the same backward: this
# node's ring passes (one per chunk of heads) or a plain ring call's one pass.
RECOMPUTING_BACKWARD = "recompute_qkv: a ring pass per chunk of heads"


class RingHeads(HeadsAttention):
    """:class:`~dilated_attention_pytorch.projected.HeadsAttention` over a ring: each
    range of heads runs as a ring pass of its part of the plan (the dilation offsets and
    dropout streams of those heads in the whole call)."""

    def __init__(self, plan: DilatedPlan, call: _RingCall, key_keep: Tensor | None) -> None:
        self.plan, self.call, self.key_keep = plan, call, key_keep

    def forward_chunks(self) -> list[tuple[int, int]]:
        # One ring pass: the forward holds q, k, v of every head anyway, and each pass
        # costs its own transfers.
        return [(0, self.plan.num_heads)]

    def _setup(self, like: Tensor, first: int, stop: int, phase: str) -> RingSetup:
        part = (
            self.plan
            if (first, stop) == (0, self.plan.num_heads)
            else heads_plan(self.plan, first, stop)
        )
        return _part_setup(self.call, like, part, phase)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, first: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        return ring_dilated_forward(q, k, v, self._setup(q, first, stop, "forward"), self.key_keep)

    def backward_into(self, grads, dout, q, k, v, out, lse_pair, first, stop) -> None:
        setup = self._setup(q, first, stop, "backward")
        accs = _ring_backward_accumulate(dout, q, k, v, out, lse_pair, setup, self.key_keep)
        for target, acc in zip(grads, accs, strict=True):
            target.copy_(acc)


@dataclasses.dataclass(frozen=True)
class _RingCall:
    """The settings :func:`_part_setup` rebuilds a ring setup from, for a part of the heads."""

    group: dist.ProcessGroup
    size: int
    is_causal: bool
    scale: float | None
    backend: object
    dropout_p: float
    key_padding_mask: Tensor | None
    timeout: float | None
    stats: RingStats | None
    seed: int
    layout: str


def _part_setup(call: _RingCall, like: Tensor, plan: DilatedPlan, phase: str) -> RingSetup:
    setup = _ring_setup(
        like, plan, call.group, call.size, is_causal=call.is_causal, scale=call.scale,
        backend=call.backend, dropout_p=call.dropout_p, key_padding_mask=call.key_padding_mask,
        timeout=call.timeout, stats=call.stats, seed=call.seed, layout=call.layout,
    )  # fmt: skip
    return dataclasses.replace(setup, phase=phase)


def projected_ring_attention(
    x: Tensor,
    weights: tuple[Tensor, Tensor, Tensor],
    biases: tuple[Tensor | None, Tensor | None, Tensor | None],
    *,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    group: dist.ProcessGroup,
    ring_size: int,
    is_causal: bool,
    branch_mixing: str,
    scale: float | None,
    backend: str | Backend,
    dropout_p: float,
    key_padding_mask: Tensor | None,
    validate: bool,
    timeout: float | None,
    stats: RingStats | None,
    layout: str,
    rotary: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`~dilated_attention_pytorch.distributed.ring_dilated_attention` of the
    projections of this rank's shard ``x`` ``(B, N/k, E)``, as ``(B, N/k, H, D)``, with
    q, k, v recomputed in the backward (see the module).

    Collective, with the ring's settings and checks (``validate``: the collective check,
    else this rank's own); ``weights``/``biases``/``rotary`` as in
    :func:`~dilated_attention_pytorch.projected.projected_attention`. Under
    ``torch.compile`` it runs as the custom operators
    ``dilated_attention_pytorch::projected_ring_forward`` and ``::projected_ring_backward``
    (the checks, the ring's transfers and the host reads inside them).
    """
    settings = dict(
        segment_lengths=tuple(segment_lengths), dilation_rates=tuple(dilation_rates),
        ring_size=ring_size, is_causal=is_causal, branch_mixing=branch_mixing, scale=scale,
        dropout_p=dropout_p, layout=layout, timeout=timeout,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        floats = ("dropout_p", "scale", "timeout")  # the operators' own arguments
        text = spec_text(
            backend=backend, group=group, stats=stats, validate=validate,
            **{name: value for name, value in settings.items() if name not in floats},
        )  # fmt: skip
        seed = seed_tensor(dropout_p)
        cos, sin = rotary if rotary is not None else (None, None)
        out, _ = _forward_op(
            x, *weights, *biases, key_padding_mask, text, seed, num_heads, num_kv_heads,
            *float_arguments(dropout_p, scale, timeout), cos, sin,
        )  # fmt: skip
        return out
    # Drawn as ring_dilated_attention draws it, so equally seeded generators agree.
    seed = draw_seed(dropout_p)
    spec = _node_spec(
        x, num_heads, num_kv_heads, group, backend, key_padding_mask, validate, stats, seed,
        rotary, **settings,
    )  # fmt: skip
    return run_projected(x, weights, biases, spec)


def qkv_like(x: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """Views of the shard ``x`` ``(B, L, E)`` with q's ``(B, L, H, D)`` and k's and v's
    ``(B, L, H_kv, D)`` shapes, dtype and device (``D = E / H``): what the checks and the
    module's signature read, without projecting anything."""
    D = x.shape[-1] // num_heads
    return x.unflatten(-1, (num_heads, D)), x.narrow(-1, 0, num_kv_heads * D).unflatten(
        -1, (num_kv_heads, D)
    )


def _node_spec(
    x: Tensor, num_heads: int, num_kv_heads: int, group: dist.ProcessGroup,
    backend: str | Backend, key_padding_mask: Tensor | None, validate: bool,
    stats: RingStats | None, seed: int, rotary: tuple[Tensor, Tensor] | None,
    count: bool = True, *, segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...],
    ring_size: int, is_causal: bool, branch_mixing: str, scale: float | None,
    dropout_p: float, layout: str, timeout: float | None,
) -> _Spec:  # fmt: skip
    """The checked call as the node's spec (checks: the collective one with ``validate``,
    else this rank's own); ``count``: count the call in ``stats`` (the ring passes count
    their bytes and steps in it either way)."""
    q_like, kv_like = qkv_like(x, num_heads, num_kv_heads)
    checked = dict(
        ring_size=ring_size, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
        branch_mixing=branch_mixing, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
        key_padding_mask=key_padding_mask, layout=layout,
    )  # fmt: skip
    rotary_error = None
    if rotary is not None:
        try:  # checked before the collective check, which then raises it on every rank
            rotary = check_rotary_tables(rotary, q_like)
        except (TypeError, ValueError) as exc:
            rotary_error = f"{type(exc).__name__}: {exc}"
            if not validate:
                raise
    if validate:
        plan = check_ring_call(
            q_like, kv_like, kv_like, group=group, backend=backend, timeout=timeout,
            backward=RECOMPUTING_BACKWARD, input_error=rotary_error, **checked,
        )  # fmt: skip
    else:
        plan = check_ring_call_locally(
            q_like, kv_like, kv_like, world_size=dist.get_world_size(group), **checked
        )
    timeout = check_timeout(timeout)
    call = _RingCall(
        group, ring_size, bool(is_causal), scale, backend, float(dropout_p), key_padding_mask,
        timeout, stats, seed, layout,
    )  # fmt: skip
    if stats is not None and count:
        stats.calls += 1
    keep = None if key_padding_mask is None else ~key_padding_mask.contiguous()
    return _Spec(q_like.shape[-1], RingHeads(plan, call, keep), rotary)


# --------------------------------------------------------------------------- torch.compile
# While torch.compile traces, the node runs as two custom operators (opaque to the
# compiler, like the ring's own): the settings as a string of Python literals, the
# process group and the monitor by their names, the checks and transfers inside.


def _op_spec(
    x: Tensor, key_padding_mask: Tensor | None, text: str, seed: Tensor, num_heads: int,
    num_kv_heads: int, dropout_p: float, scale: float | None, timeout: float | None,
    cos: Tensor | None, sin: Tensor | None, phase: str,
) -> _Spec:  # fmt: skip
    s = _parse_spec(text)
    group = dist.distributed_c10d._resolve_process_group(s["group"])
    rotary = None if cos is None or sin is None else (cos, sin)
    settings = {name: s[name] for name in (
        "segment_lengths", "dilation_rates", "ring_size", "is_causal", "branch_mixing", "layout",
    )}  # fmt: skip
    settings.update(dropout_p=dropout_p, scale=scale, timeout=timeout)
    # The backward's inputs were checked by the forward, whose call it is.
    forward = phase == "forward"
    return _node_spec(
        x, num_heads, num_kv_heads, group, _spec_backend(s), key_padding_mask,
        s["validate"] and forward, stats_by_key(s["stats"]), int(seed.item()), rotary,
        count=forward, **settings,
    )  # fmt: skip


@torch.library.custom_op("dilated_attention_pytorch::projected_ring_forward", mutates_args=())
def _forward_op(
    x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Tensor | None, bk: Tensor | None,
    bv: Tensor | None, key_padding_mask: Tensor | None, spec: str, seed: Tensor,
    num_heads: int, num_kv_heads: int, dropout_p: float, scale: float | None,
    timeout: float | None, cos: Tensor | None = None, sin: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    node = _op_spec(x, key_padding_mask, spec, seed, num_heads, num_kv_heads, dropout_p, scale,
                    timeout, cos, sin, "forward")  # fmt: skip
    out, lse_pair = _forward(x, (wq, wk, wv), (bq, bk, bv), node)
    return _fresh(out), _fresh(lse_pair)


@_forward_op.register_fake
def _(x, wq, wk, wv, bq, bk, bv, key_padding_mask, spec, seed, num_heads, num_kv_heads,
      *settings, **kwargs):  # fmt: skip
    B, L, _ = x.shape
    D = wq.shape[0] // num_heads
    return (
        x.new_empty(B, L, num_heads, D),
        x.new_empty(2, B, L, num_heads, dtype=compute_dtype(x.dtype)),
    )


@torch.library.custom_op("dilated_attention_pytorch::projected_ring_backward", mutates_args=())
def _backward_op(
    dout: Tensor, x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Tensor | None,
    bk: Tensor | None, bv: Tensor | None, out: Tensor, lse_pair: Tensor,
    key_padding_mask: Tensor | None, spec: str, seed: Tensor, num_heads: int,
    num_kv_heads: int, dropout_p: float, scale: float | None, timeout: float | None,
    cos: Tensor | None = None, sin: Tensor | None = None,
) -> list[Tensor]:  # fmt: skip
    """``[dx, dW_q, dW_k, dW_v, db_q, db_k, db_v]``; a bias that is ``None`` gets an
    empty gradient."""
    node = _op_spec(x, key_padding_mask, spec, seed, num_heads, num_kv_heads, dropout_p, scale,
                    timeout, cos, sin, "backward")  # fmt: skip
    return op_gradients(dout, x, (wq, wk, wv), (bq, bk, bv), out, lse_pair, node)


@_backward_op.register_fake
def _(dout, x, wq, wk, wv, bq, bk, bv, *settings, **kwargs):  # fmt: skip
    return fake_gradients(x, (wq, wk, wv), (bq, bk, bv))


register_projected_autograd(_forward_op, _backward_op)
