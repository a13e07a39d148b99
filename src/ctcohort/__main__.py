"""``python -m ctcohort``: the same as the ``ctcohort`` command."""

import sys

from ctcohort.cli import main

if __name__ == "__main__":  # nnU-Net starts worker processes that re-import the main module
    sys.exit(main())
