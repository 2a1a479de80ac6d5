"""Incremental decoding: a key/value cache for causal dilated attention.

A query at position ``p`` sees, in branch ``(w, r)``, only keys of its own segment
``p // w`` at its head's offset. So the cache keeps, per branch, the keys and values of
the *current* segment only, one slot per kept position: slot ``j`` of head ``h`` holds
segment position ``j * r + o_h``. That is ``ceil(w / r)`` slots per head and branch,
independent of how long the sequence grows (LongNet's ``w / r`` is constant, so a cache
holds ``#branches * w / r`` positions per head).

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
from .validation import check_qkv

__all__ = ["DilatedKVCache", "cached_dilated_attention"]


class DilatedKVCache:
    """Keys and values that later queries of causal dilated attention can still attend.

    Args:
        segment_lengths, dilation_rates, num_heads, branch_mixing: the attention's
            schedule (as in :func:`~dilated_attention_pytorch.dilated_attention`).
        scale: score scale, default ``D ** -0.5``.
        backend: the backend of the prompt's (prefill) call.

    ``position`` is the number of tokens seen so far; ``nbytes()`` the cache's size.
    Buffers are allocated at the first call, for its batch size, head dim, dtype and
    device.
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
    ) -> None:
        self.plan: DilatedPlan = make_plan(
            segment_lengths, dilation_rates, num_heads, branch_mixing
        )
        self.scale = scale
        self.backend = backend
        self.position = 0
        self.keys: list[Tensor] = []  # per branch (B, ceil(w/r), H, D)
        self.values: list[Tensor] = []
        offsets = self.plan.offsets()
        # Per branch: each head's offset, -1 for heads that do not run the branch.
        self._offsets = [torch.tensor([-1 if o is None else o for o in row]) for row in offsets]

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def reset(self) -> None:
        """Forget every token (the next call is a new prompt)."""
        self.position = 0
        self.keys, self.values = [], []

    def _allocate(self, k: Tensor, v: Tensor) -> None:
        B, _, H, D = k.shape
        if H != self.plan.num_heads:
            raise ValueError(
                f"the cache was built for {self.plan.num_heads} heads, got k of shape "
                f"{tuple(k.shape)} (B, N, H, D); build one cache per layer and head count."
            )
        self.keys, self.values = [], []
        for branch in self.plan.branches:
            slots = math.ceil(branch.segment_length / branch.dilation_rate)
            self.keys.append(k.new_zeros(B, slots, H, D))
            self.values.append(v.new_zeros(B, slots, H, v.shape[-1]))
        self._offsets = [o.to(k.device) for o in self._offsets]

    def fill(self, k: Tensor, v: Tensor) -> None:
        """Keep what the tokens after ``k``/``v`` ``(B, N, H, D)`` (a whole prompt) can see."""
        self._allocate(k, v)
        n = k.shape[1]
        heads = torch.arange(k.shape[2], device=k.device)
        for i, branch in enumerate(self.plan.branches):
            w, r = branch.segment_length, branch.dilation_rate
            start = (n // w) * w  # the segment of the next token, position n
            slots = self.keys[i].shape[1]
            pos = (
                start
                + self._offsets[i][None, :]
                + r * torch.arange(slots, device=k.device)[:, None]
            )
            keep = (pos < n) & (self._offsets[i][None, :] >= 0)  # (slots, H)
            idx = pos.clamp(max=max(n - 1, 0))
            self.keys[i] = torch.where(keep[None, :, :, None], k[:, idx, heads], self.keys[i])
            self.values[i] = torch.where(keep[None, :, :, None], v[:, idx, heads], self.values[i])
        self.position = n

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Append one token's ``k``/``v`` ``(B, H, D)`` and attend its ``q`` -> ``(B, H, D)``."""
        p = self.position
        cdt = compute_dtype(q.dtype)
        D = q.shape[-1]
        scale = D**-0.5 if self.scale is None else self.scale
        outs, lses = [], []
        for i, branch in enumerate(self.plan.branches):
            w, r = branch.segment_length, branch.dilation_rate
            s = p % w
            slot = s // r
            active = self._offsets[i] == s % r  # (H,): heads whose offset this token has
            self.keys[i][:, slot] = torch.where(active[None, :, None], k, self.keys[i][:, slot])
            self.values[i][:, slot] = torch.where(active[None, :, None], v, self.values[i][:, slot])
            keys = self.keys[i][:, : slot + 1].to(cdt)  # (B, L, H, D)
            vals = self.values[i][:, : slot + 1].to(cdt)
            scores = torch.einsum("bhd,blhd->bhl", q.to(cdt), keys) * scale
            lse = torch.logsumexp(scores, dim=-1)  # (B, H)
            out = torch.einsum("bhl,blhd->bhd", torch.exp(scores - lse[..., None]), vals)
            lses.append(torch.where(active[None, :], lse, torch.full_like(lse, -math.inf)))
            outs.append(out)
        self.position = p + 1
        lse = torch.stack(lses)  # (branches, B, H)
        total = torch.logsumexp(lse, dim=0)
        # Heads that no branch lets attend at this position output 0, as in the full call.
        weights = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total))
        out = (weights[..., None] * torch.stack(outs)).sum(dim=0)
        return out.to(q.dtype)


def cached_dilated_attention(q: Tensor, k: Tensor, v: Tensor, cache: DilatedKVCache) -> Tensor:
    """Causal dilated attention of the next tokens, with a :class:`DilatedKVCache`.

    Args:
        q, k, v: ``(B, T, H, D)`` for the ``T`` tokens at positions
            ``cache.position .. cache.position + T - 1``.
        cache: the layer's cache; on its first call (``cache.position == 0``) ``q, k, v``
            are the whole prompt and run as one causal call, later calls step through
            their tokens one at a time.

    Returns:
        ``(B, T, H, D)``: what causal ``dilated_attention`` over the whole sequence gives
        at these positions.
    """
    check_qkv(q, k, v)
    if not isinstance(cache, DilatedKVCache):
        raise TypeError(f"cache must be a DilatedKVCache, got {type(cache).__name__}.")
    plan = cache.plan
    if cache.position == 0:
        out = dilated_attention(
            q, k, v, plan.segment_lengths, plan.dilation_rates, is_causal=True,
            branch_mixing=plan.branch_mixing, scale=cache.scale, backend=cache.backend,
        )  # fmt: skip
        with torch.no_grad():
            cache.fill(k.detach(), v.detach())
        return out
    if k.shape[0] != cache.keys[0].shape[0] or k.shape[-1] != cache.keys[0].shape[-1]:
        raise ValueError(
            f"the cache holds batch {cache.keys[0].shape[0]} and head dim "
            f"{cache.keys[0].shape[-1]}, got k of shape {tuple(k.shape)}; call cache.reset() "
            f"before a new prompt."
        )
    with torch.no_grad():
        steps = [cache.step(q[:, t], k[:, t], v[:, t]) for t in range(q.shape[1])]
    return torch.stack(steps, dim=1)
