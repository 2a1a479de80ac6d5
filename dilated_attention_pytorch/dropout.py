"""Attention dropout keyed by *where* an entry is, not by *when* it is computed.

Entry ``(branch i, batch b, head h, query p, key p')`` of the joint attention
probabilities is kept iff a 64-bit hash of ``(seed, i * H + h, b * N + p, b * N + p')``
is not among the lowest ``p`` fraction of hash values. So the mask does not depend
on how the computation is cut into blocks or tiles, or on which rank computes an
entry: one device and a ring of any size with the same seed drop the same
entries, and a backward (or a checkpointed forward) regenerates them exactly.
The hash is a SplitMix64-style finaliser, applied in three stages so that only one
mixing pass runs per attention-matrix entry.

Token ids are global: ``b * N + p`` with ``N`` the whole sequence length (the
length of one ring's sequence over the ring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DropoutKeys", "draw_seed", "dropout_keep", "seed_tensor", "token_ids"]

# A kept entry's 24 low hash bits are >= threshold: p is resolved to 2**-24.
_BITS = 24


def seed_tensor(dropout_p: float) -> Tensor:
    """A call's dropout seed as a one-element int64 tensor: drawn from the default
    generator only with dropout (zero without), once per call, so that the backward and
    every rank of a ring replay the same entries. The form a compiled operator takes."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (1,))
    return torch.zeros(1, dtype=torch.long)


def draw_seed(dropout_p: float) -> int:
    """:func:`seed_tensor` as a Python int (eager calls), drawing alike."""
    return int(seed_tensor(dropout_p).item()) if dropout_p > 0.0 else 0


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 PyTorch multiplies with (two's complement)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    # Logical shift of int64 (PyTorch's >> is arithmetic): clear the copied sign bits.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 (wrap-around multiplication): a bijection."""
    x = (x ^ _shift_right(x, 30)) * _M1
    x = (x ^ _shift_right(x, 27)) * _M2
    return x ^ _shift_right(x, 31)


def _mix_int(x: int) -> int:
    """:func:`_mix` of one Python int, exactly (for seeds and constants)."""
    return int(_mix(torch.tensor([_signed(x & ((1 << 64) - 1))], dtype=torch.int64)).item())


def token_ids(batch: int, seq_len: int, start: int, length: int, device: torch.device) -> Tensor:
    """``(batch, length)`` int64 ids ``b * seq_len + p`` of positions ``start .. start+length-1``."""
    pos = torch.arange(start, start + length, dtype=torch.int64, device=device)
    rows = torch.arange(batch, dtype=torch.int64, device=device)[:, None] * seq_len
    return rows + pos[None, :]


@dataclass(frozen=True)
class DropoutKeys:
    """What identifies the entries of one block of attention probabilities.

    Attributes:
        p: drop probability, ``0 < p < 1``.
        seed: the call's seed (every rank of a ring uses its own draw; equal draws
            give the single-device masks).
        q_ids: ``(Bb, Lq)`` int64 global token ids of the block's queries.
        k_ids: ``(Bb, Lk)`` int64 global token ids of its keys.
        streams: ``(Hs,)`` int64, ``branch_index * H + head`` of the block's heads.
    """

    p: float
    seed: int
    q_ids: Tensor
    k_ids: Tensor
    streams: Tensor

    def keep(self, b0: int, b1: int, q0: int, q1: int) -> Tensor:
        """Bool keep mask ``(b1-b0, Hs, q1-q0, Lk)`` of a tile of the block."""
        return dropout_keep(
            self.p,
            self.seed,
            self.streams,
            self.q_ids[b0:b1, q0:q1],
            self.k_ids[b0:b1],
        )


def dropout_keep(p: float, seed: int, streams: Tensor, q_ids: Tensor, k_ids: Tensor) -> Tensor:
    """Keep mask ``(Bb, Hs, Lq, Lk)``: ``True`` where the entry survives dropout.

    Args:
        p: drop probability.
        seed: the call's seed.
        streams: ``(Hs,)`` int64 ``branch_index * H + head``.
        q_ids: ``(Bb, Lq)`` and ``k_ids``: ``(Bb, Lk)`` int64 global token ids.
    """
    base = torch.tensor(_mix_int(seed ^ _mix_int(0x5EED)), dtype=torch.int64, device=q_ids.device)
    per_stream = _mix(base + streams.to(q_ids.device) * _GOLDEN)  # (Hs,)
    rows = _mix(per_stream[None, :, None] + q_ids[:, None, :])  # (Bb, Hs, Lq)
    cols = _mix(k_ids * _GOLDEN + _GOLDEN)  # (Bb, Lk)
    entry = _mix(rows[..., None] ^ cols[:, None, None, :])  # (Bb, Hs, Lq, Lk)
    threshold = round(p * (1 << _BITS))
    return (entry & ((1 << _BITS) - 1)) >= threshold
