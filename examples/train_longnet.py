"""Train a byte-level LongNetLM on real text: Python's own standard library, or your folder.

    python examples/train_longnet.py                                  # one GPU (CPU without)
    python examples/train_longnet.py --cpu                            # a small CPU run
    torchrun --nproc_per_node=2 examples/train_longnet.py --cpu --sp 2    # a ring of 2 on gloo
    torchrun --nproc_per_node=4 examples/train_longnet.py --sp 4      # the ring over 4 GPUs

The corpus is every ``.py`` file of ``sysconfig.get_paths()["stdlib"]`` (or every file
of ``--data DIR`` with ``--suffix``), read as bytes (vocabulary 256). Files are split into
training and validation by a hash of their relative path, so the split is the same on
every run. Each step draws ``--batch-size`` windows of ``--seq-len + 1`` bytes at
offsets that depend only on the seed, the step and the data-parallel rank, so a
resumed run reads exactly the data the killed one would have.

Everything goes to ``--out`` (default ``runs/longnet``): ``log.jsonl`` (one line per step
and per evaluation), ``checkpoint.pt`` (model, optimizer, step and RNG states, written
every ``--checkpoint-every`` steps and at the end; a run started again with the same
``--out`` continues from it), ``summary.json`` and ``loss.png``. Validation is reported
in bits per byte.

With ``--sp K`` each sequence is split over ``K`` ranks and attention runs as a ring;
the other ``world_size / K`` ranks are data parallel (DDP over all ranks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import shlex
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh

from dilated_attention_pytorch.models import (
    LongNetLM,
    mesh_mean_loss,
    parallelize_longnet,
    shard_batch,
)

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional; lines are printed instead
    tqdm = None
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # loss.png is skipped without matplotlib
    plt = None

VALIDATION_SHARE = 20  # one file in 20 (by path hash) is validation


# ---------------------------------------------------------------------------- data


@dataclass
class Corpus:
    train: Tensor  # uint8 bytes
    validation: Tensor
    files: tuple[int, int]  # (training files, validation files)
    root: str


def load_corpus(root: str | None, suffix: str = ".py") -> Corpus:
    """Every file under ``root`` ending in ``suffix`` (the standard library by default),
    in sorted order, split into training and validation by path hash."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise SystemExit(f"--data {base}: not a folder.")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    paths = sorted(
        p for p in base.rglob(f"*{suffix}")
        if p.is_file() and not skip & set(p.relative_to(base).parts)
    )  # fmt: skip
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for p in paths:
        rel = p.relative_to(base).as_posix().encode()
        parts[zlib.crc32(rel) % VALIDATION_SHARE == 0].append(p.read_bytes() + b"\n\n")
    if not parts[False] or not parts[True]:
        raise SystemExit(
            f"--data {base}: found {len(paths)} '*{suffix}' files; need enough for both a "
            f"training and a validation split (one file in {VALIDATION_SHARE})."
        )

    def tensor(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return Corpus(tensor(parts[False]), tensor(parts[True]),
                  (len(parts[False]), len(parts[True])), str(base))  # fmt: skip


def training_batch(data: Tensor, step: int, dp_rank: int, batch: int, seq_len: int,
                   seed: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(inputs, targets)`` ``(batch, seq_len)`` int64 for one step: random windows whose
    offsets depend only on ``(seed, step, dp_rank)``."""
    if data.numel() < seq_len + 2:
        raise SystemExit(f"the training text has {data.numel()} bytes, fewer than --seq-len + 2.")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + dp_rank)
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def validation_batches(data: Tensor, windows: int, batch: int, seq_len: int):
    """``windows`` evenly spaced validation windows, ``batch`` at a time (the same every run)."""
    span = data.numel() - seq_len - 1
    if span < 1:
        raise SystemExit(f"the validation text has {data.numel()} bytes, fewer than --seq-len + 2.")
    starts = torch.linspace(0, span, windows).long().tolist()
    for i in range(0, len(starts), batch):
        w = torch.stack([data[s : s + seq_len + 1] for s in starts[i : i + batch]]).long()
        yield w[:, :-1], w[:, 1:]


# --------------------------------------------------------------------------- setup


def defaults(cpu: bool) -> dict[str, Any]:
    """Model and run sizes: small on the CPU, a real run on one GPU."""
    if cpu:
        return dict(embed_dim=64, num_heads=4, num_layers=2, seq_len=1024, batch_size=4,
                    steps=60, lr=3e-3, warmup=10, base_segment=128, eval_every=20,
                    eval_windows=8, checkpoint_every=20, dtype="float32")  # fmt: skip
    return dict(embed_dim=512, num_heads=8, num_layers=6, seq_len=65536, batch_size=1,
                steps=1000, lr=1e-3, warmup=50, base_segment=2048, eval_every=100,
                eval_windows=16, checkpoint_every=100, dtype="bfloat16")  # fmt: skip


def branches(seq_len: int, base: int) -> tuple[list[int], list[int]]:
    """LongNet's schedule: ``w = base * 2**i`` and ``r = 2**i`` up to the sequence length."""
    ws, rs = [], []
    w, r = min(base, seq_len), 1
    while True:
        ws.append(w)
        rs.append(r)
        if w >= seq_len:
            return ws, rs
        w, r = min(w * 2, seq_len), r * 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="examples/train_longnet.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo), small defaults")
    p.add_argument("--data", default=None, help="text folder (default: the standard library)")
    p.add_argument("--suffix", default=".py", help="file suffix read from --data")
    p.add_argument("--out", default="runs/longnet", help="folder for logs and checkpoints")
    p.add_argument("--sp", type=int, default=1, help="ranks each sequence is split over (ring)")
    p.add_argument("--attention", choices=("dilated", "dense"), default="dilated")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per data-parallel rank and step")
    p.add_argument("--steps", type=int)
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds of training (checkpointed)")  # fmt: skip
    p.add_argument("--stop-at", type=int, default=None,
                   help="exit after this step without saving, as a killed run would")  # fmt: skip
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0, help="attention and residual dropout")
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--base-segment", type=int, help="first segment length (w = base * 2**i)")
    p.add_argument("--segment-lengths", type=int, nargs="+")
    p.add_argument("--dilation-rates", type=int, nargs="+")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-windows", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--no-resume", action="store_true", help="start afresh even with a checkpoint")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    p.add_argument("--sample", type=int, default=0, help="print this many generated bytes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in defaults(args.cpu or not torch.cuda.is_available()).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.segment_lengths is None:
        args.segment_lengths, args.dilation_rates = branches(args.seq_len, args.base_segment)
    elif args.dilation_rates is None or len(args.dilation_rates) != len(args.segment_lengths):
        p.error("--segment-lengths needs --dilation-rates of the same length")
    args.command = shlex.join([sys.executable, *(sys.argv if argv is None else ["examples/train_longnet.py", *argv])])  # fmt: skip
    return args


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The model a checkpoint holds."""
    return dict(vocab_size=256, embed_dim=args.embed_dim, num_heads=args.num_heads,
                num_layers=args.num_layers, segment_lengths=list(args.segment_lengths),
                dilation_rates=list(args.dilation_rates), attention=args.attention,
                seq_len=args.seq_len, dtype=args.dtype, dropout=args.dropout)  # fmt: skip


def run_config(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model and the data stream."""
    return dict(model=model_config(args), seed=args.seed, batch_size=args.batch_size,
                data=str(args.data), suffix=args.suffix, sp=args.sp, processes=world)  # fmt: skip


def build_model(args: argparse.Namespace, device: torch.device) -> LongNetLM:
    cfg = model_config(args)
    dense = cfg["attention"] == "dense"
    return LongNetLM(
        cfg["vocab_size"], cfg["embed_dim"], cfg["num_heads"], cfg["num_layers"],
        None if dense else cfg["segment_lengths"], None if dense else cfg["dilation_rates"],
        attention=cfg["attention"], dropout=cfg["dropout"], device=device,
        dtype=getattr(torch, cfg["dtype"]),
    )  # fmt: skip


def learning_rate(step: int, seconds: float, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth over ``--steps`` or, when it comes
    first, over ``--time-budget`` seconds."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.time_budget is not None:
        t = max(t, seconds / args.time_budget)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --------------------------------------------------------------------------- state


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's random states: CPU, its own GPU, Python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def save_checkpoint(path: Path, model: LongNetLM, opt: torch.optim.Optimizer,
                    progress: dict[str, Any], run: dict[str, Any],
                    rng: list[dict[str, Any]]) -> None:  # fmt: skip
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "progress": progress, "rng": rng, "run": run}, tmp)  # fmt: skip
    os.replace(tmp, path)  # a run killed while saving keeps the previous checkpoint


