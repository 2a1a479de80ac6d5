"""Block-sparse attention over a sequence sharded across the ranks of a ring.

Rank ``j`` of ``k`` holds tokens ``[j*L, (j+1)*L)`` (``L = N/k``, a multiple of the
block size). The block mask is the same on every rank, so every rank knows which of
its key blocks each other rank's query blocks keep. Each rank then sends every peer
exactly those K/V blocks, by P2P, once; nothing else moves. A peer that needs none
of a rank's blocks gets no message (``local_window`` talks only to neighbours, so its
bytes per rank do not grow with the number of ranks).

Forward: the local queries attend to the local key blocks and the received ones (the
block computation of :mod:`.functional`, with global block numbers). The received
blocks are kept for the backward (they are the kept remote blocks: the memory of the
sparsity, not of the sequence). Backward: the gradients of the received blocks go
back to their owners (compute dtype), which add them to their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..autograd import first_order_only
from ..backends.blocks import compute_dtype
from ..distributed.comm import RingComm, RingStats
from ..segments import token_major
from .functional import SparseCall, block_backward, block_forward

__all__ = ["ring_block_sparse_attention", "needed_blocks"]

_KV_TAG, _GRAD_TAG = 3, 4  # distinct from the dilated ring's tags (0, 1, 5) and gathers (2)


def needed_blocks(
    block_mask: Tensor, owner_rows: range, owner_of_block: Tensor, peer: int
) -> Tensor:
    """Key blocks of rank ``peer`` kept by any query block in ``owner_rows`` (any head)."""
    rows = block_mask[..., owner_rows.start : owner_rows.stop, :]
    if rows.dim() == 3:
        rows = rows.any(0)
    kept = rows.any(0)
    return torch.nonzero(kept & (owner_of_block == peer)).flatten()


@dataclass(frozen=True)
class RingSparseSetup:
    """Everything the ring's forward and backward need besides the tensors."""

    group: dist.ProcessGroup
    ring: tuple[int, ...]  # group ranks of this ring, in token order
    position: int  # this rank's index in ``ring``
    block_mask: Tensor  # (Qb, Kb) or (H, Qb, Kb) bool, the whole sequence's, CPU
    block_size: int
    seq_len: int
    scale: float
    is_causal: bool
    dropout_p: float = 0.0
    seed: int = 0
    stats: RingStats | None = None
    timeout: float | None = None  # seconds each wait may take (None: the group's own timeout)
    kernel: str = "pytorch"  # the block kernel: "pytorch" or "triton" (functional.ring_kernel)

    @property
    def blocks_per_rank(self) -> int:
        return self.seq_len // len(self.ring) // self.block_size

    def rows(self, position: int) -> range:
        n = self.blocks_per_rank
        return range(position * n, (position + 1) * n)

    def owners(self) -> Tensor:
        return torch.arange(self.block_mask.shape[-1]) // self.blocks_per_rank

    def wanted_from(self, peer: int) -> Tensor:
        """Blocks of ring member ``peer`` that this rank's queries keep."""
        return needed_blocks(self.block_mask, self.rows(self.position), self.owners(), peer)

    def wanted_by(self, peer: int) -> Tensor:
        """Blocks of this rank that ring member ``peer``'s queries keep."""
        return needed_blocks(self.block_mask, self.rows(peer), self.owners(), self.position)

    def comm(self, tag: int, what: str) -> RingComm:
        return RingComm(self.group, tag, stats=self.stats, timeout=self.timeout, context=what)


def _block_tokens(blocks: Tensor, first_block: int, bs: int, device: torch.device) -> Tensor:
    """Local token indices of global ``blocks`` of a rank whose first block is ``first_block``."""
    return (
        (blocks.to(device) - first_block)[:, None] * bs + torch.arange(bs, device=device)
    ).flatten()


def _exchange(setup: RingSparseSetup, tensors: list[Tensor], tag: int, what: str,
              send_sets: dict[int, Tensor], recv_sets: dict[int, Tensor],
              dtype: torch.dtype) -> dict[int, Tensor]:  # fmt: skip
    """Send each peer the blocks ``send_sets[peer]`` of ``tensors`` (stacked), receive
    ``recv_sets[peer]`` blocks from it; returns per peer ``(len(tensors), B, n*bs, H, D)``."""
    bs, n = setup.block_size, setup.blocks_per_rank
    like = tensors[0]
    B, _, H, D = like.shape
    comm = setup.comm(tag, what)
    received = {}
    for peer, blocks in send_sets.items():
        if blocks.numel():
            tok = _block_tokens(blocks, setup.position * n, bs, like.device)
            comm.send(torch.stack([t[:, tok] for t in tensors]).to(dtype).contiguous(),
                      setup.ring[peer])  # fmt: skip
    for peer, blocks in recv_sets.items():
        if blocks.numel():
            buf = torch.empty(len(tensors), B, blocks.numel() * bs, H, D, dtype=dtype,
                              device=like.device)  # fmt: skip
            received[peer] = comm.recv(buf, setup.ring[peer])
    comm.commit()
    comm.wait()
    return received


