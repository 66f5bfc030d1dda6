"""The old name of `dia2stream.tools.demo`: `python -m dia2stream.demo` keeps working."""

import sys

from dia2stream.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
