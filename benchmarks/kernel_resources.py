"""Registers, spills and shared memory of the Triton kernels as a real call launches them,
compiled for an NVIDIA GPU on any machine (no GPU needed).

    python benchmarks/kernel_resources.py --out benchmarks/results [--arch 90] [--dims 64,128]

The backend's launchers run on ``meta`` tensors (no memory, no data) with every kernel
replaced by a recorder, for LongNet's layer (``B = 1``, ``N`` = ``--seq-len``, ``H = 16``,
segment lengths 2048..32768, rates 1..16, bf16), forward and backward, causal and not,
for each ``DQ_MODE`` and ``LOAD_MODE`` (``backends/triton/launch.py``). Each distinct
launch form (kernel, compile-time settings, whether the dilation rate is 1, warps, stages;
other arguments as Triton specialises them: divisibility by 16, pointer alignment) is then
compiled the way Triton's runtime would on the GPU, with Triton's compiler and the
``ptxas`` bundled with it, for compute capability ``--arch``.

Columns: the kernel, its compile-time settings, registers per thread, bytes of spill stores
and loads per thread (registers that did not fit and go through local memory: slow), shared
memory, and whether the PTX holds the Hopper bulk tensor reduce-add
(``cp.reduce.async.bulk``, ``DQ_MODE = "tma"``). Writes
``kernel_resources_cpu_sm<arch>_<date>.json`` (stamp, rows) to ``--out``. About a minute
on two cores (Triton caches what it compiled). ``--candidates`` adds the forms of every tile
config ``bench_dilated.py --tune`` tries (rows marked ``candidate``), so the tuning run on
a GPU can be read next to what each tile costs in registers.

``--loops`` also disassembles each form (Triton's bundled ``nvdisasm``) and counts the
instructions per thread of its innermost loops that hold tensor-core instructions (the
loops over key or query tiles), by class: ``mma`` (``HGMMA``/``HMMA``), ``mma_sync``
(``WARPGROUP`` arrive/wait), ``exp`` (``MUFU``), ``fp32``, ``convert``, ``shared``,
``global`` (loads, copies, tensor-memory-accelerator operations), ``spill`` (``LDL``/
``STL``), ``barrier`` and ``integer_and_control`` (address arithmetic, predicates,
branches, moves). A static count, not a timing: use it to see where a loop's issue slots
go before spending GPU time on a change.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from typing import Any

import torch
import triton
from bench_dilated import TUNE_KERNELS, tune_candidates
from measure import result_path, stamp, write_json
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from dilated_attention_pytorch.backends.triton import launch
from dilated_attention_pytorch.plan import make_plan

# Triton's bundled CUDA tools (ptxas, nvdisasm).
_TRITON_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]
KERNELS = (
    "_fwd_kernel",
    "_delta_kernel",
    "_bwd_dkdv_kernel",
    "_bwd_dq_kernel",
    "_joint_fwd_kernel",
    "_joint_dq_kernel",
    "_joint_dkdv_kernel",
    "_zero_uncovered_kernel",
)
SETTINGS = (
    "HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL", "ACC_IN", "LSE_PAIR", "DQ_ADD", "TMA_LOADS",
    "PACKED",
)  # fmt: skip


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's arguments."""

    def __init__(self, name: str, fn: triton.JITFunction, calls: list) -> None:
        self.name, self.fn, self.calls = name, fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, self.fn, args, kwargs))


@contextmanager
def recording(calls: list):
    """Replace the launcher's kernels by recorders while the block runs."""
    saved = {name: getattr(launch, name) for name in KERNELS}
    try:
        for name, fn in saved.items():
            setattr(launch, name, _Recorder(name, fn, calls))
        yield
    finally:
        for name, fn in saved.items():
            setattr(launch, name, fn)


def launches(N: int, D: int, causal: bool, dq_mode: str, load_mode: str = "pointer") -> list:
    """Every kernel launch of one forward and one backward of the LongNet configuration."""
    B, H = 1, 16
    q, k, v, dout = (torch.empty(B, N, H, D, device="meta", dtype=torch.bfloat16) for _ in range(4))
    plan = make_plan(SEGMENTS, RATES, H)
    calls: list = []
    default = launch.DQ_MODE, launch.LOAD_MODE
    launch.DQ_MODE, launch.LOAD_MODE = dq_mode, load_mode
    try:
        with recording(calls):
            out, lse = launch.dilated_forward(q, k, v, plan, scale=D**-0.5, causal=causal)
            launch.dilated_backward(dout, q, k, v, out, lse, plan, scale=D**-0.5, causal=causal)
    finally:
        launch.DQ_MODE, launch.LOAD_MODE = default
    return calls


@contextmanager
def as_on_gpu():
    """While the block runs: the launchers see an H100/H200 (``DQ_ADD``, TMA loads), and
    meta tensors report an address (Triton's specialisation reads one: alignment by 16),
    the byte offset of their view, which decides the alignment of a real one."""
    saved = launch._on_hopper, torch.Tensor.data_ptr
    launch._on_hopper = lambda device: True
    torch.Tensor.data_ptr = lambda t: 256 + t.storage_offset() * t.element_size()  # type: ignore[method-assign]
    try:
        yield
    finally:
        launch._on_hopper, torch.Tensor.data_ptr = saved  # type: ignore[method-assign]


