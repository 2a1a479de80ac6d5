"""Backend protocol and registry (xformers-style: each backend says why it cannot run).

A backend computes one plan's branches for local tensors and returns
``(out, lse)``; its backward takes ``(dout, q, k, v, out, lse)`` where ``out`` and
``lse`` are the *final mixed* output and log-sum-exp, so the gradient is the exact
gradient of the joint softmax (DESIGN.md section 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..plan import DilatedPlan

logger = logging.getLogger("dilated_attention_pytorch")


@dataclass(frozen=True)
class AttentionCall:
    """Everything a backend needs to decide whether it can run a call."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    is_causal: bool
    dropout: bool
    key_padding_mask: bool
    plan: DilatedPlan
    requires_grad: bool = False  # a backward will follow (grad mode on, an input needs grad)


@dataclass
class ForwardContext:
    """Per-call settings shared by a backend's forward and backward."""

    plan: DilatedPlan
    scale: float
    is_causal: bool = False
    dropout_p: float = 0.0
    key_padding_mask: Tensor | None = None  # (B, N) bool, True = padding
    seed: int = 0  # dropout seed, drawn once per forward so backward regenerates the same mask


class Backend:
    """Base class. Subclasses set ``name`` and ``priority`` (higher is tried first by ``auto``)."""

    name: str = "base"
    priority: int = 0

    def why_not(self, call: AttentionCall) -> list[str]:
        """Reasons this backend cannot run ``call``; empty when it can."""
        raise NotImplementedError

    def auto_priority(self, call: AttentionCall) -> int:
        """Rank of this backend for ``backend="auto"`` on ``call`` (higher is tried first).

        Defaults to ``priority``; a backend overrides it where measurements show that
        another backend is faster for some calls it supports.
        """
        return self.priority

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        """q, k, v: ``(B, N, H, D)`` -> ``out (B, N, H, D)`` in q.dtype, ``lse (B, N, H)``."""
        raise NotImplementedError

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: ForwardContext,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of q, k, v given the final ``out`` and ``lse`` of :meth:`forward`."""
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the registered backends, fastest first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are {['auto', *available_backends()]}."
        )
    return _REGISTRY[name]


def select_backend(name: str, call: AttentionCall) -> Backend:
    """Pick the backend for ``call``.

    ``"auto"`` takes the highest-priority backend that supports the call and logs
    the choice at DEBUG level. An explicitly named backend that cannot run raises
    one ``ValueError`` listing its reasons; there is no silent fallback.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__} {name!r}.")
    if name == "auto":
        reasons: dict[str, list[str]] = {}
        for backend in sorted(_REGISTRY.values(), key=lambda b: -b.auto_priority(call)):
            why = backend.why_not(call)
            if not why:
                logger.debug("backend='auto' chose %r for %s", backend.name, call)
                return backend
            reasons[backend.name] = why
        details = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
        raise ValueError(f"no backend supports this call ({details}).")
    backend = get_backend(name)
    why = backend.why_not(call)
    if why:
        raise ValueError(
            f"backend {name!r} cannot run this call: {'; '.join(why)}. "
            f"Use backend='auto' or one of {available_backends()}."
        )
    return backend
