"""What the ElevenLabs adapter costs the event loop per 80 ms frame, per output format: encode
(resample, G.711 or MP3), alignment and JSON, on this machine's CPU (docs/compat.md).

    python scripts/compat_frame_cost.py
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dia2stream.call.call import AudioFrame  # noqa: E402
from dia2stream.wire import protocol as p  # noqa: E402
from dia2stream.wire.compat import adapter_for  # noqa: E402

FRAMES = 500

for fmt in ("pcm_24000", "pcm_16000", "ulaw_8000", "mp3_22050_32", "mp3_44100_128"):
    adapter = adapter_for(f"/v1/text-to-speech/default/multi-stream-input?output_format={fmt}", [])
    adapter.receive(json.dumps({"text": "Hello there. ", "context_id": "c"}))
    adapter.translate(p.Started(id=1, position=0))
    frame = AudioFrame((np.random.default_rng(0).standard_normal(1920) * 0.1).astype(np.float32), 0, 0)
    t0 = time.perf_counter()
    for i in range(FRAMES):
        if i % 4 == 0:  # a word every 4 frames, about speech's rate
            adapter.translate(p.Word(id=1, word="hello", start_s=0, frame=0))
        adapter.translate(frame)
    print(f"{fmt}: {(time.perf_counter() - t0) / FRAMES * 1000:.3f} ms per 80 ms frame")
