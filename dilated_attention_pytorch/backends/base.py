"""Backend protocol and registry (xformers-style: each backend declares what it supports).

A backend computes one plan's branches for local tensors and returns
``(out, lse)``; its backward takes ``(dout, q, k, v, out, lse)`` where ``out`` and
``lse`` are the *final mixed* output and log-sum-exp, so the gradient is the exact
gradient of the joint softmax over every branch's keys.

What a backend supports is data (:class:`Capabilities`): the base class turns it
into the reasons a call cannot run, and a backend adds only reasons of its own by
extending :meth:`Backend.why_not`. The tests are generated from the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..plan import DilatedPlan
from ..validation import check_backend_name

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
    packed: bool = False  # packed documents (cu_seqlens) in one row


@dataclass
class ForwardContext:
    """Per-call settings shared by a backend's forward and backward."""

    plan: DilatedPlan
    scale: float
    is_causal: bool = False
    dropout_p: float = 0.0
    key_padding_mask: Tensor | None = None  # (B, N) bool, True = padding
    seed: int = 0  # dropout seed, drawn once per forward so backward regenerates the same mask
    # Packed documents (B == 1): their lengths, for a backend with capabilities.packed.
    documents: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BlockOps:
    """A backend's attention of one block of queries against one block of keys.

    The ring (sequence parallelism) calls these for each block it receives.
    ``forward(q, k, v, *, scale, causal) -> (out, lse)`` with q ``(Bb, Lq, Hs, D)``,
    k/v ``(Bb, Lk, Hs, D)``, out ``(Bb, Lq, Hs, D)``, lse ``(Bb, Lq, Hs)``;
    ``backward(dout, q, k, v, out, lse, *, scale, causal) -> (dq, dk, dv)`` given the
    *final* merged out/lse. ``causal`` aligns both blocks at position 0.
    """

    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, as data.

    Attributes:
        dtypes: per device type (``"cpu"``, ``"cuda"``), the input dtypes it runs; a
            device type not listed is not supported.
        head_dims: the head dims it runs, ``None`` for any.
        causal, key_padding_mask, dropout: whether it implements these options.
        block_ops: whether it exposes :class:`BlockOps` for the ring.
        packed: whether its forward and backward take packed documents
            (``ForwardContext.documents``) in one call; for other backends
            ``dilated_attention`` runs one call per document.
        tolerances: per dtype, ``(atol, rtol)`` of its output and gradients against
            the float64 dense oracle on the tests' small random inputs.
    """

    dtypes: Mapping[str, tuple[torch.dtype, ...]]
    head_dims: tuple[int, ...] | None = None
    causal: bool = True
    key_padding_mask: bool = True
    dropout: bool = True
    block_ops: bool = False
    packed: bool = False
    tolerances: Mapping[torch.dtype, tuple[float, float]] = field(default_factory=dict)

    @property
    def device_types(self) -> tuple[str, ...]:
        return tuple(self.dtypes)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


class Backend:
    """Base class. Subclasses set ``name``, ``priority`` (higher is tried first by
    ``auto``) and ``capabilities``, and implement :meth:`forward` / :meth:`backward`."""

    name: str = "base"
    priority: int = 0
    capabilities: Capabilities = Capabilities(dtypes={})
    # The unit of the LSE pair :meth:`forward` returns, in nats: the LSE is
    # ``(pair[0] + pair[1]) * lse_unit`` (1 for natural logs, ln 2 for log2 units).
    lse_unit: float = 1.0

    def why_not(self, call: AttentionCall) -> list[str]:
        """Reasons this backend cannot run ``call``; empty when it can.

        Derived from :attr:`capabilities`; a subclass extends it with reasons the
        declaration cannot express (calling ``super().why_not(call)`` first).
        """
        caps = self.capabilities
        reasons = []
        dtypes = caps.dtypes.get(call.device_type)
        if dtypes is None:
            reasons.append(
                f"{self.name} runs on {' or '.join(caps.device_types)} devices, got "
                f"{call.device_type!r}"
            )
        elif call.dtype not in dtypes:
            reasons.append(
                f"{self.name} on {call.device_type} runs {_names(dtypes)} inputs, got {call.dtype}"
            )
        if caps.head_dims is not None and call.head_dim not in caps.head_dims:
            reasons.append(f"{self.name} needs head_dim in {caps.head_dims}, got {call.head_dim}")
        if call.is_causal and not caps.causal:
            reasons.append(f"{self.name} does not implement is_causal=True")
        if call.key_padding_mask and not caps.key_padding_mask:
            reasons.append(f"{self.name} does not implement key_padding_mask")
        if call.dropout and not caps.dropout:
            reasons.append(
                f"{self.name} does not implement dropout; pass dropout_p=0.0 or use another backend"
            )
        return reasons

    def auto_priority(self, call: AttentionCall) -> int:
        """Rank of this backend for ``backend="auto"`` on ``call`` (higher is tried first).

        Defaults to ``priority``; a backend overrides it where measurements show that
        another backend is faster for some calls it supports.
        """
        return self.priority

    def block_ops(self) -> BlockOps | None:
        """The block primitive the ring calls, or ``None`` (``capabilities.block_ops`` False)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        """q, k, v: ``(B, N, H, D)`` -> ``out (B, N, H, D)`` in q.dtype and the LSE as a pair
        ``(2, B, N, H)``: ``lse = (pair[0] + pair[1]) * lse_unit``, ``pair[0]`` a block's own
        LSE (or score maximum), ``pair[1]`` the log of the mixing sum relative to it (see
        :func:`~dilated_attention_pytorch.segments.merge_lse_`); ``(-inf, 0)`` for rows
        with no key."""
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
        """Gradients of q, k, v given the final ``out`` and LSE pair of :meth:`forward`."""
        raise NotImplementedError

    def backward_into(
        self,
        grads: tuple[Tensor, Tensor, Tensor],
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: ForwardContext,
    ) -> None:
        """:meth:`backward`, written into ``grads = (dq, dk, dv)`` (shaped like q, k, v, in
        their dtype; any token-major strides with a unit stride on the head dim, e.g.
        slices of one buffer). This default copies :meth:`backward`'s results; a backend
        overrides it to write in place."""
        for target, grad in zip(grads, self.backward(dout, q, k, v, out, lse, ctx), strict=True):
            target.copy_(grad)


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the registered backends, fastest first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def get_backend(name: str | Backend) -> Backend:
    """The registered backend called ``name`` (a :class:`Backend` instance is returned as is)."""
    if isinstance(name, Backend):
        return name
    check_backend_name(name, available_backends())
    if name == "auto":
        raise ValueError("get_backend needs a backend name, not 'auto'; use select_backend.")
    return _REGISTRY[name]


