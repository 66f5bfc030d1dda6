"""dia2stream server: `python server.py` (the published Dia2-2B on a GPU, random `tiny` on CPU;
`--checkpoint` picks another, see --help)."""

import asyncio
import logging
import sys

from dia2stream.serve.config import parse_args
from dia2stream.serve.server import run
from vendor_dia2.checkpoint import CheckpointError

if __name__ == "__main__":
    config = parse_args()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(run(config)))  # 1 after an engine failure: the supervisor restarts us
    except KeyboardInterrupt:
        pass
    except CheckpointError as exc:  # a message for the user (no hub, no such directory), not a traceback
        raise SystemExit(f"server.py: {exc}") from None
