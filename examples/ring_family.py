"""Every member of the ring family against single-device dilated attention.

    torchrun --nproc_per_node=2 examples/ring_family.py          # NCCL, one GPU per rank
    torchrun --nproc_per_node=2 examples/ring_family.py --cpu    # gloo

Each rank builds the same inputs, runs the module over the ring, and compares the
output and the input gradients with ``dilated_attention`` on one device (rank-local,
no communication). The last row trains with dropout and padded keys: with the
generator seeded alike on every rank, the ring drops exactly the entries one device
drops. Prints one line per module and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from dilated_attention_pytorch import (
    DistributedRingAttention,
    HilbertRingAttention,
    RingAttentionConfig,
    StandardRingAttention,
    create_ring_attention,
    dilated_attention,
    hilbert_permutation,
    inverse_permutation,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU (float64)")
    parser.add_argument("--tokens", type=int, default=16384, help="global sequence length N")
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    # bf16 on GPUs: compare with the single-device bf16 result, whose own rounding is the
    # scale of the allowed difference; float64 on the CPU: equal to rounding.
    dtype, tol = (torch.bfloat16, 2e-2) if use_cuda else (torch.float64, 1e-10)
    N = args.tokens
    side = int(N**0.5)
    segments, rates = [N // 16, N // 4, N], [1, 4, 16]

    torch.manual_seed(0)  # the same inputs on every rank
    q, k, v = (torch.randn(1, N, 8, 64, device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn_like(q)

    # Training with dropout and padded keys, built as the specification's config example.
    mask = torch.zeros(1, N, dtype=torch.bool, device=device)
    mask[:, -N // 8 :] = True  # the last eighth of the sequence is padding
    config = RingAttentionConfig(
        segment_lengths=segments, dilation_rates=rates, dropout=0.1, ring_size=world
    )

    def reference(permute: bool, train: bool = False) -> tuple[torch.Tensor, ...]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if train:
            torch.manual_seed(1)  # the ring draws its dropout seed like this call does
            out = dilated_attention(
                *leaves, segments, rates, is_causal=True, dropout_p=0.1, key_padding_mask=mask
            )
        elif permute:
            perm = hilbert_permutation(side, side, device=device)
            inv = inverse_permutation(perm)
            out = dilated_attention(*(t[:, perm] for t in leaves), segments, rates, is_causal=True)
            out = out[:, inv]
        else:
            out = dilated_attention(*leaves, segments, rates, is_causal=True)
        return (out, *torch.autograd.grad(out, leaves, dout))

    modules = {
        "StandardRingAttention": (StandardRingAttention(segments, rates), False),
        "HilbertRingAttention": (HilbertRingAttention(segments, rates), True),
        "DistributedRingAttention": (
            DistributedRingAttention(segments, rates, timeout=120.0, use_checkpointing=True),
            False,
        ),
        "dropout 0.1 + key mask": (create_ring_attention("standard", config=config), False),
    }
    ok = True
    for name, (module, permute) in modules.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        train = module.dropout > 0.0
        if train:
            torch.manual_seed(1)
            out = module(*leaves, is_causal=True, key_padding_mask=mask)
        else:
            out = module(*leaves, is_causal=True)  # the whole sequence in and out
        got = (out, *torch.autograd.grad(out, leaves, dout))
        want = reference(permute, train)
        err = max(
            (a.double() - b.double()).abs().max().item() for a, b in zip(got, want, strict=True)
        )
        scale = max(b.float().abs().max().item() for b in want)
        good = err <= tol * max(scale, 1.0)
        ok &= good
        extra = ""
        if isinstance(module, DistributedRingAttention):
            stats = module.get_communication_stats()
            extra = f", sent {stats['bytes_sent'] / 2**20:.1f} MiB in {stats['ring_steps']} steps"
        if rank == 0:
            print(
                f"{name:>25}: max |ring - single device| = {err:.3g} (max |ref| {scale:.3g})"
                f" -> {'OK' if good else 'MISMATCH'}{extra}",
                flush=True,
            )
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    if rank == 0:
        print(
            f"world_size={world} device={device} dtype={dtype} N={N}: "
            f"{'all OK' if flag.item() == 0 else 'MISMATCH'}"
        )
    dist.destroy_process_group()
    return int(flag.item() != 0)


if __name__ == "__main__":
    sys.exit(main())
