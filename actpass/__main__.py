"""``python -m actpass``: the same as the ``actpass`` console script."""

import sys

from actpass.cli import main

if __name__ == "__main__":
    sys.exit(main())
