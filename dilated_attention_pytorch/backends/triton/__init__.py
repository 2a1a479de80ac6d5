"""The ``triton`` backend: fused Triton kernels on CUDA (and on CPU through Triton's
interpreter, for tests).

- :mod:`.kernels`: the ``@triton.jit`` kernels;
- :mod:`.launch`: tile configs, launches, the plan driver and the ring's block ops;
- :mod:`.backend`: :class:`TritonBackend`, registered here as ``"triton"``.

``backends/__init__.py`` imports this package only when Triton is installed.
"""

from ..base import register_backend
from .backend import TritonBackend
from .launch import (
    KernelConfig,
    dilated_backward,
    dilated_forward,
    interpreting,
    triton_block_backward,
    triton_block_forward,
)

__all__ = [
    "KernelConfig",
    "TritonBackend",
    "dilated_backward",
    "dilated_forward",
    "interpreting",
    "triton_block_backward",
    "triton_block_forward",
]

register_backend(TritonBackend())
