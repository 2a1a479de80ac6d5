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
back to their owners (compute dtype), which add them to their own. With grouped-query
attention (k, v with ``H_kv`` heads dividing q's ``H``) the blocks and their gradients
travel with ``H_kv`` heads.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..autograd import first_order_only
from ..backends.blocks import compute_dtype
from ..distributed.comm import RingComm, RingStats, gather_objects, stats_by_key
from ..distributed.validation import _Reported
from ..dropout import seed_tensor
from ..ops import _fresh, float_arguments, register_attention_autograd
from ..segments import token_major
from ..validation import check_is_causal, check_qkv
from .functional import SparseCall, block_backward, block_forward
from .ops import _pattern

__all__ = [
    "check_ring_sparse_call",
    "needed_blocks",
    "ring_block_sparse_attention",
    "ring_block_sparse_op",
    "ring_sparse_spec",
]

# Distinct from the dilated ring's tags (0, 1, 5) and gathers (2). The K/V sent again by
# a compiled backward have their own, so that they never pair with a forward's.
_KV_TAG, _GRAD_TAG, _BACKWARD_KV_TAG = 3, 4, 6


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


@dataclass
class _Held:
    """The K/V a rank attends to in a call: its own and the received blocks."""

    k: Tensor
    v: Tensor
    call: SparseCall
    send: dict[int, Tensor]  # peer -> this rank's blocks it sent there
    recv: dict[int, Tensor]  # peer -> the blocks received from there


def _gather_held(setup: RingSparseSetup, k: Tensor, v: Tensor, phase: str) -> _Held:
    """Send every peer the K/V blocks it keeps and receive those this rank keeps."""
    peers = [p for p in range(len(setup.ring)) if p != setup.position]
    send = {p: setup.wanted_by(p) for p in peers}
    recv = {p: setup.wanted_from(p) for p in peers}
    what = f"the K/V blocks of block-sparse ring attention ({phase}, its one ring step)"
    tag = _KV_TAG if phase == "forward" else _BACKWARD_KV_TAG
    received = _exchange(setup, [k, v], tag, what, send, recv, k.dtype)
    k_held, v_held, call = _held(setup, k, v, received, recv)
    return _Held(k_held, v_held, call, send, recv)


def _ring_backward(
    setup: RingSparseSetup, held: _Held, dout: Tensor, q: Tensor, out: Tensor, lse: Tensor,
    local_len: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """dq, dk, dv of this rank's shards (compute dtype): the held blocks' gradients, the
    received blocks' sent home and the peers' gradients of this rank's blocks added."""
    L = local_len
    dq, dk_held, dv_held = block_backward(held.call, dout, q, held.k, held.v, out, lse)
    dk, dv = dk_held[:, :L].clone(), dv_held[:, :L].clone()
    # Gradients of the received blocks go home; the owners add them to their own.
    remote, start = {}, L
    for peer in sorted(held.recv):
        size = held.recv[peer].numel() * setup.block_size
        if size:
            remote[peer] = (dk_held[:, start : start + size], dv_held[:, start : start + size])
            start += size
    what = "the dK/dV blocks of block-sparse ring attention (backward, its one ring step)"
    comm = setup.comm(_GRAD_TAG, what)
    acc = compute_dtype(q.dtype)
    for peer, (gk, gv) in remote.items():
        comm.send(torch.stack([gk, gv]).to(acc).contiguous(), setup.ring[peer])
    incoming = {}
    B, _, H_kv, D = held.k.shape  # dK/dV travel with the K/V heads (grouped-query: fewer)
    for peer, blocks in held.send.items():
        if blocks.numel():
            buf = torch.empty(2, B, blocks.numel() * setup.block_size, H_kv, D, dtype=acc,
                              device=q.device)  # fmt: skip
            incoming[peer] = comm.recv(buf, setup.ring[peer])
    comm.commit()
    comm.wait()
    n = setup.blocks_per_rank
    for peer, buf in incoming.items():
        tok = _block_tokens(held.send[peer], setup.position * n, setup.block_size, q.device)
        dk.index_add_(1, tok, buf[0])
        dv.index_add_(1, tok, buf[1])
    return dq, dk, dv


class _RingBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, setup: RingSparseSetup):
        held = _gather_held(setup, k, v, "forward")
        out, lse = block_forward(held.call, q, held.k, held.v)
        ctx.save_for_backward(q, held.k, held.v, out, lse)
        # The tensors through save_for_backward only (saved-tensor hooks see them).
        ctx.setup, ctx.local_len = setup, k.shape[1]
        ctx.call, ctx.send, ctx.recv = held.call, held.send, held.recv
        return out.to(q.dtype)

    @staticmethod
    @first_order_only("ring block-sparse attention")
    def backward(ctx, dout: Tensor):
        q, k_held, v_held, out, lse = ctx.saved_tensors
        held = _Held(k_held, v_held, ctx.call, ctx.send, ctx.recv)
        dq, dk, dv = _ring_backward(ctx.setup, held, token_major(dout), q, out, lse,
                                    ctx.local_len)  # fmt: skip
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None


def ring_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, setup: RingSparseSetup) -> Tensor:
    """This rank's shard of block-sparse attention; q, k, v ``(B, N/k, H, D)`` shards.

    Collective over ``setup.ring``; inputs are assumed validated (the module does it).
    """
    if setup.stats is not None:
        setup.stats.calls += 1
    return _RingBlockSparse.apply(token_major(q), token_major(k), token_major(v), setup)


