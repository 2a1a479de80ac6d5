"""LongNet dilated attention and ring (sequence-parallel) dilated attention for PyTorch."""

from .backends import available_backends
from .functional import dilated_attention
from .plan import DilatedPlan, make_plan
from .reference import dense_dilated_attention

__version__ = "0.1.0"

__all__ = [
    "DilatedPlan",
    "available_backends",
    "dense_dilated_attention",
    "dilated_attention",
    "make_plan",
]