def append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (a run killed after its last checkpoint
    logged steps that the resumed run computes again)."""
    kept = [r for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot(log: list[dict[str, Any]], path: Path, title: str) -> bool:
    if plt is None:
        return False
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] / math.log(2) for r in train],
            lw=0.8, alpha=0.7, label="training (bits per byte)")  # fmt: skip
    ax.plot([r["tokens"] / 1e6 for r in val], [r["val_bpb"] for r in val], "o-",
            label="validation (bits per byte)")  # fmt: skip
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- training


@dataclass
class Layout:
    device: torch.device
    mesh: Any  # DeviceMesh or None
    rank: int
    world: int
    dp_rank: int
    dp_size: int


def setup(args: argparse.Namespace) -> Layout:
    cpu = args.cpu or not torch.cuda.is_available()
    if "RANK" not in os.environ:  # one process
        if args.sp != 1:
            raise SystemExit(f"--sp {args.sp} needs {args.sp} processes: run it under torchrun.")
        return Layout(torch.device("cpu" if cpu else "cuda"), None, 0, 1, 0, 1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not cpu:
        torch.cuda.set_device(local)
    dist.init_process_group("gloo" if cpu else "nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.sp < 1 or world % args.sp:
        raise SystemExit(f"--sp {args.sp} must divide the {world} processes.")
    mesh = init_device_mesh("cpu" if cpu else "cuda", (world // args.sp, args.sp),
                            mesh_dim_names=("dp", "sp"))  # fmt: skip
    device = torch.device("cpu") if cpu else torch.device("cuda", local)
    return Layout(device, mesh, rank, world, mesh.get_local_rank("dp"), world // args.sp)


def average(value: Tensor, layout: Layout) -> float:
    """The mean of ``value`` over every rank."""
    value = value.detach().float().clone()
    if layout.world > 1:
        dist.all_reduce(value)
        value /= layout.world
    return float(value)


def agreed_seconds(seconds: float, layout: Layout) -> float:
    """The largest elapsed time over the ranks: every rank then takes the same
    learning rate and the same decision to evaluate or stop."""
    if layout.world == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=layout.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_rng_states(layout: Layout) -> list[dict[str, Any]]:
    """Every rank's random states, in rank order (a collective under torchrun)."""
    mine = rng_state(layout.device)
    if layout.world == 1:
        return [mine]
    states: list[Any] = [None] * layout.world
    dist.all_gather_object(states, mine)
    return states