# --------------------------------------------------------------------------- checks


def check_ring_sparse_call(
    q: object, k: object, v: object, is_causal: object, group: dist.ProcessGroup,
    members: Sequence[int], *, block_size: int, timeout: float | None, config: str,
    validated: set | None, error: str | None = None, mode: object = None,
) -> None:  # fmt: skip
    """This rank's checks of a ring call, shared with every rank of ``group`` so that all
    raise together. ``error``: a problem the caller already found on this rank;
    ``config``: the settings the ranks of a ring must share; ``validated``: signatures
    that passed before (skipped, and this one added), ``None`` to check every call;
    ``mode``: part of the signature only (the module's training mode: after a switch
    every rank checks again, also one whose settings stay the same)."""
    try:
        if error is not None:
            raise _Reported(error)
        check_qkv(q, k, v, grouped_query=True)
        check_is_causal(is_causal)
        assert isinstance(q, Tensor) and isinstance(k, Tensor)
        if q.shape[1] % block_size != 0:
            raise ValueError(
                f"each rank's shard has {q.shape[1]} tokens, not a multiple of "
                f"block_size={block_size}; blocks must not straddle ranks: choose N "
                f"with N/{len(members)} a multiple of {block_size}."
            )
        signature = (tuple(q.shape), k.shape[2], str(q.dtype), q.device.type, is_causal,
                     id(group), mode)  # fmt: skip
    except _Reported:
        signature = None
    except (TypeError, ValueError) as exc:
        error, signature = f"{type(exc).__name__}: {exc}", None
    if validated is not None and signature in validated:
        return
    what = "the collective input check of block-sparse ring attention (before its ring step)"
    rows: list[Any] = gather_objects(  # type: ignore[assignment]
        group, (error, signature, config), timeout, what
    )
    rank = dist.get_rank(group)
    bad = [(j, e) for j, (e, _, _) in enumerate(rows) if e is not None]
    if bad:
        details = "; ".join(f"rank {j}: {e}" for j, e in bad)
        raise ValueError(
            f"block-sparse ring attention: invalid input on rank(s) {[j for j, _ in bad]} "
            f"(this is rank {rank}; every rank raises this error): {details}"
        )
    ring_rows = [rows[m] for m in members]
    # The group's id is this process's own; compare the rest.
    if len({(None if sig is None else sig[:5], cfg) for _, sig, cfg in ring_rows}) > 1:
        details = "; ".join(
            f"rank {m} has q shape/K/V heads/dtype/device/causal {sig[:5]} and {cfg}"
            for m, (_, sig, cfg) in zip(members, ring_rows, strict=True)
        )
        raise ValueError(
            f"block-sparse ring attention: the ranks of a ring disagree (this is rank "
            f"{rank}); pass shards of one shape, dtype and device and the same settings "
            f"on every rank: {details}."
        )
    if validated is not None:
        validated.add(signature)


# --------------------------------------------------------------------------- torch.compile
#
# While torch.compile traces a ring module, the call runs as two custom operators (as the
# dilated ring does): the collective check, the pattern's construction, the exchanges and
# the kernels happen inside them. The settings travel as JSON, the group by its name. The
# backward operator receives the K/V blocks again rather than keeping them.

# Per call spec (which names the module: ``owner``), the signatures that passed the
# collective check (validate="once"), as each module keeps its own in eager mode.
_VALIDATED: dict[str, set] = {}


