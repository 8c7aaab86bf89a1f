"""``python -m aggtree``: the ``aggtree`` command line (see :mod:`aggtree.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