def evaluate(model, corpus: Corpus, args: argparse.Namespace, layout: Layout) -> float:
    """Validation bits per byte over ``--eval-windows`` fixed windows."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in validation_batches(corpus.validation, args.eval_windows,
                                                  args.batch_size, args.seq_len):  # fmt: skip
            ids, tgt, pos = shard_batch(inputs.to(layout.device), targets.to(layout.device),
                                        layout.mesh)  # fmt: skip
            loss = mesh_mean_loss(model(ids, tgt, positions=pos, reduction="sum"), tgt,
                                  layout.mesh)  # fmt: skip
            total += average(loss, layout) * inputs.shape[0]
            count += inputs.shape[0]
    model.train()
    return total / count / math.log(2)


def train(args: argparse.Namespace) -> dict[str, Any]:
    layout = setup(args)
    main = layout.rank == 0
    out = Path(args.out)
    ckpt, log_path = out / "checkpoint.pt", out / "log.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.data, args.suffix)
    torch.manual_seed(args.seed)
    model = build_model(args, layout.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.95))  # fmt: skip
    progress = {"step": 0, "tokens": 0, "seconds": 0.0, "val_bpb": None}
    run = run_config(args, layout.world)
    resumed = False
    if ckpt.exists() and not args.no_resume:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["run"] != run:
            raise SystemExit(
                f"{ckpt} was written for another configuration ({state['run']}; this run: "
                f"{run}); pass another --out, or --no-resume to start afresh in this one."
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        progress = state["progress"]
        set_rng_state(state["rng"][layout.rank], layout.device)
        resumed = True
        if main:
            truncate_log(log_path, progress["step"])
    elif main and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    if progress["step"] >= args.steps:
        if main:
            print(f"{ckpt}: already trained for {progress['step']} steps (--steps {args.steps}); "
                  f"pass a larger --steps to train on, or another --out.")  # fmt: skip
        if layout.world > 1:
            dist.destroy_process_group()
        summary_path = out / "summary.json"
        return json.loads(summary_path.read_text()) if summary_path.exists() else {}
    params = model.num_parameters()
    trained = parallelize_longnet(
        model, layout.mesh, data_parallel="ddp",
        activation_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    tokens_per_step = args.batch_size * args.seq_len * layout.dp_size
    if main:
        where = f"{layout.world} process(es), sp={args.sp}" if layout.world > 1 else "1 process"
        print(f"corpus: {corpus.root}: {corpus.train.numel() / 1e6:.1f} MB training "
              f"({corpus.files[0]} files), {corpus.validation.numel() / 1e6:.2f} MB validation "
              f"({corpus.files[1]} files)", flush=True)  # fmt: skip
        branch_text = (f"segments {list(args.segment_lengths)} rates {list(args.dilation_rates)}"
                       if args.attention == "dilated" else "causal SDPA")  # fmt: skip
        print(f"model: LongNetLM {params / 1e6:.2f}M parameters, {args.attention} attention, "
              f"E={args.embed_dim} H={args.num_heads} L={args.num_layers}, "
              f"{branch_text}; "
              f"{args.dtype} on {layout.device.type}, {where}", flush=True)  # fmt: skip
        print(f"run: {args.steps} steps of {tokens_per_step:,} tokens (seq_len {args.seq_len:,}"
              f"){'; resumed at step ' + str(progress['step']) if resumed else ''}; "
              f"writing {out}/", flush=True)  # fmt: skip
    bar = None
    if main and tqdm is not None:
        bar = tqdm(total=args.steps, initial=progress["step"], unit="step", dynamic_ncols=True)
    started = time.perf_counter() - progress["seconds"]
    last_eval = progress["val_bpb"]
    while progress["step"] < args.steps:
        step = progress["step"]
        for group in opt.param_groups:
            group["lr"] = lr = learning_rate(step, progress["seconds"], args)
        inputs, targets = training_batch(corpus.train, step, layout.dp_rank, args.batch_size,
                                         args.seq_len, args.seed)  # fmt: skip
        ids, tgt, pos = shard_batch(inputs.to(layout.device), targets.to(layout.device),
                                    layout.mesh)  # fmt: skip
        t0 = time.perf_counter()
        loss = mesh_mean_loss(trained(ids, tgt, positions=pos, reduction="sum"), tgt, layout.mesh)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = average(loss, layout)  # also waits for the step to finish
        dt = time.perf_counter() - t0
        progress = {"step": step + 1, "tokens": progress["tokens"] + tokens_per_step,
                    "seconds": agreed_seconds(time.perf_counter() - started, layout),
                    "val_bpb": last_eval}  # fmt: skip
        record = {"step": step + 1, "loss": loss_value, "lr": lr,
                  "tokens": progress["tokens"], "tokens_per_s": tokens_per_step / dt,
                  "seconds": progress["seconds"], "memory_gib": memory_gib(layout.device)}  # fmt: skip
        if main:
            append_log(log_path, record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                mem=f"{record['memory_gib']:.1f}G")  # fmt: skip
                bar.update(1)
            else:
                print(f"step {step + 1}: loss {loss_value:.3f}, "
                      f"{record['tokens_per_s']:,.0f} tokens/s", flush=True)  # fmt: skip
        if progress["step"] == args.stop_at:  # as if killed: no evaluation, no checkpoint
            if layout.world > 1:
                dist.destroy_process_group()
            return {"stopped_at": progress["step"]}
        out_of_time = args.time_budget is not None and progress["seconds"] >= args.time_budget
        done = progress["step"] == args.steps or out_of_time
        if progress["step"] % args.eval_every == 0 or done:
            last_eval = progress["val_bpb"] = evaluate(trained, corpus, args, layout)
            if main:
                append_log(log_path, {"step": progress["step"], "tokens": progress["tokens"],
                                      "val_bpb": last_eval})  # fmt: skip
                (bar.write if bar is not None else print)(
                    f"step {progress['step']}: validation {last_eval:.3f} bits per byte"
                )
        if progress["step"] % args.checkpoint_every == 0 or done:
            rng = all_rng_states(layout)  # every rank's, gathered to all (a collective)
            if main:
                save_checkpoint(ckpt, model, opt, progress, run, rng)
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    log = read_log(log_path) if main else []
    steps = [r for r in log if "loss" in r]
    summary = {
        "device": torch.cuda.get_device_name(layout.device) if layout.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "command": args.command, "processes": layout.world, "sp": args.sp,
        "config": model_config(args), "parameters": params,
        "steps": progress["step"], "tokens": progress["tokens"],
        "train_seconds": progress["seconds"], "val_bpb": last_eval,
        "final_loss": steps[-1]["loss"] if steps else None,
        "tokens_per_s": (sum(r["tokens_per_s"] for r in steps[-10:]) / len(steps[-10:])
                         if steps else None),
        "peak_memory_gib": memory_gib(layout.device),
        "corpus": {"root": corpus.root, "train_bytes": corpus.train.numel(),
                   "validation_bytes": corpus.validation.numel(), "files": corpus.files},
    }  # fmt: skip
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        title = (f"LongNetLM {params / 1e6:.1f}M, {args.attention} attention, "
                 f"seq_len {args.seq_len:,}")  # fmt: skip
        if not args.no_plot and plot(log, out / "loss.png", title):
            print(f"wrote {out / 'loss.png'}")
        if last_eval is not None:
            print(f"validation: {last_eval:.3f} bits per byte after {progress['tokens']:,} tokens")
        if args.sample and layout.world == 1:
            prompt = corpus.validation[:64].long()[None].to(layout.device)
            model.eval()
            text = model.generate(prompt, args.sample, temperature=0.8, top_k=20)
            print("sample:\n" + bytes(text[0].tolist()).decode("utf-8", "replace"))
    if layout.world > 1:
        dist.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
