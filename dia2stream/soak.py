"""The old name of `dia2stream.tools.soak`: `python -m dia2stream.soak` keeps working."""

import sys

from dia2stream.tools.soak import main

if __name__ == "__main__":
    sys.exit(main())