@dataclass(frozen=True)
class BackendChoice:
    """Which backend ``backend="auto"`` runs for a call, and why the faster ones do not.

    ``str(choice)`` reads e.g. ``"pytorch (triton: triton runs on cuda devices, got 'cpu', ...)"``.
    """

    name: str
    skipped: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (faster backend, its reasons)

    def __str__(self) -> str:
        if not self.skipped:
            return self.name
        why = "; ".join(f"{n}: {', '.join(r)}" for n, r in self.skipped)
        return f"{self.name} ({why})"


def choose_backend(name: str | Backend, call: AttentionCall) -> BackendChoice:
    """The backend ``name`` resolves to for ``call``, with the reasons faster ones were passed
    over (only for ``"auto"``). Raises like :func:`select_backend`."""
    if name != "auto":
        return BackendChoice(select_backend(name, call).name)
    skipped: list[tuple[str, tuple[str, ...]]] = []
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.auto_priority(call)):
        why = backend.why_not(call)
        if not why:
            return BackendChoice(backend.name, tuple(skipped))
        skipped.append((backend.name, tuple(why)))
    details = "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped)
    raise ValueError(f"no backend supports this call ({details}).")


def select_backend(name: str | Backend, call: AttentionCall) -> Backend:
    """Pick the backend for ``call``.

    ``"auto"`` takes the backend with the highest :meth:`Backend.auto_priority` that
    supports the call and logs the choice at DEBUG level (:func:`choose_backend` also
    says why faster backends were passed over). An explicitly named backend (or a
    :class:`Backend` instance, e.g. ``PyTorchBackend(kernel="flash")``) that cannot run
    raises one ``ValueError`` listing its reasons; there is no silent fallback.
    """
    if name == "auto":
        choice = choose_backend(name, call)
        if not torch.compiler.is_compiling():  # logging would break a compiled graph
            logger.debug("backend='auto' chose %r for %s; %s", choice.name, call, choice)
        return _REGISTRY[choice.name]
    backend = get_backend(name)
    why = backend.why_not(call)
    if why:
        raise ValueError(
            f"backend {backend.name!r} cannot run this call: {'; '.join(why)}. "
            f"Use backend='auto' or one of {available_backends()}."
        )
    return backend
