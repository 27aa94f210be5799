"""The RoSA schedule under its first name: :mod:`rosa.schedule` holds it."""

from .schedule import *  # noqa: F403
from .schedule import __all__ as __all__
