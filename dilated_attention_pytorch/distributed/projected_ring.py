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

from ..plan import DilatedPlan, heads_plan
from ..projected import HeadsAttention, _Spec, run_projected
from ..rotary import check_rotary_tables
from .comm import RingStats
from .ring_dilated_attention import (
    RingSetup,
    _ring_backward_accumulate,
    _ring_setup,
    ring_dilated_forward,
)
from .validation import check_ring_call, check_ring_call_locally, check_timeout

__all__ = ["RingHeads", "projected_ring_attention"]


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
    backend: str,
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
    :func:`~dilated_attention_pytorch.projected.projected_attention`. Eager only: under
    ``torch.compile`` the layer runs its projections and the ring as separate nodes.
    """
    D = weights[0].shape[0] // num_heads
    # Views with q's and k's shapes, dtype and device, for the checks.
    q_like = x.unflatten(-1, (num_heads, D))
    kv_like = x.narrow(-1, 0, num_kv_heads * D).unflatten(-1, (num_kv_heads, D))
    settings = dict(
        ring_size=ring_size, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
        branch_mixing=branch_mixing, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
        key_padding_mask=key_padding_mask, layout=layout,
    )  # fmt: skip
    if validate:
        plan = check_ring_call(
            q_like, kv_like, kv_like, group=group, backend=backend, timeout=timeout, **settings
        )
    else:
        plan = check_ring_call_locally(
            q_like, kv_like, kv_like, world_size=dist.get_world_size(group), **settings
        )
    timeout = check_timeout(timeout)
    if rotary is not None:
        rotary = check_rotary_tables(rotary, q_like)
    # Drawn as ring_dilated_attention draws it, so equally seeded generators agree.
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else 0
    call = _RingCall(
        group, ring_size, bool(is_causal), scale, backend, float(dropout_p), key_padding_mask,
        timeout, stats, seed, layout,
    )  # fmt: skip
    if stats is not None:
        stats.calls += 1
    keep = None if key_padding_mask is None else ~key_padding_mask.contiguous()
    return run_projected(x, weights, biases, _Spec(D, RingHeads(plan, call, keep), rotary))
