"""dia2stream server: `python server.py --checkpoint tiny --port 8765` (see --help)."""

import asyncio
import logging
import sys

from dia2stream.serve.config import parse_args
from dia2stream.serve.server import run

if __name__ == "__main__":
    config = parse_args()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(run(config)))  # 1 after an engine failure: the supervisor restarts us
    except KeyboardInterrupt:
        pass
