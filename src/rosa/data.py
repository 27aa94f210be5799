"""Moved to :mod:`rosa.app.data`; this name is an alias of it, kept for scripts that import ``rosa.data``."""

import sys

from .app import data

sys.modules[__name__] = data