def specialize(fn: triton.JITFunction, args: tuple, kwargs: dict, arch: int) -> tuple:
    """What Triton's runtime would compile for this launch: ``(source, options)``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return ASTSource(fn, signature, constexprs, attrs), options


def compile_launch(source: ASTSource, options: Any, arch: int, loops: bool = False) -> dict:
    """Compile one launch form for ``sm_<arch>``; returns its resources (``ptxas -v``),
    whether its PTX uses the bulk tensor reduce-add and, with ``loops``, the instruction
    counts of its innermost tensor-core loops (:func:`sass_loops`)."""
    target = GPUTarget("cuda", arch, 32)
    kernel = triton.compile(source, target=target, options=options.__dict__)
    ptx = kernel.asm["ptx"]
    ptxas = os.path.join(_TRITON_BIN, "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
             path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip

    def number(pattern: str) -> int:
        found = re.findall(pattern, report)
        return int(found[-1]) if found else 0

    got = {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "shared_bytes": kernel.metadata.shared,
        "tma_reduce": "cp.reduce.async.bulk" in ptx,
    }
    if loops:
        got["loops"] = sass_loops(disassemble(kernel.asm["cubin"]))
    return got


_SASS_INSTRUCTION = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);"
)
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_CLASSES = {
    "mma": ("HGMMA", "HMMA"),
    "mma_sync": ("WARPGROUP",),
    "exp": ("MUFU",),
    "fp32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FFMA2", "FMUL2", "FADD2"),
    "convert": ("F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "global": ("LDG", "STG", "LDGSTS", "LDGDEPBAR", "UTMALDG", "UTMASTG", "UTMAREDG",
               "UBLKCP", "UBLKRED", "RED", "REDG", "ATOMG"),
    "spill": ("LDL", "STL"),
    "barrier": ("BAR", "SYNCS", "MEMBAR", "DEPBAR", "FENCE", "ERRBAR"),
}  # fmt: skip
_SASS_CLASS_OF = {op: name for name, ops in _SASS_CLASSES.items() for op in ops}


def sass_loops(sass: str) -> list[dict]:
    """The innermost loops of disassembled SASS that hold tensor-core instructions, in
    address order: per loop, ``instructions`` (per thread, one iteration) and the count of
    each class (``_SASS_CLASSES``; the rest is ``integer_and_control``). A loop is the
    span from a label to a later branch back to it, unless it starts inside another such
    span and ends past it (a jump back into a loop from out-of-line code)."""
    labels: dict[str, int] = {}
    pending: list[str] = []
    code: list[tuple[int, str, str]] = []  # (address, opcode, operands)
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _SASS_INSTRUCTION.search(line)
        if found:
            address = int(found.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            code.append((address, found.group(2), found.group(3)))
    index = {address: i for i, (address, _, _) in enumerate(code)}
    spans = []
    for i, (address, opcode, operands) in enumerate(code):
        target = re.search(r"(\.L_x_\d+)", operands)
        if opcode.split(".")[0] != "BRA" or not target or target.group(1) not in labels:
            continue
        start = labels[target.group(1)]
        if start <= address and start in index:
            body = code[index[start] : i + 1]
            if any(_SASS_CLASS_OF.get(op.split(".")[0]) == "mma" for _, op, _ in body):
                spans.append((index[start], i))
    # A span that starts inside another and ends past it is no loop: out-of-line code
    # (ptxas puts a barrier wait's retry after the kernel body) jumping back into a
    # loop's body.
    spans = [(a, b) for a, b in spans if not any(c < a <= d < b for c, d in spans)]
    innermost = [
        (a, b)
        for a, b in spans
        if not any((c, d) != (a, b) and a <= c and d <= b for c, d in spans)
    ]
    loops = []
    for a, b in sorted(innermost):
        counts = dict.fromkeys([*_SASS_CLASSES, "integer_and_control"], 0)
        for _, opcode, _ in code[a : b + 1]:
            counts[_SASS_CLASS_OF.get(opcode.split(".")[0], "integer_and_control")] += 1
        loops.append({"instructions": b - a + 1, **counts})
    return loops


def disassemble(cubin: bytes) -> str:
    """SASS of a compiled kernel, through the ``nvdisasm`` bundled with Triton."""
    tool = os.path.join(_TRITON_BIN, "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout


def launch_forms(
    seq_len: int, D: int, causal: bool, mode: str, load_mode: str, arch: int, seen: dict,
    loops: bool = False,
) -> None:  # fmt: skip
    """Compile each launch form of one configuration not in ``seen`` (keyed by kernel,
    compile-time settings, ``r == 1``, warps, stages and register cap), adding its row
    (with ``loops``, its loops' instruction counts); call inside :func:`as_on_gpu`."""
    for name, fn, a, kw in launches(seq_len, D, causal, mode, load_mode):
        if name in ("_delta_kernel", "_zero_uncovered_kernel"):
            continue
        settings = {s: kw[s] for s in SETTINGS if s in kw}
        # The dilation rate as the kernel sees it: 1 is a compile-time constant (Triton
        # specialises integers equal to 1). Launches that differ only in other values'
        # specialisations compile alike: the first stands in.
        # The joint kernels run every branch in one launch: no rate argument ("all").
        dil = a[fn.arg_names.index("dil")] if "dil" in fn.arg_names else "all"
        key = (name, tuple(settings.items()), dil == 1, kw["num_warps"], kw["num_stages"],
               kw.get("maxnreg"))  # fmt: skip
        if key not in seen:
            source, options = specialize(fn, a, kw, arch)
            seen[key] = {
                "kernel": name.strip("_").removesuffix("_kernel"),
                **{s.lower(): v for s, v in settings.items()},
                "dil": dil if dil in (1, "all") else "> 1",
                "num_warps": kw["num_warps"],
                "num_stages": kw["num_stages"],
                "maxnreg": kw.get("maxnreg"),
                **compile_launch(source, options, arch, loops),
                "dq_modes": [],
            }
            r = seen[key]
            print(f"{r['kernel']:>9} D={D:<3} causal={causal!s:<5} r={r['dil']:<3} "
                  f"acc_in={r.get('acc_in', '-')!s:<5} dq_add={r.get('dq_add', '-')} "
                  f"tma_loads={r['tma_loads']!s:<5} packed={r.get('packed', '-')!s:<5} "
                  f"tiles {r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}"
                  f"{'' if r['maxnreg'] is None else ' cap ' + str(r['maxnreg'])}: "
                  f"{r['registers']} registers, spills {r['spill_stores']}/{r['spill_loads']} B, "
                  f"shared {r['shared_bytes']} B" + (", TMA reduce-add" if r["tma_reduce"] else ""),
                  flush=True)  # fmt: skip
            for i, loop in enumerate(r.get("loops", [])):
                counts = ", ".join(f"{k} {v}" for k, v in loop.items() if k != "instructions" and v)
                print(f"    loop {i}: {loop['instructions']} instructions ({counts})", flush=True)
        if mode not in seen[key]["dq_modes"]:
            seen[key]["dq_modes"].append(mode)


# Per tuned kernel: the launcher's config table and the DQ_MODE whose backward runs it.
_TABLES = {
    "fwd": ("FWD_CONFIGS", "separate"),
    "dkdv": ("DKDV_CONFIGS", "separate"),
    "dq": ("DQ_CONFIGS", "separate"),
    "dkdv_dq": ("DKDV_DQ_CONFIGS", "tma"),
}


def candidate_forms(
    seq_len: int, D: int, load_mode: str, arch: int, seen: dict, loops: bool = False
) -> None:
    """Compile the forms of every tile config ``bench_dilated.py --tune`` tries (its
    ``tune_candidates``), each installed in turn as the launcher's config; the rows this
    adds (forms the defaults do not launch) get ``"candidate": True`` (with ``loops``,
    their loops' instruction counts too)."""
    for kernel in TUNE_KERNELS:
        table_name, mode = _TABLES[kernel]
        table = getattr(launch, table_name)
        default = table[D]
        try:
            for config in tune_candidates(D)[kernel]:
                table[D] = launch.KernelConfig(*config)
                for causal in (False, True):
                    before = set(seen)
                    launch_forms(seq_len, D, causal, mode, load_mode, arch, seen, loops)
                    for key in set(seen) - before:
                        seen[key]["candidate"] = True
        finally:
            table[D] = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--dq-modes", default=",".join(launch.DQ_MODES))
    parser.add_argument("--load-modes", default="pointer,tma")
    parser.add_argument(
        "--loops",
        action="store_true",
        help="also count the instructions of each form's tensor-core loops (nvdisasm)",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="also every tile config bench_dilated.py --tune tries (pointer loads)",
    )
    args = parser.parse_args()
    if launch.interpreting():
        raise SystemExit("run without TRITON_INTERPRET=1: it selects the interpreter's tiles")
    seen: dict[tuple, dict] = {}
    with as_on_gpu():
        for D in [int(d) for d in args.dims.split(",")]:
            for causal in (False, True):
                for mode in args.dq_modes.split(","):
                    for load_mode in args.load_modes.split(","):
                        launch_forms(
                            args.seq_len, D, causal, mode, load_mode, args.arch, seen, args.loops
                        )
            if args.candidates:
                candidate_forms(args.seq_len, D, "pointer", args.arch, seen, args.loops)
    report = {
        **stamp(torch.device("cpu")),
        "target": f"sm_{args.arch}",
        "configuration": {
            "segment_lengths": SEGMENTS,
            "dilation_rates": RATES,
            "B": 1,
            "H": 16,
            "N": args.seq_len,
            "dtype": "bfloat16",
        },  # fmt: skip
        "rows": list(seen.values()),
    }
    path = result_path(args.out, "kernel_resources", "cpu", f"sm{args.arch}")
    write_json(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
