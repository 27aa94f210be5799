"""``rosa`` (the console script) and ``python -m rosa.cli`` run :func:`rosa.app.cli.main`."""

import sys

from .app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
