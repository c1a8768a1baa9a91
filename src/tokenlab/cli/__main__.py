"""``python -m tokenlab.cli`` (and ``torchrun -m tokenlab.cli``) runs the ``tokenlab`` command."""

import sys

from tokenlab.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
