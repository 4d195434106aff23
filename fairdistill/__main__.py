"""``python -m fairdistill ...`` is the ``fair`` command."""

import sys

from fairdistill.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
