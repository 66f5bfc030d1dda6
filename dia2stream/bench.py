"""The old name of `dia2stream.tools.bench`: `python -m dia2stream.bench` keeps working."""

import sys

from dia2stream.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
