"""``python -m loadtest.plan``: the command line of `loadtest.plan.cli`."""

import sys

from loadtest.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