def _held(setup: RingSparseSetup, k: Tensor, v: Tensor, received: dict[int, Tensor],
          recv_sets: dict[int, Tensor]) -> tuple[Tensor, Tensor, SparseCall]:  # fmt: skip
    """Local plus received K/V, and the call that maps the held blocks to global ones."""
    n, bs = setup.blocks_per_rank, setup.block_size
    own = torch.arange(setup.position * n, (setup.position + 1) * n)
    pieces_k, pieces_v, ids = [k], [v], [own]
    for peer in sorted(received):
        pieces_k.append(received[peer][0])
        pieces_v.append(received[peer][1])
        ids.append(recv_sets[peer])
    k_held, v_held = torch.cat(pieces_k, dim=1), torch.cat(pieces_v, dim=1)
    k_blocks = torch.cat(ids)
    rows = setup.rows(setup.position)
    mask = setup.block_mask[..., rows.start : rows.stop, :][..., k_blocks]
    per_head = mask if mask.dim() == 3 else None
    call = SparseCall(
        block_mask=mask if per_head is None else mask[0],
        block_size=bs,
        q_start=setup.position * n * bs,
        k_blocks=k_blocks,
        k_start=torch.arange(k_blocks.numel()) * bs,
        k_len=k_held.shape[1],
        seq_len=setup.seq_len,
        scale=setup.scale,
        is_causal=setup.is_causal,
        dropout_p=setup.dropout_p,
        seed=setup.seed,
        kernel=setup.kernel,
        per_head_mask=per_head,
    )
    return k_held, v_held, call


class _RingBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, setup: RingSparseSetup):
        peers = [p for p in range(len(setup.ring)) if p != setup.position]
        send = {p: setup.wanted_by(p) for p in peers}
        recv = {p: setup.wanted_from(p) for p in peers}
        what = "the K/V blocks of block-sparse ring attention (forward, its one ring step)"
        received = _exchange(setup, [k, v], _KV_TAG, what, send, recv, k.dtype)
        k_held, v_held, call = _held(setup, k, v, received, recv)
        out, lse = block_forward(call, q, k_held, v_held)
        ctx.save_for_backward(q, k_held, v_held, out, lse)
        ctx.setup, ctx.call, ctx.send, ctx.recv = setup, call, send, recv
        ctx.local_len = k.shape[1]
        return out.to(q.dtype)

    @staticmethod
    @first_order_only("ring block-sparse attention")
    def backward(ctx, dout: Tensor):
        q, k_held, v_held, out, lse = ctx.saved_tensors
        setup, L = ctx.setup, ctx.local_len
        dq, dk_held, dv_held = block_backward(
            ctx.call, token_major(dout), q, k_held, v_held, out, lse
        )
        dk, dv = dk_held[:, :L].clone(), dv_held[:, :L].clone()
        # Gradients of the received blocks go home; the owners add them to their own.
        remote, start = {}, L
        for peer in sorted(ctx.recv):
            size = ctx.recv[peer].numel() * setup.block_size
            if size:
                remote[peer] = (dk_held[:, start : start + size], dv_held[:, start : start + size])
                start += size
        what = "the dK/dV blocks of block-sparse ring attention (backward, its one ring step)"
        comm = setup.comm(_GRAD_TAG, what)
        acc = compute_dtype(q.dtype)
        for peer, (gk, gv) in remote.items():
            comm.send(torch.stack([gk, gv]).to(acc).contiguous(), setup.ring[peer])
        incoming = {}
        B, _, H, D = q.shape
        for peer, blocks in ctx.send.items():
            if blocks.numel():
                buf = torch.empty(2, B, blocks.numel() * setup.block_size, H, D, dtype=acc,
                                  device=q.device)  # fmt: skip
                incoming[peer] = comm.recv(buf, setup.ring[peer])
        comm.commit()
        comm.wait()
        n = setup.blocks_per_rank
        for peer, buf in incoming.items():
            tok = _block_tokens(ctx.send[peer], setup.position * n, setup.block_size, q.device)
            dk.index_add_(1, tok, buf[0])
            dv.index_add_(1, tok, buf[1])
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None


def ring_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, setup: RingSparseSetup) -> Tensor:
    """This rank's shard of block-sparse attention; q, k, v ``(B, N/k, H, D)`` shards.

    Collective over ``setup.ring``; inputs are assumed validated (the module does it).
    """
    if setup.stats is not None:
        setup.stats.calls += 1
    return _RingBlockSparse.apply(token_major(q), token_major(k), token_major(v), setup)
