"""Moved to :mod:`rosa.app.train`; this name is an alias of it, kept for scripts that import ``rosa.train``."""

import sys

from .app import train

sys.modules[__name__] = train