def ring_sparse_spec(
    pattern: str, *, group: dist.ProcessGroup, members: Sequence[int], block_size: int,
    is_causal: bool, kernel: str, stats: RingStats | None, validate: str, config: str,
    error: str | None, owner: int,
) -> str:  # fmt: skip
    """The operators' description of a ring call (``pattern``: ``pattern_spec``'s JSON):
    the repr of its settings (built with what the compiler can trace; json cannot be).
    The float settings (scale, dropout, timeout) are the operators' own arguments: the
    compiler may make them symbolic, which a string cannot hold."""
    settings = dict(
        pattern=pattern, group=group.group_name, members=tuple(members), block_size=block_size,
        is_causal=is_causal, kernel=kernel, stats="" if stats is None else stats.key,
        validate=validate, config=config, error=error, owner=owner,
    )  # fmt: skip
    return repr(tuple(settings.items()))


def _op_setup(
    q: Tensor, k: Tensor, v: Tensor, spec: str, seed: Tensor, floats: tuple, check: bool
):  # fmt: skip
    s = dict(ast.literal_eval(spec))
    s["scale"], s["dropout_p"], s["timeout"] = floats
    group = dist.distributed_c10d._resolve_process_group(s["group"])
    members = tuple(s["members"])
    if check:
        validated = None if s["validate"] == "always" else _VALIDATED.setdefault(spec, set())
        check_ring_sparse_call(
            q, k, v, s["is_causal"], group, members, block_size=s["block_size"],
            timeout=s["timeout"], config=s["config"], validated=validated, error=s["error"],
        )  # fmt: skip
    L, D = q.shape[1], q.shape[-1]
    N = L * len(members)
    return RingSparseSetup(
        group=group,
        ring=members,
        position=members.index(dist.get_rank(group)),
        block_mask=_pattern(s["pattern"], N, s["is_causal"]).block_mask,
        block_size=s["block_size"],
        seq_len=N,
        scale=D**-0.5 if s["scale"] is None else s["scale"],
        is_causal=s["is_causal"],
        dropout_p=s["dropout_p"],
        seed=int(seed.item()) if s["dropout_p"] > 0.0 else 0,
        stats=stats_by_key(s["stats"]),
        timeout=s["timeout"],
        kernel=s["kernel"],
    )


@torch.library.custom_op("dilated_attention_pytorch::ring_block_sparse_forward", mutates_args=())
def _forward_op(
    q: Tensor, k: Tensor, v: Tensor, spec: str, seed: Tensor, scale: float | None,
    dropout_p: float, timeout: float | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    setup = _op_setup(q, k, v, spec, seed, (scale, dropout_p, timeout), check=True)
    if setup.stats is not None:
        setup.stats.calls += 1
    q, k, v = token_major(q), token_major(k), token_major(v)
    held = _gather_held(setup, k, v, "forward")
    out, lse = block_forward(held.call, q, held.k, held.v)
    # The compute dtype, as the fake says (the triton kernels return q.dtype: exact upcast).
    cdt = compute_dtype(q.dtype)
    return _fresh(out.to(cdt)), _fresh(lse.to(cdt))


@_forward_op.register_fake
def _(q, k, v, *settings):
    B, L, H, _ = q.shape
    cdt = compute_dtype(q.dtype)
    return q.new_empty(B, L, H, v.shape[-1], dtype=cdt), q.new_empty(B, L, H, dtype=cdt)


@torch.library.custom_op("dilated_attention_pytorch::ring_block_sparse_backward", mutates_args=())
def _backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, spec: str,
    seed: Tensor, scale: float | None, dropout_p: float, timeout: float | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    setup = _op_setup(q, k, v, spec, seed, (scale, dropout_p, timeout), check=False)
    q, k, v = token_major(q), token_major(k), token_major(v)
    held = _gather_held(setup, k, v, "backward")
    if setup.kernel == "triton":  # its kernels take out and dout in q.dtype (exact downcasts)
        out, dout = out.to(q.dtype), dout.to(q.dtype)
    grads = _ring_backward(setup, held, token_major(dout), q, out, lse, k.shape[1])
    return tuple(_fresh(g.to(t.dtype)) for g, t in zip(grads, (q, k, v), strict=True))


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, *settings):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_attention_autograd(_forward_op, _backward_op)


def ring_block_sparse_op(
    q: Tensor, k: Tensor, v: Tensor, spec: str, *, scale: float | None, dropout_p: float,
    timeout: float | None,
) -> Tensor:  # fmt: skip
    """This rank's shard of a ring call described by ``spec`` (:func:`ring_sparse_spec`)
    and the float settings, through the custom operators; ``(B, N/k, H, D)`` in and out,
    in q.dtype."""
    seed = seed_tensor(dropout_p)
    out, _ = _forward_op(q, k, v, spec, seed, *float_arguments(scale, dropout_p, timeout))
    return out.to(q.dtype)
