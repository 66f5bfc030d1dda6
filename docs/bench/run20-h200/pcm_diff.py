"""Diagnosis (run 20b): the CUDA comparisons had equal tokens, words and events but PCM apart by
more than 1e-5. How far apart, and is it there with the same settings run twice?"""
import sys
sys.path.insert(0, "tests")
import numpy as np
from dia2stream.serve.config import CompileMode, KernelChoice
from test_step_in_flight import run_conversations
from vendor_dia2 import Dia2
from vendor_dia2.checkpoint import write_random_checkpoint
from vendor_dia2.config import preset

path = write_random_checkpoint(preset("tiny"), __import__("pathlib").Path("/tmp/cktiny"))
tts = Dia2.from_pretrained(str(path), device="cuda", mimi="random-small")
settings = dict(context_frames=80, rollover_frames=30, min_turn_frames=20, kernels=KernelChoice.TORCH,
                compile=CompileMode.OFF)


def diff(a, b):
    same_tokens = all(np.array_equal(x["text"], y["text"]) and x["events"] == y["events"] for x, y in zip(a, b))
    d = [float(np.abs(p - q).max()) for x, y in zip(a, b) for p, q in zip(x["pcm"], y["pcm"])]
    peak = max(float(np.abs(p).max()) for x in a for p in x["pcm"])
    return f"tokens/events same: {same_tokens}; frames {len(d)}; PCM max |diff| {max(d):.2e}, frames over 1e-5: {sum(v > 1e-5 for v in d)}, PCM peak {peak:.3f}"


off1 = run_conversations(tts, "off", **settings)
off2 = run_conversations(tts, "off", **settings)
on = run_conversations(tts, "on", **settings)
beside = run_conversations(tts, "on", decode_stream="on", **settings)
print("off vs off:           ", diff(off1, off2), flush=True)
print("flight on vs off:     ", diff(on, off1), flush=True)
print("decode beside vs not: ", diff(beside, on), flush=True)
