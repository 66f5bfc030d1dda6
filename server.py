"""dia2stream server: `python server.py` (the published Dia2-2B on a GPU, random `tiny` on CPU;
`--checkpoint` picks another, see --help).

A bad flag is `server.py: error: ...` and exit status 2 (serve/config.py checks what it can before
anything starts); a server that cannot start (a port in use, a checkpoint that cannot be found, a
voice that cannot be loaded) says why in one line and exits 1 (2 for a setting the model refuses);
the traceback is logged at DEBUG (`--log-level DEBUG`). A failure after start-up keeps its traceback."""

import asyncio
import concurrent.futures
import logging
import sys

from dia2stream.serve.config import parse_args
from dia2stream.serve.server import StartupError, run
from dia2stream.voices.voice import VoiceError
from vendor_dia2.checkpoint import CheckpointError

log = logging.getLogger("dia2stream")


def main() -> int:
    config = parse_args()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started: concurrent.futures.Future = concurrent.futures.Future()  # the port, once every port is bound
    try:
        return asyncio.run(run(config, ready=started))  # 1 after an engine failure: the supervisor restarts us
    except KeyboardInterrupt:
        return 0
    except CheckpointError as exc:  # a message for the user (no hub, no such directory), not a traceback
        return _cannot_start(exc, f"server.py: {exc}")
    except StartupError as exc:
        return _cannot_start(exc, f"server.py: error: {exc}", status=2 if exc.usage else 1)
    except Exception as exc:
        if started.done() and not started.cancelled() and started.exception() is None:
            raise  # it had started: a fault, whose traceback says where
        if isinstance(exc, VoiceError):  # a --voice preload (with the engine in this process)
            return _cannot_start(exc, f"server.py: error: --voice: {exc.message}")
        reason = " ".join(str(exc).split()) or type(exc).__name__  # one line
        return _cannot_start(exc, f"server.py: error: could not start: {reason}")


def _cannot_start(exc: BaseException, message: str, status: int = 1) -> int:
    log.debug("start-up failed", exc_info=exc)
    print(message, file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
