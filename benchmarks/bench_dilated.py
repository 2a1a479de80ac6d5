"""Dilated attention on one GPU: triton backend vs pytorch backend vs dense cuDNN SDPA.

Usage::

    python benchmarks/bench_dilated.py --out benchmarks/results [--quick] [--tune]

``--tune`` first times each kernel alone at N = 256K over the tile configs of
``_TUNE_CANDIDATES`` and installs the fastest for the run (``--tune-kernels`` picks the
kernels; ``--tune-rate R`` times the branch with dilation ``R``, segments of ``2048 R``,
its backward reading the branch's own gathered row terms as the library does; default the
``r = 1`` branch).

Configuration (LongNet): segment lengths 2048, 4096, 8192, 16384, 32768 with dilation
rates 1, 2, 4, 8, 16; B = 1, H = 16 (``--heads``; ``--kv-heads`` for grouped-query
attention, without dense rows), D in {64, 128}; bf16; N from 32K to 1M tokens;
both branch mixings; forward and forward+backward; not causal (``--causal``: every
implementation, dense SDPA included, causal).

Implementations (``--impls``): backend names (``triton``, ``pytorch``),
``pytorch-flash``, the pytorch backend pinned to PyTorch's flash op
(``backend=PyTorchBackend(kernel="flash")``) instead of cuDNN, ``triton-dq-MODE``,
the triton backend with ``backends.triton.launch.DQ_MODE = MODE`` (``separate``,
``atomic``, ``tma``: how the backward computes dQ; forward+backward rows only, its
forward is the triton backend's), ``triton-loads-MODE`` with ``LOAD_MODE = MODE``
(``pointer``, ``tma``: how the kernels' loops read tiles) and
``triton-dq-MODE-loads-MODE`` with both.

Columns: median time over many runs (CUDA events, after warm-up), useful TFLOP/s,
peak memory (``torch.cuda.max_memory_allocated`` during the call, inputs and outputs
included), and the time ratio to the pytorch backend (b). Timing, memory, FLOPs and
the JSON stamp come from ``benchmarks/measure.py``.

FLOP formula (``dilated_attention_pytorch.plan.attention_flops``; useful work only: the
pairs the pattern attends, counted with multiplicity across branches). For branch
``(w, r)`` and a head ``h`` running it with offset ``o``, segment ``s`` holds ``L_s(o)``
dilated positions (the last segment may be shorter); non-causal it attends ``L_s^2``
pairs, causal ``L_s (L_s + 1) / 2``. Then::

    pairs    = B * sum_{branches} sum_{heads h of the branch} sum_s pairs_s(o_h)
    FLOP_fwd = 4 * D * pairs          # QK^T and PV, 2 FLOP per multiply-add each
    FLOP_fwd+bwd = 3.5 * FLOP_fwd     # flash convention: backward = 2.5 x forward

Dense SDPA: ``pairs = B * H * N^2`` (non-causal). Dense runs only up to ``--dense-max``
tokens (it is O(N^2)); its best TFLOP/s is the ceiling the dilated kernels are held to.

Writes ``dilated_bench.json`` (device, date, versions, command, rows) and
``dilated_bench.png`` (log-log time vs N, one panel per head dim and mixing, the three
implementations as lines) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch
from measure import (
    FLOP_CONVENTION,
    GiB,
    dense_flops,
    dilated_flops,
    measure,
    stamp,
    tflops,
    time_ms,
    write_json,
)

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.backends import PyTorchBackend

SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]


def make_runner(
    backend: str, q, k, v, dout, ws, rs, mixing: str, with_bwd: bool, causal: bool = False
):
    """A closure running one call (forward, or forward+backward) of a backend."""
    if backend == "dense":
        from torch.nn.attention import sdpa_kernel

        qt, kt, vt, dt = (t.transpose(1, 2) for t in (q, k, v, dout))

        def run():
            with sdpa_kernel(DENSE_BACKEND):
                out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            if with_bwd:
                out.backward(dt)
            return out

        return run

    # "pytorch-flash": the pytorch backend pinned to PyTorch's flash op instead of cuDNN,
    # to show what the pytorch backend's choice of kernel is worth. "triton-dq-MODE",
    # "triton-loads-MODE" (or both, "triton-dq-MODE-loads-MODE"): the triton backend with
    # launch.DQ_MODE / launch.LOAD_MODE set for the call.
    chosen = PyTorchBackend(kernel="flash") if backend == "pytorch-flash" else backend
    settings = triton_settings(backend)
    if settings:
        chosen = "triton"

    def run():
        with launch_settings(**settings):
            out = dilated_attention(
                q, k, v, ws, rs, is_causal=causal, branch_mixing=mixing, backend=chosen
            )
            if with_bwd:
                out.backward(dout)
        return out

    return run


@contextmanager
def launch_settings(**settings: str):
    """Set ``backends.triton.launch`` module settings (``DQ_MODE="tma"``, ...) while the
    block runs, and restore them after."""
    if not settings:
        yield
        return
    from dilated_attention_pytorch.backends.triton import launch

    defaults = {name: getattr(launch, name) for name in settings}
    for name, value in settings.items():
        setattr(launch, name, value)
    try:
        yield
    finally:
        for name, value in defaults.items():
            setattr(launch, name, value)


def triton_settings(impl: str) -> dict[str, str]:
    """The launch settings an impl name asks for: ``triton-dq-tma-loads-tma`` ->
    ``{"DQ_MODE": "tma", "LOAD_MODE": "tma"}``; ``{}`` for every other name."""
    if not impl.startswith("triton-"):
        return {}
    from dilated_attention_pytorch.backends.triton import launch

    words = impl.removeprefix("triton-").split("-")
    options = {"dq": ("DQ_MODE", launch.DQ_MODES), "loads": ("LOAD_MODE", launch.LOAD_MODES)}
    if len(words) % 2 or any(w not in options for w in words[::2]):
        raise ValueError(
            f"unknown impl {impl!r}: triton variants are triton-dq-MODE, triton-loads-MODE "
            f"or triton-dq-MODE-loads-MODE"
        )
    settings = {}
    for key, value in zip(words[::2], words[1::2], strict=True):
        name, valid = options[key]
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r} in {impl!r}; one of {valid}")
        settings[name] = value
    return settings


DENSE_BACKEND = None
DENSE_NAME = ""


def pick_dense_backend() -> None:
    """cuDNN SDPA if it runs here, else flash; records which."""
    global DENSE_BACKEND, DENSE_NAME
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 16, 4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for backend, name in (
        (SDPBackend.CUDNN_ATTENTION, "cudnn"),
        (SDPBackend.FLASH_ATTENTION, "flash"),
    ):
        try:
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            out.sum().backward()
            torch.cuda.synchronize()
            DENSE_BACKEND, DENSE_NAME = backend, name
            return
        except RuntimeError as exc:
            print(f"dense backend {name} unavailable: {exc}", file=sys.stderr)
    raise RuntimeError("neither cuDNN nor flash SDPA runs on this device")


def bench_one(
    impl: str,
    N: int,
    D: int,
    mixing: str,
    with_bwd: bool,
    H: int = 16,
    B: int = 1,
    causal: bool = False,
    kv_heads: int | None = None,
) -> dict:
    """One row: ``impl`` on ``(B, N, H, D)`` bf16 inputs (k, v with ``kv_heads`` heads:
    grouped-query attention; not for ``"dense"``)."""
    ws, rs = SEGMENTS, RATES
    H_kv = H if kv_heads is None else kv_heads
    if impl == "dense" and H_kv != H:
        raise ValueError("dense rows run with kv_heads == H only")
    gen = torch.Generator(device="cuda").manual_seed(N + D)
    q, k, v, dout = (
        torch.randn(B, N, heads, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        for heads in (H, H_kv, H_kv, H)
    )
    if with_bwd:
        for t in (q, k, v):
            t.requires_grad_()
    run = make_runner(impl, q, k, v, dout, ws, rs, mixing, with_bwd, causal)

    def call():
        for t in (q, k, v):
            t.grad = None
        if with_bwd:
            return run()
        with torch.no_grad():
            return run()

    # One warm-up call (compile, caches), one under the memory probe (which also sizes the
    # number of timed runs: about 0.7 s of timing, 5 to 50 runs), then the timed runs.
    m = measure(call, "cuda", warmup=1, count_live=True)
    if impl == "dense":
        flop = dense_flops(N, H, D, batch=B, is_causal=causal, backward=with_bwd)
    else:
        flop = dilated_flops(
            ws, rs, H, N, D, branch_mixing=mixing, batch=B, is_causal=causal, backward=with_bwd
        )
    return dict(
        impl=impl if impl != "dense" else f"dense-{DENSE_NAME}",
        N=N,
        D=D,
        H=H,
        H_kv=H_kv,
        B=B,
        mixing=mixing if impl != "dense" else "dense",
        pass_="fwd+bwd" if with_bwd else "fwd",
        causal=causal,
        ms=m.ms,
        reps=m.reps,
        tflops=tflops(flop, m.ms),
        peak_gib=m.peak_bytes / GiB,
    )


# Tile configs --tune tries, (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]), per
# kernel: the forward, the dK/dV and dQ kernels, and the dK/dV kernel adding dQ (DQ_MODE
# "tma"). maxnreg caps the registers per thread (8 warps run two programs per SM only at
# 128 or fewer).
TUNE_KERNELS = ("fwd", "dkdv", "dq", "dkdv_dq")
_TUNE_CANDIDATES = {
    64: {
        "fwd": [(128, 64, 8, 3), (128, 64, 8, 3, 128), (128, 64, 4, 3), (128, 128, 8, 3),
                (128, 64, 8, 4), (128, 64, 8, 4, 128)],
        "dkdv": [(32, 128, 4, 3), (32, 128, 4, 4), (32, 128, 8, 3), (64, 128, 4, 3),
                 (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 4)],
        "dq": [(128, 64, 8, 3), (128, 64, 8, 3, 128), (128, 64, 4, 3), (128, 128, 8, 3),
               (64, 64, 4, 3)],
        "dkdv_dq": [(32, 128, 4, 4), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
    },
    128: {
        "fwd": [(64, 64, 4, 3), (64, 64, 4, 3, 168), (128, 64, 8, 3), (64, 64, 4, 4),
                (64, 32, 4, 3)],
        "dkdv": [(32, 64, 4, 3), (32, 64, 4, 4), (32, 128, 8, 3), (64, 64, 8, 2)],
        "dq": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
        "dkdv_dq": [(32, 64, 4, 3), (32, 64, 4, 4), (64, 64, 8, 2), (64, 64, 4, 3),
                    (32, 128, 8, 3)],
    },
}  # fmt: skip


def tune_candidates(D: int) -> dict[str, list[tuple[int, ...]]]:
    """The tile configs ``--tune`` tries for head dim ``D``, per kernel."""
    return _TUNE_CANDIDATES[64 if D <= 64 else 128]


def tune(N: int, D: int, kernels: list[str], rate: int = 1) -> dict:
    """Time each kernel alone (one launch of LongNet's branch with dilation ``rate``: 1,
    segments of 2048; else segments of ``2048 * rate``) over a few tile configs.

    Installs the fastest config per kernel for this run and returns what it chose; the
    library defaults (``backends/triton/launch.py``, ``*_CONFIGS``) are set from such a run.
    The backward reads its row terms as the library does (packed words where
    ``launch.PACKED_ROW_TERMS`` says so, except in the ``dkdv_dq`` form; a branch with
    ``rate > 1`` its own gathered rows, ``launch._branch_rows``).
    """
    from dilated_attention_pytorch.backends.triton import launch as tk

    KC = tk.KernelConfig
    cands = tune_candidates(D)
    H, B, scale = 16, 1, D**-0.5
    q, k, v, dout = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    w = 2048 * rate
    launch = tk._Launch(w, w, rate, 0, 0, H)  # one LongNet branch, all heads
    out = torch.empty_like(q)
    # The LSE as the library keeps it, a (hi, lo) pair; the forward merges into what an
    # earlier branch left (ACC_IN), as every branch after the first does.
    lse = torch.empty(2, B, N, H, device="cuda", dtype=torch.float32)
    acc = torch.empty(q.shape, device="cuda", dtype=torch.float32)
    tk._launch_forward(
        q, k, v, out, acc, lse, None, launch, scale=scale, causal=False, acc_in=False
    )
    # The backward's layout of the LSE and delta: heads-first (see dilated_backward).
    packed = tk._packs_row_terms(0)
    rows = tk._backward_rows(dout, out, lse, packed=packed)
    lse_b, delta, compact = tk._branch_rows(*rows, launch, packed)
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))

    def run_fwd():
        tk._launch_forward(
            q, k, v, acc, acc, lse, None, launch, scale=scale, causal=False, acc_in=True
        )

    dq_acc = torch.zeros(q.shape, device="cuda", dtype=torch.float32)

    def run_bwd(which: str, dq_add: int = 0):
        tk._launch_backward(
            dout, q, k, v, lse_b, delta, None, grads, grads, launch,
            scale=scale, causal=False, acc_in=False, which=which, dq_add=dq_add, dq_acc=dq_acc,
            compact=compact, packed=tk._packs_row_terms(dq_add),
        )  # fmt: skip

    jobs = {
        "fwd": (tk.FWD_CONFIGS, cands["fwd"], run_fwd),
        "dkdv": (tk.DKDV_CONFIGS, cands["dkdv"], lambda: run_bwd("dkdv")),
        "dq": (tk.DQ_CONFIGS, cands["dq"], lambda: run_bwd("dq")),
        # dK/dV adding dQ with the bulk reduce-add (DQ_MODE "tma"; the zeroing of the
        # buffer is not timed, the sums grow: only the time matters here).
        "dkdv_dq": (tk.DKDV_DQ_CONFIGS, cands["dkdv_dq"], lambda: run_bwd("dkdv", dq_add=2)),
    }
    chosen = {}
    for name, (table, configs, fn) in jobs.items():
        if name not in kernels:
            continue
        best, default = None, table[D]
        for c in configs:
            table[D] = KC(*c)
            try:
                ms = time_ms(fn, "cuda", reps=10, warmup=1)
            except Exception as exc:  # e.g. out of shared memory for this tile shape
                print(f"tune {name} D={D} {c}: failed ({type(exc).__name__})", flush=True)
                continue
            print(f"tune {name} D={D} {c}: {ms:.3f} ms", flush=True)
            if best is None or ms < best[0]:
                best = (ms, table[D])
        if best is None:  # no candidate ran: keep the default
            table[D] = default
            chosen[name] = dict(ms=None, config=None)
            continue
        table[D] = best[1]
        chosen[name] = dict(ms=best[0], config=best[1].__dict__)
    print(f"tune D={D} r={rate}: {chosen}", flush=True)
    return chosen


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ds = sorted({r["D"] for r in rows})
    mixings = ["softmax", "head_split"]
    fig, axes = plt.subplots(len(Ds), 2, figsize=(11, 4.2 * len(Ds)), squeeze=False)
    for i, D in enumerate(Ds):
        for j, mixing in enumerate(mixings):
            ax = axes[i][j]
            for impl, style in (("triton", "o-"), ("pytorch", "s--"), ("pytorch-flash", "x:")):
                pts = sorted(
                    (r["N"], r["ms"])
                    for r in rows
                    if r["impl"] == impl
                    and r["D"] == D
                    and r["mixing"] == mixing
                    and r["pass_"] == "fwd+bwd"
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{impl} (dilated)")
            pts = sorted(
                (r["N"], r["ms"])
                for r in rows
                if r["impl"].startswith("dense") and r["D"] == D and r["pass_"] == "fwd+bwd"
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), "^:", label=f"{rows_dense_name(rows)} (dense)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel("fwd+bwd time (ms)")
            H = {r["H"] for r in rows if r["D"] == D}
            ax.set_title(f"D={D}, {mixing} mixing, bf16, B=1, H={'/'.join(map(str, sorted(H)))}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rows_dense_name(rows: list[dict]) -> str:
    names = {r["impl"] for r in rows if r["impl"].startswith("dense")}
    return "/".join(sorted(names)) or "dense"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and the plot")
    parser.add_argument("--quick", action="store_true", help="a few sizes only (smoke test)")
    parser.add_argument("--tune", action="store_true", help="pick tile configs at N=256K first")
    parser.add_argument(
        "--tune-kernels",
        default=",".join(TUNE_KERNELS),
        help="with --tune: which kernels' configs to pick (fwd, dkdv, dq, dkdv_dq)",
    )
    parser.add_argument(
        "--tune-rate",
        type=int,
        default=1,
        help="with --tune: the dilation rate of the timed branch (1: the r = 1 branch)",
    )
    parser.add_argument(
        "--passes", default="fwd,fwd+bwd", help="which passes to time: fwd, fwd+bwd or both"
    )
    parser.add_argument("--causal", action="store_true", help="causal attention everywhere")
    parser.add_argument("--heads", type=int, default=16, help="query heads H")
    parser.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        help="K/V heads (grouped-query attention; default H); skips the dense rows",
    )
    parser.add_argument("--dense-max", type=int, default=131072, help="largest N for dense SDPA")
    parser.add_argument("--max-n", type=int, default=1 << 20)
    parser.add_argument("--dims", default="64,128")
    parser.add_argument(
        "--sizes", default="15,17,19,20", help="log2 of the sequence lengths (default 32K..1M)"
    )
    parser.add_argument(
        "--impls",
        default="triton,pytorch",
        help="dilated implementations to time: backend names; 'pytorch-flash' adds the pytorch "
        "backend pinned to PyTorch's flash op instead of cuDNN",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    pick_dense_backend()
    tuned = {}
    if args.tune:
        for D in [int(d) for d in args.dims.split(",")]:
            tuned[D] = tune(1 << 18, D, args.tune_kernels.split(","), args.tune_rate)
    Ns = [1 << int(p) for p in args.sizes.split(",")]
    if args.quick:
        Ns = [1 << 15, 1 << 20]
    Ns = [n for n in Ns if n <= args.max_n]
    rows: list[dict] = []
    meta = dict(
        **stamp("cuda"),
        dense_backend=DENSE_NAME,
        segment_lengths=SEGMENTS,
        dilation_rates=RATES,
        dtype="bfloat16",
        causal=args.causal,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        tuned_configs={str(k): v for k, v in tuned.items()},
        tune_rate=args.tune_rate if args.tune else None,
        flop_formula=FLOP_CONVENTION,
        rows=rows,
    )
    json_path = os.path.join(args.out, "dilated_bench.json")

    def add(row: dict) -> None:
        torch.cuda.empty_cache()  # the call's tensors are gone: start each from a clean pool
        rows.append(row)
        # Ratio to the pytorch backend (b): time(b) / time(impl); > 1 is faster than (b).
        ref = {(r["N"], r["D"], r["mixing"], r["pass_"]): r for r in rows if r["impl"] == "pytorch"}
        for r in rows:
            b = ref.get((r["N"], r["D"], r["mixing"], r["pass_"]))
            r["speedup_vs_pytorch"] = b["ms"] / r["ms"] if b else None
            r["memory_ratio_vs_pytorch"] = r["peak_gib"] / b["peak_gib"] if b else None
        write_json(json_path, meta)  # after every row, so a cut-off run keeps its data
        print(
            f"{row['impl']:>13} D={row['D']:<3} {row['mixing']:>10} {row['pass_']:>7} N={row['N']:>8}: "
            f"{row['ms']:9.2f} ms {row['tflops']:7.1f} TFLOP/s {row['peak_gib']:6.2f} GiB",
            flush=True,
        )

    gqa = args.kv_heads not in (None, args.heads)  # no dense rows then
    for D in [int(d) for d in args.dims.split(",")]:
        for N in Ns:
            for with_bwd in [p == "fwd+bwd" for p in args.passes.split(",")]:
                if N <= args.dense_max and not gqa:
                    add(bench_one("dense", N, D, "dense", with_bwd, args.heads, causal=args.causal))
                for mixing in ("softmax", "head_split"):
                    for impl in args.impls.split(","):
                        # dQ modes differ only in the backward.
                        if with_bwd or "DQ_MODE" not in triton_settings(impl):
                            add(
                                bench_one(
                                    impl,
                                    N,
                                    D,
                                    mixing,
                                    with_bwd,
                                    args.heads,
                                    causal=args.causal,
                                    kv_heads=args.kv_heads,
                                )
                            )
    plot(
        rows,
        os.path.join(args.out, "dilated_bench.png"),
        f"{meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}"
        + (", causal" if args.causal else ""),
    )
    # Summary table (the last lines of output).
    print(f"\n{meta['device']} {meta['date']} dense={DENSE_NAME}")
    print(
        f"{'impl':>13} {'D':>3} {'mixing':>10} {'pass':>7} {'N':>8} {'ms':>9} {'TFLOP/s':>8} {'GiB':>6} {'x(b)':>6} {'mem/(b)':>7}"
    )
    for r in rows:
        if r["N"] in (Ns[0], Ns[-1]) or r["impl"].startswith("dense"):
            sp = r["speedup_vs_pytorch"]
            mr = r["memory_ratio_vs_pytorch"]
            print(
                f"{r['impl']:>13} {r['D']:>3} {r['mixing']:>10} {r['pass_']:>7} {r['N']:>8} {r['ms']:9.2f} "
                f"{r['tflops']:8.1f} {r['peak_gib']:6.2f} {'' if sp is None else f'{sp:6.2f}':>6} "
                f"{'' if mr is None else f'{mr:7.2f}':>7}"
            )


if __name__ == "__main__":
    main()
