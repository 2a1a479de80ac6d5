"""Hilbert-ordered ring attention over the patches of a real photograph.

    python examples/hilbert_image.py                                   # one device
    torchrun --nproc_per_node=2 examples/hilbert_image.py --cpu        # a ring of 2 on gloo
    torchrun --nproc_per_node=2 examples/hilbert_image.py              # NCCL, one GPU per rank

The photo is matplotlib's sample portrait of Grace Hopper (it ships with matplotlib),
or any image passed with ``--image``; without one the script draws a picture. It is
cropped to a square, cut into ``--patch`` x ``--patch`` pixel patches (a 64 x 64 grid
of 4096 tokens by default) and embedded by a fixed random linear map. Then:

1. ``HilbertRingMultiheadAttention`` (dilated attention over the patches in
   Hilbert-curve order, over a ring when launched with torchrun) is checked against
   ``MultiheadDilatedAttention`` with the same weights on the curve-ordered patches,
   output and input gradient.
2. The compactness of the first branch's segments is measured: the total length of
   the boundaries between segments, in patch edges, row-major vs Hilbert order.
3. ``--out`` (default ``docs/hilbert_image.png``) shows the photo with those segment
   boundaries in both orders (rank 0; needs matplotlib).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dilated_attention_pytorch import (
    HilbertRingMultiheadAttention,
    MultiheadDilatedAttention,
    hilbert_permutation,
    inverse_permutation,
)
from dilated_attention_pytorch.hilbert import segment_boundaries, segment_map

SEGMENTS, DILATIONS = [256, 1024, 4096], [1, 4, 16]


def load_image(path: str | None, side: int) -> tuple[torch.Tensor, str]:
    """A ``(side, side, 3)`` float image in [0, 1] and where it came from."""
    try:
        from PIL import Image

        if path is None:
            import matplotlib.cbook

            path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        image = Image.open(path).convert("RGB")
        crop = min(image.size)
        left, top = (image.size[0] - crop) // 2, (image.size[1] - crop) // 2
        image = image.crop((left, top, left + crop, top + crop)).resize((side, side))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(side, side, 3).float() / 255.0, str(path)
    except (ImportError, OSError, ValueError):
        if path is not None and not str(path).endswith("grace_hopper.jpg"):
            raise
    y = torch.linspace(0, 1, side).view(-1, 1)
    x = torch.linspace(0, 1, side).view(1, -1)
    channels = [0.5 + 0.5 * torch.sin(9 * x + 4 * y), 0.5 + 0.5 * torch.cos(7 * y - 5 * x * y),
                0.5 + 0.5 * torch.sin(3 * (x - 0.4) ** 2 + 11 * y**2)]  # fmt: skip
    return torch.stack(torch.broadcast_tensors(*channels), dim=-1), "a drawn picture"


def patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """``(side, side, 3)`` -> ``(grid * grid, patch * patch * 3)`` in row-major order."""
    side = image.shape[0]
    grid = side // patch
    x = image.view(grid, patch, grid, patch, 3).permute(0, 2, 1, 3, 4)
    return x.reshape(grid * grid, patch * patch * 3)


def draw(image: torch.Tensor, grid: int, out: Path, perimeters: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    scale = image.shape[0] / grid  # pixels per patch
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), layout="constrained")
    orders = {"row-major": torch.arange(grid * grid), "Hilbert": hilbert_permutation(grid, grid)}
    for ax, (name, order) in zip(axes, orders.items(), strict=True):
        ax.imshow(image.numpy())
        edges = segment_boundaries(segment_map(order, grid, grid, SEGMENTS[0]))
        pixels = [[((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in e] for e in edges]
        ax.add_collection(LineCollection(pixels, colors="yellow", linewidths=1.2))
        ax.set_title(
            f"{name} order: {perimeters[name]} patch edges of segment boundary", fontsize=10
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Segments of {SEGMENTS[0]} consecutive patches ({grid} x {grid} patches of "
        f"{scale:.0f} px): strips in row-major order, compact squares along the Hilbert curve",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    from PIL import Image  # a matplotlib dependency

    # 192 colours keep the photo recognisable at a fraction of the size.
    Image.open(buffer).convert("RGB").quantize(colors=192).save(out, format="png", optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", help="an image file (default: matplotlib's sample photo)")
    parser.add_argument("--patch", type=int, default=8, help="patch side in pixels")
    parser.add_argument("--grid", type=int, default=64, help="patches per side (a power of 2)")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU under torchrun")
    parser.add_argument("--out", type=Path, default=Path("docs/hilbert_image.png"))
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    # float64 on the CPU (exact up to rounding); bf16 on GPUs, compared with bf16 on one GPU.
    dtype, tol = (torch.bfloat16, 3e-2) if use_cuda else (torch.float64, 1e-10)

    image, source = load_image(args.image, args.grid * args.patch)
    tokens = patches(image, args.patch)  # (N, patch*patch*3), row-major
    N, E, H = tokens.shape[0], 128, 8
    torch.manual_seed(0)  # the same embedding and weights on every rank
    embed = torch.randn(tokens.shape[1], E, dtype=torch.float64) / tokens.shape[1] ** 0.5
    x = (tokens.double() @ embed).to(device=device, dtype=dtype).unsqueeze(0)  # (1, N, E)

    ring = HilbertRingMultiheadAttention(
        E, H, SEGMENTS, DILATIONS, grid_size=(args.grid, args.grid), device=device, dtype=dtype
    )
    single = MultiheadDilatedAttention(E, H, SEGMENTS, DILATIONS, device=device, dtype=dtype)
    single.load_state_dict(ring.state_dict())
    perm = hilbert_permutation(args.grid, args.grid, device=device)
    inv = inverse_permutation(perm)

    x_ring = x.clone().requires_grad_()
    y_ring = ring(x_ring, is_causal=False)[0]  # row-major in and out
    y_ring.float().square().mean().backward()
    x_single = x.clone().requires_grad_()
    y_single = single(x_single[:, perm])[0][:, inv]  # the same maths on the curve order
    y_single.float().square().mean().backward()
    err = max(
        (y_ring.double() - y_single.double()).abs().max().item(),
        (x_ring.grad.double() - x_single.grad.double()).abs().max().item()
        / x_single.grad.double().abs().max().item(),
    )

    perimeters = {
        name: len(segment_boundaries(segment_map(order, args.grid, args.grid, SEGMENTS[0])))
        for name, order in (
            ("row-major", torch.arange(N)),
            ("Hilbert", hilbert_permutation(args.grid, args.grid)),
        )
    }
    ok = err <= tol
    if rank == 0:
        world = dist.get_world_size() if distributed else 1
        print(f"image: {source}; {args.grid} x {args.grid} patches of {args.patch} px = {N} tokens")
        print(
            f"HilbertRingMultiheadAttention on a ring of {world} ({device}, {dtype}) vs one "
            f"device on the curve order: max difference {err:.3g} -> {'OK' if ok else 'MISMATCH'}"
        )
        print(
            f"boundary between segments of {SEGMENTS[0]} patches: row-major "
            f"{perimeters['row-major']} patch edges, Hilbert {perimeters['Hilbert']}"
        )
        try:
            draw(image, args.grid, args.out, perimeters)
            print(f"wrote {args.out}")
        except ImportError:
            print("matplotlib is not installed: no picture (pip install matplotlib)")
    if distributed:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
