"""The mask API under its first name: :mod:`rosa.mask` is where it lives.

``rosa_layers`` here is :func:`rosa.mask.mask_layers` (layers by canonical name, for one adapter), not
:func:`rosa.rosa_layers` (every RoSA layer by full module name).
"""

from .mask import *  # noqa: F403
from .mask import __all__ as _mask_all
from .mask import mask_layers as rosa_layers

__all__ = [*_mask_all, "rosa_layers"]
