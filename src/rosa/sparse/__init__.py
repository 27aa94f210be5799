"""Sparse support and the three sparse operations of RoSA (forward SpMM, transposed SpMM, SDDMM).

:mod:`rosa.sparse.delta` (the sparse part of an adapter, as a layer holds it) is imported on its own: it needs
PEFT, and the kernels do not."""

from . import ops
from .support import (
    Support,
    SupportError,
    empty_support,
    support_from_coo,
    support_from_csr,
    support_from_flat_index,
    support_from_mask,
    validate_csr,
)

__all__ = [
    "Support",
    "SupportError",
    "empty_support",
    "ops",
    "support_from_coo",
    "support_from_csr",
    "support_from_flat_index",
    "support_from_mask",
    "validate_csr",
]
