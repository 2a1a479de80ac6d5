"""Ring (sequence-parallel) dilated attention across processes.

Each rank holds a contiguous shard of the sequence; the multi-head ring module
runs projections and attention on the shard and exchanges only dilated K/V with
the ranks that share a segment. Rank 0 then gathers inputs and outputs, reruns
the single-device module on the whole sequence and checks the result.

    torchrun --nproc_per_node=2 examples/ring_attention.py          # NCCL, one GPU per rank
    torchrun --nproc_per_node=2 examples/ring_attention.py --cpu    # gloo on CPU
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from dilated_attention_pytorch import (
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
    gather_sequence,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on GPUs")
    parser.add_argument(
        "--tokens-per-rank", type=int, default=None, help="default: 8192 GPU, 512 CPU"
    )
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32

    L = args.tokens_per_rank or (8192 if use_cuda else 512)
    N = L * world_size
    # LongNet-style schedule: a local segment, a shard-sized one, and the whole
    # sequence with a dilation that keeps w / r small.
    segment_lengths = [L // 4, L, N]
    dilation_rates = [1, 2, max(1, N // (L // 2))]

    torch.manual_seed(0)  # identical weights on every rank
    ring = RingMultiheadDilatedAttention(
        args.embed_dim, args.heads, segment_lengths, dilation_rates, device=device, dtype=dtype
    )
    torch.manual_seed(1 + rank)  # each rank draws its own shard of the input
    x = torch.randn(1, L, args.embed_dim, device=device, dtype=dtype, requires_grad=True)

    def step() -> torch.Tensor:
        out, _ = ring(x, is_causal=True, already_split=True)
        out.float().square().mean().backward()
        return out

    out = step()  # warm-up
    if use_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        out = step()
    if use_cuda:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.iters

    # Check: rank 0 reruns the single-device module on the gathered sequence.
    x_full = gather_sequence(x.detach())
    out_full = gather_sequence(out.detach())
    if rank == 0:
        single = MultiheadDilatedAttention(
            args.embed_dim, args.heads, segment_lengths, dilation_rates, device=device, dtype=dtype
        )
        single.load_state_dict(ring.state_dict())
        with torch.no_grad():
            want, _ = single(x_full, is_causal=True)
        err = (out_full.double() - want.double()).abs().max().item()
        scale = want.float().abs().max().item()
        ok = err <= 2e-2 * scale if dtype == torch.bfloat16 else err <= 1e-4 * scale
        print(
            f"world_size={world_size} device={device.type} dtype={dtype} N={N} "
            f"segments={segment_lengths} dilations={dilation_rates}\n"
            f"max |ring - single device| = {err:.3e} (max |out| = {scale:.3e}) -> "
            f"{'OK' if ok else 'MISMATCH'}\n"
            f"ring forward+backward: {elapsed * 1e3:.1f} ms per step"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
