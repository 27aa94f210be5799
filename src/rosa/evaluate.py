"""Moved to :mod:`rosa.app.evaluate`; this name is an alias of it, kept for scripts that import ``rosa.evaluate``."""

import sys

from .app import evaluate

sys.modules[__name__] = evaluate
