"""The old name of `dia2stream.tools.load`: `python -m dia2stream.load` keeps working."""

import sys

from dia2stream.tools.load import main

if __name__ == "__main__":
    sys.exit(main())
