"""``python -m serve_app.k8s``: the command line of `serve_app.k8s.cli`."""

import sys

from serve_app.k8s.cli import main

if __name__ == "__main__":
    sys.exit(main())
