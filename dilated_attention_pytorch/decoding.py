"""Incremental decoding: a key/value cache for causal dilated attention.

A query at position ``p`` sees, in branch ``(w, r)``, only keys of its own segment
``p // w`` at its head's offset. So the cache keeps, per branch, the keys and values of
the *current* segment only, one slot per kept position: slot ``j`` of head ``h`` holds
segment position ``j * r + o_h``. That is ``ceil(w / r)`` slots per head and branch,
independent of how long the sequence grows (LongNet's ``w / r`` is constant, so a cache
holds ``#branches * w / r`` positions per head). With grouped-query attention the heads
are K/V heads, once per offset that their query heads use.

Usage (one attention layer; :class:`~dilated_attention_pytorch.models.LongNetLM`'s
``generate`` does this for every layer)::

    cache = DilatedKVCache([2048, 4096], [1, 2], num_heads=8)
    out = cached_dilated_attention(q, k, v, cache)   # the prompt: (B, N, H, D)
    out = cached_dilated_attention(q1, k1, v1, cache)  # then one (or more) new tokens

Each call returns exactly what causal :func:`~dilated_attention_pytorch.dilated_attention`
over the whole sequence returns for those tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .backends.blocks import compute_dtype
from .functional import dilated_attention
from .plan import DilatedPlan, make_plan
from .validation import check_qkv, check_scale

__all__ = ["DilatedKVCache", "cached_dilated_attention"]


class DilatedKVCache:
    """Keys and values that later queries of causal dilated attention can still attend.

    Args:
        segment_lengths, dilation_rates, num_heads, branch_mixing: the attention's
            schedule (as in :func:`~dilated_attention_pytorch.dilated_attention`).
        num_kv_heads: K/V heads of grouped-query attention (default ``num_heads``).
        scale: score scale, default ``D ** -0.5``.
        backend: the backend of the prompt's (prefill) call.

    ``position`` is the number of tokens seen so far; ``nbytes()`` the cache's size.
    Buffers are allocated at the first call (the prompt), for its batch size, head dim,
    dtype and device; later calls must match them. Each branch keeps only the heads that
    run it (all of them with ``"softmax"`` mixing, one group with ``"head_split"``).
    The cache is for inference: token steps run without autograd.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        num_heads: int,
        *,
        branch_mixing: str = "softmax",
        scale: float | None = None,
        backend: str = "auto",
        num_kv_heads: int | None = None,
    ) -> None:
        self.plan: DilatedPlan = make_plan(
            segment_lengths, dilation_rates, num_heads, branch_mixing, num_kv_heads
        )
        self.scale = check_scale(scale)
        self.backend = backend
        self.position = 0
        self.keys: list[Tensor] = []  # per branch (B, ceil(w/r), columns, D)
        self.values: list[Tensor] = []
        # Per branch, the buffers' columns: one per head group and K/V head it reads (the
        # heads that run the branch, without grouped-query attention), with its K/V head
        # and offset.
        self._kv_heads: list[list[int]] = []
        self._offsets: list[list[int]] = []
        for b in self.plan.branches:
            self._kv_heads.append([h for g in b.head_groups for h in g.kv_heads])
            self._offsets.append([g.offset for g in b.head_groups for _ in g.kv_heads])
        # Per branch and offset o: (the columns, their K/V heads, the query heads, the
        # column each query head reads) of the head groups with offset o, as index
        # tensors on the buffers' device (set by _allocate), so a step selects a token's
        # heads without asking the device which they are.
        self._groups: list[dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]] = []

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def reset(self) -> None:
        """Forget every token (the next call is a new prompt)."""
        self.position = 0
        self.keys, self.values = [], []

    def check(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Raise unless ``q, k, v`` ``(B, T, H, D)`` fit this cache's buffers."""
        H, H_kv = self.plan.num_heads, self.plan.num_kv_heads
        if q.shape[2] != H or k.shape[2] != H_kv:
            raise ValueError(
                f"the cache was built for {H} query and {H_kv} K/V heads, got q of shape "
                f"{tuple(q.shape)} and k of shape {tuple(k.shape)} (B, N, H, D); build one "
                f"cache per layer and head count."
            )
        if not self.keys or self.position == 0:
            return  # a new prompt: its fill allocates buffers of its own shape
        ref_k, ref_v = self.keys[0], self.values[0]
        wanted = (ref_k.shape[0], ref_k.shape[-1], ref_v.shape[-1], ref_k.dtype, ref_k.device)
        got = (k.shape[0], k.shape[-1], v.shape[-1], k.dtype, k.device)
        if got != wanted:
            raise ValueError(
                f"the cache holds batch {wanted[0]}, head dims {wanted[1]}/{wanted[2]}, "
                f"{wanted[3]} on {wanted[4]}, got k {tuple(k.shape)} / v {tuple(v.shape)}, "
                f"{k.dtype} on {k.device}; call cache.reset() before a new prompt."
            )

    def _allocate(self, k: Tensor, v: Tensor) -> None:
        B, _, _, D = k.shape
        self.keys, self.values = [], []
        for i, branch in enumerate(self.plan.branches):
            slots = math.ceil(branch.segment_length / branch.dilation_rate)
            columns = len(self._kv_heads[i])
            self.keys.append(k.new_zeros(B, slots, columns, D))
            self.values.append(v.new_zeros(B, slots, columns, v.shape[-1]))
        self._groups = []
        for branch in self.plan.branches:
            by_offset: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
            column = 0
            for g in branch.head_groups:
                cols, kv, heads, reads = by_offset.setdefault(g.offset, ([], [], [], []))
                cols += range(column, column + g.num_kv_heads)
                kv += g.kv_heads
                heads += g.heads
                reads += [column + i // g.kv_share for i in range(g.num_heads)]
                column += g.num_kv_heads
            self._groups.append(
                {
                    o: tuple(torch.tensor(x, dtype=torch.long, device=k.device) for x in lists)
                    for o, lists in by_offset.items()
                }
            )

    def fill(self, k: Tensor, v: Tensor) -> None:
        """Keep what the tokens after ``k``/``v`` ``(B, N, H, D)`` (a whole prompt) can see."""
        self._allocate(k, v)
        n = k.shape[1]
        for i, branch in enumerate(self.plan.branches):
            w, r = branch.segment_length, branch.dilation_rate
            start = (n // w) * w  # the segment of the next token, position n
            slots = self.keys[i].shape[1]
            if n == 0:
                continue
            offsets = torch.tensor(self._offsets[i], dtype=torch.long, device=k.device)
            heads = torch.tensor(self._kv_heads[i], dtype=torch.long, device=k.device)
            pos = start + offsets[None, :] + r * torch.arange(slots, device=k.device)[:, None]
            keep = (pos < n)[None, :, :, None]  # (1, slots, columns, 1)
            idx = pos.clamp(max=n - 1)
            self.keys[i] = torch.where(keep, k[:, idx, heads], self.keys[i])
            self.values[i] = torch.where(keep, v[:, idx, heads], self.values[i])
        self.position = n

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Append one token's ``k``/``v`` ``(B, H_kv, D)`` and attend its ``q`` ``(B, H, D)``
        -> ``(B, H, D)``."""
        p = self.position
        if self.keys and self.keys[0].is_inference() and not torch.is_inference_mode_enabled():
            # Buffers made under torch.inference_mode() (the prompt) cannot be written
            # outside it: continue on copies.
            self.keys = [t.clone() for t in self.keys]
            self.values = [t.clone() for t in self.values]
        cdt = compute_dtype(q.dtype)
        B, H, D = q.shape
        scale = D**-0.5 if self.scale is None else self.scale
        # Per branch, each head's best score m and log-sum l of exp(score - m): merged
        # relative to the largest m, so large logits lose nothing (the LSE-pair rule).
        maxes = torch.full((len(self.plan.branches), B, H), -math.inf, dtype=cdt, device=q.device)
        logs = torch.zeros_like(maxes)
        outs = torch.zeros(len(self.plan.branches), B, H, v.shape[-1], dtype=cdt, device=q.device)
        for i, branch in enumerate(self.plan.branches):
            w, r = branch.segment_length, branch.dilation_rate
            s = p % w
            slot = s // r
            group = self._groups[i].get(s % r)  # the heads whose offset p has
            if group is None:
                continue
            cols, kv_heads, a_heads, reads = group
            self.keys[i][:, slot, cols] = k[:, kv_heads]
            self.values[i][:, slot, cols] = v[:, kv_heads]
            keys = self.keys[i][:, : slot + 1, reads].to(cdt)  # (B, L, h, D) per query head
            vals = self.values[i][:, : slot + 1, reads].to(cdt)
            scores = torch.einsum("bhd,blhd->bhl", q[:, a_heads].to(cdt), keys) * scale
            m = scores.amax(dim=-1)  # (B, h)
            probs = torch.exp(scores - m[..., None])
            total = probs.sum(dim=-1)
            maxes[i][:, a_heads] = m
            logs[i][:, a_heads] = torch.log(total)
            outs[i][:, a_heads] = torch.einsum("bhl,blhd->bhd", probs, vals) / total[..., None]
        self.position = p + 1
        top = maxes.amax(dim=0)  # (B, H); -inf where no branch covers the head here
        covered = torch.isfinite(top)
        rel = maxes - torch.where(covered, top, 0.0) + logs  # log weight, up to a constant
        weights = torch.softmax(torch.where(covered, rel, 0.0), dim=0)
        # Branches a head does not run at p, and heads no branch covers, contribute
        # nothing (not 0 * value: a non-finite value must not reach them).
        used = torch.isfinite(maxes)
        out = torch.where(used[..., None], weights[..., None] * outs, 0.0).sum(dim=0)
        return out.to(q.dtype)


def cached_dilated_attention(q: Tensor, k: Tensor, v: Tensor, cache: DilatedKVCache) -> Tensor:
    """Causal dilated attention of the next tokens, with a :class:`DilatedKVCache`.

    Args:
        q, k, v: ``(B, T, H, D)`` (k, v: ``(B, T, H_kv, D)``) for the ``T`` tokens at positions
            ``cache.position .. cache.position + T - 1``.
        cache: the layer's cache; on its first call (``cache.position == 0``) ``q, k, v``
            are the whole prompt and run as one causal call (differentiable), later calls
            step through their tokens one at a time (inference only: under autograd
            they raise).

    Returns:
        ``(B, T, H, D)``: what causal ``dilated_attention`` over the whole sequence gives
        at these positions.
    """
    check_qkv(q, k, v, grouped_query=True)
    if not isinstance(cache, DilatedKVCache):
        raise TypeError(f"cache must be a DilatedKVCache, got {type(cache).__name__}.")
    cache.check(q, k, v)
    plan = cache.plan
    if cache.position == 0:
        out = dilated_attention(
            q, k, v, plan.segment_lengths, plan.dilation_rates, is_causal=True,
            branch_mixing=plan.branch_mixing, scale=cache.scale, backend=cache.backend,
        )  # fmt: skip
        with torch.no_grad():
            cache.fill(k.detach(), v.detach())
        return out
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "decoding steps with a DilatedKVCache do not record gradients; run them under "
            "torch.no_grad() (or torch.inference_mode()), or train without a cache."
        )
    if q.shape[1] == 0:
        return q.new_empty(q.shape[0], 0, q.shape[2], v.shape[-1])
    with torch.no_grad():
        steps = [cache.step(q[:, t], k[:, t], v[:, t]) for t in range(q.shape[1])]
    return torch.stack(steps, dim=1)
