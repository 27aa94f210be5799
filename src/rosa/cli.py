"""``python -m rosa.cli`` runs the ``rosa`` command (the console script starts in :mod:`rosa_cli`)."""

import sys

from .app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
