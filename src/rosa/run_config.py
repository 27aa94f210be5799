"""Moved to :mod:`rosa.app.run_config`; this name is an alias of it, kept for scripts that import ``rosa.run_config``."""

import sys

from .app import run_config

sys.modules[__name__] = run_config
