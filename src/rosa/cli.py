"""``python -m rosa.cli`` runs the ``rosa`` command (the console script starts in :mod:`rosa_cli`).

Python imports the ``rosa`` package (and so PEFT and bitsandbytes) before this module, so lines those libraries log
while being imported appear even under -q; ``rosa`` and ``python -m rosa_cli`` set their loggers first.
"""

import sys

from .app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
