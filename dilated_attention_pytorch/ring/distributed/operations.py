"""``DistributedRingAttention``: the ring plus what operating it at scale needs.

Monitoring (bytes, ring steps, calls, time waiting for transfers and computing
blocks, peak memory), activation checkpointing of the ring (its forward is
recomputed in the backward instead of keeping its saved tensors), DeepSpeed's
activation checkpointing when asked for, and bounded waits on other ranks.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import Tensor

from ...distributed.comm import RingStats
from ...validation import check_bool
from ..standard import StandardRingAttention

__all__ = ["DistributedRingAttention"]


def _deepspeed_checkpointing() -> Any:
    try:
        return importlib.import_module("deepspeed.checkpointing")
    except ImportError as exc:
        raise ImportError(
            "use_deepspeed=True needs DeepSpeed: install it with `pip install deepspeed` "
            "(or pass use_deepspeed=False to use PyTorch's activation checkpointing)."
        ) from exc


class DistributedRingAttention(StandardRingAttention):
    """:class:`StandardRingAttention` (``(B, N, H, D)``) with monitoring, checkpointing and timeouts.

    Computes exactly what :class:`StandardRingAttention` computes (same arguments,
    same ``forward(query, key, value, is_causal, key_padding_mask, *, already_split)``
    on ``(B, N, H, D)``), and adds:

    Args:
        enable_monitoring: count what the ring does on this rank; read it with
            :meth:`get_communication_stats`, clear it with :meth:`reset_communication_stats`.
        use_checkpointing: do not keep the ring's saved tensors for the backward; the
            ring forward (with its transfers) runs again during the backward. Inside a
            multi-head layer this frees little (the projections and the norm keep the
            attention's inputs and output for their own backward; measured on an H200:
            0.19 GiB of 74.6 GiB for 4 layers at 1M tokens, 1.24x the time); checkpoint
            whole layers with ``torch.utils.checkpoint`` to save activations (30 GiB
            there, 1.30x the time; ``benchmarks/bench_memory.py``).
        use_deepspeed: checkpoint through ``deepspeed.checkpointing`` (needs DeepSpeed;
            an ``ImportError`` says how to install it otherwise). Implies checkpointing.
        timeout: seconds each wait on another rank may take before a ``RuntimeError``
            naming the rank that did not answer, the branch and the ring step (``None``:
            the process group's timeout); as in :class:`StandardRingAttention`.
        segment_lengths, dilation_rates, dropout, ring_size, process_group,
            branch_mixing, scale, backend, validate, layout: as in
            :class:`StandardRingAttention`.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        dropout: float = 0.0,
        ring_size: int | None = None,
        enable_monitoring: bool = True,
        use_checkpointing: bool = False,
        use_deepspeed: bool = False,
        timeout: float | None = None,
        layout: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        branch_mixing: str = "softmax",
        scale: float | None = None,
        backend: str = "auto",
        validate: str = "once",
    ) -> None:
        super().__init__(
            segment_lengths,
            dilation_rates,
            dropout=dropout,
            ring_size=ring_size,
            process_group=process_group,
            branch_mixing=branch_mixing,
            scale=scale,
            backend=backend,
            validate=validate,
            timeout=timeout,
            layout=layout,
        )
        self.enable_monitoring = check_bool("enable_monitoring", enable_monitoring)
        self.use_deepspeed = check_bool("use_deepspeed", use_deepspeed)
        self.use_checkpointing = check_bool("use_checkpointing", use_checkpointing) or (
            self.use_deepspeed
        )
        self._checkpoint = _deepspeed_checkpointing().checkpoint if self.use_deepspeed else None
        self._stats = RingStats() if self.enable_monitoring else None
        self._peak_device: torch.device | None = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        *,
        already_split: bool = False,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | Tensor | None = None,
    ) -> Tensor:
        """As :meth:`StandardRingAttention.forward`, checkpointed when asked for."""
        if isinstance(query, Tensor):
            self._peak_device = query.device
        run = super().forward
        kwargs = dict(
            is_causal=is_causal, key_padding_mask=key_padding_mask, already_split=already_split,
            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        )  # fmt: skip
        if not self.use_checkpointing or not torch.is_grad_enabled():
            return run(query, key, value, **kwargs)
        if self._checkpoint is not None:
            return self._checkpoint(lambda q, k, v: run(q, k, v, **kwargs), query, key, value)
        return torch.utils.checkpoint.checkpoint(
            run, query, key, value, use_reentrant=False, **kwargs
        )

    def _agreed_settings(self, seq_len: int | None) -> str:
        # Checkpointing runs the ring again in the backward: ranks must agree on it where
        # it takes effect (gradients on), or one would wait for the other's second pass.
        return f"use_checkpointing={self.use_checkpointing and torch.is_grad_enabled()}"

    def _runs_projected_node(self) -> bool:
        # With use_checkpointing the checkpoint wraps this module's forward: the layer
        # runs separate nodes.
        return not self.use_checkpointing

    def _projected_call(
        self, x: Tensor, weights: tuple, biases: tuple, **kwargs: Any
    ) -> Tensor | None:
        """The multi-head layer's recomputing node
        (:meth:`StandardRingAttention._projected_call`), counted by the monitor; ``None``
        (the layer then runs separate nodes) with ``use_checkpointing``, whose
        checkpoint wraps this module's forward."""
        if not self._runs_projected_node():
            return None
        self._peak_device = x.device
        return super()._projected_call(x, weights, biases, **kwargs)

    def get_communication_stats(self) -> dict[str, Any]:
        """What the ring did on this rank since construction or the last reset.

        Keys: ``bytes_sent``, ``bytes_received`` (P2P payload: K/V blocks, dK/dV
        accumulators and, with ``already_split=False``, the shards gathered over the
        ring), ``ring_steps`` (forward and backward loop steps), ``calls`` (ring calls;
        a checkpointed forward counts again when it is recomputed), ``comm_wait_seconds``
        and ``compute_seconds`` (CUDA events on a GPU, wall clock on the CPU),
        ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated`` on CUDA, ``None``
        on the CPU).

        Raises:
            ValueError: monitoring is off (``enable_monitoring=False``).
        """
        if self._stats is None:
            raise ValueError(
                "monitoring is off for this module; construct it with enable_monitoring=True "
                "to collect communication statistics."
            )
        stats: dict[str, Any] = dict(self._stats.as_dict())
        device = self._peak_device
        on_cuda = device is not None and device.type == "cuda"
        stats["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if on_cuda else None
        return stats

    def reset_communication_stats(self) -> None:
        """Start counting again from zero (and reset CUDA's peak memory counter)."""
        if self._stats is not None:
            self._stats.reset()  # in place: a compiled module keeps counting into it
        if self._peak_device is not None and self._peak_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._peak_device)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, enable_monitoring={self.enable_monitoring}, "
            f"use_checkpointing={self.use_checkpointing}, use_deepspeed={self.use_deepspeed}, "
            f"timeout={self.timeout}"
        )
